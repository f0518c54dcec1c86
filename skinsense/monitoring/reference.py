"""What a model showed on its test part, stored with it for monitoring to compare against.

The evaluation writes `monitoring_reference.json` into the model folder (so it is registered
with the model and the champion's reference comes down with it): the class mix of its
answers, the out-of-domain gate's scores and refusal rate, the referral rate, accuracy and
referral sensitivity, all on the HAM10000 test part exactly as the app computes them
(calibrated probabilities, no test-time flips).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from skinsense.labels import CLASS_CODES

REFERENCE_FILE = "monitoring_reference.json"
MALIGNANT = ("mel", "bcc", "akiec")
# Keep every test score up to this many (HAM10000's test part is ~1,500 images); a larger
# part is subsampled evenly over its sorted scores, which keeps the KS test's reference.
_MAX_SCORES = 5000


def build_reference(y_true: np.ndarray, probabilities: np.ndarray, *,
                    ood_scores: np.ndarray | None, ood_threshold: float | None,
                    referral_threshold: float | None) -> dict[str, Any]:
    """The reference figures of one model on its test part.

    Args:
        y_true: class indices of the test images.
        probabilities: calibrated probabilities as served, (N, 7).
        ood_scores: the gate's score of each test image (None: the model has no gate).
        ood_threshold, referral_threshold: the card's.
    """
    predicted = probabilities.argmax(axis=1)
    in_domain = (np.ones(len(y_true), bool) if ood_scores is None or ood_threshold is None
                 else ood_scores <= ood_threshold)
    mix = np.bincount(predicted[in_domain], minlength=len(CLASS_CODES))
    reference: dict[str, Any] = {
        "n_images": int(len(y_true)),
        "class_mix": dict(zip(CLASS_CODES, map(int, mix), strict=True)),
        "accuracy": float((predicted == y_true).mean()),
        "ood_rate": None if ood_scores is None else float((~in_domain).mean()),
        "ood_scores": None if ood_scores is None else [
            float(s) for s in _even_sample(np.sort(ood_scores))],
        "quality_rate": 0.0,  # the test part is HAM10000's curated images
    }
    if referral_threshold is not None:
        malignant = np.isin(y_true, [CLASS_CODES.index(c) for c in MALIGNANT])
        score = probabilities[:, [CLASS_CODES.index(c) for c in MALIGNANT]].sum(axis=1)
        referred = score >= referral_threshold
        reference["referral_rate"] = float(referred[in_domain].mean()) if in_domain.any() \
            else None
        reference["referral_sensitivity"] = (float(referred[malignant].mean())
                                             if malignant.any() else None)
    return reference


def _even_sample(values: np.ndarray) -> np.ndarray:
    if len(values) <= _MAX_SCORES:
        return values
    return values[np.linspace(0, len(values) - 1, _MAX_SCORES).round().astype(int)]


def save_reference(model_dir: Path, reference: dict[str, Any]) -> Path:
    path = Path(model_dir) / REFERENCE_FILE
    path.write_text(json.dumps(reference, indent=1))
    return path


def load_reference(model_dir: Path) -> dict[str, Any] | None:
    """The folder's reference, or None for a model evaluated before monitoring existed."""
    path = Path(model_dir) / REFERENCE_FILE
    return json.loads(path.read_text()) if path.is_file() else None
