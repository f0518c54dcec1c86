"""The predictor: a model folder turned into `image -> seven class probabilities` on the CPU.

Preprocessing is the evaluation preset applied to an image decoded and resized exactly like
the image cache does (`skinsense.data.cache.load_square`: JPEG draft decoding, then `resize_square`), so served predictions match
what the model was evaluated on.

Two backends compute the same logits and penultimate features in one forward pass: ONNX
Runtime, used when the model folder holds a `model.onnx` exported from its current weights
(see `skinsense.lifecycle.export`), and PyTorch otherwise. ONNX Runtime runs `model.int8.onnx` instead
when the evaluation found it agrees with fp32 (`skinsense.quantize.serving_precision`;
`precision` and `precision_note` say which and why), and serves concurrent requests without
a lock (`skinsense.serving.runtime.OnnxRunner`). For both, the logits become probabilities
here, through the one function every path uses
(`skinsense.trust.calibration.calibrated_probabilities`) with the card's temperature; the referral
decision on those probabilities is `skinsense.trust.referral.referral_decision`.

`assess` is what the app and the MLflow pyfunc answer with: the image-quality checks
(`skinsense.trust.quality`) first, then the model, the out-of-domain gate on its features
(`skinsense.trust.gate`, when the folder has one), the calibrated probabilities and the referral
decision. `explain` adds a Grad-CAM overlay (`skinsense.serving.explain`, PyTorch weights
loaded on first use).
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

from skinsense.data.cache import resize_square
from skinsense.labels import CLASS_CODES
from skinsense.lifecycle.export import (
    FEATURES_NAME,
    INPUT_NAME,
    ONNX_FILE,
    OUTPUT_NAME,
    WEIGHTS_SHA256_KEY,
    onnx_has_features,
    weights_sha256,
)
from skinsense.lifecycle.packaging import (
    WEIGHTS_FILE,
    ModelCard,
    load_card,
    load_model_dir,
)
from skinsense.models import LogitsAndFeatures
from skinsense.presets import make_preset
from skinsense.quantize import INT8_FILE, Precision, serving_precision
from skinsense.serving.runtime import OnnxRunner
from skinsense.trust.calibration import calibrated_probabilities
from skinsense.trust.gate import ABSENT, GATE_FILE, GateDamagedError, OodGate, load_gate
from skinsense.trust.quality import MEASURE_SIDE, QualityIssue, check_quality
from skinsense.trust.referral import Referral, referral_decision

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


GateStatus = Literal["on", "off", "absent", "unusable", "damaged"]
# The card's `ood_gate.status` of a gate that cannot judge (`skinsense.evaluation.ood.judge_gate`).
UNUSABLE = "unusable"


@dataclass(frozen=True)
class GateResult:
    """The out-of-domain gate's verdict on one image.

    `status` 'on': the gate ran (`in_domain`, `score` and `threshold` are set); 'absent':
    the model folder has no gate (a model from before SkinSense had one); 'unusable': the
    evaluation found that the gate cannot judge (the card's `ood_gate.status`), so the model
    is served without it; 'damaged': the gate file is there but unreadable or stale. In
    these three cases `note` says why and nothing is known about the image's domain, which
    is not the same as "in domain". 'off': the app was configured without it
    (`ServeConfig.gate`).
    """

    status: GateStatus
    in_domain: bool | None = None
    score: float | None = None
    threshold: float | None = None
    note: str = ""


@dataclass(frozen=True)
class Assessment:
    """Everything SkinSense says about one image.

    `probabilities` is None when a quality check failed (the model did not run); otherwise
    they are calibrated and given even when the gate says the image is out of domain (the
    app shows them only on request, marked unreliable). `referral` is None then too, and
    when the gate refused the image.
    """

    quality_issues: tuple[QualityIssue, ...]
    gate: GateResult
    probabilities: dict[str, float] | None = None
    referral: Referral | None = None

    @property
    def answered(self) -> bool:
        """True when a classification may be shown: quality passed and the gate did not
        refuse (an absent gate refuses nothing, and the app says it is absent)."""
        return not self.quality_issues and self.gate.in_domain is not False

    @property
    def top_class(self) -> str | None:
        """The most probable class code (None when the model did not run)."""
        if not self.probabilities:
            return None
        return max(self.probabilities, key=self.probabilities.__getitem__)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (what the app's `/assess` endpoint returns)."""
        referral = self.referral
        return {
            "answered": self.answered,
            "quality_issues": [{"check": q.check, "value": q.value, "threshold": q.threshold,
                                "message": q.message} for q in self.quality_issues],
            "gate": {"status": self.gate.status, "in_domain": self.gate.in_domain,
                     "ood_score": self.gate.score, "ood_threshold": self.gate.threshold,
                     "note": self.gate.note},
            "probabilities": self.probabilities,
            "top_class": self.top_class,
            "referral": None if referral is None else {
                "score": referral.score, "threshold": referral.threshold,
                "refer": referral.refer, "sensitivity_target": referral.sensitivity_target},
        }


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
    # The out-of-domain gate (None: not used; `gate_status` says which case, `gate_note` why).
    gate: OodGate | None = None
    gate_note: str = ABSENT
    gate_status: GateStatus = "absent"
    # 'int8' (model.int8.onnx) or 'fp32', and why (skinsense.quantize.serving_precision).
    precision: str = "fp32"
    precision_note: str = ""

    def __post_init__(self) -> None:
        if (self.model is None) == (self.session is None):
            raise ValueError("a Predictor needs either a torch model or an ONNX Runtime session")
        self._preset = make_preset("eval", mean=self.card.mean, std=self.card.std)
        # PyTorch already uses every core for one batch; parallel calls would only contend.
        # ONNX Runtime runs take no lock (OnnxRunner spreads them over the cores).
        self._lock = threading.Lock()
        self._split = LogitsAndFeatures(self.model).eval() if self.model is not None else None
        self._session_has_features = (self.session is not None
                                      and onnx_has_features(self.session))
        if self.gate is not None and self.card.ood_threshold is None:
            self.gate, self.gate_note = None, (f"{GATE_FILE} is there but the model card has "
                                               f"no ood_threshold")
            self.gate_status = "damaged"
        if self.gate is not None and self.card.ood_gate.get("status") == UNUSABLE:
            self.gate, self.gate_status = None, UNUSABLE
            self.gate_note = (f"the evaluation found this model's out-of-domain gate unusable: "
                              f"{self.card.ood_gate.get('reason') or 'no reason recorded'}")
        if self.gate is not None:
            self.gate_status, self.gate_note = "on", ""

    @property
    def backend(self) -> str:
        """'onnxruntime' or 'torch'."""
        return "torch" if self.session is None else "onnxruntime"

    @classmethod
    def from_model_dir(cls, model_dir: Path, *,
                       backend: Literal["auto", "onnxruntime", "torch"] = "auto",
                       precision: Precision = "auto", threads: int | None = None,
                       concurrency: int | None = None) -> Predictor:
        """Load a model folder.

        Args:
            model_dir: weights.safetensors + model_card.json, optionally model.onnx and
                model.int8.onnx.
            backend: 'auto' uses ONNX Runtime when a `model.onnx` made from these weights is
                there and onnxruntime is installed, else PyTorch; 'onnxruntime' or 'torch'
                force one (forcing ONNX Runtime without a usable model.onnx raises).
            precision: `ServeConfig.precision`: 'auto' serves `model.int8.onnx` when the
                card's int8 comparison allows it (`skinsense.quantize`), else fp32; 'int8'
                forces int8 (raises when there is no usable int8 export); 'fp32' forces fp32.
            threads, concurrency: ONNX Runtime threads of a lone request and requests at
                once (`skinsense.serving.runtime`; default from the core count).

        Raises:
            FileNotFoundError: a forced backend or precision has no usable file.
        """
        model_dir = Path(model_dir)
        sha = weights_sha256(model_dir) if (model_dir / WEIGHTS_FILE).is_file() else None
        gate_status: GateStatus = "absent"
        try:
            gate, gate_note = load_gate(model_dir, weights_sha256=sha)
        except GateDamagedError as exc:
            gate, gate_note, gate_status = None, str(exc), "damaged"
            log.error("%s: its out-of-domain gate is damaged: %s", model_dir, exc)
        card = load_card(model_dir)
        chosen, note = serving_precision(card, precision)
        if backend == "torch" and precision == "int8":
            raise FileNotFoundError(f"int8 is served by ONNX Runtime only; {model_dir} was "
                                    f"asked for the torch backend")
        if backend != "torch":
            files = [INT8_FILE, ONNX_FILE] if chosen == "int8" else [ONNX_FILE]
            for file in files:
                session, why_not = _onnx_session_for(model_dir, sha, file, threads=threads,
                                                     concurrency=concurrency)
                if session is not None and gate is not None and not onnx_has_features(session):
                    # The gate needs the features; PyTorch computes them in the same pass.
                    session, why_not = None, f"{file} outputs no features for the gate"
                if file == INT8_FILE and session is None:
                    if precision == "int8":
                        raise FileNotFoundError(f"cannot serve {model_dir} in int8: {why_not}")
                    log.warning("serving %s in fp32: %s", model_dir, why_not)
                    note = f"{why_not} (the evaluation had allowed int8)"
                    continue
                if session is not None:
                    _check_classes(card, model_dir)
                    return cls(model=None, card=card, source=str(model_dir), session=session,
                               gate=gate, gate_note=gate_note, gate_status=gate_status,
                               precision="int8" if file == INT8_FILE else "fp32",
                               precision_note=note)
            if backend == "onnxruntime":
                raise FileNotFoundError(f"cannot serve {model_dir} with ONNX Runtime: {why_not}")
            if why_not != f"no {ONNX_FILE}":
                log.warning("serving %s with PyTorch: %s", model_dir, why_not)
        model, card = load_model_dir(model_dir)
        if precision != "fp32":
            note = "PyTorch serves fp32 (no usable ONNX export)"
        return cls(model=model, card=card, source=str(model_dir), gate=gate, gate_note=gate_note,
                   gate_status=gate_status, precision="fp32", precision_note=note)

    def runtime_summary(self) -> dict[str, Any]:
        """Precision, why, and the threads and concurrency of the runtime (for /health)."""
        runtime = (self.session.describe() if hasattr(self.session, "describe")
                   else {"threads": torch.get_num_threads() if self.session is None else None})
        return {"backend": self.backend, "precision": self.precision,
                "precision_note": self.precision_note, **runtime}

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
    def outputs(self, images: list) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits (N, 7) in CLASS_CODES order and penultimate features (N, D), float32, from
        one forward pass; features are None only for an ONNX export from before the gate."""
        if self.session is not None:
            inputs = self._normalized_array(images)
            names = [OUTPUT_NAME, FEATURES_NAME] if self._session_has_features else [OUTPUT_NAME]
            result = self.session.run(names, {INPUT_NAME: inputs})
            return result[0], (result[1] if len(result) > 1 else None)
        batch = self.preprocess(images)
        with self._lock:
            logits, features = self._split(batch)
        return logits.float().numpy(), features.float().numpy()

    def logits(self, images: list) -> np.ndarray:
        """Raw network outputs (N, 7) in CLASS_CODES order, float32."""
        return self.outputs(images)[0]

    def predict_proba(self, images: list) -> np.ndarray:
        """Calibrated probabilities (N, 7) in CLASS_CODES order: the logits divided by the
        card's temperature, then the softmax (`skinsense.trust.calibration`)."""
        return calibrated_probabilities(self.logits(images), self.card.temperature)

    def classify(self, image) -> dict[str, float]:
        """One image -> {class code: calibrated probability} (no quality checks, no gate)."""
        return dict(zip(CLASS_CODES, map(float, self.predict_proba([image])[0]), strict=True))

    def served_gate_status(self, *, enabled: bool = True) -> GateStatus:
        """'off' when the app runs without the gate, else `gate_status`."""
        return "off" if not enabled else self.gate_status

    def gate_summary(self, *, enabled: bool = True) -> dict[str, Any]:
        """The gate as /health reports it: status, threshold, percentile, why it is not on."""
        return {"status": self.served_gate_status(enabled=enabled),
                "threshold": self.card.ood_threshold if self.gate else None,
                "percentile": self.card.ood_percentile if self.gate else None,
                "note": "" if self.gate else self.gate_note}

    def assess(self, image, *, gate: bool = True) -> Assessment:
        """One image through the quality checks, the model, the gate and the referral rule.

        Args:
            image: bytes, a path, a PIL image or an HxWxC array.
            gate: False skips the quality checks and the gate (`ServeConfig.gate`).

        Raises:
            ImageRejected: the file is not a readable image at all (or is a bomb).
        """
        return self.assess_many([image], gate=gate)[0]

    def assess_many(self, images: list, *, gate: bool = True) -> list[Assessment]:
        """`assess` for several images, with one forward pass for all that pass the checks."""
        decoded = [self.decode_checked(image, gate) for image in images]
        runnable = [i for i, (_, issues) in enumerate(decoded) if not issues]
        status = self.served_gate_status(enabled=gate)
        results: list[Assessment] = [
            Assessment(tuple(issues), GateResult(status, note="not scored: the image failed "
                                                              "a quality check"))
            for _, issues in decoded]
        if not runnable:
            return results
        logits, features = self.outputs([decoded[i][0] for i in runnable])
        probabilities = calibrated_probabilities(logits, self.card.temperature)
        verdicts = self.gate_verdicts(features, len(runnable), enabled=gate)
        for row, i in enumerate(runnable):
            p = dict(zip(CLASS_CODES, map(float, probabilities[row]), strict=True))
            # No referral decision on an image the gate refuses: "see a dermatologist" about
            # a photo of a cat would be the very harm the gate exists to prevent.
            referral = (None if verdicts[row].in_domain is False
                        else referral_decision(p, self.card))
            results[i] = Assessment((), verdicts[row], p, referral)
        return results

    def decode_checked(self, image, gate: bool) -> tuple[Image.Image, list[QualityIssue]]:
        """Decode an upload for the model and run the quality checks on it.

        Args:
            image: bytes, a path, a PIL image or an HxWxC array.
            gate: False skips the checks (`ServeConfig.gate`).

        Returns:
            The image the model gets (decoded as the image cache decodes) and the checks it
            fails (empty: it passes).
        """
        data = Path(image).read_bytes() if isinstance(image, (str, Path)) else image
        if not gate:
            return open_image(data, draft_size=self.card.image_size), []
        # Measured at a fixed scale (MEASURE_SIDE); the model's own decode may use another
        # JPEG draft scale, and must equal the cache's, so it decodes again when it would.
        seen = open_image(data, draft_size=MEASURE_SIDE)
        issues = check_quality(seen)
        if issues:
            return seen, issues
        same_decode = (self.card.image_size == MEASURE_SIDE or not isinstance(data, bytes)
                       or not data.startswith(b"\xff\xd8"))
        return (seen if same_decode else open_image(data, draft_size=self.card.image_size)), []

    def gate_verdicts(self, features: np.ndarray | None, n: int, *,
                      enabled: bool) -> list[GateResult]:
        """The gate's verdict on each of `n` images from their penultimate features."""
        if not enabled:
            return [GateResult("off")] * n
        if self.gate is None:
            return [GateResult(self.gate_status, note=self.gate_note)] * n
        if features is None:
            return [GateResult("absent", note="the ONNX export has no features")] * n
        threshold = float(self.card.ood_threshold)
        scores = self.gate.scores(features)
        return [GateResult("on", in_domain=bool(score <= threshold), score=float(score),
                           threshold=threshold) for score in scores]


def _check_classes(card: ModelCard, model_dir: Path) -> None:
    if card.class_codes != list(CLASS_CODES):
        raise ValueError(f"model in {model_dir} predicts classes {card.class_codes}, this "
                         f"SkinSense expects {list(CLASS_CODES)}")


def _onnx_session_for(model_dir: Path, sha: str | None, file: str = ONNX_FILE, *,
                      threads: int | None = None, concurrency: int | None = None
                      ) -> tuple[OnnxRunner | None, str]:
    """(runner, '') when `file` is usable for this folder, else (None, why not)."""
    onnx_path = model_dir / file
    if not onnx_path.is_file():
        return None, f"no {file}"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None, "onnxruntime is not installed"
    session = OnnxRunner(onnx_path, threads=threads, concurrency=concurrency)
    recorded = session.get_modelmeta().custom_metadata_map.get(WEIGHTS_SHA256_KEY)
    # Retraining into the same folder replaces the weights; an older export must not win.
    if sha is not None and recorded != sha:
        return None, f"{file} was not exported from the current {WEIGHTS_FILE}"
    return session, ""
