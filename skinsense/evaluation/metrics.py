"""Metrics of a prediction on a part: classification, calibration (ECE) and the referral
rule with lesion-bootstrap intervals, from labels and probabilities alone.

Metric conventions (the classes of `skinsense.labels.CLASS_CODES`, indices 0..6):

- Balanced accuracy is the mean recall over the classes present in `y_true` (the ISIC 2018
  Task 3 metric; scikit-learn's `balanced_accuracy_score`), the same rule as the training
  loop's validation metric.
- Macro F1 averages over the classes present in `y_true` or predicted (scikit-learn's default
  label set): a class that is never true and never predicted has no F1 to average.
- One-vs-rest ROC AUC is defined for a class only when the part holds both images of that class
  and images of other classes; for the rest it is NaN in the report and left out of the flat
  metrics. `macro_roc_auc` is the mean over the defined classes (NaN when none is defined).
- Melanoma sensitivity/specificity treat 'mel' against all other classes at the argmax
  decision; each is NaN when its denominator is empty (no melanoma, or only melanoma).
- ECE is torchmetrics' multiclass calibration error of the top-1 confidence, 15 bins, L1.
- Probabilities are calibrated: the logits are divided by the model card's temperature
  (fitted on the validation part, `skinsense.evaluation.fit`) before the softmax, exactly
  as every predictor does. `ece_uncalibrated` and `nll_uncalibrated` are the plain
  softmax's; the argmax metrics (`ARGMAX_METRICS`) are the same either way, and checked to
  be (`skinsense.evaluation.evaluate`).
- The referral rule (`skinsense.trust.referral`) is reported as `referral_sensitivity` and
  `referral_specificity` with 95% intervals from a bootstrap over lesions
  (`skinsense.evaluation.bootstrap`), `referral_rate` and `referral_roc_auc`.

`classification_metrics` returns flat `dict[str, float]` whose keys are MLflow metric names:
the headline scalars (`HEADLINE_METRICS`) plus `precision_<code>`, `recall_<code>`,
`f1_<code>` for every class present in `y_true` and `roc_auc_<code>` where it is defined.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    recall_score,
    roc_auc_score,
)
from torchmetrics.functional.classification import multiclass_calibration_error

from skinsense.evaluation.bootstrap import LesionBootstrap, percentile_interval
from skinsense.labels import CLASS_CODES, CODE_TO_INDEX
from skinsense.trust.referral import is_malignant, referral_scores

HEADLINE_METRICS: tuple[str, ...] = (
    "balanced_accuracy", "accuracy", "macro_f1", "macro_roc_auc",
    "mel_sensitivity", "mel_specificity", "ece",
)
ECE_BINS = 15  # the usual choice since Guo et al. 2017, so numbers compare with the literature
MELANOMA = "mel"
# Metrics of the predicted class alone: temperature scaling must leave them exactly as they were.
ARGMAX_METRICS: tuple[str, ...] = ("accuracy", "balanced_accuracy", "macro_f1")


def _per_class_roc_auc(y_true: np.ndarray, probabilities: np.ndarray) -> list[float]:
    # One binary AUC per class rather than roc_auc_score(multi_class="ovr"): the latter
    # raises when a class is missing from y_true, and a small test part often lacks one.
    aucs = []
    for k in range(len(CLASS_CODES)):
        positives = y_true == k
        if positives.all() or not positives.any():
            aucs.append(math.nan)
        else:
            aucs.append(float(roc_auc_score(positives, probabilities[:, k])))
    return aucs


def _mean_or_nan(values: Sequence[float]) -> float:
    defined = [v for v in values if not math.isnan(v)]
    return float(np.mean(defined)) if defined else math.nan


def check_inputs(y_true: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels as int64 and probabilities as float32 (N, 7), or a ValueError saying why not."""
    y_true = np.asarray(y_true).astype(np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float32)
    if probabilities.ndim != 2 or probabilities.shape[1] != len(CLASS_CODES):
        raise ValueError(
            f"probabilities must be (N, {len(CLASS_CODES)}), got {probabilities.shape}")
    if len(y_true) != len(probabilities) or len(y_true) == 0:
        raise ValueError(f"need as many labels as probability rows, and at least one: "
                         f"{len(y_true)} labels, {len(probabilities)} rows")
    return y_true, probabilities


def expected_calibration_error(y_true: np.ndarray, probabilities: np.ndarray) -> float:
    """ECE of the top-1 confidence: torchmetrics' multiclass calibration error, 15 bins, L1."""
    y_true, probabilities = check_inputs(y_true, probabilities)
    return float(multiclass_calibration_error(
        torch.from_numpy(probabilities), torch.from_numpy(y_true), num_classes=len(CLASS_CODES),
        n_bins=ECE_BINS, norm="l1"))


def evaluation_report(y_true: np.ndarray, probabilities: np.ndarray) -> dict[str, Any]:
    """Every metric of a prediction, as a JSON-friendly dict (NaN where undefined).

    Args:
        y_true: (N,) class indices in `CLASS_CODES` order.
        probabilities: (N, 7) class probabilities.

    Returns:
        Keys `metrics` (the flat dict of `classification_metrics`), `per_class` (code ->
        precision, recall, f1, support, roc_auc), `confusion_matrix` (counts, rows true,
        columns predicted), `confusion_matrix_normalized` (rows sum to 1; all-zero rows for
        absent classes), `class_codes` and `classification_report` (scikit-learn's dict).

    Raises:
        ValueError: shapes do not match or there are no images.
    """
    y_true, probabilities = check_inputs(y_true, probabilities)
    y_pred = probabilities.argmax(axis=1)
    labels = list(range(len(CLASS_CODES)))
    mel = CODE_TO_INDEX[MELANOMA]
    is_mel, pred_mel = (y_true == mel).astype(int), (y_pred == mel).astype(int)

    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0)
    aucs = _per_class_roc_auc(y_true, probabilities)
    ece = expected_calibration_error(y_true, probabilities)
    metrics = {
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "macro_roc_auc": _mean_or_nan(aucs),
        "mel_sensitivity": float(recall_score(is_mel, pred_mel, pos_label=1,
                                              zero_division=np.nan)),
        "mel_specificity": float(recall_score(is_mel, pred_mel, pos_label=0,
                                              zero_division=np.nan)),
        "ece": ece,
    }
    per_class: dict[str, dict[str, float]] = {}
    for k, code in enumerate(CLASS_CODES):
        per_class[code] = {"precision": float(precision[k]), "recall": float(recall[k]),
                           "f1": float(f1[k]), "support": int(support[k]), "roc_auc": aucs[k]}
        if support[k] > 0:
            metrics |= {f"precision_{code}": float(precision[k]),
                        f"recall_{code}": float(recall[k]), f"f1_{code}": float(f1[k])}
        if not math.isnan(aucs[k]):
            metrics[f"roc_auc_{code}"] = aucs[k]
    return {
        "metrics": metrics,
        "per_class": per_class,
        "class_codes": list(CLASS_CODES),
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "confusion_matrix_normalized": confusion_matrix(
            y_true, y_pred, labels=labels, normalize="true").tolist(),
        "classification_report": classification_report(
            y_true, y_pred, labels=labels, target_names=list(CLASS_CODES), output_dict=True,
            zero_division=0),
    }


def classification_metrics(y_true: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """Flat, MLflow-ready metrics of a prediction (see the module docstring for conventions).

    Args:
        y_true: (N,) class indices in `CLASS_CODES` order.
        probabilities: (N, 7) class probabilities.

    Returns:
        `HEADLINE_METRICS` (always present; NaN only where undefined) plus `precision_<code>`,
        `recall_<code>`, `f1_<code>` for the classes present in `y_true` and `roc_auc_<code>`
        for the classes whose AUC is defined.
    """
    return evaluation_report(y_true, probabilities)["metrics"]



def json_safe(value: Any) -> Any:
    # Undefined metrics are NaN; strict JSON has no NaN, so they are written as null.
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value



def referral_report(y_true: np.ndarray, probabilities: np.ndarray, threshold: float, *,
                    lesion_ids: np.ndarray | None = None, n_resamples: int = 1000,
                    seed: int = 0) -> dict[str, Any]:
    """The referral rule (`score >= threshold`) on a part, with lesion-bootstrap intervals.

    Args:
        y_true: (N,) class indices.
        probabilities: (N, 7) calibrated probabilities.
        threshold: the card's referral threshold.
        lesion_ids: (N,) the lesion of each image; None treats every image as its own lesion
            (the report then says `resampled_by: image`).
        n_resamples: bootstrap resamples.
        seed: bootstrap seed.

    Returns:
        `threshold`, `sensitivity` and `specificity` each with `_ci_low`/`_ci_high` (NaN
        when the part has no malignant, or no benign, image), `referral_rate` (share of
        images referred), `roc_auc` of the referral score (malignant vs benign; NaN when
        one side is missing), `n_malignant`, `n_benign`, `n_lesions`, `bootstrap_resamples`
        and `resampled_by`.
    """
    y_true, probabilities = check_inputs(y_true, probabilities)
    scores = referral_scores(probabilities)
    malignant, referred = is_malignant(y_true), scores >= threshold
    lesions = (np.asarray(lesion_ids).astype(str) if lesion_ids is not None
               else np.arange(len(y_true)).astype(str))
    resamples = LesionBootstrap(lesions, n_resamples, seed)
    report: dict[str, Any] = {"threshold": float(threshold)}
    for name, positives, hits in (("sensitivity", malignant, referred),
                                  ("specificity", ~malignant, ~referred)):
        if positives.any():
            low, high = percentile_interval(resamples.recall(hits, positives))
            value = float(recall_score(positives, hits & positives))
        else:
            value = low = high = math.nan
        report |= {name: value, f"{name}_ci_low": low, f"{name}_ci_high": high}
    both = malignant.any() and not malignant.all()
    report |= {
        "referral_rate": float(referred.mean()),
        "roc_auc": float(roc_auc_score(malignant, scores)) if both else math.nan,
        "n_malignant": int(malignant.sum()), "n_benign": int((~malignant).sum()),
        "n_lesions": len(np.unique(lesions)), "bootstrap_resamples": n_resamples,
        "resampled_by": "lesion" if lesion_ids is not None else "image",
    }
    return report


def referral_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The MLflow metrics of a `referral_report`: `referral_sensitivity` (and `_ci_low`,
    `_ci_high`), the same for specificity, `referral_rate` and `referral_roc_auc`."""
    keys = ("sensitivity", "sensitivity_ci_low", "sensitivity_ci_high", "specificity",
            "specificity_ci_low", "specificity_ci_high", "referral_rate", "roc_auc")
    return {f"referral_{key.removeprefix('referral_')}": float(report[key]) for key in keys}
