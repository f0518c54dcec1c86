"""How well a model works for each group of patients and images: the subgroup audit.

For each attribute of the HAM10000 metadata that describes the patient or how the diagnosis
was made (`sex`, age band, `localization`, `dx_type`), the test images are grouped by
fairlearn's `MetricFrame`, and each group gets balanced accuracy, referral sensitivity and
referral specificity, each with the number of images it is computed on and a 95% bootstrap
interval that resamples whole lesions (`skinsense.evaluation.bootstrap`). A figure computed on
fewer than `min_images` test images is listed with its count and no value: a balanced
accuracy on a dozen images, or a sensitivity on four cancers, says more about chance than
about the model. (The count of a referral sensitivity is the group's malignant images, so a
group of 30 or more images can still be too small for it.)

The table (`subgroup_metrics.csv`) has one row per attribute, group and metric:

- `attribute`: `all` (the whole test part), `sex`, `age_band`, `localization`, `dx_type`.
- `group`: the group's value (`unknown` where the metadata has none).
- `n`: the images the figure is computed on: all of the group's images for balanced accuracy,
  its malignant (mel, bcc, akiec) images for referral sensitivity, its benign ones for
  referral specificity.
- `value`, `ci_low`, `ci_high`: the figure and its interval; empty when `n` is below
  `min_images` (which covers the undefined case `n` = 0).

The largest gap of an attribute is best group minus worst group over the groups with a
figure (`gaps`). Age bands follow decades of clinical risk: <30, 30-44, 45-59, 60-74, 75+.
"""

from __future__ import annotations

import math
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from fairlearn.metrics import MetricFrame
from sklearn.metrics import balanced_accuracy_score, recall_score

from skinsense.evaluation.bootstrap import (
    NO_FIGURE,
    Estimate,
    LesionBootstrap,
    percentile_interval,
)
from skinsense.trust.referral import is_malignant

ATTRIBUTES: tuple[str, ...] = ("sex", "age_band", "localization", "dx_type")
OVERALL = "all"
UNKNOWN = "unknown"
AGE_BANDS: tuple[str, ...] = ("<30", "30-44", "45-59", "60-74", "75+", UNKNOWN)
_AGE_EDGES = (-math.inf, 30, 45, 60, 75, math.inf)
SUBGROUP_METRICS: tuple[str, ...] = (
    "balanced_accuracy", "referral_sensitivity", "referral_specificity")
COLUMNS: tuple[str, ...] = ("attribute", "group", "n", "metric", "value", "ci_low", "ci_high")
CSV_NAME, MARKDOWN_NAME = "subgroup_metrics.csv", "subgroup_metrics.md"
METADATA_NEEDED: tuple[str, ...] = ("lesion_id", "sex", "age", "localization", "dx_type")


def age_band(age: pd.Series) -> pd.Series:
    """Age in years -> one of `AGE_BANDS` (missing or unreadable ages are `unknown`)."""
    years = pd.to_numeric(age, errors="coerce")
    bands = pd.cut(years, bins=list(_AGE_EDGES), right=False, labels=list(AGE_BANDS[:-1]))
    return bands.astype(object).where(years.notna(), UNKNOWN).astype(str)


def group_columns(manifest: pd.DataFrame) -> pd.DataFrame:
    """The grouping attributes of each image, as text, with `unknown` for missing values.

    Args:
        manifest: rows of the metadata (at least `METADATA_NEEDED`).

    Raises:
        ValueError: a needed column is missing (the message names it).
    """
    missing = [c for c in METADATA_NEEDED if c not in manifest.columns]
    if missing:
        raise ValueError(f"the test manifest lacks the metadata column(s) {missing} needed "
                         f"for the subgroup audit")

    def text(column: str) -> pd.Series:
        values = manifest[column].astype(object).where(manifest[column].notna(), UNKNOWN)
        return values.astype(str).str.strip().replace("", UNKNOWN)

    return pd.DataFrame({"sex": text("sex"), "age_band": age_band(manifest["age"]),
                         "localization": text("localization"), "dx_type": text("dx_type")},
                        index=manifest.index)


# -- one figure of one group (MetricFrame calls these with the group's rows) ---------------------

def _estimate(point: float, resampled: np.ndarray) -> Estimate:
    if math.isnan(point):
        return NO_FIGURE
    return Estimate(point, *percentile_interval(resampled))


def _balanced_accuracy(y_true, y_pred, lesion_id, referred, *, min_images: int,
                       n_resamples: int, seed: int) -> Estimate:
    if len(y_true) < min_images:
        return NO_FIGURE
    with warnings.catch_warnings():
        # A group's images rarely cover all seven classes; predicting an absent one is fine.
        warnings.filterwarnings("ignore", "y_pred contains classes not in y_true")
        point = float(balanced_accuracy_score(y_true, y_pred))
    resamples = LesionBootstrap(lesion_id, n_resamples, seed)
    return _estimate(point, resamples.balanced_accuracy(y_true, y_pred))


def _referral_recall(y_true, y_pred, lesion_id, referred, *, malignant: bool, min_images: int,
                     n_resamples: int, seed: int) -> Estimate:
    positives = is_malignant(y_true) == malignant
    hits = np.asarray(referred, dtype=bool) == malignant  # referred if malignant, else passed
    # The figure's own count decides: a sensitivity on four cancers says nothing.
    if positives.sum() < min_images:
        return NO_FIGURE
    point = float(recall_score(positives, hits & positives, zero_division=np.nan))
    resamples = LesionBootstrap(lesion_id, n_resamples, seed)
    return _estimate(point, resamples.recall(hits, positives))


def _denominator(metric: str, y_true: np.ndarray) -> int:
    if metric == "referral_sensitivity":
        return int(is_malignant(y_true).sum())
    if metric == "referral_specificity":
        return int((~is_malignant(y_true)).sum())
    return len(y_true)


def subgroup_metrics(manifest: pd.DataFrame, y_true: np.ndarray, y_pred: np.ndarray,
                     referred: np.ndarray | None, *, min_images: int = 30,
                     n_resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """The subgroup table (see the module docstring) of one model on one part.

    Args:
        manifest: the part's metadata rows, aligned with `y_true` (row i is image i).
        y_true: (N,) true class indices.
        y_pred: (N,) predicted class indices (argmax).
        referred: (N,) bool referral decisions, or None when the model has no referral
            rule (then only balanced accuracy is reported).
        min_images: the fewest images a figure may be computed on (`n`).
        n_resamples: lesion bootstrap resamples per figure.
        seed: seed of the bootstrap (each figure uses it, so the three figures of a group
            see the same resamples).

    Returns:
        A DataFrame with `COLUMNS`, the whole part first (attribute `all`), then each
        attribute's groups (age bands in age order, the others largest first).
    """
    y_true, y_pred = np.asarray(y_true).astype(np.int64), np.asarray(y_pred).astype(np.int64)
    if not len(manifest) == len(y_true) == len(y_pred):
        raise ValueError(f"{len(manifest)} manifest rows, {len(y_true)} labels and "
                         f"{len(y_pred)} predictions: they must describe the same images")
    groups = group_columns(manifest.reset_index(drop=True))
    settings = {"min_images": min_images, "n_resamples": n_resamples, "seed": seed}
    metrics = {"balanced_accuracy": partial(_balanced_accuracy, **settings)}
    if referred is not None:
        metrics["referral_sensitivity"] = partial(_referral_recall, malignant=True, **settings)
        metrics["referral_specificity"] = partial(_referral_recall, malignant=False, **settings)
        referred = np.asarray(referred, dtype=bool)
    else:
        referred = np.zeros(len(y_true), dtype=bool)  # unused: no referral metric asks for it
    params = {"lesion_id": manifest["lesion_id"].astype(str).to_numpy(), "referred": referred}
    rows: list[dict[str, Any]] = []
    for i, attribute in enumerate(ATTRIBUTES):
        with warnings.catch_warnings():
            # MetricFrame also precomputes the min and max over groups, which compares our
            # Estimate tuples (NaN inside) and warns; those aggregates are never used here.
            warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)
            frame = MetricFrame(metrics=metrics, y_true=y_true, y_pred=y_pred,
                                sensitive_features=groups[attribute].rename(attribute),
                                sample_params={name: params for name in metrics})
        if i == 0:
            rows += _rows(OVERALL, OVERALL, frame.overall, y_true)
        for group in _ordered_groups(attribute, groups[attribute]):
            members = (groups[attribute] == group).to_numpy()
            rows += _rows(attribute, str(group), frame.by_group.loc[group], y_true[members])
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _ordered_groups(attribute: str, values: pd.Series) -> list[str]:
    # Age bands in age order; other attributes largest group first (ties by name).
    if attribute == "age_band":
        return [band for band in AGE_BANDS if (values == band).any()]
    sizes = values.value_counts()
    return sorted(sizes.index, key=lambda group: (-sizes[group], group))


def _rows(attribute: str, group: str, estimates: pd.Series, y_true: np.ndarray) -> list[dict]:
    return [{"attribute": attribute, "group": group, "n": _denominator(metric, y_true),
             "metric": metric, "value": estimate.value, "ci_low": estimate.ci_low,
             "ci_high": estimate.ci_high}
            for metric, estimate in estimates.items()]


def gaps(table: pd.DataFrame) -> dict[str, dict[str, dict[str, Any]]]:
    """The largest gap of each metric within each attribute, over the groups with a figure.

    Returns:
        metric -> attribute -> {`gap` (best minus worst), `best_group`, `best`,
        `worst_group`, `worst`, `groups` (how many had a figure)}; an attribute with fewer
        than two groups with a figure has no entry.
    """
    result: dict[str, dict[str, dict[str, Any]]] = {}
    figures = table[(table["attribute"] != OVERALL) & table["value"].notna()]
    for (metric, attribute), rows in figures.groupby(["metric", "attribute"], sort=False):
        if len(rows) < 2:
            continue
        best, worst = rows.loc[rows["value"].idxmax()], rows.loc[rows["value"].idxmin()]
        result.setdefault(metric, {})[attribute] = {
            "gap": float(best["value"] - worst["value"]),
            "best_group": str(best["group"]), "best": float(best["value"]),
            "worst_group": str(worst["group"]), "worst": float(worst["value"]),
            "groups": len(rows)}
    return result


def gap_metrics(table: pd.DataFrame) -> dict[str, float]:
    """`gap_<metric>_<attribute>` -> the gap, MLflow-ready (see `gaps`)."""
    return {f"gap_{metric}_{attribute}": entry["gap"]
            for metric, by_attribute in gaps(table).items()
            for attribute, entry in by_attribute.items()}


def _cell(row: pd.Series | None) -> str:
    if row is None:
        return ""
    if pd.isna(row["value"]):
        return f"- (n={int(row['n'])})"
    interval = ("" if pd.isna(row["ci_low"])
                else f" [{row['ci_low']:.2f}, {row['ci_high']:.2f}]")
    return f"{row['value']:.3f}{interval} (n={int(row['n'])})"


def markdown(table: pd.DataFrame, *, title: str = "Subgroup audit (test part)",
             min_images: int = 30) -> str:
    """The table as markdown: one line per group, one column per metric, then the gaps."""
    metrics = [m for m in SUBGROUP_METRICS if m in set(table["metric"])]
    lines = [f"# {title}", "",
             f"Each cell: figure [95% bootstrap interval, resampled by lesion] (n = images it is "
             f"computed on: the group's images for balanced accuracy, its malignant ones for "
             f"referral sensitivity, its benign ones for specificity). '-': fewer than "
             f"{min_images} such images, too few for a figure.", "",
             "| attribute | group | " + " | ".join(m.replace("_", " ") for m in metrics) + " |",
             "|" + " --- |" * (len(metrics) + 2)]
    for (attribute, group), rows in table.groupby(["attribute", "group"], sort=False):
        by_metric = {r["metric"]: r for _, r in rows.iterrows()}
        lines.append(f"| {attribute} | {str(group).replace('|', '/')} | "
                     + " | ".join(_cell(by_metric.get(m)) for m in metrics) + " |")
    found = gaps(table)
    if found:
        lines += ["", "Largest gap per attribute (best group minus worst group, groups with a "
                      "figure):", ""]
        for metric, by_attribute in found.items():
            for attribute, entry in by_attribute.items():
                lines.append(f"- {metric.replace('_', ' ')}, {attribute}: {entry['gap']:.3f} "
                             f"({entry['best_group']} {entry['best']:.3f} vs "
                             f"{entry['worst_group']} {entry['worst']:.3f})")
    return "\n".join(lines) + "\n"


def write(table: pd.DataFrame, out_dir: Path, *, min_images: int = 30) -> tuple[Path, Path]:
    """Write `subgroup_metrics.csv` and `subgroup_metrics.md` into `out_dir` (created)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / CSV_NAME, out_dir / MARKDOWN_NAME
    table.to_csv(csv_path, index=False)
    md_path.write_text(markdown(table, min_images=min_images))
    return csv_path, md_path
