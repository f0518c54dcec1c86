"""The referral rule: "see a dermatologist" when the malignant classes together are likely.

The malignant HAM10000 classes are melanoma (mel), basal cell carcinoma (bcc) and actinic
keratoses / intraepithelial carcinoma (akiec). The referral score of an image is the sum of
their *calibrated* probabilities (see `skinsense.trust.calibration`); the rule refers an image when
its score is at least the model card's `referral_threshold`.

The threshold is chosen on the validation part (`choose_referral_threshold`): the highest one
at which at least `referral_sensitivity_target` of the malignant validation images are
referred. Its sensitivity and specificity are then measured on the test part and recorded in
the card (`test_referral`). What the rule is not: a clinical validation. It is one operating
point measured on HAM10000's dermatoscopic test lesions (mostly fair-skinned patients of two
centres, images a dermatologist chose to photograph); on other populations, cameras or
phone photos its sensitivity is unknown. `RULE_CAVEAT` says so in words, for the card and the
app.

Serving imports this module: it needs numpy only (no prefect, mlflow, gradio, scikit-learn).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from skinsense.labels import CLASS_CODES, MALIGNANT_CODES

if TYPE_CHECKING:
    from skinsense.lifecycle.packaging import ModelCard

# In CLASS_CODES order: akiec, bcc, mel.
REFERRAL_CODES: tuple[str, ...] = tuple(c for c in CLASS_CODES if c in MALIGNANT_CODES)
REFERRAL_INDICES: tuple[int, ...] = tuple(CLASS_CODES.index(c) for c in REFERRAL_CODES)

RULE_CAVEAT = (
    "This is an operating point measured on HAM10000's held-out test lesions (dermatoscopic "
    "images of mostly fair-skinned patients from two centres), not a clinical validation. Its "
    "sensitivity on other populations, devices or phone photos is unknown, and a low score "
    "never rules a cancer out: a lesion that worries its owner or changes should be seen by a "
    "dermatologist whatever the score."
)


def referral_scores(probabilities: np.ndarray) -> np.ndarray:
    """Referral score of each row: the sum of its mel, bcc and akiec probabilities.

    Args:
        probabilities: (N, 7) calibrated probabilities in `CLASS_CODES` order.

    Returns:
        float64 (N,), each within 0..1.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 2 or probabilities.shape[1] != len(CLASS_CODES):
        raise ValueError(f"probabilities must be (N, {len(CLASS_CODES)}), got "
                         f"{probabilities.shape}")
    return probabilities[:, list(REFERRAL_INDICES)].sum(axis=1)


def is_malignant(y_true: np.ndarray) -> np.ndarray:
    """Boolean (N,): the class index is one of the referral (malignant) classes."""
    return np.isin(np.asarray(y_true).astype(np.int64), REFERRAL_INDICES)


def choose_referral_threshold(y_true: np.ndarray, scores: np.ndarray, sensitivity: float) -> float:
    """The highest threshold whose rule `score >= threshold` refers at least `sensitivity`
    of the malignant images.

    That is the k-th highest score among the malignant images, k = ceil(sensitivity x their
    number): any higher threshold misses one more of them.

    Args:
        y_true: (N,) class indices (validation part).
        scores: (N,) referral scores (`referral_scores` of calibrated probabilities).
        sensitivity: the target share of malignant images to refer, 0 < s <= 1.

    Raises:
        ValueError: the target is out of range, or there is no malignant image to aim at.
    """
    if not 0 < sensitivity <= 1:
        raise ValueError(f"the referral sensitivity target must be in (0, 1], got {sensitivity}")
    y_true, scores = np.asarray(y_true), np.asarray(scores, dtype=np.float64)
    if y_true.shape != scores.shape:
        raise ValueError(f"{len(y_true)} labels but {len(scores)} scores")
    malignant = np.sort(scores[is_malignant(y_true)])[::-1]
    if len(malignant) == 0:
        raise ValueError(
            "the validation part holds no mel, bcc or akiec image, so no referral threshold "
            "can be chosen; use more data (or a larger val_fraction)")
    # The small tolerance keeps 0.95 x 20 = 19.000000000000004 from asking for 20 of 20.
    k = max(1, math.ceil(sensitivity * len(malignant) - 1e-9))
    return float(malignant[k - 1])


@dataclass(frozen=True)
class Referral:
    """The referral decision for one image."""

    score: float                      # calibrated mel + bcc + akiec probability
    threshold: float | None           # the card's referral_threshold (None: no rule)
    refer: bool | None                # score >= threshold; None when the model has no rule
    sensitivity_target: float | None  # what the threshold was chosen for, on validation


def referral_decision(probabilities: Mapping[str, float] | np.ndarray,
                      card: ModelCard) -> Referral:
    """The referral score of one image and the card's decision on it.

    Args:
        probabilities: calibrated probabilities of one image, as {class code: p} (what
            `Predictor.classify` returns) or a (7,) array in `CLASS_CODES` order.
        card: the model's card (`referral_threshold`, `referral_sensitivity_target`).

    Returns:
        The score, the threshold and the decision (None when the card has no threshold,
        e.g. a model trained before SkinSense chose one).
    """
    if isinstance(probabilities, Mapping):
        missing = [c for c in REFERRAL_CODES if c not in probabilities]
        if missing:
            raise ValueError(f"probabilities lack the class(es) {missing}")
        score = float(sum(float(probabilities[c]) for c in REFERRAL_CODES))
    else:
        score = float(referral_scores(np.asarray(probabilities).reshape(1, -1))[0])
    threshold = card.referral_threshold
    return Referral(score=score, threshold=threshold,
                    refer=None if threshold is None else score >= threshold,
                    sensitivity_target=card.referral_sensitivity_target)


def describe_rule(threshold: float | None, sensitivity_target: float | None,
                  test_referral: Mapping[str, float | None] | None = None) -> str:
    """The rule in words, with its measured figures and what it is not (for the model card).

    Args:
        threshold: the chosen referral threshold (None: no rule could be chosen).
        sensitivity_target: the validation sensitivity it was chosen for.
        test_referral: `sensitivity`, `specificity` and their `_ci_low`/`_ci_high` on the
            test part, when measured.
    """
    if threshold is None:
        return ("No referral rule: the validation part held no malignant (mel, bcc, akiec) "
                "image to choose a threshold on. " + RULE_CAVEAT)
    text = (f"Refer to a dermatologist when the calibrated probabilities of melanoma, basal "
            f"cell carcinoma and actinic keratosis/intraepithelial carcinoma (mel + bcc + "
            f"akiec) add up to at least {threshold:.4f}. The threshold is the highest at which "
            f"at least {sensitivity_target:.0%} of the malignant validation images are "
            f"referred.")
    figures = dict(test_referral or {})
    if _defined(figures.get("sensitivity")) and _defined(figures.get("specificity")):
        text += (f" On the held-out test part it referred {_with_ci(figures, 'sensitivity')} of "
                 f"the malignant images and passed {_with_ci(figures, 'specificity')} of the "
                 f"benign ones (95% bootstrap intervals over lesions).")
    return f"{text} {RULE_CAVEAT}"


def _defined(value: float | None) -> bool:
    return value is not None and not math.isnan(value)


def _with_ci(figures: Mapping[str, float | None], name: str) -> str:
    low, high = figures.get(f"{name}_ci_low"), figures.get(f"{name}_ci_high")
    if _defined(low) and _defined(high):
        return f"{figures[name]:.1%} (95% CI {low:.1%}-{high:.1%})"
    return f"{figures[name]:.1%}"
