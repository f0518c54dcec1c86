"""The model folder: what every checkpoint and registered model carries to be used again.

A model folder holds `weights.safetensors` (a plain state dict: loading it can never run
code) and `model_card.json` (architecture, class codes in order, input size, normalization,
metrics, dataset fingerprint, the resolved config, and from the evaluation stage the
calibration temperature, the referral rule with its test figures, the subgroup audit's
gaps and the out-of-domain gate's threshold). The evaluation stage adds
`ood_gate.safetensors` (the gate's class means and precision matrix, `skinsense.trust.gate`) and
`model.onnx` with its int8 twin `model.int8.onnx` (`skinsense.quantize`), which the registry
checks and logs. The app rebuilds itself from that alone.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, field_validator
from safetensors.torch import load_file, save_file
from torch import nn

from skinsense import __version__
from skinsense.labels import CLASS_CODES, CLASSES
from skinsense.models import IMAGENET_MEAN, IMAGENET_STD, build_model

WEIGHTS_FILE = "weights.safetensors"
CARD_FILE = "model_card.json"


class ModelCard(BaseModel):
    """Everything needed to rebuild, preprocess for and judge a trained model."""

    arch: str
    class_codes: list[str] = Field(default_factory=lambda: list(CLASS_CODES))
    class_names: list[str] = Field(default_factory=lambda: [c.name for c in CLASSES])
    image_size: int
    mean: list[float] = Field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = Field(default_factory=lambda: list(IMAGENET_STD))
    metrics: dict[str, float] = Field(default_factory=dict)
    dataset_fingerprint: str = ""
    split_seed: int | None = None
    trained_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    trained_feedback_ids: list[str] | None = Field(
        None, description="Image ids of the confirmed diagnoses (the `feedback` source, "
        "`data.extra_sources`) in the training part, so that `field_*` figures leave them out "
        "(skinsense.monitoring.field); None: not recorded (a card from before), and then only "
        "the cases confirmed after `trained_at` count as never trained on.")
    config: dict[str, Any] = Field(default_factory=dict)
    skinsense_version: str = __version__
    # Set by the evaluation stage. A card written before calibration existed loads with
    # these defaults: temperature 1 (the plain softmax) and no referral rule.
    temperature: float = Field(
        1.0, gt=0, allow_inf_nan=False, description="Logits are divided by this before the softmax "
        "(skinsense.trust.calibration); fitted on the validation part.")
    referral_threshold: float | None = Field(
        None, description="Refer when calibrated p(mel) + p(bcc) + p(akiec) >= this "
        "(skinsense.trust.referral); None: no referral rule.")
    referral_sensitivity_target: float | None = Field(
        None, description="The validation sensitivity the threshold was chosen for.")
    referral_rule: str = Field(
        "", description="The referral rule in words, its test figures and what it is not.")
    test_referral: dict[str, Any] = Field(
        default_factory=dict, description="The rule on the test part: sensitivity, "
        "specificity (with 95% lesion-bootstrap intervals), counts, referral rate, ROC AUC.")
    subgroups: dict[str, Any] = Field(
        default_factory=dict, description="The subgroup audit: largest gap per metric and "
        "attribute (skinsense.evaluation.subgroups), and how it was computed.")
    # Set by the evaluation stage with ood_gate.safetensors; None: no gate (an older model).
    ood_threshold: float | None = Field(
        None, description="The out-of-domain gate refuses an image whose smallest Mahalanobis "
        "distance to a class mean (skinsense.trust.gate) is above this; None: no gate.")
    ood_percentile: float | None = Field(
        None, description="The percentile of the validation part's gate scores the threshold "
        "is (95: about 5% of in-domain images are refused).")
    ood_gate: dict[str, Any] = Field(
        default_factory=dict, description="How the gate was fitted (images, feature size, "
        "Ledoit-Wolf shrinkage), what it scored at evaluation, and whether it can judge: "
        "`status` 'usable' or 'unusable' (then the app serves without it) with the `reason`.")
    calibration: dict[str, Any] = Field(
        default_factory=dict, description="What the temperature did on the test part: "
        "`temperature`, `fitted_on`, test ECE and NLL before and after, `helped` (it lowered "
        "the test NLL and did not raise the test ECE) and `summary` in words. Empty on a card "
        "from before it was recorded.")
    # Set by the evaluation stage with model.int8.onnx (skinsense.quantize.Int8Report);
    # empty: never compared, and fp32 is served.
    int8: dict[str, Any] = Field(
        default_factory=dict, description="The int8 export beside fp32 on the test part "
        "(balanced accuracy, ECE, referral, gate agreement, latency) and whether it is served.")

    @property
    def calibrated(self) -> bool:
        """A temperature was fitted and it helped: its probabilities may be called calibrated.

        A fitted temperature is never exactly 1 (a card from before calibration has 1); a
        temperature that did not help on the test part (`calibration['helped']` False: the
        NLL did not go down, or the ECE went up) was fitted, but its probabilities are not
        called calibrated.
        """
        return self.temperature != 1.0 and self.calibration.get("helped") is not False

    def calibration_text(self) -> str:
        """What was done to the probabilities, in words for the app and the registry."""
        if self.calibrated:
            return f"probabilities calibrated (temperature {self.temperature:.2f})"
        if self.temperature != 1.0 and self.calibration.get("summary"):
            return (f"probabilities not calibrated: {self.calibration['summary']}, so the "
                    f"temperature did not help")
        return "probabilities not calibrated"

    @field_validator("metrics", mode="before")
    @classmethod
    def _undefined_metrics_are_nan(cls, metrics: Any) -> Any:
        # Undefined metrics are NaN; JSON writes them as null, which must read back as NaN.
        if isinstance(metrics, dict):
            return {k: math.nan if v is None else v for k, v in metrics.items()}
        return metrics


def save_model_dir(model: nn.Module, card: ModelCard, out_dir: Path) -> Path:
    """Write weights and card into `out_dir` (created), returning it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS_FILE))
    return save_card(card, out_dir)


def save_card(card: ModelCard, model_dir: Path) -> Path:
    """Write (or update) the card of a model folder atomically."""
    tmp = Path(model_dir) / f".{CARD_FILE}.tmp"
    tmp.write_text(card.model_dump_json(indent=2))
    tmp.replace(Path(model_dir) / CARD_FILE)
    return Path(model_dir)


def load_card(model_dir: Path) -> ModelCard:
    """Read a model folder's card, with a clear error when it is not a model folder."""
    card_path = Path(model_dir) / CARD_FILE
    if not card_path.is_file():
        raise FileNotFoundError(
            f"{model_dir} is not a SkinSense model folder: {CARD_FILE} is missing"
        )
    return ModelCard.model_validate(json.loads(card_path.read_text()))


def load_model_dir(model_dir: Path) -> tuple[nn.Module, ModelCard]:
    """Rebuild the model of a model folder in eval mode on the CPU."""
    card = load_card(model_dir)
    if card.class_codes != list(CLASS_CODES):
        raise ValueError(
            f"model in {model_dir} predicts classes {card.class_codes}, this SkinSense "
            f"expects {list(CLASS_CODES)}"
        )
    model = build_model(card.arch, image_size=card.image_size, num_classes=len(card.class_codes))
    state = OrderedDict(load_file(str(Path(model_dir) / WEIGHTS_FILE)))
    # safetensors keeps tensors only; modules that check the version recorded in a state
    # dict (torchvision's MNASNet refuses one without it) get the versions of the freshly
    # built model of the same architecture.
    state._metadata = getattr(model.state_dict(), "_metadata", None)  # type: ignore[attr-defined]
    model.load_state_dict(state, strict=True)
    return model.eval(), card
