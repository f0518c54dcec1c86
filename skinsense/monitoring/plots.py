"""Monitoring figures (matplotlib, PNG): the window over time, its class mix and its
`ood_score` distribution against the champion's test part."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from skinsense.labels import CLASS_CODES  # noqa: E402


def draw(window: pd.DataFrame, reference: dict[str, Any], out_dir: Path, *,
         window_hours: float) -> list[Path]:
    """`over_time.png`, `class_mix.png` and `ood_scores.png` in `out_dir` (those that the
    window has data for)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if window.empty:
        return []
    paths = [_over_time(window, reference, out_dir / "over_time.png", window_hours)]
    answered = window[window["outcome"] == "answered"]
    if len(answered):
        paths.append(_class_mix(answered, reference, out_dir / "class_mix.png"))
    scores = window["ood_score"].dropna().to_numpy(float)
    if len(scores) and reference.get("ood_scores"):
        paths.append(_ood_scores(scores, reference, out_dir / "ood_scores.png"))
    return paths


def _over_time(window: pd.DataFrame, reference: dict, path: Path, hours: float) -> Path:
    freq = "1h" if hours <= 72 else "1D"
    frame = window.set_index("created_at")
    grouped = frame.resample(freq)
    per = pd.DataFrame({
        "requests": grouped.size(),
        "quality": grouped["outcome"].apply(lambda s: (s == "quality").mean() if len(s) else np.nan),
        "out_of_domain": grouped["outcome"].apply(
            lambda s: (s == "out_of_domain").mean() if len(s) else np.nan),
        "referral": grouped["referral"].apply(
            lambda s: s.dropna().astype(float).mean() if s.notna().any() else np.nan)})
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.bar(per.index, per["requests"], width=0.03 if freq == "1h" else 0.8, color="#4f6d8f")
    top.set_ylabel(f"requests per {'hour' if freq == '1h' else 'day'}")
    for column, colour in (("quality", "#b45309"), ("out_of_domain", "#7c3aed"),
                           ("referral", "#b91c1c")):
        bottom.plot(per.index, per[column], marker="o", label=f"{column} rate", color=colour)
    for key, colour in (("ood_rate", "#7c3aed"), ("referral_rate", "#b91c1c")):
        if reference.get(key) is not None:
            bottom.axhline(reference[key], ls="--", color=colour, alpha=0.6,
                           label=f"{key} on the test part")
    bottom.set_ylabel("share of requests")
    bottom.set_ylim(0, 1)
    bottom.legend(fontsize=8, loc="upper left")
    fig.suptitle("SkinSense traffic over the window")
    fig.autofmt_xdate()
    return _save(fig, path)


def _class_mix(answered: pd.DataFrame, reference: dict, path: Path) -> Path:
    window = answered["top_class"].value_counts(normalize=True).reindex(CLASS_CODES).fillna(0)
    ref = pd.Series(reference["class_mix"]).reindex(CLASS_CODES).fillna(0)
    ref = ref / max(ref.sum(), 1)
    x = np.arange(len(CLASS_CODES))
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(x - 0.2, ref, 0.4, label="test part", color="#9ca3af")
    ax.bar(x + 0.2, window, 0.4, label="window", color="#2563eb")
    ax.set_xticks(x, CLASS_CODES)
    ax.set_ylabel("share of answers (top class)")
    return _save(fig, path, ax, "Class mix of the answers")


def _ood_scores(scores: np.ndarray, reference: dict, path: Path) -> Path:
    ref = np.asarray(reference["ood_scores"])
    bins = np.histogram_bin_edges(np.concatenate([scores, ref]), bins=40)
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.hist(ref, bins=bins, density=True, alpha=0.5, label="test part", color="#9ca3af")
    ax.hist(scores, bins=bins, density=True, alpha=0.6, label="window", color="#7c3aed")
    ax.set_xlabel("out-of-domain score (Mahalanobis)")
    ax.set_ylabel("density")
    return _save(fig, path, ax, "Out-of-domain scores")


def _save(fig, path: Path, ax=None, title: str | None = None) -> Path:
    """Legend and title on `ax` (when given), then the PNG at `path`; the figure is closed."""
    if ax is not None:
        ax.legend()
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
