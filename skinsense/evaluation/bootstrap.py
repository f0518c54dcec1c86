"""Bootstrap intervals that resample whole lesions, not images.

HAM10000 has several photos of many lesions (4,501 of its 10,015 images). Photos of one
lesion are not independent evidence: resampling images would treat three photos of one
missed melanoma as three misses observed independently and make intervals too narrow. A
lesion bootstrap draws lesions with replacement and takes all of each drawn lesion's images.

All resamples are evaluated at once: a resample is how many times each lesion was drawn, and
a metric that is a ratio of counts (recall, sensitivity, specificity, balanced accuracy)
becomes a ratio of weighted sums of per-lesion counts, one matrix product for all resamples.
With every lesion drawn once the metrics equal scikit-learn's (a test checks it). The
generator is numpy's `default_rng(seed)`, so intervals are reproducible.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np

CONFIDENCE = 0.95


class Estimate(NamedTuple):
    """A figure with its 95% bootstrap interval (NaN where undefined or not computed)."""

    value: float
    ci_low: float
    ci_high: float


NO_FIGURE = Estimate(math.nan, math.nan, math.nan)


class LesionBootstrap:
    """`n_resamples` lesion bootstrap resamples of a set of images, evaluated all at once.

    Each resample draws as many lesions as there are, with replacement, and takes every image
    of each drawn lesion. Metrics are ratios of counts, so they are computed from per-lesion
    counts and how often each lesion was drawn: one (n_resamples x lesions) matrix product
    per count, the same numbers as weighting every image by its lesion's draws
    (`image_weights`).
    """

    def __init__(self, lesion_ids: np.ndarray, n_resamples: int, seed: int):
        """Draw the resamples.

        Args:
            lesion_ids: (N,) the lesion of each image.
            n_resamples: how many resamples.
            seed: seed of numpy's `default_rng`.
        """
        _, self.lesion_of_image = np.unique(np.asarray(lesion_ids).astype(str),
                                            return_inverse=True)
        self.n_lesions = int(self.lesion_of_image.max()) + 1 if len(self.lesion_of_image) else 0
        rng = np.random.default_rng(seed)
        drawn = rng.integers(0, max(self.n_lesions, 1), size=(n_resamples, self.n_lesions))
        # How often each lesion was drawn, per resample: one bincount over row-offset indices
        # (numpy's multinomial does the same job about ten times slower at these sizes).
        offsets = np.arange(n_resamples)[:, None] * self.n_lesions
        self.times_drawn = np.bincount((drawn + offsets).ravel(),
                                       minlength=n_resamples * self.n_lesions
                                       ).reshape(n_resamples, self.n_lesions).astype(np.float64)

    def image_weights(self) -> np.ndarray:
        """(n_resamples, N): how many times each image's lesion was drawn in each resample."""
        return self.times_drawn[:, self.lesion_of_image]

    def _counts(self, masks: list[np.ndarray]) -> np.ndarray:
        """(n_resamples, len(masks)): how many images of each mask every resample holds."""
        per_lesion = np.stack([np.bincount(self.lesion_of_image, minlength=self.n_lesions,
                                           weights=np.asarray(m, dtype=np.float64))
                               for m in masks], axis=1)
        return self.times_drawn @ per_lesion  # one pass over the draws for all the masks

    def _recalls(self, hits: list[np.ndarray], positives: list[np.ndarray]) -> np.ndarray:
        positives = [np.asarray(p, dtype=bool) for p in positives]
        hits = [np.asarray(h, dtype=bool) & p for h, p in zip(hits, positives, strict=True)]
        counts = self._counts(hits + positives)
        with np.errstate(invalid="ignore", divide="ignore"):
            return counts[:, :len(hits)] / counts[:, len(hits):]

    def recall(self, hits: np.ndarray, positives: np.ndarray) -> np.ndarray:
        """Share of the positives (e.g. malignant) that are hits (e.g. referred), per resample.

        Returns:
            (n_resamples,); NaN where a resample holds no positive.
        """
        return self._recalls([hits], [positives])[:, 0]

    def balanced_accuracy(self, y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
        """Mean per-class recall over the classes present, per resample.

        The classes present are judged per resample, as scikit-learn's
        `balanced_accuracy_score` judges them in `y_true`.

        Returns:
            (n_resamples,); NaN where a resample is empty.
        """
        y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
        classes = np.unique(y_true)
        if len(classes) == 0:
            return np.full(len(self.times_drawn), np.nan)
        recalls = self._recalls([y_pred == k for k in classes], [y_true == k for k in classes])
        with warnings.catch_warnings():
            # A resample without any image of a class leaves it out, as meant; an all-NaN
            # row (no image at all) is NaN.
            warnings.filterwarnings("ignore", "Mean of empty slice", RuntimeWarning)
            return np.nanmean(recalls, axis=1)


def percentile_interval(values: np.ndarray) -> tuple[float, float]:
    """The central 95% of the defined (non-NaN) resampled values; NaN when none is defined."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return math.nan, math.nan
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)
