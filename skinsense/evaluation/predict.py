"""Forward passes: a model folder loaded once, and its logits and features on a cached part
or on the reference photos.

Everything the evaluation derives (temperature, referral threshold, gate, metrics,
subgroups, the reference-photo figures) comes from these arrays, so one architecture's
evaluation reads its weights once (`LoadedModel.load`) and runs each part through the
network once (`split_outputs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from skinsense.data.records import CachedSplit
from skinsense.labels import CLASS_CODES
from skinsense.lifecycle.packaging import ModelCard, load_model_dir
from skinsense.models import LogitsAndFeatures
from skinsense.presets import make_preset
from skinsense.trust.calibration import calibrated_probabilities


@dataclass
class LoadedModel:
    """A model folder read once: the network (eval mode), its card and where it lives.

    The card is the one in memory that the evaluation completes and writes back once
    (`skinsense.evaluation.architecture`); the network moves to the GPU, if there is one,
    for the forward passes (`to_cpu` brings it back for the ONNX export and the predictor).
    """

    model_dir: Path
    model: torch.nn.Module
    card: ModelCard

    @classmethod
    def load(cls, model_dir: Path) -> LoadedModel:
        """Read the card and the weights of a model folder (see `skinsense.lifecycle.packaging`)."""
        model, card = load_model_dir(Path(model_dir))
        return cls(model_dir=Path(model_dir), model=model, card=card)

    @cached_property
    def weights_sha256(self) -> str:
        """SHA-256 of the weights file (what the gate and the ONNX exports record)."""
        from skinsense.lifecycle.export import weights_sha256

        return weights_sha256(self.model_dir)

    @cached_property
    def device(self) -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @cached_property
    def network(self) -> LogitsAndFeatures:
        """Logits and penultimate features from one pass, on `device`, channels last."""
        return LogitsAndFeatures(self.model).to(self.device,
                                                memory_format=torch.channels_last).eval()

    def to_cpu(self) -> torch.nn.Module:
        """The network back on the CPU in the default memory format (as `load_model_dir`
        gives it), e.g. for the ONNX export after the forward passes."""
        self.model.to("cpu", memory_format=torch.contiguous_format)
        self.__dict__.pop("network", None)
        return self.model


@dataclass
class SplitOutputs:
    """One pass of a model over a part: what every later figure is derived from."""

    logits: np.ndarray        # (N, 7) float32, averaged over the flips with tta
    features: np.ndarray      # (N, D) float32, the classifier head's input, of the image itself
    plain_logits: np.ndarray  # (N, 7) of the image itself, as served (`logits` without tta)
    labels: np.ndarray        # (N,) class indices in CLASS_CODES order


def _flip_views(batch: torch.Tensor) -> list[torch.Tensor]:
    # Dermatoscopy has no canonical orientation, so flipped views are equally valid inputs.
    return [batch, torch.flip(batch, dims=(3,)), torch.flip(batch, dims=(2,))]


def forward_batches(loaded: LoadedModel, batches, *, tta: bool = False
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits, penultimate features and plain logits of uint8 (B, H, W, 3) batches, on the
    GPU if any. The plain logits are those of the image itself (one view, as served): the
    same array as the logits without tta, the first of the views with it."""
    # The network moves to its device outside inference mode: its parameters stay ordinary
    # tensors, which the ONNX export and the predictor can use afterwards.
    device, split = loaded.device, loaded.network
    preset = make_preset("eval", mean=loaded.card.mean, std=loaded.card.std).to(device)
    with torch.inference_mode():
        return _forward(split, preset, device, batches, tta=tta)


def _forward(split: LogitsAndFeatures, preset, device: torch.device, batches, *, tta: bool
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    logits_out, features_out, plain_out = [], [], []
    for images in batches:
        batch = torch.from_numpy(images).permute(0, 3, 1, 2).to(device)
        views = _flip_views(batch) if tta else [batch]
        outputs = [split(preset(v)) for v in views]
        logits_out.append(torch.stack([o[0].float() for o in outputs]).mean(dim=0).cpu())
        # The gate judges the image as served: one view, no flips.
        features_out.append(outputs[0][1].float().cpu())
        if tta:
            plain_out.append(outputs[0][0].float().cpu())
    if not logits_out:
        empty = np.zeros((0, len(CLASS_CODES)), dtype=np.float32)
        return empty, np.zeros((0, split.feature_dim), dtype=np.float32), empty
    logits = torch.cat(logits_out).numpy().astype(np.float32, copy=False)
    plain = torch.cat(plain_out).numpy().astype(np.float32, copy=False) if tta else logits
    return logits, torch.cat(features_out).numpy().astype(np.float32, copy=False), plain


def split_outputs(loaded: LoadedModel, split: CachedSplit, *, batch_size: int = 64,
                  tta: bool = False, rows: np.ndarray | None = None) -> SplitOutputs:
    """Logits and penultimate features of a loaded model on a cached part, in one pass.

    Args:
        loaded: the model (see `LoadedModel.load`).
        split: a cached part at the model's input size.
        batch_size: images per forward pass.
        tta: average the logits over the image, its horizontal and its vertical flip.
            Logits rather than probabilities are averaged so that temperature scaling, which
            divides them, keeps the predicted class of the averaged prediction too. The
            features and `plain_logits` are always those of the image itself (what the
            served model and gate see), from the same pass.
        rows: only these rows of the part (default: all), in this order.

    Raises:
        ValueError: the cache was built at another size than the model takes.
    """
    card = loaded.card
    if card.image_size != split.size:
        raise ValueError(
            f"model in {loaded.model_dir} takes {card.image_size} px inputs but the cache "
            f"holds {split.size} px images; build the cache at {card.image_size} px"
        )
    images = np.load(split.images_npy, mmap_mode="r")
    order = np.arange(len(images)) if rows is None else np.asarray(rows, dtype=np.int64)
    # Copies: torch refuses to wrap the read-only memory map without a warning.
    batches = (np.array(images[order[start:start + batch_size]])
               for start in range(0, len(order), batch_size))
    logits, features, plain = forward_batches(loaded, batches, tta=tta)
    labels = np.load(split.labels_npy)
    return SplitOutputs(logits=logits, features=features, plain_logits=plain,
                        labels=labels if rows is None else labels[order])


def reference_outputs(loaded: LoadedModel, *, batch_size: int = 64
                      ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Logits and features of the non-dermatoscopic reference images (`ood_reference`).

    Each image is squashed to the model's input exactly as the cache and the app do
    (`resize_square`), so its score is the one the served gate would give it.

    Returns:
        Names, logits (M, 7) and features (M, D).
    """
    from skinsense.data.cache import resize_square
    from skinsense.evaluation.ood_reference import non_dermatoscopic_images

    size = loaded.card.image_size
    named = non_dermatoscopic_images()
    pixels = np.stack([np.asarray(resize_square(image, size)) for _, image in named])
    batches = (pixels[start:start + batch_size] for start in range(0, len(pixels), batch_size))
    logits, features, _ = forward_batches(loaded, batches)
    return [name for name, _ in named], logits, features


# -- one call per question, for a model folder on disk ------------------------------------------

def predict_outputs(model_dir: Path, split: CachedSplit, *, batch_size: int = 64,
                    tta: bool = False, rows: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, 7) in `CLASS_CODES` order and penultimate features (N, D) of a model
    folder on a cached part, float32, in one pass (see `split_outputs`).

    Raises:
        ValueError: the cache was built at another size than the model takes.
    """
    outputs = split_outputs(LoadedModel.load(model_dir), split, batch_size=batch_size, tta=tta,
                            rows=rows)
    return outputs.logits, outputs.features


def predict_logits(model_dir: Path, split: CachedSplit, *, batch_size: int = 64,
                   tta: bool = False) -> np.ndarray:
    """Logits (N, 7) of a model folder on a cached part, columns in `CLASS_CODES` order,
    on the GPU if there is one (tta: see `split_outputs`)."""
    return predict_outputs(model_dir, split, batch_size=batch_size, tta=tta)[0]


def predict_probabilities(model_dir: Path, split: CachedSplit, *, batch_size: int = 64,
                          tta: bool = False, temperature: float | None = None) -> np.ndarray:
    """Calibrated class probabilities (N, 7) of a model folder on a cached part: the logits
    divided by `temperature` (None: the card's, what serving does), then the softmax."""
    loaded = LoadedModel.load(model_dir)
    if temperature is None:
        temperature = loaded.card.temperature
    logits = split_outputs(loaded, split, batch_size=batch_size, tta=tta).logits
    if len(logits) == 0:
        return logits
    return calibrated_probabilities(logits, temperature)
