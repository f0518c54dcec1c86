"""`field_*` metrics: a model on the confirmed diagnoses it never trained on.

Confirmed cases come from clinics, not from HAM10000's curated test part, so they show how a
model does in the field. A case the model trained on (`data.extra_sources: [feedback]`; its
image id is in the training manifest, which the card records as `trained_feedback_ids`) is
left out. Intervals resample whole
lesions (`skinsense.evaluation.bootstrap.LesionBootstrap`); with fewer than `min_cases` cases only the
count is reported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from skinsense.evaluation.bootstrap import LesionBootstrap, percentile_interval
from skinsense.labels import CLASS_CODES
from skinsense.monitoring.reference import MALIGNANT

if TYPE_CHECKING:
    from skinsense.serving.predictor import Predictor


def field_metrics(model_dir: Path, cases: pd.DataFrame, *, trained_image_ids: set[str],
                  min_cases: int, n_resamples: int = 1000, seed: int = 0,
                  batch_size: int = 64,
                  predictor: Callable[[], Predictor] | None = None) -> dict[str, float]:
    """Accuracy, balanced accuracy and referral sensitivity on confirmed cases.

    Args:
        model_dir: the model folder (served exactly as the app serves it, no gate).
        cases: the `feedback` source's metadata rows with `image_path` (one per image).
        trained_image_ids: image ids of the model's training part (left out here).
        min_cases: fewer unseen cases than this give only `field_n`.
        n_resamples, seed: the lesion bootstrap.
        predictor: makes the predictor when there are enough cases (the evaluate stage
            passes the model it has loaded); None loads the folder as the app does.

    Returns:
        `field_n`, and with enough cases `field_accuracy`, `field_balanced_accuracy`,
        `field_referral_sensitivity` (when there are malignant cases and a referral rule),
        each with `_ci_low` / `_ci_high`.
    """
    from skinsense.serving.predictor import Predictor
    from skinsense.trust.referral import referral_scores

    unseen = cases[~cases["image_id"].isin(trained_image_ids)]
    unseen = unseen[[Path(p).is_file() for p in unseen["image_path"]]]
    out: dict[str, float] = {"field_n": float(len(unseen))}
    if len(unseen) < min_cases:
        return out
    predictor = predictor() if predictor is not None else Predictor.from_model_dir(Path(model_dir))
    paths = unseen["image_path"].tolist()
    probabilities = np.concatenate([predictor.predict_proba(paths[i:i + batch_size])
                                    for i in range(0, len(paths), batch_size)])
    y_true = unseen["dx"].map(CLASS_CODES.index).to_numpy()
    y_pred = probabilities.argmax(axis=1)
    boot = LesionBootstrap(unseen["lesion_id"].to_numpy(), n_resamples, seed)

    def put(name: str, value: float, resampled: np.ndarray) -> None:
        low, high = percentile_interval(resampled)
        out.update({f"field_{name}": float(value), f"field_{name}_ci_low": low,
                    f"field_{name}_ci_high": high})

    everyone = np.ones(len(y_true), bool)
    correct = y_true == y_pred
    put("accuracy", correct.mean(), boot.recall(correct, everyone))
    from sklearn.metrics import balanced_accuracy_score

    put("balanced_accuracy", balanced_accuracy_score(y_true, y_pred),
        boot.balanced_accuracy(y_true, y_pred))
    malignant = unseen["dx"].isin(MALIGNANT).to_numpy()
    threshold = predictor.card.referral_threshold
    if malignant.any() and threshold is not None:
        referred = referral_scores(probabilities) >= threshold
        put("referral_sensitivity", referred[malignant].mean(),
            boot.recall(referred & malignant, malignant))
    return out


def field_figures(model_dir: Path, trained_image_ids: Iterable[str] | None, *, home: Path,
                  min_cases: int, n_resamples: int, seed: int,
                  predictor: Callable[[], Predictor] | None = None) -> dict[str, float]:
    """`field_metrics` on every confirmed case with a kept image that is not among
    `trained_image_ids` (None: the model's card says which: `trained_feedback_ids`, or for a
    card from before, the cases confirmed after `trained_at`), or {} when there is none (or
    the monitoring database cannot be read: the evaluation does not depend on it)."""
    import logging

    from skinsense.monitoring.feedback import FeedbackError, export_source

    try:
        source = export_source(Path(home))
        trained = (set(trained_image_ids) if trained_image_ids is not None
                   else _trained_per_card(Path(model_dir)))
    except FeedbackError:
        return {}
    except Exception as exc:  # noqa: BLE001 (a database error must not fail an evaluation)
        logging.getLogger(__name__).warning("no field_* metrics: %s", exc)
        return {}
    cases = pd.read_csv(source.metadata_csv, dtype={"image_id": str, "lesion_id": str})
    cases["image_path"] = [str(source.images_dir / f"{i}.jpg") for i in cases["image_id"]]
    return field_metrics(model_dir, cases, trained_image_ids=trained, min_cases=min_cases,
                         n_resamples=n_resamples, seed=seed, predictor=predictor)


def _trained_per_card(model_dir: Path) -> set[str]:
    """The confirmed cases a model may have trained on, by its card."""
    from datetime import datetime

    from skinsense.lifecycle.packaging import load_card
    from skinsense.monitoring.feedback import confirmed_cases, image_id_for

    card = load_card(model_dir)
    if card.trained_feedback_ids is not None:
        return set(card.trained_feedback_ids)
    # A card from before the ids were recorded: whatever was confirmed before it was trained
    # may be in its training part.
    earlier = confirmed_cases(until=datetime.fromisoformat(card.trained_at))
    return set() if earlier.empty else set(earlier["image_sha256"].map(image_id_for))
