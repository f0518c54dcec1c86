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

`classification_metrics` returns flat `dict[str, float]` whose keys are MLflow metric names:
the headline scalars (`HEADLINE_METRICS`) plus `precision_<code>`, `recall_<code>`,
`f1_<code>` for every class present in `y_true` and `roc_auc_<code>` where it is defined.
"""

from __future__ import annotations

import json
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

from skinsense.data.records import CachedSplit
from skinsense.labels import CLASS_CODES, CODE_TO_INDEX
from skinsense.packaging import WEIGHTS_FILE, load_card, load_model_dir
from skinsense.presets import make_preset

HEADLINE_METRICS: tuple[str, ...] = (
    "balanced_accuracy", "accuracy", "macro_f1", "macro_roc_auc",
    "mel_sensitivity", "mel_specificity", "ece",
)
ECE_BINS = 15  # the usual choice since Guo et al. 2017, so numbers compare with the literature
MELANOMA = "mel"
# Columns a comparison table shows first, in this order; other keys follow alphabetically.
COMPARISON_COLUMNS: tuple[str, ...] = (
    "arch", *HEADLINE_METRICS, "parameters", "weights_mb", "cpu_latency_ms",
    "gpu_images_per_s",
)


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


# -- prediction ---------------------------------------------------------------------------------

def _flip_views(batch: torch.Tensor) -> list[torch.Tensor]:
    # Dermatoscopy has no canonical orientation, so flipped views are equally valid inputs.
    return [batch, torch.flip(batch, dims=(3,)), torch.flip(batch, dims=(2,))]


@torch.inference_mode()
def predict_probabilities(model_dir: Path, split: CachedSplit, *, batch_size: int = 64,
                          tta: bool = False) -> np.ndarray:
    """Class probabilities of the model folder on a cached part, on the GPU if there is one.

    Args:
        model_dir: a model folder (see `skinsense.packaging`).
        split: a cached part at the model's input size.
        batch_size: images per forward pass.
        tta: average the softmax over the image, its horizontal and its vertical flip.

    Returns:
        float32 array (N, 7), rows summing to 1, columns in `CLASS_CODES` order.

    Raises:
        ValueError: the cache was built at another size than the model takes.
    """
    model, card = load_model_dir(model_dir)
    if card.image_size != split.size:
        raise ValueError(
            f"model in {model_dir} takes {card.image_size} px inputs but the cache holds "
            f"{split.size} px images; build the cache at {card.image_size} px"
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device, memory_format=torch.channels_last)
    preset = make_preset("eval", mean=card.mean, std=card.std).to(device)
    images = np.load(split.images_npy, mmap_mode="r")
    out = []
    for start in range(0, len(images), batch_size):
        # A copy: torch refuses to wrap the read-only memory map without a warning.
        batch = torch.from_numpy(np.array(images[start:start + batch_size]))
        batch = batch.permute(0, 3, 1, 2).to(device)
        views = _flip_views(batch) if tta else [batch]
        probs = torch.stack([torch.softmax(model(preset(v)).float(), dim=1) for v in views])
        out.append(probs.mean(dim=0).cpu())
    if not out:
        return np.zeros((0, len(CLASS_CODES)), dtype=np.float32)
    return torch.cat(out).numpy().astype(np.float32, copy=False)


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
    ece = multiclass_calibration_error(
        torch.from_numpy(probabilities), torch.from_numpy(y_true), num_classes=len(CLASS_CODES),
        n_bins=ECE_BINS, norm="l1")
    metrics = {
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "macro_roc_auc": _mean_or_nan(aucs),
        "mel_sensitivity": float(recall_score(is_mel, pred_mel, pos_label=1,
                                              zero_division=np.nan)),
        "mel_specificity": float(recall_score(is_mel, pred_mel, pos_label=0,
                                              zero_division=np.nan)),
        "ece": float(ece),
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
    """One row of the comparison table from an evaluation: arch, headline metrics, efficiency."""
    headline = {k: result.metrics[k] for k in HEADLINE_METRICS if k in result.metrics}
    return {"arch": result.arch, **headline, **result.efficiency}


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
    from skinsense import plots

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


def evaluate_model_dir(model_dir: Path, split: CachedSplit, *, out_dir: Path, batch_size: int = 64,
                       tta: bool = False, history: list[dict[str, float]] | None = None,
                       efficiency: bool = False) -> EvalResult:
    """Evaluate a model folder on a cached part and write every detail into `out_dir`.

    Writes `evaluation.json` (metrics, per-class scores, confusion matrices, scikit-learn's
    classification report, efficiency when measured), `classification_report.txt`,
    `confusion_matrix.png`, `test_probabilities.npy` and, when `history` is given,
    `training_curves.png`.

    Args:
        model_dir: a model folder (see `skinsense.packaging`).
        split: the cached part to evaluate on, at the model's input size.
        out_dir: where the files go (created).
        batch_size: images per forward pass.
        tta: flip test-time augmentation (see `predict_probabilities`).
        history: per-epoch dicts of the training (`TrainResult.history`) to plot.
        efficiency: also run `measure_efficiency` (a few seconds on a CPU).

    Returns:
        The flat metrics, the report's path and every file written.
    """
    from skinsense import plots  # matplotlib only where figures are drawn

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    probabilities = predict_probabilities(model_dir, split, batch_size=batch_size, tta=tta)
    y_true = np.load(split.labels_npy)
    report = evaluation_report(y_true, probabilities)
    card = load_card(model_dir)
    measured = measure_efficiency(model_dir) if efficiency else {}
    out_dir.mkdir(parents=True, exist_ok=True)

    report_json = out_dir / "evaluation.json"
    report_json.write_text(json.dumps(_json_safe(
        {"arch": card.arch, "n_images": len(y_true), "tta": tta, **report,
         "efficiency": measured}), indent=2, allow_nan=False))
    report_txt = out_dir / "classification_report.txt"
    report_txt.write_text(classification_report(
        y_true, probabilities.argmax(axis=1), labels=list(range(len(CLASS_CODES))),
        target_names=list(CLASS_CODES), digits=4, zero_division=0))
    probabilities_npy = out_dir / "test_probabilities.npy"
    np.save(probabilities_npy, probabilities)
    artifacts = [report_json, report_txt, probabilities_npy,
                 plots.plot_confusion_matrix(np.asarray(report["confusion_matrix"]),
                                             out_dir / "confusion_matrix.png",
                                             title=f"{card.arch}: confusion matrix")]
    if history:
        artifacts.append(plots.plot_training_curves(history, out_dir / "training_curves.png",
                                                    title=f"{card.arch}: training"))
    return EvalResult(arch=card.arch, model_dir=model_dir, metrics=report["metrics"],
                      report_json=report_json, n_images=len(y_true), artifacts=artifacts,
                      efficiency=measured, tta=tta)
