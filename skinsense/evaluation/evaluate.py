"""The test part: every figure of one model on a held-out part, derived from its outputs, and
the files that show them.

Probabilities are calibrated with the card's temperature (as served); the report also gives
ECE and NLL of the plain softmax (`ece_uncalibrated`, `nll_uncalibrated`). The app predicts
without test-time flips, and the temperature, the referral threshold and the gate were
fitted on plain logits, so what they promise (calibration, referral, gate, subgroups) is
measured on the plain logits; with tta only the headline metrics differ. When the card has
a referral threshold, the rule is reported with lesion-bootstrap intervals (`referral_*`,
`skinsense.evaluation.metrics`); with the part's manifest the subgroup audit adds
`gap_<metric>_<attribute>` (`skinsense.evaluation.subgroups`); with a gate, its figures
against the reference photos (`ood_*`, `skinsense.evaluation.ood`).

`evaluate_outputs` works from arrays (what `skinsense.evaluation.architecture` passes);
`evaluate_model_dir` loads a folder and runs it for one part.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field
from sklearn.metrics import classification_report

from skinsense.data.records import CachedSplit
from skinsense.evaluation.metrics import (
    ARGMAX_METRICS,
    ECE_BINS,
    evaluation_report,
    expected_calibration_error,
    json_safe,
    referral_metrics,
    referral_report,
)
from skinsense.evaluation.ood import GATE_USABLE, judge_gate, score_against_reference
from skinsense.evaluation.predict import (
    LoadedModel,
    SplitOutputs,
    reference_outputs,
    split_outputs,
)
from skinsense.labels import CLASS_CODES
from skinsense.lifecycle.packaging import ModelCard
from skinsense.trust.calibration import (
    calibrated_probabilities,
    negative_log_likelihood,
    reliability_bins,
)
from skinsense.trust.gate import GateDamagedError, OodGate, load_gate
from skinsense.trust.referral import is_malignant, referral_scores

log = logging.getLogger(__name__)


class EvalResult(BaseModel):
    """Metrics of one model on one part, and where the details were written."""

    arch: str
    model_dir: Path
    metrics: dict[str, float]           # flat, MLflow-ready: see `classification_metrics`
    report_json: Path
    n_images: int
    artifacts: list[Path] = Field(default_factory=list)  # every file written into out_dir
    efficiency: dict[str, float] = Field(default_factory=dict)  # `measure_efficiency`, if asked
    tta: bool = False
    temperature: float = 1.0                  # the card's, applied to every probability above
    referral: dict[str, Any] = Field(default_factory=dict)  # `referral_report` (None for NaN)
    subgroup_files: list[Path] = Field(default_factory=list)  # subgroup_metrics.csv and .md
    subgroup_gaps: dict[str, Any] = Field(default_factory=dict)  # `subgroups.gaps`
    # `ood_report` of the gate on this part (empty when the model has no gate).
    ood: dict[str, Any] = Field(default_factory=dict)
    # `judge_gate` on this part: 'usable', 'unusable' ('' when there is no gate), why it
    # cannot judge, and warnings (its refusal rate) even when it can.
    gate_status: str = ""
    gate_reason: str = ""
    gate_warning: str = ""


class GateOnPart(NamedTuple):
    """The gate's figures on a part (empty without a gate), files, and `judge_gate`'s verdict."""

    ood: dict[str, Any]
    files: list[Path]
    status: str
    reason: str
    warning: str


class _Predictions(NamedTuple):
    report: dict[str, Any]           # `evaluation_report` of the (tta) probabilities
    metrics: dict[str, float]        # its metrics, calibration figures measured as served
    probabilities: np.ndarray        # calibrated, tta-averaged with tta
    served: np.ndarray               # calibrated, plain logits (as the app computes them)
    served_uncalibrated: np.ndarray  # plain softmax of the plain logits
    argmax_unchanged: bool


def _check_argmax_metrics(before: dict[str, float], after: dict[str, float], where: Path) -> bool:
    changed = {k: (before[k], after[k]) for k in ARGMAX_METRICS if before[k] != after[k]}
    if changed:
        # Dividing logits by a positive number keeps every argmax; only a tie of two
        # probabilities rounded to float32 could move one. Worth a loud note, not a crash.
        log.warning("%s: temperature scaling changed argmax metrics %s (before, after); "
                    "only float32 ties should ever do that", where, changed)
    return not changed


def _predictions(card: ModelCard, outputs: SplitOutputs, where: Path) -> _Predictions:
    y_true, temperature = outputs.labels, card.temperature
    probabilities = calibrated_probabilities(outputs.logits, temperature)
    report = evaluation_report(y_true, probabilities)
    before = evaluation_report(y_true, calibrated_probabilities(outputs.logits, 1.0))["metrics"]
    argmax_unchanged = _check_argmax_metrics(before, report["metrics"], where)
    served_uncalibrated = calibrated_probabilities(outputs.plain_logits, 1.0)
    served = calibrated_probabilities(outputs.plain_logits, temperature)
    metrics = report["metrics"] | {
        "ece": expected_calibration_error(y_true, served),
        "ece_uncalibrated": expected_calibration_error(y_true, served_uncalibrated),
        "nll": negative_log_likelihood(outputs.plain_logits, y_true, temperature),
        "nll_uncalibrated": negative_log_likelihood(outputs.plain_logits, y_true)}
    return _Predictions(report, metrics, probabilities, served, served_uncalibrated,
                        argmax_unchanged)


def load_folder_gate(loaded: LoadedModel) -> tuple[OodGate | None, str]:
    """The folder's gate (checked against its weights), or None and why: absent, or
    damaged (then logged: the evaluation goes on without it)."""
    try:
        return load_gate(loaded.model_dir, weights_sha256=loaded.weights_sha256)
    except GateDamagedError as exc:
        log.warning("%s: its out-of-domain gate is not evaluated: %s", loaded.model_dir, exc)
        return None, str(exc)


def gate_on_part(card: ModelCard, gate: OodGate | None, features: np.ndarray,
                 served: np.ndarray, reference: tuple[list[str], np.ndarray, np.ndarray] | None,
                 out_dir: Path, where: Path) -> GateOnPart:
    """The gate on a part: against the reference photos when their outputs are given (else
    only the part's `ood_rate`), and whether it can judge (`judge_gate`)."""
    threshold = card.ood_threshold
    ood: dict[str, Any] = {}
    files: list[Path] = []
    if gate is not None and threshold is not None and reference is not None:
        ood, files = score_against_reference(gate, threshold, features, served, reference,
                                             temperature=card.temperature, out_dir=out_dir,
                                             arch=card.arch)
    elif gate is not None and threshold is not None:
        ood = {"ood_rate": float((gate.scores(features) > threshold).mean()),
               "ood_n_in": float(len(features))}
    status = reason = warning = ""
    if ood:
        status, reason, warning = judge_gate(ood, card.ood_percentile,
                                             fit_reason=gate.unusable_reason)
        if warning:
            log.warning("%s (%s): the out-of-domain gate %s%s", card.arch, where, warning,
                        "" if status == GATE_USABLE else
                        "; it is unusable, and the app serves this model without it")
    return GateOnPart(ood, files, status, reason, warning)


def subgroup_audit(manifest: pd.DataFrame, y_true: np.ndarray, served: np.ndarray,
                   card: ModelCard, out_dir: Path, *, min_images: int, n_resamples: int,
                   seed: int) -> tuple[list[Path], dict[str, Any], dict[str, float]]:
    """The subgroup audit of a part as served: its files (`subgroups/subgroup_metrics.csv`
    and `.md`), the gaps (`subgroups.gaps`) and the gap metrics."""
    import skinsense.evaluation.subgroups as audit

    referred = (referral_scores(served) >= card.referral_threshold
                if card.referral_threshold is not None else None)
    table = audit.subgroup_metrics(manifest, y_true, served.argmax(axis=1), referred,
                                   min_images=min_images, n_resamples=n_resamples, seed=seed)
    files = list(audit.write(table, out_dir / "subgroups", min_images=min_images))
    return files, audit.gaps(table), audit.gap_metrics(table)


def monitoring_reference(card: ModelCard, outputs: SplitOutputs,
                         gate: OodGate | None) -> dict[str, Any]:
    """What monitoring compares the served traffic with: the part as served (plain logits,
    the card's temperature and thresholds, the gate's scores)."""
    from skinsense.monitoring.reference import build_reference

    served = calibrated_probabilities(outputs.plain_logits, card.temperature)
    return build_reference(
        outputs.labels, served, referral_threshold=card.referral_threshold,
        ood_scores=gate.scores(outputs.features) if gate is not None else None,
        ood_threshold=card.ood_threshold)


def calibration_outcome(temperature: float, n_val: int | None,
                        metrics: dict[str, float]) -> dict[str, Any]:
    """What the temperature did on the test part, for the card's `calibration`.

    Args:
        temperature: the card's temperature (fitted on the validation part).
        n_val: validation images it was fitted on (None when unknown).
        metrics: the test part's `evaluate_outputs` metrics (`ece`, `ece_uncalibrated`,
            `nll`, `nll_uncalibrated`).

    Returns:
        `temperature`, `fitted_on`, the four test figures, `helped` (the temperature lowered
        the test NLL, the quantity it was fitted to lower, and did not raise the test ECE,
        the one a reader takes "calibrated" to promise) and `summary`, e.g. "temperature
        1.03 fitted on validation; test ECE 0.096 -> 0.112, NLL 0.739 -> 0.742".
    """
    fitted_on = "validation" + (f" ({n_val} images)" if n_val else "")
    helped = bool(metrics["nll"] < metrics["nll_uncalibrated"]
                  and metrics["ece"] <= metrics["ece_uncalibrated"])
    return {"temperature": temperature, "fitted_on": fitted_on,
            "test_ece_uncalibrated": metrics["ece_uncalibrated"], "test_ece": metrics["ece"],
            "test_nll_uncalibrated": metrics["nll_uncalibrated"], "test_nll": metrics["nll"],
            "helped": helped,
            "summary": (f"temperature {temperature:.2f} fitted on {fitted_on}; test ECE "
                        f"{metrics['ece_uncalibrated']:.3f} -> {metrics['ece']:.3f}, NLL "
                        f"{metrics['nll_uncalibrated']:.3f} -> {metrics['nll']:.3f}")}


def _draw_calibration_and_referral(out_dir: Path, arch: str, y_true: np.ndarray,
                                   uncalibrated: np.ndarray, probabilities: np.ndarray,
                                   metrics: dict[str, float], temperature: float,
                                   referral: dict[str, Any]) -> list[Path]:
    from sklearn.metrics import roc_curve

    from skinsense.evaluation.plots import plot_referral_roc, plot_reliability_diagram

    paths = [plot_reliability_diagram(
        [("uncalibrated", reliability_bins(uncalibrated, y_true, ECE_BINS),
          metrics["ece_uncalibrated"]),
         (f"temperature {temperature:.2f}", reliability_bins(probabilities, y_true, ECE_BINS),
          metrics["ece"])],
        out_dir / "reliability_diagram.png", title=f"{arch}: reliability (test part)")]
    if referral and not math.isnan(referral["roc_auc"]):
        fpr, tpr, _ = roc_curve(is_malignant(y_true), referral_scores(probabilities))
        paths.append(plot_referral_roc(
            fpr, tpr, out_dir / "referral_roc.png", roc_auc=referral["roc_auc"],
            sensitivity=referral["sensitivity"], specificity=referral["specificity"],
            threshold=referral["threshold"], title=f"{arch}: referral score (test part)"))
    return paths


def _write_files(out_dir: Path, card: ModelCard, y_true: np.ndarray, predicted: _Predictions,
                 document: dict[str, Any], referral: dict[str, Any], gate_files: list[Path],
                 history: list[dict[str, float]] | None) -> list[Path]:
    """evaluation.json, the classification report, the probabilities and the figures, in
    the order of `EvalResult.artifacts` (the gate's files before the training curves)."""
    # matplotlib only where figures are drawn
    from skinsense.evaluation.plots import plot_confusion_matrix, plot_training_curves

    report_json = out_dir / "evaluation.json"
    report_json.write_text(json.dumps(json_safe(document), indent=2, allow_nan=False))
    report_txt = out_dir / "classification_report.txt"
    report_txt.write_text(classification_report(
        y_true, predicted.probabilities.argmax(axis=1), labels=list(range(len(CLASS_CODES))),
        target_names=list(CLASS_CODES), digits=4, zero_division=0))
    probabilities_npy = out_dir / "test_probabilities.npy"
    np.save(probabilities_npy, predicted.probabilities)
    files = [report_json, report_txt, probabilities_npy,
             plot_confusion_matrix(np.asarray(predicted.report["confusion_matrix"]),
                                         out_dir / "confusion_matrix.png",
                                         title=f"{card.arch}: confusion matrix"),
             *_draw_calibration_and_referral(out_dir, card.arch, y_true,
                                             predicted.served_uncalibrated, predicted.served,
                                             predicted.metrics, card.temperature, referral),
             *gate_files]
    if history:
        files.append(plot_training_curves(history, out_dir / "training_curves.png",
                                                title=f"{card.arch}: training"))
    return files


def evaluate_outputs(card: ModelCard, outputs: SplitOutputs, *, model_dir: Path, out_dir: Path,
                     gate: OodGate | None, gate_note: str = "",
                     reference: tuple[list[str], np.ndarray, np.ndarray] | None = None,
                     tta: bool = False, history: list[dict[str, float]] | None = None,
                     efficiency: dict[str, float] | None = None,
                     manifest: pd.DataFrame | None = None, subgroups: bool = True,
                     bootstrap_resamples: int = 1000, bootstrap_seed: int = 0,
                     subgroup_min_images: int = 30) -> EvalResult:
    """Every figure of a model on a part from its outputs, written into `out_dir`.

    Args:
        card: the model's card (temperature, thresholds); not changed here.
        outputs: the part's outputs (`split_outputs`, with `tta` as asked).
        model_dir: the model folder (recorded in the result, named in the log).
        out_dir: where the files go (created).
        gate: the model's gate (None: none, or damaged), `gate_note` says why not.
        reference: names, logits and features of the reference photos (`reference_outputs`);
            None scores the gate on the part alone (`ood_rate`).
        tta: whether `outputs.logits` average the flips (recorded in the report).
        history: per-epoch dicts of the training (`TrainResult.history`) to plot.
        efficiency: `measure_efficiency`'s figures, recorded as they are.
        manifest: the part's metadata rows in cache order (`read_cached_manifest`); gives
            the lesion of each image to the bootstrap, and the groups to the audit. Without
            it each image counts as its own lesion and there is no audit.
        subgroups: run the subgroup audit when a manifest is given.
        bootstrap_resamples, bootstrap_seed: the resamples behind every interval.
        subgroup_min_images: smallest count a subgroup figure is given for.

    Returns:
        The flat metrics, the report's path and every file written: `evaluation.json`,
        `classification_report.txt`, `test_probabilities.npy` (calibrated),
        `confusion_matrix.png`, `reliability_diagram.png`, `referral_roc.png` (with a rule
        and both malignant and benign images), `training_curves.png` (with `history`),
        `subgroups/subgroup_metrics.csv` and `.md`, and with a gate and the reference photos
        `ood_scores.png` and `ood_reference_scores.csv`.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    y_true, measured = outputs.labels, efficiency or {}
    predicted = _predictions(card, outputs, model_dir)
    metrics = dict(predicted.metrics)
    lesion_ids = None if manifest is None else manifest["lesion_id"].astype(str).to_numpy()
    referral: dict[str, Any] = {}
    if card.referral_threshold is not None:
        referral = referral_report(y_true, predicted.served, card.referral_threshold,
                                   lesion_ids=lesion_ids, n_resamples=bootstrap_resamples,
                                   seed=bootstrap_seed)
        metrics |= referral_metrics(referral)
    out_dir.mkdir(parents=True, exist_ok=True)
    judged = gate_on_part(card, gate, outputs.features, predicted.served, reference, out_dir,
                          model_dir)
    metrics |= judged.ood
    subgroup_files: list[Path] = []
    subgroup_gaps: dict[str, Any] = {}
    if manifest is not None and subgroups:
        subgroup_files, subgroup_gaps, gap_metrics = subgroup_audit(
            manifest, y_true, predicted.served, card, out_dir, min_images=subgroup_min_images,
            n_resamples=bootstrap_resamples, seed=bootstrap_seed)
        metrics |= gap_metrics
    document = {
        "arch": card.arch, "n_images": len(y_true), "tta": tta, **predicted.report,
        "metrics": metrics,
        "calibration": {"temperature": card.temperature,
                        "ece_uncalibrated": metrics["ece_uncalibrated"], "ece": metrics["ece"],
                        "nll_uncalibrated": metrics["nll_uncalibrated"], "nll": metrics["nll"],
                        "argmax_metrics_unchanged": predicted.argmax_unchanged},
        "referral": referral, "subgroup_gaps": subgroup_gaps, "efficiency": measured,
        "ood_gate": {"threshold": card.ood_threshold, "percentile": card.ood_percentile,
                     "status": judged.status, "reason": judged.reason,
                     "warning": judged.warning, **judged.ood}
        if gate is not None else {"absent": gate_note}}
    files = _write_files(out_dir, card, y_true, predicted, document, referral, judged.files,
                         history)
    return EvalResult(arch=card.arch, model_dir=model_dir, metrics=metrics,
                      report_json=files[0], n_images=len(y_true),
                      artifacts=files,
                      efficiency=measured, tta=tta, temperature=card.temperature,
                      referral=json_safe(referral), subgroup_files=subgroup_files,
                      subgroup_gaps=subgroup_gaps, ood=judged.ood, gate_status=judged.status,
                      gate_reason=judged.reason, gate_warning=judged.warning)


def evaluate_model_dir(model_dir: Path, split: CachedSplit, *, out_dir: Path, batch_size: int = 64,
                       tta: bool = False, history: list[dict[str, float]] | None = None,
                       efficiency: bool = False, manifest: pd.DataFrame | None = None,
                       subgroups: bool = True, bootstrap_resamples: int = 1000,
                       bootstrap_seed: int = 0, subgroup_min_images: int = 30,
                       gate_reference: bool = True) -> EvalResult:
    """Evaluate a model folder on a cached part and write every detail into `out_dir`
    (`evaluate_outputs`), and the part's monitoring reference into the folder.

    The folder is loaded once; its gate file is used when it is there and made from the
    current weights. `efficiency` also runs `measure_efficiency` (a few seconds on a CPU);
    `gate_reference` False scores the gate on the part alone (only its `ood_rate`). The
    other arguments are `evaluate_outputs`'s; `batch_size` is images per forward pass and
    `tta` flip test-time augmentation (see `split_outputs`).

    Raises:
        ValueError: the cache was built at another size than the model takes.
    """
    from skinsense.evaluation.efficiency import measure_efficiency
    from skinsense.monitoring.reference import save_reference

    loaded = LoadedModel.load(model_dir)
    card = loaded.card
    outputs = split_outputs(loaded, split, batch_size=batch_size, tta=tta)
    gate, gate_note = load_folder_gate(loaded)
    reference = (reference_outputs(loaded, batch_size=batch_size)
                 if gate is not None and card.ood_threshold is not None and gate_reference
                 else None)
    measured = measure_efficiency(loaded) if efficiency else {}
    result = evaluate_outputs(
        card, outputs, model_dir=loaded.model_dir, out_dir=out_dir, gate=gate,
        gate_note=gate_note, reference=reference, tta=tta, history=history,
        efficiency=measured, manifest=manifest, subgroups=subgroups,
        bootstrap_resamples=bootstrap_resamples, bootstrap_seed=bootstrap_seed,
        subgroup_min_images=subgroup_min_images)
    save_reference(loaded.model_dir, monitoring_reference(card, outputs, gate))
    return result
