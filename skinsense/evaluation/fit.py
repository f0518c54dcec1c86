"""Fitting on the validation part: the temperature, the referral threshold and the
out-of-domain gate (its statistics from the training part), from the model's outputs.

The temperature minimizes the validation NLL of the logits as the app computes them (one
view, no test-time augmentation). The referral threshold is the highest at which at least
the target share of the malignant validation images are referred, on calibrated
probabilities. The gate (`skinsense.trust.gate`) takes its class means and shared
Ledoit-Wolf covariance from the training part's features and its threshold from the
validation part's scores (the same forward pass as the temperature's logits). All of it is
recorded in the card in memory (`record_fit`); whoever loaded the model writes the card and
the gate file (`calibrate_model_dir` for one folder, `skinsense.evaluation.architecture` for
the evaluate stage). The test part is never used here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel
from sklearn.metrics import recall_score

from skinsense.data.records import CachedSplit
from skinsense.evaluation.metrics import expected_calibration_error
from skinsense.evaluation.ood import GATE_UNUSABLE, GATE_USABLE
from skinsense.evaluation.predict import LoadedModel, SplitOutputs, split_outputs
from skinsense.labels import CLASS_CODES
from skinsense.lifecycle.packaging import ModelCard, save_card
from skinsense.trust.calibration import (
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    calibrated_probabilities,
    fit_temperature,
    negative_log_likelihood,
)
from skinsense.trust.gate import OodGate, choose_threshold, fit_gate, save_gate
from skinsense.trust.referral import (
    choose_referral_threshold,
    describe_rule,
    is_malignant,
    referral_scores,
)

log = logging.getLogger(__name__)


class Calibration(BaseModel):
    """What calibrating a model folder on the validation part found (also written to its card)."""

    temperature: float
    n_images: int
    nll_uncalibrated: float
    nll: float
    ece_uncalibrated: float
    ece: float
    referral_sensitivity_target: float
    referral_threshold: float | None
    # The rule on the validation part it was chosen on (None when there is no rule).
    referral_sensitivity: float | None = None
    referral_specificity: float | None = None
    note: str = ""
    # The out-of-domain gate (None when it was not fitted: no training part given).
    ood_threshold: float | None = None
    ood_percentile: float | None = None
    ood_gate_images: int | None = None      # training images its statistics come from
    val_ood_rate: float | None = None       # share of validation images it refuses

    def metrics(self) -> dict[str, float]:
        """MLflow metrics: `temperature`, `referral_threshold`, `ood_threshold` and the
        `val_*` figures."""
        values = {"temperature": self.temperature, "referral_threshold": self.referral_threshold,
                  "val_nll_uncalibrated": self.nll_uncalibrated, "val_nll": self.nll,
                  "val_ece_uncalibrated": self.ece_uncalibrated, "val_ece": self.ece,
                  "val_referral_sensitivity": self.referral_sensitivity,
                  "val_referral_specificity": self.referral_specificity,
                  "ood_threshold": self.ood_threshold, "val_ood_rate": self.val_ood_rate}
        return {k: float(v) for k, v in values.items() if v is not None}


def training_originals(train_split: CachedSplit) -> np.ndarray | None:
    """Rows of the cached training part that are original images (not oversampled copies).

    The gate describes the images the model was trained on, not augmented duplicates of
    the rare classes (which would also cost a forward pass each). None (use every row)
    when the part names no manifest to tell them apart.
    """
    return gate_training_rows(train_split)[0]


def gate_training_rows(train_split: CachedSplit) -> tuple[np.ndarray | None, str]:
    """`training_originals`, and what the gate is then fitted on, in words (the card's
    `ood_gate.fitted_on`)."""
    from skinsense.data.cache import read_cached_manifest
    from skinsense.data.records import SOURCE_IMAGE_COLUMN

    try:
        manifest = read_cached_manifest(train_split)
    except (ValueError, OSError) as exc:
        log.warning("fitting the gate on every training row, copies included: %s", exc)
        return None, (f"training part, every row: oversampled copies included, since its "
                      f"manifest could not be read ({exc})")
    if SOURCE_IMAGE_COLUMN not in manifest.columns:
        return None, (f"training part, every row (its manifest has no {SOURCE_IMAGE_COLUMN} "
                      f"column: no oversampled copies are known)")
    return (np.flatnonzero(manifest[SOURCE_IMAGE_COLUMN].isna().to_numpy()),
            "training part, original images (no oversampled copies)")


@dataclass
class GateFit:
    """The out-of-domain gate fitted on the training part, thresholded on validation."""

    gate: OodGate
    threshold: float
    percentile: float
    val_ood_rate: float      # share of validation images it refuses
    fitted_on: str           # the card's `ood_gate.fitted_on`
    n_val: int


def fit_gate_on_outputs(train: SplitOutputs, val_features: np.ndarray, *, percentile: float,
                        weights_sha256: str, fitted_on: str) -> GateFit:
    """Fit the gate on the training part's features and its threshold on validation.

    Args:
        train: the outputs of the training rows the gate describes (`training_originals`).
        val_features: (N, D) penultimate features of the validation part.
        percentile: the threshold is this percentile of the validation scores.
        weights_sha256: of the weights the features come from (the gate file records it).
        fitted_on: what `train` holds, in words.
    """
    gate = fit_gate(train.features, train.labels, weights_sha256=weights_sha256)
    val_scores = gate.scores(val_features)
    threshold = choose_threshold(val_scores, percentile)
    return GateFit(gate=gate, threshold=threshold, percentile=percentile,
                   val_ood_rate=float((val_scores > threshold).mean()), fitted_on=fitted_on,
                   n_val=len(val_features))


def fit_calibration(val: SplitOutputs, *, referral_sensitivity: float,
                    where: Path | str = "") -> Calibration:
    """The temperature and the referral threshold from the validation part's plain logits.

    Args:
        val: the validation part's outputs (one view, as served).
        referral_sensitivity: the sensitivity target (`EvalConfig.referral_sensitivity`).
        where: the model, for the log.

    Raises:
        ValueError: the validation part is empty, or the logits are not finite.
    """
    logits, y_val = val.plain_logits, val.labels
    if len(y_val) == 0:
        raise ValueError(f"the validation part of {where} holds no image; the temperature "
                         f"and the referral threshold are fitted on it")
    temperature = fit_temperature(logits, y_val)
    if not MIN_TEMPERATURE * 1.01 < temperature < MAX_TEMPERATURE / 1.01:
        log.warning("%s: the fitted temperature %.3g is at the end of its range: the logits "
                    "carry almost no information about the labels (an untrained model?)",
                    where, temperature)
    probabilities = calibrated_probabilities(logits, temperature)
    scores = referral_scores(probabilities)
    threshold, note, sensitivity, specificity = None, "", None, None
    try:
        threshold = choose_referral_threshold(y_val, scores, referral_sensitivity)
    except ValueError as exc:
        note = str(exc)
        log.warning("%s: no referral rule: %s", where, exc)
    if threshold is not None:
        malignant, referred = is_malignant(y_val), scores >= threshold
        sensitivity = float(recall_score(malignant, referred))
        specificity = (float(recall_score(~malignant, ~referred)) if (~malignant).any()
                       else None)
    return Calibration(
        temperature=temperature, n_images=len(y_val),
        nll_uncalibrated=negative_log_likelihood(logits, y_val),
        nll=negative_log_likelihood(logits, y_val, temperature),
        ece_uncalibrated=expected_calibration_error(y_val, calibrated_probabilities(logits, 1.0)),
        ece=expected_calibration_error(y_val, probabilities),
        referral_sensitivity_target=referral_sensitivity, referral_threshold=threshold,
        referral_sensitivity=sensitivity, referral_specificity=specificity, note=note)


def record_fit(card: ModelCard, calibration: Calibration, gate_fit: GateFit | None) -> None:
    """Write what was fitted into the card in memory: `temperature`, `referral_threshold`,
    `referral_sensitivity_target`, `referral_rule` and, with a gate, `ood_threshold`,
    `ood_percentile` and `ood_gate` (judged again on the test part by `judge_gate`)."""
    card.temperature = calibration.temperature
    card.referral_threshold = calibration.referral_threshold
    card.referral_sensitivity_target = calibration.referral_sensitivity_target
    card.referral_rule = describe_rule(calibration.referral_threshold,
                                       calibration.referral_sensitivity_target)
    if gate_fit is None:
        return
    gate = gate_fit.gate
    card.ood_threshold = gate_fit.threshold
    card.ood_percentile = gate_fit.percentile
    card.ood_gate = {
        "score": "smallest Mahalanobis distance of the penultimate features to a class "
                 "mean (shared Ledoit-Wolf covariance)",
        "fitted_on": gate_fit.fitted_on,
        "train_images": gate.n_images, "feature_dim": gate.feature_dim,
        "relative_spread": gate.relative_spread,
        # Judged again on the test part by the evaluation stage (`judge_gate`).
        "status": GATE_UNUSABLE if gate.unusable_reason else GATE_USABLE,
        "reason": gate.unusable_reason,
        "shrinkage": gate.shrinkage, "classes": [CLASS_CODES[int(k)] for k in
                                                 gate.class_indices],
        "threshold_from": f"{gate_fit.percentile:g}th percentile of the validation part's "
                          f"scores ({gate_fit.n_val} images)",
        "val_ood_rate": gate_fit.val_ood_rate}


def fit_on_validation(loaded: LoadedModel, val: SplitOutputs, *, referral_sensitivity: float,
                      train_split: CachedSplit | None = None, gate_percentile: float = 95.0,
                      batch_size: int = 64) -> tuple[Calibration, GateFit | None]:
    """Fit the temperature and the referral threshold on the validation outputs and, with
    the training part, the gate; record them in `loaded.card` (in memory: nothing is written).

    Args:
        loaded: the model; its card is updated.
        val: the validation part's outputs.
        referral_sensitivity: the sensitivity target (`EvalConfig.referral_sensitivity`).
        train_split: the cached training part (one forward pass over its original images);
            None leaves the gate as it is.
        gate_percentile: the gate's threshold is this percentile of the validation scores.
        batch_size: images per forward pass.

    Returns:
        The temperature, the thresholds and the validation figures before and after, and
        the gate (None without the training part).
    """
    calibration = fit_calibration(val, referral_sensitivity=referral_sensitivity,
                                  where=loaded.model_dir)
    gate_fit = None
    if train_split is not None:
        rows, fitted_on = gate_training_rows(train_split)
        train = split_outputs(loaded, train_split, batch_size=batch_size, rows=rows)
        gate_fit = fit_gate_on_outputs(train, val.features, percentile=gate_percentile,
                                       weights_sha256=loaded.weights_sha256, fitted_on=fitted_on)
        if gate_fit.gate.unusable_reason:
            log.warning("%s: its out-of-domain gate is unusable: %s; the app will serve the "
                        "model without it", loaded.model_dir, gate_fit.gate.unusable_reason)
        calibration = calibration.model_copy(update={
            "ood_threshold": gate_fit.threshold, "ood_percentile": gate_percentile,
            "ood_gate_images": gate_fit.gate.n_images, "val_ood_rate": gate_fit.val_ood_rate})
    record_fit(loaded.card, calibration, gate_fit)
    return calibration, gate_fit


def calibrate_model_dir(model_dir: Path, val_split: CachedSplit, *, referral_sensitivity: float,
                        batch_size: int = 64, train_split: CachedSplit | None = None,
                        gate_percentile: float = 95.0) -> Calibration:
    """Fit the temperature and choose the referral threshold on the validation part of a
    model folder; with the training part, also fit the out-of-domain gate. Writes the card
    (and `ood_gate.safetensors`), which every predictor path then follows.

    Args:
        model_dir: a model folder (see `skinsense.lifecycle.packaging`).
        val_split: the cached validation part at the model's input size.
        referral_sensitivity: the sensitivity target (`EvalConfig.referral_sensitivity`).
        batch_size: images per forward pass.
        train_split: the cached training part; None leaves the gate as it is.
        gate_percentile: the gate's threshold is this percentile of the validation scores.

    Returns:
        The temperature, the thresholds and the validation figures before and after.

    Raises:
        ValueError: the validation part is empty, or the logits are not finite.
    """
    loaded = LoadedModel.load(model_dir)
    val = split_outputs(loaded, val_split, batch_size=batch_size)
    calibration, gate_fit = fit_on_validation(
        loaded, val, referral_sensitivity=referral_sensitivity, train_split=train_split,
        gate_percentile=gate_percentile, batch_size=batch_size)
    if gate_fit is not None:
        save_gate(gate_fit.gate, loaded.model_dir)
    save_card(loaded.card, loaded.model_dir)
    return calibration
