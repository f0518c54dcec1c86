"""The out-of-domain gate judged on a held-out part: how well it refuses non-dermatoscopic
photos, and whether it can judge at all.

The out-of-domain gate (`skinsense.trust.gate`, fitted on validation with the temperature
by `skinsense.evaluation.fit`) is reported with the part's images as in-domain against the
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

A gate that cannot judge is reported, not used (`judge_gate`): it is `unusable` when its
features barely vary (`skinsense.trust.gate.MIN_RELATIVE_SPREAD`, checked when it is fitted),
when it refuses far more of the part than its nominal rate (more than
`OOD_RATE_WARNING_FACTOR` times `1 - percentile / 100`, and a one-sided binomial test at
the nominal rate gives p < `OOD_UNUSABLE_P`), or when its AUROC against the reference
photos is not above 0.5 beyond chance (`ood_auroc_p_value` >= `OOD_UNUSABLE_P`). A refusal
rate over twice the nominal one is warned about in any case.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from skinsense.labels import CLASS_CODES
from skinsense.trust.calibration import calibrated_probabilities
from skinsense.trust.gate import OodGate

# A gate refusing more than this many times its nominal share of in-domain test images is
# warned about; significantly so (binomial p below OOD_UNUSABLE_P) makes it unusable, as
# does an AUROC against the reference photos that chance explains (p at or above it).
OOD_RATE_WARNING_FACTOR = 2.0
OOD_UNUSABLE_P = 1e-3
GATE_USABLE, GATE_UNUSABLE = "usable", "unusable"


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


def score_against_reference(gate: OodGate, threshold: float, features: np.ndarray,
                            probabilities: np.ndarray,
                            reference: tuple[list[str], np.ndarray, np.ndarray], *,
                            temperature: float, out_dir: Path, arch: str
                            ) -> tuple[dict[str, float], list[Path]]:
    """`ood_report` of the gate with a part's images against the reference photos, and its
    files: `ood_reference_scores.csv` (each photo's score and verdict) and `ood_scores.png`.

    Args:
        gate, threshold: the fitted gate and the card's `ood_threshold`.
        features, probabilities: the part's features and calibrated probabilities.
        reference: names, logits and features of the reference photos
            (`skinsense.evaluation.predict.reference_outputs`).
        temperature: the card's temperature (for the photos' max-softmax baseline).
        out_dir: where the files go (exists).
        arch: the figure's title.
    """
    from skinsense.evaluation.plots import plot_ood_scores

    names, ref_logits, ref_features = reference
    ref_scores = gate.scores(ref_features)
    ref_probabilities = calibrated_probabilities(ref_logits, temperature)
    in_scores = gate.scores(features)
    report = ood_report(in_scores, ref_scores, threshold,
                        in_max_probability=probabilities.max(axis=1),
                        reference_max_probability=ref_probabilities.max(axis=1))
    table = out_dir / "ood_reference_scores.csv"
    pd.DataFrame({"image": names, "ood_score": ref_scores, "refused": ref_scores > threshold,
                  "max_probability": ref_probabilities.max(axis=1),
                  "top_class": [CLASS_CODES[k] for k in ref_probabilities.argmax(axis=1)]}
                 ).to_csv(table, index=False)
    figure = plot_ood_scores(in_scores, dict(zip(names, ref_scores.tolist(), strict=True)),
                                   out_dir / "ood_scores.png", threshold=threshold,
                                   auroc=report["ood_auroc"],
                                   title=f"{arch}: out-of-domain gate")
    return report, [table, figure]
