"""Why the model answered: a Grad-CAM overlay of the top class, on demand.

Grad-CAM (Selvaraju et al. 2017) weights the feature maps of one layer by the gradient of a
class's logit with respect to them and keeps the positive part: the map shows where the
evidence for that class lies. SkinSense uses the maintained `grad-cam` package
(pytorch-grad-cam) on the PyTorch weights, since ONNX Runtime gives no gradients; they are
loaded on the first request, so a plain classification stays as fast as before. The layer
per architecture comes from the model registry (`skinsense.models.cam_target_layer`).

One forward pass gives the logits, the penultimate features (so the out-of-domain gate
judges the same pass) and the activations; the backward pass runs only from the logit down
to the target layer: every parameter before it is frozen, so autograd records nothing
there. The overlay is drawn on the upload as the user sees it (EXIF orientation applied),
at its own size: the model's square map is stretched back over the whole image, as the
model's input squashed the whole image into a square.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import nn

from skinsense.labels import CLASS_CODES
from skinsense.lifecycle.packaging import ModelCard, load_model_dir
from skinsense.models import cam_target_layer, cam_target_layer_path, head_name
from skinsense.serving.predictor import GateResult, Predictor, open_image
from skinsense.trust.calibration import calibrated_probabilities

if TYPE_CHECKING:
    from skinsense.trust.quality import QualityIssue

# How much of the photo shows through the heat map (pytorch-grad-cam's default is 0.5).
IMAGE_WEIGHT = 0.55


@dataclass(frozen=True)
class Explanation:
    """A Grad-CAM explanation of one image, or why there is none.

    `overlay` is None when the image failed a quality check or the gate refused it; then
    `quality_issues` or `gate` says why.
    """

    overlay: Image.Image | None
    heatmap: np.ndarray | None          # (H, W) float32 in 0..1 at the upload's size
    class_code: str | None              # the explained (top) class
    probability: float | None           # its calibrated probability
    gate: GateResult
    quality_issues: tuple[QualityIssue, ...] = ()
    target_layer: str = ""

    @property
    def flat(self) -> bool:
        """True when the map holds no location at all (every pixel 0): the target layer's
        map is 1x1 at this input size, or no gradient reached it."""
        return self.heatmap is not None and float(self.heatmap.max()) < 1e-6


class _FeatureCapture(nn.Module):
    """The model as Grad-CAM calls it (image -> logits), keeping the head's input."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.features: torch.Tensor | None = None
        model.get_submodule(head_name(model)).register_forward_hook(self._keep_input)

    def _keep_input(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.features = args[0].detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class GradCamExplainer:
    """Grad-CAM for one model folder; builds its own copy of the network on first use.

    Args:
        model_dir: the model folder (weights.safetensors + model_card.json).
        card: its card (the architecture decides the target layer).

    Raises:
        NoExplanationError: the registry names no target layer for the architecture (raised
            at once, before any weights are read).
    """

    def __init__(self, model_dir: Path, card: ModelCard) -> None:
        self.model_dir = Path(model_dir)
        self.arch = card.arch
        self.target_layer_path = cam_target_layer_path(card.arch)
        self._cam = None
        self._capture: _FeatureCapture | None = None
        # Grad-CAM's hooks keep per-call state: one explanation at a time.
        self._lock = threading.Lock()

    def _load(self) -> None:
        from pytorch_grad_cam import GradCAM

        model, _ = load_model_dir(self.model_dir)
        layer = cam_target_layer(model, self.arch)
        # Gradients are needed from the logit down to the target layer only: freezing every
        # other parameter keeps autograd from recording (and differentiating) the layers
        # before it, so the backward pass costs a small part of a forward pass.
        model.requires_grad_(False)
        layer.requires_grad_(True)
        self._capture = _FeatureCapture(model.eval())
        self._cam = GradCAM(model=self._capture, target_layers=[layer])

    def explain(self, predictor: Predictor, image, *, gate: bool = True) -> Explanation:
        """Explain the top class of `image` with the predictor's preprocessing and gate.

        Args:
            predictor: the served predictor (decoding, quality checks, preset, gate, card).
            image: bytes, a path, a PIL image or an HxWxC array.
            gate: run the quality checks and the out-of-domain gate first (an image the gate
                refuses gets no explanation, as it gets no classification).
        """
        from pytorch_grad_cam.utils.image import show_cam_on_image

        data = Path(image).read_bytes() if isinstance(image, (str, Path)) else image
        model_image, issues = predictor.decode_checked(data, gate)
        if issues:
            status = predictor.served_gate_status(enabled=gate)
            return Explanation(None, None, None, None, GateResult(status), tuple(issues),
                               self.target_layer_path)
        batch = predictor.preprocess([model_image])
        with self._lock:
            if self._cam is None:
                self._load()
            with torch.enable_grad():
                grayscale = self._cam(input_tensor=batch, targets=None)[0]
            logits = self._cam.outputs.detach().float().numpy()
            features = self._capture.features.float().numpy()
        verdict = predictor.gate_verdicts(features, 1, enabled=gate)[0]
        probabilities = calibrated_probabilities(logits, predictor.card.temperature)[0]
        top = int(np.argmax(probabilities))
        if verdict.in_domain is False:
            return Explanation(None, None, CLASS_CODES[top], float(probabilities[top]), verdict,
                               (), self.target_layer_path)
        upright = open_image(data)  # full size, EXIF orientation applied
        rgb = np.asarray(upright, dtype=np.float32) / 255.0
        # The model saw the whole image squashed into a square: stretch the map back.
        heat = np.asarray(Image.fromarray(grayscale.astype(np.float32), mode="F").resize(
            upright.size, Image.Resampling.BILINEAR), dtype=np.float32).clip(0, 1)
        overlay = show_cam_on_image(rgb, heat, use_rgb=True, image_weight=IMAGE_WEIGHT)
        return Explanation(Image.fromarray(overlay), heat, CLASS_CODES[top],
                           float(probabilities[top]), verdict, (), self.target_layer_path)


# One explainer per served predictor, dropped with it (the predictor itself knows nothing of
# explanations: this module builds on it, never the other way round).
_EXPLAINERS: dict[int, GradCamExplainer] = {}
_EXPLAINERS_LOCK = threading.Lock()


def explain_image(predictor: Predictor, image, *, gate: bool = True) -> Explanation:
    """A Grad-CAM overlay for the top class of `image`, at the upload's size.

    The PyTorch weights of the predictor's model folder are loaded on the first call for that
    predictor (ONNX Runtime cannot give gradients) and kept as long as the predictor lives.

    Raises:
        skinsense.models.NoExplanationError: no target layer is known for the arch.
        ImageRejected: the file is not a readable image.
    """
    with _EXPLAINERS_LOCK:
        explainer = _EXPLAINERS.get(id(predictor))
        if explainer is None:
            explainer = GradCamExplainer(Path(predictor.source), predictor.card)
            _EXPLAINERS[id(predictor)] = explainer
            weakref.finalize(predictor, _EXPLAINERS.pop, id(predictor), None)
    return explainer.explain(predictor, image, gate=gate)
