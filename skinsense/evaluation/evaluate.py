"""Evaluation of a model folder on a held-out cached part: metrics, plots, size and latency.

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
  (fitted on the validation part by `calibrate_model_dir`) before the softmax, exactly as
  every predictor does. `ece_uncalibrated` and `nll_uncalibrated` are the plain softmax's;
  the argmax metrics (`ARGMAX_METRICS`) are the same either way, and checked to be.
- The referral rule (`skinsense.trust.referral`) is reported as `referral_sensitivity` and
  `referral_specificity` with 95% intervals from a bootstrap over lesions
  (`skinsense.evaluation.bootstrap`), `referral_rate` and `referral_roc_auc`; the subgroup audit adds
  `gap_<metric>_<attribute>` (`skinsense.evaluation.subgroups`).
- The out-of-domain gate (`skinsense.trust.gate`, fitted by `calibrate_model_dir` with the
  temperature) is reported with the part's images as in-domain against the
  non-dermatoscopic reference images (`skinsense.evaluation.ood_reference`): `ood_auroc` (refused
  images positive, gate score as the score; 1.0 separates perfectly), `ood_fpr_at_95_tpr`
  (the share of reference images still accepted at the score that accepts 95% of the part's
  images; the literature's "FPR at 95% TPR", in-domain positive), `ood_rate` (share of the
  part's images the gate refuses at its threshold: about 1 - percentile / 100 by design),
  `ood_reference_refused` (share of reference images refused at the threshold),
  `ood_auroc_p_value` (one-sided Mann-Whitney test that the reference images score higher
  than the part's: the chance of an AUROC this far above 0.5 from a gate that cannot tell
  them apart) and, as the baseline the gate is meant to beat, `ood_auroc_max_softmax` (the
  same AUROC with one minus the top calibrated probability as the score).
- A gate that cannot judge is reported, not used (`judge_gate`): it is `unusable` when its
  features barely vary (`skinsense.trust.gate.MIN_RELATIVE_SPREAD`, checked when it is fitted),
  when it refuses far more of the part than its nominal rate (more than
  `OOD_RATE_WARNING_FACTOR` times `1 - percentile / 100`, and a one-sided binomial test at
  the nominal rate gives p < `OOD_UNUSABLE_P`), or when its AUROC against the reference
  photos is not above 0.5 beyond chance (`ood_auroc_p_value` >= `OOD_UNUSABLE_P`). A refusal
  rate over twice the nominal one is warned about in any case.

`classification_metrics` returns flat `dict[str, float]` whose keys are MLflow metric names:
the headline scalars (`HEADLINE_METRICS`) plus `precision_<code>`, `recall_<code>`,
`f1_<code>` for every class present in `y_true` and `roc_auc_<code>` where it is defined.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, Field
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
from skinsense.trust.calibration import (
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    calibrated_probabilities,
    fit_temperature,
    negative_log_likelihood,
    reliability_bins,
)
from skinsense.data.records import CachedSplit
from skinsense.trust.gate import (
    GateDamagedError,
    OodGate,
    choose_threshold,
    fit_gate,
    load_gate,
    save_gate,
)
from skinsense.labels import CLASS_CODES, CODE_TO_INDEX
from skinsense.models import LogitsAndFeatures
from skinsense.packaging import WEIGHTS_FILE, load_card, load_model_dir, save_card
from skinsense.presets import make_preset
from skinsense.trust.referral import (
    choose_referral_threshold,
    describe_rule,
    is_malignant,
    referral_scores,
)

log = logging.getLogger(__name__)

HEADLINE_METRICS: tuple[str, ...] = (
    "balanced_accuracy", "accuracy", "macro_f1", "macro_roc_auc",
    "mel_sensitivity", "mel_specificity", "ece",
)
ECE_BINS = 15  # the usual choice since Guo et al. 2017, so numbers compare with the literature
MELANOMA = "mel"
# Columns a comparison table shows first, in this order; other keys follow alphabetically.
# The referral rule at the same validation sensitivity target: what a clinician compares.
REFERRAL_COMPARED: tuple[str, ...] = ("referral_sensitivity", "referral_specificity")
# And how well each model's gate refuses non-dermatoscopic images, how many of the test
# part's own images it refuses, and whether it can judge at all (`gate`).
OOD_COMPARED: tuple[str, ...] = ("ood_auroc", "ood_fpr_at_95_tpr", "ood_rate")
COMPARISON_COLUMNS: tuple[str, ...] = (
    "arch", *HEADLINE_METRICS, *REFERRAL_COMPARED, *OOD_COMPARED, "gate", "parameters",
    "weights_mb", "cpu_latency_ms", "gpu_images_per_s",
)
# A gate refusing more than this many times its nominal share of in-domain test images is
# warned about; significantly so (binomial p below OOD_UNUSABLE_P) makes it unusable, as
# does an AUROC against the reference photos that chance explains (p at or above it).
OOD_RATE_WARNING_FACTOR = 2.0
OOD_UNUSABLE_P = 1e-3
GATE_USABLE, GATE_UNUSABLE = "usable", "unusable"


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
    subgroup_gaps: dict[str, Any] = Field(default_factory=dict)  # `skinsense.evaluation.subgroups.gaps`
    # `ood_report` of the gate on this part (empty when the model has no gate).
    ood: dict[str, Any] = Field(default_factory=dict)
    # `judge_gate` on this part: 'usable', 'unusable' ('' when there is no gate), why it
    # cannot judge, and warnings (its refusal rate) even when it can.
    gate_status: str = ""
    gate_reason: str = ""
    gate_warning: str = ""


# -- prediction ---------------------------------------------------------------------------------

def _flip_views(batch: torch.Tensor) -> list[torch.Tensor]:
    # Dermatoscopy has no canonical orientation, so flipped views are equally valid inputs.
    return [batch, torch.flip(batch, dims=(3,)), torch.flip(batch, dims=(2,))]


@torch.inference_mode()
def _forward_batches(model_dir: Path, batches, *, tta: bool = False
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits, penultimate features and plain logits of uint8 (B, H, W, 3) batches, on the
    GPU if any. The plain logits are those of the image itself (one view, as served): the
    same array as the logits without tta, the first of the views with it."""
    model, card = load_model_dir(model_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    split = LogitsAndFeatures(model).to(device, memory_format=torch.channels_last).eval()
    preset = make_preset("eval", mean=card.mean, std=card.std).to(device)
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
        return (empty, np.zeros((0, LogitsAndFeatures(model).feature_dim), dtype=np.float32),
                empty)
    logits = torch.cat(logits_out).numpy().astype(np.float32, copy=False)
    plain = torch.cat(plain_out).numpy().astype(np.float32, copy=False) if tta else logits
    return logits, torch.cat(features_out).numpy().astype(np.float32, copy=False), plain


def predict_outputs(model_dir: Path, split: CachedSplit, *, batch_size: int = 64,
                    tta: bool = False, rows: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Logits and penultimate features of the model folder on a cached part, in one pass
    (`_predict_outputs` without the plain logits).

    Args:
        model_dir: a model folder (see `skinsense.packaging`).
        split: a cached part at the model's input size.
        batch_size: images per forward pass.
        tta: average the logits over the image, its horizontal and its vertical flip.
            Logits rather than probabilities are averaged so that temperature scaling, which
            divides them, keeps the predicted class of the averaged prediction too. The
            features are always those of the image itself (what the served gate sees).
        rows: only these rows of the part (default: all), in this order.

    Returns:
        float32 logits (N, 7) in `CLASS_CODES` order and features (N, D), the input of the
        classifier head.

    Raises:
        ValueError: the cache was built at another size than the model takes.
    """
    return _predict_outputs(model_dir, split, batch_size=batch_size, tta=tta, rows=rows)[:2]


def _predict_outputs(model_dir: Path, split: CachedSplit, *, batch_size: int = 64,
                     tta: bool = False, rows: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`predict_outputs`, and the plain logits (of the image itself, as the app predicts)
    from the same pass: with tta they are the first of its views, so no second pass."""
    card = load_card(model_dir)
    if card.image_size != split.size:
        raise ValueError(
            f"model in {model_dir} takes {card.image_size} px inputs but the cache holds "
            f"{split.size} px images; build the cache at {card.image_size} px"
        )
    images = np.load(split.images_npy, mmap_mode="r")
    order = np.arange(len(images)) if rows is None else np.asarray(rows, dtype=np.int64)
    # Copies: torch refuses to wrap the read-only memory map without a warning.
    batches = (np.array(images[order[start:start + batch_size]])
               for start in range(0, len(order), batch_size))
    return _forward_batches(model_dir, batches, tta=tta)


def predict_logits(model_dir: Path, split: CachedSplit, *, batch_size: int = 64,
                   tta: bool = False) -> np.ndarray:
    """Logits of the model folder on a cached part, on the GPU if there is one.

    Args:
        model_dir: a model folder (see `skinsense.packaging`).
        split: a cached part at the model's input size.
        batch_size: images per forward pass.
        tta: average the logits over the image and its two flips (see `predict_outputs`).

    Returns:
        float32 array (N, 7), columns in `CLASS_CODES` order.

    Raises:
        ValueError: the cache was built at another size than the model takes.
    """
    return predict_outputs(model_dir, split, batch_size=batch_size, tta=tta)[0]


def predict_probabilities(model_dir: Path, split: CachedSplit, *, batch_size: int = 64,
                          tta: bool = False, temperature: float | None = None) -> np.ndarray:
    """Calibrated class probabilities of the model folder on a cached part.

    Args:
        model_dir: a model folder (see `skinsense.packaging`).
        split: a cached part at the model's input size.
        batch_size: images per forward pass.
        tta: average the logits over flips first (see `predict_logits`).
        temperature: divide the logits by this; None uses the card's (what serving does).

    Returns:
        float32 array (N, 7), rows summing to 1, columns in `CLASS_CODES` order.
    """
    if temperature is None:
        temperature = load_card(model_dir).temperature
    logits = predict_logits(model_dir, split, batch_size=batch_size, tta=tta)
    if len(logits) == 0:
        return logits
    return calibrated_probabilities(logits, temperature)


# -- metrics ------------------------------------------------------------------------------------

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


def _check_inputs(y_true: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
    y_true, probabilities = _check_inputs(y_true, probabilities)
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
    y_true, probabilities = _check_inputs(y_true, probabilities)
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


# -- efficiency ---------------------------------------------------------------------------------

def _median_seconds(step, *, repeats: int, warmup: int, sync=None) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        start = time.perf_counter()
        step()
        if sync:
            sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.inference_mode()
def measure_efficiency(model_dir: Path, *, repeats: int = 20, warmup: int = 3) -> dict[str, float]:
    """Size of a model folder and its speed: CPU latency, and GPU throughput where CUDA is.

    Args:
        model_dir: a model folder (see `skinsense.packaging`).
        repeats: timed runs; the median is reported, which shrugs off scheduler hiccups.
        warmup: untimed runs first (allocator, oneDNN/cuDNN kernel selection).

    Returns:
        `parameters` (count), `weights_mb` (size of the safetensors file, 10^6 bytes),
        `cpu_latency_ms` (one image of the card's size, batch 1, fp32, preset included) and,
        only when CUDA is available, `gpu_images_per_s` (batch 64, bf16 autocast).
    """
    model, card = load_model_dir(model_dir)
    size = card.image_size
    result: dict[str, float] = {
        "parameters": float(sum(p.numel() for p in model.parameters())),
        "weights_mb": (Path(model_dir) / WEIGHTS_FILE).stat().st_size / 1e6,
    }
    preset = make_preset("eval", mean=card.mean, std=card.std)
    model = model.to(memory_format=torch.channels_last)
    # A constant image: timing needs no randomness, and drawing some would move the global RNG.
    image = torch.full((1, 3, size, size), 128, dtype=torch.uint8)
    seconds = _median_seconds(lambda: model(preset(image)), repeats=repeats, warmup=warmup)
    result["cpu_latency_ms"] = seconds * 1e3
    if torch.cuda.is_available():
        device = torch.device("cuda")
        gpu_model, gpu_preset = model.to(device), preset.to(device)
        batch = torch.full((64, 3, size, size), 128, dtype=torch.uint8, device=device)

        def gpu_step() -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                gpu_model(gpu_preset(batch))

        seconds = _median_seconds(gpu_step, repeats=repeats, warmup=warmup,
                                  sync=torch.cuda.synchronize)
        result["gpu_images_per_s"] = 64 / seconds
    return result


# -- comparison across architectures -----------------------------------------------------------

def comparison_row(result: EvalResult) -> dict[str, Any]:
    """One row of the comparison table: arch, headline, referral and gate metrics, efficiency."""
    headline = {k: result.metrics[k] for k in (*HEADLINE_METRICS, *REFERRAL_COMPARED,
                                                *OOD_COMPARED) if k in result.metrics}
    return {"arch": result.arch, **headline, "gate": gate_summary_text(result),
            **result.efficiency}


def gate_summary_text(result: EvalResult) -> str:
    """The gate of an evaluation in a few words: 'usable', 'UNUSABLE: why', 'none', with
    any warning about its refusal rate."""
    if not result.gate_status:
        return "none"
    text = ("UNUSABLE: " + result.gate_reason if result.gate_status == GATE_UNUSABLE
            else result.gate_status)
    if result.gate_warning and result.gate_warning not in text:
        text += f"; warning: {result.gate_warning}"
    return text


def comparison_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The architectures side by side, best balanced accuracy first.

    Args:
        rows: one dict per architecture with at least `arch`; usually `comparison_row` output.

    Returns:
        A DataFrame with the `COMPARISON_COLUMNS` that occur first, then any other keys in
        alphabetical order; a row without a key holds NaN there.
    """
    frame = pd.DataFrame(rows)
    known = [c for c in COMPARISON_COLUMNS if c in frame.columns]
    frame = frame[known + sorted(c for c in frame.columns if c not in known)]
    if "balanced_accuracy" in frame.columns:
        frame = frame.sort_values("balanced_accuracy", ascending=False, kind="stable",
                                  na_position="last")
    return frame.reset_index(drop=True)


def _format_cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return f"{value:.4f}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value).replace("|", "\\|")


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table (pandas' `to_markdown` needs `tabulate`)."""
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |",
             "| " + " | ".join("---" for _ in frame.columns) + " |"]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(_format_cell(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def write_comparison(rows: list[dict[str, Any]], out_dir: Path) -> tuple[Path, Path]:
    """Write `comparison.csv` and `comparison.md` into `out_dir` (created); returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = comparison_table(rows)
    csv_path, md_path = out_dir / "comparison.csv", out_dir / "comparison.md"
    frame.to_csv(csv_path, index=False)
    md_path.write_text(markdown_table(frame))
    return csv_path, md_path


def per_class_recalls(results: Sequence[EvalResult]) -> dict[str, dict[str, float]]:
    """Architecture -> class code -> test recall (NaN for classes absent from the part)."""
    return {r.arch: {code: r.metrics.get(f"recall_{code}", math.nan) for code in CLASS_CODES}
            for r in results}


def compare_models(results: Sequence[EvalResult], out_dir: Path) -> list[Path]:
    """Write the comparison of several evaluated architectures into `out_dir`.

    Args:
        results: one evaluation per architecture (with `efficiency` for the size and
            latency columns and panels).
        out_dir: where the files go (created).

    Returns:
        Paths of `comparison.csv`, `comparison.md`, `model_comparison.png` and
        `per_class_recall.png`.
    """
    import skinsense.evaluation.plots as plots

    rows = [comparison_row(r) for r in results]
    csv_path, md_path = write_comparison(rows, out_dir)
    return [csv_path, md_path,
            plots.plot_model_comparison(rows, Path(out_dir) / "model_comparison.png"),
            plots.plot_per_class_recall(per_class_recalls(results),
                                        Path(out_dir) / "per_class_recall.png")]


# -- the whole evaluation of one model folder ---------------------------------------------------

def _json_safe(value: Any) -> Any:
    # Undefined metrics are NaN; strict JSON has no NaN, so they are written as null.
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# Metrics of the predicted class alone: temperature scaling must leave them exactly as they were.
ARGMAX_METRICS: tuple[str, ...] = ("accuracy", "balanced_accuracy", "macro_f1")


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
    y_true, probabilities = _check_inputs(y_true, probabilities)
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
    return _gate_training_rows(train_split)[0]


def _gate_training_rows(train_split: CachedSplit) -> tuple[np.ndarray | None, str]:
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


def fit_gate_model_dir(model_dir: Path, train_split: CachedSplit, val_features: np.ndarray, *,
                       percentile: float, batch_size: int = 64) -> tuple[OodGate, float, float]:
    """Fit the out-of-domain gate on the training part and its threshold on validation.

    Writes `ood_gate.safetensors` into the folder (the caller writes the card).

    Args:
        model_dir: a model folder.
        train_split: the cached training part (original images are used, see
            `training_originals`).
        val_features: (N, D) penultimate features of the validation part.
        percentile: the threshold is this percentile of the validation scores.
        batch_size: images per forward pass.

    Returns:
        The gate, its threshold and the share of validation images it refuses
        (`calibrate_model_dir` also records what it was fitted on in the card).
    """
    return _fit_gate_model_dir(model_dir, train_split, val_features, percentile=percentile,
                               batch_size=batch_size)[:3]


def _fit_gate_model_dir(model_dir: Path, train_split: CachedSplit, val_features: np.ndarray, *,
                        percentile: float, batch_size: int = 64
                        ) -> tuple[OodGate, float, float, str]:
    """`fit_gate_model_dir`, and what the gate was fitted on (`_gate_training_rows`)."""
    from skinsense.export import weights_sha256

    rows, fitted_on = _gate_training_rows(train_split)
    _, train_features = predict_outputs(model_dir, train_split, batch_size=batch_size, rows=rows)
    labels = np.load(train_split.labels_npy)
    labels = labels if rows is None else labels[rows]
    gate = fit_gate(train_features, labels, weights_sha256=weights_sha256(model_dir))
    val_scores = gate.scores(val_features)
    threshold = choose_threshold(val_scores, percentile)
    save_gate(gate, model_dir)
    return gate, threshold, float((val_scores > threshold).mean()), fitted_on


def calibrate_model_dir(model_dir: Path, val_split: CachedSplit, *, referral_sensitivity: float,
                        batch_size: int = 64, train_split: CachedSplit | None = None,
                        gate_percentile: float = 95.0) -> Calibration:
    """Fit the temperature and choose the referral threshold on the validation part; with
    the training part, also fit the out-of-domain gate.

    The temperature minimizes the validation NLL of the logits as the app computes them (one
    view, no test-time augmentation). The referral threshold is the highest at which at least
    `referral_sensitivity` of the malignant validation images are referred, on calibrated
    probabilities. Both go into the folder's card (`temperature`, `referral_threshold`,
    `referral_sensitivity_target`), which every predictor path then follows. The gate
    (`skinsense.trust.gate`) takes its class means and shared Ledoit-Wolf covariance from the
    training part's features and its threshold from the validation part's scores (the same
    forward pass as the temperature's logits): `ood_gate.safetensors`, and `ood_threshold`,
    `ood_percentile`, `ood_gate` in the card.

    Args:
        model_dir: a model folder (see `skinsense.packaging`).
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
    logits, val_features = predict_outputs(model_dir, val_split, batch_size=batch_size)
    y_val = np.load(val_split.labels_npy)
    if len(y_val) == 0:
        raise ValueError(f"the validation part {val_split.images_npy} holds no image; the "
                         f"temperature and the referral threshold are fitted on it")
    temperature = fit_temperature(logits, y_val)
    if not MIN_TEMPERATURE * 1.01 < temperature < MAX_TEMPERATURE / 1.01:
        log.warning("%s: the fitted temperature %.3g is at the end of its range: the logits "
                    "carry almost no information about the labels (an untrained model?)",
                    model_dir, temperature)
    before = calibrated_probabilities(logits, 1.0)
    probabilities = calibrated_probabilities(logits, temperature)
    scores = referral_scores(probabilities)
    threshold, note, sensitivity, specificity = None, "", None, None
    try:
        threshold = choose_referral_threshold(y_val, scores, referral_sensitivity)
    except ValueError as exc:
        note = str(exc)
        log.warning("%s: no referral rule: %s", model_dir, exc)
    if threshold is not None:
        malignant, referred = is_malignant(y_val), scores >= threshold
        sensitivity = float(recall_score(malignant, referred))
        specificity = (float(recall_score(~malignant, ~referred)) if (~malignant).any()
                       else None)
    gate_figures: dict[str, Any] = {}
    if train_split is not None:
        gate, ood_threshold, val_ood_rate, fitted_on = _fit_gate_model_dir(
            model_dir, train_split, val_features, percentile=gate_percentile,
            batch_size=batch_size)
        if gate.unusable_reason:
            log.warning("%s: its out-of-domain gate is unusable: %s; the app will serve the "
                        "model without it", model_dir, gate.unusable_reason)
        gate_figures = {"ood_threshold": ood_threshold, "ood_percentile": gate_percentile,
                        "ood_gate_images": gate.n_images, "val_ood_rate": val_ood_rate}
    card = load_card(model_dir)
    card.temperature = temperature
    card.referral_threshold = threshold
    card.referral_sensitivity_target = referral_sensitivity
    card.referral_rule = describe_rule(threshold, referral_sensitivity)
    if gate_figures:
        card.ood_threshold = gate_figures["ood_threshold"]
        card.ood_percentile = gate_percentile
        card.ood_gate = {
            "score": "smallest Mahalanobis distance of the penultimate features to a class "
                     "mean (shared Ledoit-Wolf covariance)",
            "fitted_on": fitted_on,
            "train_images": gate.n_images, "feature_dim": gate.feature_dim,
            "relative_spread": gate.relative_spread,
            # Judged again on the test part by the evaluation stage (`judge_gate`).
            "status": GATE_UNUSABLE if gate.unusable_reason else GATE_USABLE,
            "reason": gate.unusable_reason,
            "shrinkage": gate.shrinkage, "classes": [CLASS_CODES[int(k)] for k in
                                                     gate.class_indices],
            "threshold_from": f"{gate_percentile:g}th percentile of the validation part's "
                              f"scores ({len(y_val)} images)",
            "val_ood_rate": gate_figures["val_ood_rate"]}
    save_card(card, model_dir)
    return Calibration(
        temperature=temperature, n_images=len(y_val),
        nll_uncalibrated=negative_log_likelihood(logits, y_val),
        nll=negative_log_likelihood(logits, y_val, temperature),
        ece_uncalibrated=expected_calibration_error(y_val, before),
        ece=expected_calibration_error(y_val, probabilities),
        referral_sensitivity_target=referral_sensitivity, referral_threshold=threshold,
        referral_sensitivity=sensitivity, referral_specificity=specificity, note=note,
        **gate_figures)


def calibration_outcome(temperature: float, n_val: int | None,
                        metrics: dict[str, float]) -> dict[str, Any]:
    """What the temperature did on the test part, for the card's `calibration`.

    Args:
        temperature: the card's temperature (fitted on the validation part).
        n_val: validation images it was fitted on (None when unknown).
        metrics: the test part's `evaluate_model_dir` metrics (`ece`, `ece_uncalibrated`,
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


def reference_outputs(model_dir: Path, *, batch_size: int = 64
                      ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Logits and features of the non-dermatoscopic reference images (`ood_reference`).

    Each image is squashed to the model's input exactly as the cache and the app do
    (`resize_square`), so its score is the one the served gate would give it.

    Returns:
        Names, logits (M, 7) and features (M, D).
    """
    from skinsense.data.cache import resize_square
    from skinsense.evaluation.ood_reference import non_dermatoscopic_images

    size = load_card(model_dir).image_size
    named = non_dermatoscopic_images()
    pixels = np.stack([np.asarray(resize_square(image, size)) for _, image in named])
    batches = (pixels[start:start + batch_size] for start in range(0, len(pixels), batch_size))
    logits, features, _ = _forward_batches(model_dir, batches)
    return [name for name, _ in named], logits, features


def ood_report(in_scores: np.ndarray, reference_scores: np.ndarray, threshold: float, *,
               in_max_probability: np.ndarray | None = None,
               reference_max_probability: np.ndarray | None = None) -> dict[str, float]:
    """How well a gate score separates in-domain images from reference (foreign) images.

    Args:
        in_scores: (N,) gate scores of in-domain images (a test part).
        reference_scores: (M,) gate scores of non-dermatoscopic images.
        threshold: the gate's threshold (refuse above).
        in_max_probability, reference_max_probability: the top calibrated probability of
            each image, for the max-softmax baseline.

    Returns:
        `ood_auroc`, `ood_fpr_at_95_tpr`, `ood_rate`, `ood_reference_refused`,
        `ood_auroc_p_value`, `ood_auroc_max_softmax` (when the probabilities are given),
        `ood_n_in`, `ood_n_reference`.
    """
    from scipy.stats import mannwhitneyu
    from sklearn.metrics import roc_curve

    in_scores = np.asarray(in_scores, dtype=np.float64)
    reference_scores = np.asarray(reference_scores, dtype=np.float64)
    if len(in_scores) == 0 or len(reference_scores) == 0:
        raise ValueError("the gate is scored on at least one in-domain and one reference image")
    foreign = np.r_[np.zeros(len(in_scores)), np.ones(len(reference_scores))]
    scores = np.r_[in_scores, reference_scores]
    # In-domain as the positive class and "accepted" as the prediction, as in the
    # literature: at the first point that accepts 95% of the in-domain images, the share of
    # foreign images also accepted.
    fpr, tpr, _ = roc_curve(1 - foreign, -scores, drop_intermediate=False)
    report = {
        "ood_auroc": float(roc_auc_score(foreign, scores)),
        "ood_fpr_at_95_tpr": float(fpr[np.searchsorted(tpr, 0.95 - 1e-12, side="left")]),
        "ood_rate": float((in_scores > threshold).mean()),
        "ood_reference_refused": float((reference_scores > threshold).mean()),
        "ood_n_in": float(len(in_scores)), "ood_n_reference": float(len(reference_scores)),
        "ood_auroc_p_value": float(mannwhitneyu(reference_scores, in_scores,
                                                alternative="greater").pvalue),
    }
    if in_max_probability is not None and reference_max_probability is not None:
        report["ood_auroc_max_softmax"] = float(roc_auc_score(
            foreign, -np.r_[in_max_probability, reference_max_probability]))
    return report


def judge_gate(ood: dict[str, float], percentile: float | None, *,
               fit_reason: str = "") -> tuple[str, str, str]:
    """Whether a gate can judge, from its fit and its figures on a held-out part.

    Args:
        ood: `ood_report` of the gate on the part (or just its `ood_rate` and `ood_n_in`).
        percentile: the card's `ood_percentile` (nominal refusal rate 1 - percentile / 100).
        fit_reason: why the fit found it unusable ('' when it did not: `OodGate.unusable_reason`).

    Returns:
        (status, reason, warning): status `GATE_USABLE` or `GATE_UNUSABLE`; the reasons it
        is unusable in words ('' when usable); a warning about its refusal rate when it is
        over `OOD_RATE_WARNING_FACTOR` times the nominal one ('' otherwise).
    """
    from scipy.stats import binomtest

    reasons = [fit_reason] if fit_reason else []
    warning = ""
    nominal = 1 - (percentile if percentile is not None else 95.0) / 100
    rate, n = ood.get("ood_rate"), int(ood.get("ood_n_in", 0))
    if rate is not None and rate > OOD_RATE_WARNING_FACTOR * nominal:
        warning = (f"it refuses {rate:.0%} of the test part's images, over "
                   f"{OOD_RATE_WARNING_FACTOR:g} times its nominal {nominal:.0%}")
        if n and binomtest(round(rate * n), n, nominal, alternative="greater").pvalue \
                < OOD_UNUSABLE_P:
            reasons.append(warning)
    p_value = ood.get("ood_auroc_p_value")
    if p_value is not None and p_value >= OOD_UNUSABLE_P:
        reasons.append(f"it does not tell non-dermatoscopic photos from the test part's "
                       f"images (AUROC {ood['ood_auroc']:.2f}, no better than chance: "
                       f"p = {p_value:.2g})")
    return (GATE_UNUSABLE if reasons else GATE_USABLE), "; ".join(reasons), warning


def _evaluate_gate(model_dir: Path, gate: OodGate, threshold: float, features: np.ndarray,
                   probabilities: np.ndarray, out_dir: Path, arch: str, batch_size: int
                   ) -> tuple[dict[str, float], list[Path]]:
    import skinsense.evaluation.plots as plots

    names, ref_logits, ref_features = reference_outputs(model_dir, batch_size=batch_size)
    ref_scores = gate.scores(ref_features)
    ref_probabilities = calibrated_probabilities(ref_logits, load_card(model_dir).temperature)
    in_scores = gate.scores(features)
    report = ood_report(in_scores, ref_scores, threshold,
                        in_max_probability=probabilities.max(axis=1),
                        reference_max_probability=ref_probabilities.max(axis=1))
    table = out_dir / "ood_reference_scores.csv"
    pd.DataFrame({"image": names, "ood_score": ref_scores, "refused": ref_scores > threshold,
                  "max_probability": ref_probabilities.max(axis=1),
                  "top_class": [CLASS_CODES[k] for k in ref_probabilities.argmax(axis=1)]}
                 ).to_csv(table, index=False)
    figure = plots.plot_ood_scores(in_scores, dict(zip(names, ref_scores.tolist(), strict=True)),
                                   out_dir / "ood_scores.png", threshold=threshold,
                                   auroc=report["ood_auroc"],
                                   title=f"{arch}: out-of-domain gate")
    return report, [table, figure]


def _check_argmax_metrics(before: dict[str, float], after: dict[str, float], where: Path) -> bool:
    changed = {k: (before[k], after[k]) for k in ARGMAX_METRICS if before[k] != after[k]}
    if changed:
        # Dividing logits by a positive number keeps every argmax; only a tie of two
        # probabilities rounded to float32 could move one. Worth a loud note, not a crash.
        log.warning("%s: temperature scaling changed argmax metrics %s (before, after); "
                    "only float32 ties should ever do that", where, changed)
    return not changed


def _draw_calibration_and_referral(out_dir: Path, arch: str, y_true: np.ndarray,
                                   uncalibrated: np.ndarray, probabilities: np.ndarray,
                                   metrics: dict[str, float], temperature: float,
                                   referral: dict[str, Any]) -> list[Path]:
    from sklearn.metrics import roc_curve

    import skinsense.evaluation.plots as plots

    paths = [plots.plot_reliability_diagram(
        [("uncalibrated", reliability_bins(uncalibrated, y_true, ECE_BINS),
          metrics["ece_uncalibrated"]),
         (f"temperature {temperature:.2f}", reliability_bins(probabilities, y_true, ECE_BINS),
          metrics["ece"])],
        out_dir / "reliability_diagram.png", title=f"{arch}: reliability (test part)")]
    if referral and not math.isnan(referral["roc_auc"]):
        fpr, tpr, _ = roc_curve(is_malignant(y_true), referral_scores(probabilities))
        paths.append(plots.plot_referral_roc(
            fpr, tpr, out_dir / "referral_roc.png", roc_auc=referral["roc_auc"],
            sensitivity=referral["sensitivity"], specificity=referral["specificity"],
            threshold=referral["threshold"], title=f"{arch}: referral score (test part)"))
    return paths


def evaluate_model_dir(model_dir: Path, split: CachedSplit, *, out_dir: Path, batch_size: int = 64,
                       tta: bool = False, history: list[dict[str, float]] | None = None,
                       efficiency: bool = False, manifest: pd.DataFrame | None = None,
                       subgroups: bool = True, bootstrap_resamples: int = 1000,
                       bootstrap_seed: int = 0, subgroup_min_images: int = 30,
                       gate_reference: bool = True) -> EvalResult:
    """Evaluate a model folder on a cached part and write every detail into `out_dir`.

    Probabilities are calibrated with the card's temperature (as served); the report also
    gives ECE and NLL of the plain softmax (`ece_uncalibrated`, `nll_uncalibrated`). When the
    card has a referral threshold, the rule's sensitivity and specificity are reported with
    95% bootstrap intervals over lesions (`referral_*`). With the part's `manifest` the
    subgroup audit runs too (`skinsense.evaluation.subgroups`; `gap_<metric>_<attribute>` metrics).
    When the folder has an out-of-domain gate, it is scored with this part as in-domain
    against the non-dermatoscopic reference images (`ood_*` metrics, see the module
    docstring).

    Writes `evaluation.json` (metrics, per-class scores, confusion matrices, scikit-learn's
    classification report, calibration, referral, efficiency when measured),
    `classification_report.txt`, `confusion_matrix.png`, `reliability_diagram.png`,
    `referral_roc.png` (when there is a rule and both malignant and benign images),
    `test_probabilities.npy` (calibrated), `training_curves.png` when `history` is given,
    `subgroups/subgroup_metrics.csv` and `.md` with the audit, and with a gate
    `ood_scores.png` (the scores of both sets and the threshold) and
    `ood_reference_scores.csv` (each reference image's score and verdict).

    Args:
        model_dir: a model folder (see `skinsense.packaging`).
        split: the cached part to evaluate on, at the model's input size.
        out_dir: where the files go (created).
        batch_size: images per forward pass.
        tta: flip test-time augmentation (see `predict_logits`).
        history: per-epoch dicts of the training (`TrainResult.history`) to plot.
        efficiency: also run `measure_efficiency` (a few seconds on a CPU).
        manifest: the part's metadata rows in cache order (`read_cached_manifest`); gives
            the lesion of each image to the bootstrap, and the groups to the audit. Without
            it each image counts as its own lesion and there is no audit.
        subgroups: run the subgroup audit when a manifest is given.
        bootstrap_resamples: resamples behind every interval.
        bootstrap_seed: seed of the bootstrap.
        subgroup_min_images: smallest count a subgroup figure is given for.
        gate_reference: score the gate against the reference images (False: only the
            part's `ood_rate`).

    Returns:
        The flat metrics, the report's path and every file written.
    """
    import skinsense.evaluation.plots as plots  # matplotlib only where figures are drawn

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    card = load_card(model_dir)
    logits, features, served_logits = _predict_outputs(model_dir, split, batch_size=batch_size,
                                                       tta=tta)
    y_true = np.load(split.labels_npy)
    uncalibrated = calibrated_probabilities(logits, 1.0)
    probabilities = calibrated_probabilities(logits, card.temperature)
    report = evaluation_report(y_true, probabilities)
    before = evaluation_report(y_true, uncalibrated)["metrics"]
    argmax_unchanged = _check_argmax_metrics(before, report["metrics"], model_dir)
    # The app predicts without TTA, and the temperature, the referral threshold and the gate
    # were fitted on plain logits: what they promise (calibration, referral, gate, subgroups)
    # is measured on the plain logits; with tta only the headline report above differs.
    served_uncalibrated = calibrated_probabilities(served_logits, 1.0)
    served = calibrated_probabilities(served_logits, card.temperature)
    metrics = report["metrics"] | {
        "ece": expected_calibration_error(y_true, served),
        "ece_uncalibrated": expected_calibration_error(y_true, served_uncalibrated),
        "nll": negative_log_likelihood(served_logits, y_true, card.temperature),
        "nll_uncalibrated": negative_log_likelihood(served_logits, y_true)}
    lesion_ids = None if manifest is None else manifest["lesion_id"].astype(str).to_numpy()
    referral: dict[str, Any] = {}
    if card.referral_threshold is not None:
        referral = referral_report(y_true, served, card.referral_threshold,
                                   lesion_ids=lesion_ids, n_resamples=bootstrap_resamples,
                                   seed=bootstrap_seed)
        metrics |= referral_metrics(referral)
    measured = measure_efficiency(model_dir) if efficiency else {}
    out_dir.mkdir(parents=True, exist_ok=True)

    ood: dict[str, Any] = {}
    ood_files: list[Path] = []
    from skinsense.export import weights_sha256

    try:
        gate, gate_note = load_gate(model_dir, weights_sha256=weights_sha256(model_dir))
    except GateDamagedError as exc:
        log.warning("%s: its out-of-domain gate is not evaluated: %s", model_dir, exc)
        gate, gate_note = None, str(exc)
    if gate is not None and card.ood_threshold is not None and gate_reference:
        ood, ood_files = _evaluate_gate(model_dir, gate, card.ood_threshold, features,
                                        served, out_dir, card.arch, batch_size)
        metrics |= ood
    elif gate is not None and card.ood_threshold is not None:
        ood = {"ood_rate": float((gate.scores(features) > card.ood_threshold).mean()),
               "ood_n_in": float(len(features))}
        metrics |= ood
    gate_status = gate_reason = gate_warning = ""
    if ood:
        gate_status, gate_reason, gate_warning = judge_gate(
            ood, card.ood_percentile, fit_reason=gate.unusable_reason)
        if gate_warning:
            log.warning("%s (%s): the out-of-domain gate %s%s", card.arch, model_dir,
                        gate_warning, "" if gate_status == GATE_USABLE else
                        "; it is unusable, and the app serves this model without it")

    from skinsense.monitoring.reference import build_reference, save_reference

    # What monitoring compares the served traffic with (stored with the model).
    save_reference(model_dir, build_reference(
        y_true, served, referral_threshold=card.referral_threshold,
        ood_scores=gate.scores(features) if gate is not None and features is not None else None,
        ood_threshold=card.ood_threshold))

    subgroup_files: list[Path] = []
    subgroup_gaps: dict[str, Any] = {}
    if manifest is not None and subgroups:
        import skinsense.evaluation.subgroups as audit

        referred = (referral_scores(served) >= card.referral_threshold
                    if card.referral_threshold is not None else None)
        table = audit.subgroup_metrics(manifest, y_true, served.argmax(axis=1), referred,
                                       min_images=subgroup_min_images,
                                       n_resamples=bootstrap_resamples, seed=bootstrap_seed)
        subgroup_files = list(audit.write(table, out_dir / "subgroups",
                                          min_images=subgroup_min_images))
        subgroup_gaps = audit.gaps(table)
        metrics |= audit.gap_metrics(table)

    report_json = out_dir / "evaluation.json"
    report_json.write_text(json.dumps(_json_safe(
        {"arch": card.arch, "n_images": len(y_true), "tta": tta, **report, "metrics": metrics,
         "calibration": {"temperature": card.temperature,
                         "ece_uncalibrated": metrics["ece_uncalibrated"],
                         "ece": metrics["ece"], "nll_uncalibrated": metrics["nll_uncalibrated"],
                         "nll": metrics["nll"], "argmax_metrics_unchanged": argmax_unchanged},
         "referral": referral, "subgroup_gaps": subgroup_gaps, "efficiency": measured,
         "ood_gate": {"threshold": card.ood_threshold, "percentile": card.ood_percentile,
                      "status": gate_status, "reason": gate_reason, "warning": gate_warning,
                      **ood} if gate is not None else {"absent": gate_note}}),
        indent=2, allow_nan=False))
    report_txt = out_dir / "classification_report.txt"
    report_txt.write_text(classification_report(
        y_true, probabilities.argmax(axis=1), labels=list(range(len(CLASS_CODES))),
        target_names=list(CLASS_CODES), digits=4, zero_division=0))
    probabilities_npy = out_dir / "test_probabilities.npy"
    np.save(probabilities_npy, probabilities)
    artifacts = [report_json, report_txt, probabilities_npy,
                 plots.plot_confusion_matrix(np.asarray(report["confusion_matrix"]),
                                             out_dir / "confusion_matrix.png",
                                             title=f"{card.arch}: confusion matrix"),
                 *_draw_calibration_and_referral(out_dir, card.arch, y_true,
                                                 served_uncalibrated, served, metrics,
                                                 card.temperature,
                                                 referral),
                 *ood_files]
    if history:
        artifacts.append(plots.plot_training_curves(history, out_dir / "training_curves.png",
                                                    title=f"{card.arch}: training"))
    return EvalResult(arch=card.arch, model_dir=model_dir, metrics=metrics,
                      report_json=report_json, n_images=len(y_true), artifacts=artifacts,
                      efficiency=measured, tta=tta, temperature=card.temperature,
                      referral=_json_safe(referral), subgroup_files=subgroup_files,
                      subgroup_gaps=subgroup_gaps, ood=ood, gate_status=gate_status,
                      gate_reason=gate_reason, gate_warning=gate_warning)
