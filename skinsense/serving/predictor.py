"""The predictor: a model folder turned into `image -> seven class probabilities` on the CPU.

Preprocessing is the evaluation preset applied to an image decoded and resized exactly like
the image cache does (`skinsense.data.cache.load_square`: JPEG draft decoding, then `resize_square`), so served predictions match
what the model was evaluated on.

Two backends compute the same logits: ONNX Runtime, used when the model folder holds a
`model.onnx` exported from its current weights (see `skinsense.export`), and PyTorch
otherwise. For both, the logits become probabilities here, through the one function every
path uses (`skinsense.calibration.calibrated_probabilities`) with the card's temperature; the
referral decision on those probabilities is `skinsense.referral.referral_decision`.
"""

from __future__ import annotations

import io
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from skinsense.calibration import calibrated_probabilities
from skinsense.data.cache import resize_square
from skinsense.export import (
    INPUT_NAME,
    ONNX_FILE,
    OUTPUT_NAME,
    WEIGHTS_SHA256_KEY,
    onnx_session,
    weights_sha256,
)
from skinsense.labels import CLASS_CODES
from skinsense.packaging import WEIGHTS_FILE, ModelCard, load_card, load_model_dir
from skinsense.presets import make_preset

log = logging.getLogger(__name__)

# Pillow's own bomb guard trips at ~179 Mpx; a dermatoscope image is < 50 Mpx, so refuse early.
MAX_PIXELS = 40_000_000
MIN_SIDE = 16
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class ImageRejected(ValueError):
    """The input cannot be classified; the message says why, in words for the user."""


def open_image(data: bytes | str | Path | Image.Image | np.ndarray, *,
               draft_size: int | None = None) -> Image.Image:
    """Open and sanity-check an image from bytes, a path, a PIL image or an HxWxC array.

    Applies the EXIF orientation (phones and some dermatoscopes store rotated pixels), and
    refuses what is not an image, truncated, too large (decompression bombs) or too small.
    `draft_size` lets a JPEG decode at a reduced scale, exactly as the image cache does.
    """
    if isinstance(data, np.ndarray):
        image = Image.fromarray(data)
    elif isinstance(data, Image.Image):
        image = data
    else:
        source = io.BytesIO(data) if isinstance(data, bytes) else str(data)
        try:
            image = Image.open(source)
            if image.width * image.height > MAX_PIXELS:
                raise Image.DecompressionBombError("too many pixels")
            if draft_size:
                image.draft("RGB", (draft_size, draft_size))
            image.load()
        except Image.DecompressionBombError as exc:
            raise ImageRejected(
                f"the image is too large to classify (more than {MAX_PIXELS:,} pixels)") from exc
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise ImageRejected(
                f"the file is not a readable image ({exc}); upload a JPEG or PNG photo") from exc
    if image.width * image.height > MAX_PIXELS:
        raise ImageRejected(f"the image is too large to classify (more than {MAX_PIXELS:,} pixels)")
    if min(image.size) < MIN_SIDE:
        raise ImageRejected(
            f"the image is {image.width}x{image.height} pixels; at least {MIN_SIDE}x{MIN_SIDE} "
            f"is needed to see a lesion")
    image = ImageOps.exif_transpose(image)
    if image.mode != "RGB":
        # RGBA/LA/P with transparency: composite on white rather than on black garbage.
        if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGB", rgba.size, (255, 255, 255))
            background.paste(rgba, mask=rgba.getchannel("A"))
            image = background
        else:
            image = image.convert("RGB")
    return image


@dataclass
class Predictor:
    """A loaded model and the preprocessing it was evaluated with.

    Exactly one of `model` (PyTorch) and `session` (an ONNX Runtime InferenceSession whose
    output is logits) is set; `backend` says which.
    """

    model: torch.nn.Module | None
    card: ModelCard
    source: str = ""
    session: Any | None = None

    def __post_init__(self) -> None:
        if (self.model is None) == (self.session is None):
            raise ValueError("a Predictor needs either a torch model or an ONNX Runtime session")
        self._preset = make_preset("eval", mean=self.card.mean, std=self.card.std)
        # Either backend already uses every core for one batch; parallel calls only contend.
        self._lock = threading.Lock()

    @property
    def backend(self) -> str:
        """'onnxruntime' or 'torch'."""
        return "torch" if self.session is None else "onnxruntime"

    @classmethod
    def from_model_dir(cls, model_dir: Path, *,
                       backend: Literal["auto", "onnxruntime", "torch"] = "auto") -> Predictor:
        """Load a model folder.

        Args:
            model_dir: weights.safetensors + model_card.json, optionally model.onnx.
            backend: 'auto' uses ONNX Runtime when a `model.onnx` made from these weights is
                there and onnxruntime is installed, else PyTorch; 'onnxruntime' or 'torch'
                force one (forcing ONNX Runtime without a usable model.onnx raises).
        """
        model_dir = Path(model_dir)
        if backend != "torch":
            session, why_not = _onnx_session_for(model_dir)
            if session is not None:
                card = load_card(model_dir)
                _check_classes(card, model_dir)
                return cls(model=None, card=card, source=str(model_dir), session=session)
            if backend == "onnxruntime":
                raise FileNotFoundError(f"cannot serve {model_dir} with ONNX Runtime: {why_not}")
            if why_not != "no model.onnx":
                log.warning("serving %s with PyTorch: %s", model_dir, why_not)
        model, card = load_model_dir(model_dir)
        return cls(model=model, card=card, source=str(model_dir))

    def pixels(self, images: list) -> np.ndarray:
        """uint8 (N, 3, H, W): decoded and resized exactly like the image cache does."""
        size = self.card.image_size
        arrays = [np.asarray(resize_square(open_image(im, draft_size=size), size)) for im in images]
        return np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2))

    def preprocess(self, images: list) -> torch.Tensor:
        """The model's input: `pixels` through the evaluation preset."""
        return self._preset(torch.from_numpy(self.pixels(images)))

    def _normalized_array(self, images: list) -> np.ndarray:
        # The evaluation preset's arithmetic, with its own mean and std, in numpy: the same
        # float32 values as `preprocess`. On the ONNX Runtime path a torch op of this size
        # would wake torch's thread pool, whose threads then spin on the cores ORT needs
        # (25 ms on a 2-core machine).
        x = self.pixels(images).astype(np.float32)
        x -= self._preset.mean.numpy()
        x /= self._preset.std.numpy()
        return x

    @torch.inference_mode()
    def logits(self, images: list) -> np.ndarray:
        """Raw network outputs (N, 7) in CLASS_CODES order, float32."""
        if self.session is not None:
            inputs = self._normalized_array(images)
            with self._lock:
                return self.session.run([OUTPUT_NAME], {INPUT_NAME: inputs})[0]
        batch = self.preprocess(images)
        with self._lock:
            return self.model(batch).float().numpy()

    def predict_proba(self, images: list) -> np.ndarray:
        """Calibrated probabilities (N, 7) in CLASS_CODES order: the logits divided by the
        card's temperature, then the softmax (`skinsense.calibration`)."""
        return calibrated_probabilities(self.logits(images), self.card.temperature)

    def classify(self, image) -> dict[str, float]:
        """One image -> {class code: calibrated probability}."""
        return dict(zip(CLASS_CODES, map(float, self.predict_proba([image])[0]), strict=True))


def _check_classes(card: ModelCard, model_dir: Path) -> None:
    if card.class_codes != list(CLASS_CODES):
        raise ValueError(f"model in {model_dir} predicts classes {card.class_codes}, this "
                         f"SkinSense expects {list(CLASS_CODES)}")


def _onnx_session_for(model_dir: Path) -> tuple[Any | None, str]:
    """(session, '') when model.onnx is usable for this folder, else (None, why not)."""
    onnx_path = model_dir / ONNX_FILE
    if not onnx_path.is_file():
        return None, "no model.onnx"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None, "onnxruntime is not installed"
    session = onnx_session(onnx_path)
    recorded = session.get_modelmeta().custom_metadata_map.get(WEIGHTS_SHA256_KEY)
    # Retraining into the same folder replaces the weights; an older export must not win.
    if (model_dir / WEIGHTS_FILE).is_file() and recorded != weights_sha256(model_dir):
        return None, f"{ONNX_FILE} was not exported from the current {WEIGHTS_FILE}"
    return session, ""
