"""Summaries of a pipeline run as plain rows and markdown, for the orchestrator's UI.

Pure functions: they build text and tables; `tasks/reports.py` publishes them as Prefect
artifacts.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from skinsense.data.records import OversampledData, SplitData
from skinsense.labels import CLASS_CODES

if TYPE_CHECKING:
    from skinsense.evaluation.evaluate import EvalResult

HEADLINE = ("balanced_accuracy", "accuracy", "macro_f1", "macro_roc_auc", "mel_sensitivity",
            "mel_specificity", "ece", "referral_sensitivity", "referral_specificity",
            "ood_auroc", "ood_fpr_at_95_tpr", "ood_rate")


def data_summary_rows(split: SplitData, oversampled: OversampledData) -> list[dict]:
    """Images per class: training part before and after oversampling, validation, test."""
    rows = []
    for code in (*CLASS_CODES, "total"):
        def count(counts: dict[str, int]) -> int:
            return sum(counts.values()) if code == "total" else counts.get(code, 0)

        rows.append({
            "class": code,
            "train (before oversampling)": count(oversampled.class_counts_before),
            "train (after oversampling)": count(oversampled.class_counts_after),
            "val": count(split.class_counts.get("val", {})),
            "test": count(split.class_counts.get("test", {})),
        })
    return rows


def metrics_markdown(rows: list[dict]) -> str:
    """A markdown table of each architecture's test metrics, with a link to its MLflow run,
    and below it a warning for each out-of-domain gate that cannot judge or refuses too much.

    Args:
        rows: {"arch", "run_link", "metrics": {...}, "gate": text} per architecture (`gate`:
            `evaluation.compare.gate_summary_text`, optional).
    """
    header = ("| architecture | " + " | ".join(HEADLINE)
              + " | out-of-domain gate | MLflow run |")
    lines = [header, "|" + " --- |" * (len(HEADLINE) + 3)]
    warnings = []
    for row in rows:
        cells = [_fmt(row["metrics"].get(name)) for name in HEADLINE]
        link = row["run_link"]
        link_cell = f"[run]({link})" if link.startswith("http") else link
        gate = row.get("gate") or "n/a"
        lines.append(f"| {row['arch']} | " + " | ".join(cells)
                     + f" | {gate.replace('|', '/')} | {link_cell} |")
        if gate.startswith("UNUSABLE"):
            warnings.append(f"- **{row['arch']}: the out-of-domain gate is unusable**, and the "
                            f"app serves this model without it: {gate.split(': ', 1)[1]}")
        elif "warning: " in gate:
            warnings.append(f"- **{row['arch']}**: the out-of-domain gate "
                            f"{gate.split('warning: ', 1)[1]}")
    if warnings:
        lines += ["", "**Warnings**", "", *warnings]
    return "\n".join(lines)


def subgroups_markdown(arch: str, evaluation: EvalResult) -> str:
    """The best model's calibration, referral rule and subgroup table, for the run's page.

    Args:
        arch: the architecture's name.
        evaluation: its test evaluation (`EvalResult`, with `subgroup_files` when audited).
    """
    metrics = evaluation.metrics
    lines = [f"# Subgroup audit: {arch}", "",
             f"Temperature {evaluation.temperature:.3f}: test ECE "
             f"{_fmt(metrics.get('ece_uncalibrated'))} uncalibrated, {_fmt(metrics.get('ece'))} "
             f"calibrated."]
    referral = evaluation.referral
    if referral:
        lines.append(
            f"Referral rule (see a dermatologist when p(mel) + p(bcc) + p(akiec) >= "
            f"{_fmt(referral['threshold'])}): test sensitivity {_interval(referral, 'sensitivity')}"
            f", specificity {_interval(referral, 'specificity')}, "
            f"{referral['n_malignant']} malignant and {referral['n_benign']} benign images. An "
            f"operating point on HAM10000's test lesions, not a clinical validation.")
    else:
        lines.append("No referral rule (the validation part had no malignant image).")
    ood = evaluation.ood
    if "ood_auroc" in ood:
        lines.append(
            f"Out-of-domain gate (refuses images far from the training images): AUROC "
            f"{_fmt(ood['ood_auroc'])} against {int(ood['ood_n_reference'])} non-dermatoscopic "
            f"photos (max-softmax baseline {_fmt(ood.get('ood_auroc_max_softmax'))}), "
            f"{_fmt(ood['ood_reference_refused'])} of them refused, "
            f"{_fmt(ood['ood_rate'])} of the test images refused.")
    if evaluation.gate_status == "unusable":
        lines.append(f"**The out-of-domain gate is unusable**, and the app serves this model "
                     f"without it: {evaluation.gate_reason}.")
    elif evaluation.gate_warning:
        lines.append(f"**Warning:** the out-of-domain gate {evaluation.gate_warning}.")
    table = next((p for p in evaluation.subgroup_files if p.suffix == ".md"), None)
    if table is None or not table.is_file():
        lines += ["", "No subgroup table: the test part's metadata was not available."]
        return "\n".join(lines) + "\n"
    # The file's own title line is replaced by the one above.
    body = table.read_text().split("\n", 1)[1]
    return "\n".join(lines) + "\n" + body


def _interval(figures: dict, name: str) -> str:
    low, high = figures.get(f"{name}_ci_low"), figures.get(f"{name}_ci_high")
    if low is None or high is None:
        return _fmt(figures.get(name))
    return f"{_fmt(figures.get(name))} [{_fmt(low)}, {_fmt(high)}]"


FIELD_FIGURES = ("accuracy", "balanced_accuracy", "referral_sensitivity")


def field_markdown(rows: list[dict]) -> str:
    """The champion and the candidates on confirmed diagnoses each never trained on.

    Args:
        rows: {"model", "field_n", and with enough cases "field_<name>" with "_ci_low" and
            "_ci_high"} per model (`stages.field_rows`).
    """
    lines = ["# On confirmed diagnoses", "",
             "Each model on the cases a clinician confirmed (`skinsense feedback`) that it "
             "never trained on, with 95% lesion-bootstrap intervals. These are clinic cases, "
             "not HAM10000's curated test part; with few cases only the count is given.", "",
             "| model | cases | " + " | ".join(n.replace("_", " ") for n in FIELD_FIGURES) + " |",
             "|" + " --- |" * (len(FIELD_FIGURES) + 2)]
    for row in rows:
        cells = []
        for name in FIELD_FIGURES:
            value = row.get(f"field_{name}")
            cells.append("n/a" if value is None else
                         f"{value:.3f} [{row[f'field_{name}_ci_low']:.3f}, "
                         f"{row[f'field_{name}_ci_high']:.3f}]")
        lines.append(f"| {row['model']} | {int(row.get('field_n', 0))} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def promotion_markdown(decision: dict) -> str:
    """The champion/challenger decision in words."""
    verdict = "**promoted to champion**" if decision["promoted"] else "**not promoted**"
    champion = (f"version {decision['champion_version']} scored "
                f"{_fmt(decision['champion_score'])}" if decision.get("champion_version")
                else "there was no champion")
    return (f"# Promotion\n\nVersion {decision['version']} of `{decision['model_name']}` "
            f"scored {_fmt(decision['challenger_score'])} ({decision['metric']}); {champion}. "
            f"It was {verdict}.\n\n{decision['reason']}\n")


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)
