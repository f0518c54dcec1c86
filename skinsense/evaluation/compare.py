"""The architectures side by side: the comparison table (CSV and markdown) and its figures."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from skinsense.evaluation.evaluate import EvalResult
from skinsense.evaluation.metrics import HEADLINE_METRICS
from skinsense.evaluation.ood import GATE_UNUSABLE
from skinsense.labels import CLASS_CODES

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
    from skinsense.evaluation.plots import plot_model_comparison, plot_per_class_recall

    rows = [comparison_row(r) for r in results]
    csv_path, md_path = write_comparison(rows, out_dir)
    return [csv_path, md_path,
            plot_model_comparison(rows, Path(out_dir) / "model_comparison.png"),
            plot_per_class_recall(per_class_recalls(results),
                                  Path(out_dir) / "per_class_recall.png")]
