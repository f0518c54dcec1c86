"""Evaluation figures, written as PNG files.

Every figure is a `matplotlib.figure.Figure` drawn on its own Agg canvas, never through
`pyplot`: pyplot keeps a global figure registry and backend, which is neither thread-safe
(Prefect runs tasks in threads) nor polite to other code in the same process.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from skinsense.labels import CLASS_CODES

DPI = 120


def _save(fig: Figure, out_path: Path) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)  # attach an Agg canvas so savefig never consults pyplot's backend
    fig.savefig(out_path, dpi=DPI, format="png")
    return out_path


def plot_confusion_matrix(confusion: np.ndarray, out_path: Path, *,
                          class_codes: Sequence[str] = CLASS_CODES,
                          title: str = "Confusion matrix (rows: true, normalized)") -> Path:
    """Row-normalized confusion matrix with each cell's share annotated.

    Args:
        confusion: (K, K) counts, rows true classes, columns predicted classes.
        out_path: the PNG to write (its folder is created).
        class_codes: axis labels, in the matrix's order.
        title: the figure title.

    Returns:
        `out_path`.
    """
    counts = np.asarray(confusion, dtype=float)
    totals = counts.sum(axis=1, keepdims=True)
    # A class absent from the part has an all-zero row: show zeros, not NaN.
    shares = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    fig = Figure(figsize=(6.5, 5.5), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="share of the true class")
    ticks = np.arange(len(class_codes))
    ax.set_xticks(ticks, labels=list(class_codes))
    ax.set_yticks(ticks, labels=[f"{c} (n={int(n)})" for c, n in zip(class_codes, totals[:, 0])])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(shares.shape[0]):
        for j in range(shares.shape[1]):
            ax.text(j, i, f"{shares[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if shares[i, j] > 0.5 else "black")
    return _save(fig, out_path)


def plot_per_class_recall(recalls: Mapping[str, Mapping[str, float]], out_path: Path, *,
                          class_codes: Sequence[str] = CLASS_CODES,
                          title: str = "Per-class recall") -> Path:
    """Grouped bars: for each class, one bar per architecture.

    Args:
        recalls: architecture -> class code -> recall; a missing or NaN value draws no bar.
        out_path: the PNG to write (its folder is created).
        class_codes: the classes on the x axis, in order.
        title: the figure title.

    Returns:
        `out_path`.
    """
    archs = list(recalls)
    x = np.arange(len(class_codes))
    width = 0.8 / max(len(archs), 1)
    fig = Figure(figsize=(max(7.0, 1.2 * len(class_codes)), 4.5), layout="constrained")
    ax = fig.add_subplot()
    for i, arch in enumerate(archs):
        values = [recalls[arch].get(code, math.nan) for code in class_codes]
        ax.bar(x - 0.4 + width * (i + 0.5), np.nan_to_num(values, nan=0.0), width, label=arch)
    ax.set_xticks(x, labels=list(class_codes))
    ax.set_ylim(0.0, 1.05)
    ax.set_ylabel("recall (sensitivity)")
    ax.set_title(title)
    if archs:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out_path)


def plot_training_curves(history: Sequence[Mapping[str, float]], out_path: Path, *,
                         title: str = "Training") -> Path:
    """Losses and validation balanced accuracy per epoch.

    Args:
        history: one dict per epoch (as `TrainResult.history`) with `epoch` and any of
            `train_loss`, `val_loss`, `val_balanced_accuracy`; missing keys are skipped.
        out_path: the PNG to write (its folder is created).
        title: the figure title.

    Returns:
        `out_path`.
    """
    epochs = [float(entry.get("epoch", i + 1)) for i, entry in enumerate(history)]

    def series(key: str) -> list[float]:
        return [float(entry.get(key, math.nan)) for entry in history]

    fig = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, score_ax = fig.subplots(1, 2)
    for key in ("train_loss", "val_loss"):
        if any(key in entry for entry in history):
            loss_ax.plot(epochs, series(key), marker="o", label=key)
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("cross-entropy")
    loss_ax.set_title("loss")
    loss_ax.legend(fontsize=8)
    if any("val_balanced_accuracy" in entry for entry in history):
        score_ax.plot(epochs, series("val_balanced_accuracy"), marker="o", color="tab:green")
    score_ax.set_xlabel("epoch")
    score_ax.set_ylabel("balanced accuracy")
    score_ax.set_ylim(0.0, 1.0)
    score_ax.set_title("validation balanced accuracy")
    for ax in (loss_ax, score_ax):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, out_path)


# (key in a comparison row, panel title, format of the bar labels)
_COMPARISON_PANELS: tuple[tuple[str, str, str], ...] = (
    ("balanced_accuracy", "balanced accuracy (test)", "{:.3f}"),
    ("macro_f1", "macro F1 (test)", "{:.3f}"),
    ("weights_mb", "weights (MB)", "{:.1f}"),
    ("cpu_latency_ms", "CPU latency, batch 1 (ms)", "{:.0f}"),
)


def plot_model_comparison(rows: Sequence[Mapping[str, Any]], out_path: Path, *,
                          title: str = "Architectures compared") -> Path:
    """One panel per quantity (balanced accuracy, macro F1, size, CPU latency), one bar per arch.

    Args:
        rows: one dict per architecture with `arch` and any of `balanced_accuracy`,
            `macro_f1`, `weights_mb`, `cpu_latency_ms` (as `evaluation.compare.comparison_row`);
            a missing value draws no bar.
        out_path: the PNG to write (its folder is created).
        title: the figure title.

    Returns:
        `out_path`.
    """
    archs = [str(row.get("arch", f"model {i}")) for i, row in enumerate(rows)]
    fig = Figure(figsize=(12, 3.8), layout="constrained")
    axes = fig.subplots(1, len(_COMPARISON_PANELS))
    colors = [f"C{i % 10}" for i in range(len(archs))]
    for ax, (key, label, fmt) in zip(axes, _COMPARISON_PANELS):
        values = [float(row.get(key, math.nan)) for row in rows]
        bars = ax.bar(archs, np.nan_to_num(values, nan=0.0), color=colors)
        ax.bar_label(bars, labels=["" if math.isnan(v) else fmt.format(v) for v in values],
                     fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.margins(y=0.15)
    fig.suptitle(title)
    return _save(fig, out_path)


def plot_reliability_diagram(panels: Sequence[tuple[str, Mapping[str, np.ndarray], float]],
                             out_path: Path, *,
                             title: str = "Reliability (top-1 confidence)") -> Path:
    """Reliability diagrams side by side: accuracy against confidence per bin.

    Args:
        panels: one (label, bins, ECE) per panel, e.g. before and after temperature
            scaling; `bins` as `skinsense.trust.calibration.reliability_bins` returns them.
        out_path: the PNG to write (its folder is created).
        title: the figure title.

    Returns:
        `out_path`.
    """
    fig = Figure(figsize=(5 * len(panels), 5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels), sharey=True))
    for ax, (label, bins, ece) in zip(axes, panels):
        edges = np.asarray(bins["edges"])
        width = np.diff(edges)
        count = np.asarray(bins["count"])
        accuracy = np.nan_to_num(np.asarray(bins["accuracy"], dtype=float), nan=0.0)
        # The gap to the diagonal is what ECE sums (weighted by count): draw it in red.
        ax.bar(edges[:-1], accuracy, width=width, align="edge", color="tab:blue",
               edgecolor="white", label="accuracy")
        centers = edges[:-1] + width / 2
        confidence = np.where(count > 0, np.asarray(bins["confidence"], dtype=float), np.nan)
        ax.bar(edges[:-1], np.nan_to_num(confidence - accuracy, nan=0.0), bottom=accuracy,
               width=width, align="edge", color="tab:red", alpha=0.3, label="gap to confidence")
        ax.plot([0, 1], [0, 1], color="black", linestyle="--", linewidth=1, label="calibrated")
        for x, n in zip(centers, count):
            if n:
                ax.text(x, 0.02, str(int(n)), ha="center", va="bottom", fontsize=6, rotation=90)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("top-1 confidence (bar labels: images per bin)")
        ax.set_title(f"{label}: ECE {ece:.3f}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle(title)
    return _save(fig, out_path)


def plot_referral_roc(fpr: np.ndarray, tpr: np.ndarray, out_path: Path, *, roc_auc: float,
                      sensitivity: float, specificity: float, threshold: float,
                      title: str = "Referral score: malignant vs benign") -> Path:
    """ROC curve of the referral score with the referral rule's operating point marked.

    Args:
        fpr: false-positive rates (1 - specificity) along the curve.
        tpr: true-positive rates (sensitivity) along the curve.
        out_path: the PNG to write (its folder is created).
        roc_auc: area under the curve (legend).
        sensitivity: the rule's sensitivity on this part.
        specificity: the rule's specificity on this part.
        threshold: the rule's threshold (legend).
        title: the figure title.

    Returns:
        `out_path`.
    """
    fig = Figure(figsize=(5.5, 5.5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, color="tab:blue", label=f"referral score (AUC {roc_auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="chance")
    if not (math.isnan(sensitivity) or math.isnan(specificity)):
        ax.plot([1 - specificity], [sensitivity], marker="o", color="tab:red", linestyle="",
                label=f"rule: score >= {threshold:.3f}\n(sensitivity {sensitivity:.2f}, "
                      f"specificity {specificity:.2f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("1 - specificity (benign images referred)")
    ax.set_ylabel("sensitivity (malignant images referred)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, out_path)


def plot_ood_scores(in_domain: np.ndarray, reference: Mapping[str, float], out_path: Path, *,
                    threshold: float, auroc: float,
                    title: str = "Out-of-domain gate: test part vs non-dermatoscopic images"
                    ) -> Path:
    """Gate scores of in-domain images (histogram) and of named reference images (ticks).

    Args:
        in_domain: (N,) gate scores of the test part's images.
        reference: name -> gate score of each non-dermatoscopic image.
        out_path: the PNG to write (its folder is created).
        threshold: the gate's threshold (images above it are refused).
        auroc: the gate's AUROC, for the title.
        title: the figure title.

    Returns:
        `out_path`.
    """
    fig = Figure(figsize=(8, 4.8), layout="constrained")
    ax = fig.add_subplot()
    values = np.asarray(list(reference.values()), dtype=float)
    everything = np.concatenate([np.asarray(in_domain, dtype=float), values, [threshold]])
    bins = np.linspace(everything.min(), everything.max(), 40)
    ax.hist(in_domain, bins=bins, color="tab:blue", alpha=0.7,
            label=f"test part ({len(in_domain)} dermatoscopic images)")
    ax.hist(values, bins=bins, color="tab:orange", alpha=0.7,
            label=f"non-dermatoscopic images ({len(values)})")
    ax.axvline(threshold, color="tab:red", linestyle="--",
               label=f"threshold {threshold:.1f} (refused above)")
    top = ax.get_ylim()[1]
    for i, (name, score) in enumerate(sorted(reference.items(), key=lambda kv: kv[1])):
        # Three heights in turn, so that names of close scores do not print over each other.
        ax.annotate(name, (score, 0), xytext=(score, top * (0.3 + 0.2 * (i % 3))),
                    rotation=90, fontsize=6,
                    ha="center", va="bottom", color="tab:orange",
                    arrowprops={"arrowstyle": "-", "color": "tab:orange", "lw": 0.5})
    ax.set_xlabel("gate score: smallest Mahalanobis distance to a class mean")
    ax.set_ylabel("images")
    ax.set_title(f"{title} (AUROC {auroc:.3f})", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    return _save(fig, out_path)
