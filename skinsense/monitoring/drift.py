"""Drift statistics: a window of the prediction log against the champion's test part.

Every test comes from scipy: the class mix by a chi-square goodness-of-fit test (with the
population stability index beside it), `ood_score` by a two-sample Kolmogorov-Smirnov test,
and rates with Wilson 95% intervals (`scipy.stats.binomtest`). Thresholds are
`skinsense.config.MonitorConfig`'s.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from scipy import stats

from skinsense.config import MonitorConfig
from skinsense.labels import CLASS_CODES
from skinsense.monitoring.database import Prediction, engine_for, utc_now
from skinsense.monitoring.reference import MALIGNANT


@dataclass
class Check:
    """One test: its figure, the reference, and whether it crossed its threshold."""

    name: str
    value: float | None
    reference: float | None
    crossed: bool
    detail: str
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass
class DriftReport:
    window_start: str
    window_end: str
    requests: int
    enough: bool
    message: str
    checks: list[Check]
    counts: dict[str, int]
    confirmed: int = 0

    @property
    def crossed(self) -> list[Check]:
        return [c for c in self.checks if c.crossed]

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "crossed": [c.name for c in self.crossed]}

    def metrics(self) -> dict[str, float]:
        """Flat figures for MLflow."""
        out: dict[str, float] = {"requests": float(self.requests),
                                 "confirmed": float(self.confirmed)}
        for check in self.checks:
            if check.value is not None:
                out[check.name] = float(check.value)
            for key, value in check.figures.items():
                if isinstance(value, (int, float)) and value is not None:
                    out[f"{check.name}_{key}"] = float(value)
            out[f"{check.name}_crossed"] = float(check.crossed)
        return out


def read_window(start: datetime, end: datetime, *, database_url: str | None = None
                ) -> pd.DataFrame:
    """The log's rows with `start <= created_at < end`."""
    engine = engine_for(database_url)
    query = (sa.select(Prediction).where(Prediction.created_at >= start)
             .where(Prediction.created_at < end).order_by(Prediction.created_at))
    with engine.connect() as connection:
        rows = [dict(r) for r in connection.execute(query).mappings()]
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame["created_at"] = pd.to_datetime(frame["created_at"], utc=True)
    return frame


def wilson(k: int, n: int) -> tuple[float, float]:
    """95% Wilson interval of k successes in n."""
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return float(ci.low), float(ci.high)


def psi(observed: np.ndarray, expected: np.ndarray, eps: float = 1e-4) -> float:
    """Population stability index of two count vectors (shares floored at `eps`)."""
    p = np.maximum(observed / observed.sum(), eps)
    q = np.maximum(expected / expected.sum(), eps)
    return float(np.sum((p - q) * np.log(p / q)))


def class_mix_check(top_classes: pd.Series, reference: dict[str, int],
                    cfg: MonitorConfig) -> Check:
    observed = np.array([(top_classes == c).sum() for c in CLASS_CODES], float)
    # Half a count on each reference class, so a class the test part never predicted does
    # not make the expected frequency zero (chi-square is undefined there).
    ref = np.array([reference.get(c, 0) for c in CLASS_CODES], float) + 0.5
    expected = ref / ref.sum() * observed.sum()
    chi2, p_value = stats.chisquare(observed, expected)
    index = psi(observed, ref)
    crossed = bool(p_value < cfg.p_value and index > cfg.psi_threshold)
    shares = {c: round(float(o / observed.sum()), 4) for c, o in zip(CLASS_CODES, observed,
                                                                       strict=True)}
    return Check("class_mix_psi", index, None, crossed,
                 f"chi-square {chi2:.1f}, p={p_value:.2g}; PSI {index:.3f} (threshold "
                 f"{cfg.psi_threshold})", {"chi2": float(chi2), "p_value": float(p_value),
                                            "shares": shares})


def ood_score_check(scores: np.ndarray, reference: list[float], cfg: MonitorConfig) -> Check:
    result = stats.ks_2samp(scores, np.asarray(reference))
    crossed = bool(result.pvalue < cfg.p_value)
    return Check("ood_score_ks", float(result.statistic), None, crossed,
                 f"KS statistic {result.statistic:.3f}, p={result.pvalue:.2g}; median "
                 f"{np.median(scores):.1f} against {np.median(reference):.1f} on the test part",
                 {"p_value": float(result.pvalue), "median": float(np.median(scores)),
                  "reference_median": float(np.median(reference))})


def rate_check(name: str, k: int, n: int, reference: float | None, *, crossed: bool,
               rule: str) -> Check:
    low, high = wilson(k, n) if n else (float("nan"), float("nan"))
    rate = k / n if n else None
    ref = "n/a" if reference is None else f"{reference:.3f}"
    return Check(name, rate, reference, crossed,
                 f"{k}/{n} = {rate if rate is None else round(rate, 3)} (95% CI {low:.3f}-"
                 f"{high:.3f}); test part {ref}; {rule}", {"ci_low": low, "ci_high": high,
                                                           "n": n})


def compare(window: pd.DataFrame, reference: dict[str, Any], cfg: MonitorConfig, *,
            start: datetime, end: datetime, confirmed: pd.DataFrame | None = None
            ) -> DriftReport:
    """Every test of the window against the champion's reference.

    Args:
        window: rows of `read_window`.
        reference: the champion's `monitoring_reference.json`.
        cfg: thresholds.
        start, end: the window (for the report).
        confirmed: confirmed cases of the window (`feedback.confirmed_cases`), with the
            app's answer on each.
    """
    n = len(window)
    counts = {"requests": n}
    if n:
        counts |= {k: int(v) for k, v in window["outcome"].value_counts().items()}
    report = DriftReport(start.isoformat(), end.isoformat(), n, n >= cfg.min_requests, "",
                         [], counts, 0 if confirmed is None else len(confirmed))
    if not report.enough:
        report.message = (f"only {n} requests in the window (fewer than monitor.min_requests="
                          f"{cfg.min_requests}): too few to test drift; widen the window")
        return report
    checks = report.checks
    quality = int((window["outcome"] == "quality").sum())
    checks.append(rate_check("quality_rate", quality, n, reference.get("quality_rate"),
                             crossed=quality / n > cfg.quality_rate_max,
                             rule=f"drift above {cfg.quality_rate_max:.0%}"))
    scored = window[window["outcome"] != "quality"]
    if reference.get("ood_rate") is not None and len(scored):
        ood = int((scored["outcome"] == "out_of_domain").sum())
        ref_rate = reference["ood_rate"]
        checks.append(rate_check(
            "ood_rate", ood, len(scored), ref_rate,
            crossed=ood / len(scored) > ref_rate + cfg.ood_rate_increase,
            rule=f"drift above test part + {cfg.ood_rate_increase:.0%}"))
        scores = scored["ood_score"].dropna().to_numpy(float)
        if len(scores) and reference.get("ood_scores"):
            checks.append(ood_score_check(scores, reference["ood_scores"], cfg))
    answered = window[window["outcome"] == "answered"]
    if len(answered):
        checks.append(class_mix_check(answered["top_class"], reference["class_mix"], cfg))
        decided = answered["referral"].dropna()
        if len(decided) and reference.get("referral_rate") is not None:
            k, m, ref_rate = int(decided.astype(bool).sum()), len(decided), \
                reference["referral_rate"]
            low, high = wilson(k, m)
            checks.append(rate_check(
                "referral_rate", k, m, ref_rate,
                crossed=not low <= ref_rate <= high and abs(k / m - ref_rate)
                > cfg.referral_rate_change,
                rule=f"drift when the test part's rate is outside the interval and "
                     f"{cfg.referral_rate_change:.0%} away"))
    if confirmed is not None and len(confirmed):
        checks.extend(confirmed_checks(confirmed, reference, cfg))
    report.message = (f"{len(report.crossed)} of {len(checks)} tests crossed their threshold: "
                      f"{', '.join(c.name for c in report.crossed)}" if report.crossed else
                      f"no drift: {len(checks)} tests within their thresholds")
    return report


def confirmed_checks(confirmed: pd.DataFrame, reference: dict[str, Any],
                     cfg: MonitorConfig) -> list[Check]:
    """Accuracy and referral sensitivity of the app's answers on confirmed cases."""
    cases = confirmed[confirmed["top_class"].notna()]
    checks = []
    enough = len(cases) >= cfg.min_confirmed
    if len(cases):
        k = int((cases["top_class"] == cases["dx"]).sum())
        low, high = wilson(k, len(cases))
        ref = reference.get("accuracy")
        checks.append(rate_check("confirmed_accuracy", k, len(cases), ref,
                                 crossed=enough and ref is not None and high < ref,
                                 rule=f"drift when the interval lies below the test part "
                                      f"(needs {cfg.min_confirmed} cases)"))
    malignant = cases[cases["dx"].isin(MALIGNANT) & cases["referral"].notna()]
    if len(malignant):
        k = int(malignant["referral"].astype(bool).sum())
        low, high = wilson(k, len(malignant))
        ref = reference.get("referral_sensitivity")
        checks.append(rate_check("confirmed_referral_sensitivity", k, len(malignant), ref,
                                 crossed=enough and ref is not None and high < ref,
                                 rule="drift when the interval lies below the test part"))
    return checks


def window_bounds(hours: float, end: datetime | None = None) -> tuple[datetime, datetime]:
    end = end or utc_now()
    return end - timedelta(hours=hours), end
