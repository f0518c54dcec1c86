"""The subgroup audit on the real HAM10000 metadata, with made-up predictions."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score, recall_score

import skinsense.evaluation.subgroups as audit
from skinsense.evaluation.bootstrap import LesionBootstrap
from skinsense.labels import CODE_TO_INDEX
from skinsense.trust.referral import is_malignant

FIXTURE = Path(__file__).parent / "fixtures" / "HAM10000_metadata.csv"
MIN_IMAGES = 30


@pytest.fixture(scope="module")
def metadata() -> pd.DataFrame:
    return pd.read_csv(FIXTURE, dtype={"lesion_id": str, "image_id": str, "dx": str})


@pytest.fixture(scope="module")
def predictions(metadata):
    """Labels, a 70%-right prediction and a referral decision, reproducibly made up."""
    rng = np.random.default_rng(0)
    y_true = metadata["dx"].map(CODE_TO_INDEX).to_numpy()
    y_pred = np.where(rng.random(len(y_true)) < 0.7, y_true, rng.integers(0, 7, len(y_true)))
    referred = np.where(is_malignant(y_true), rng.random(len(y_true)) < 0.9,
                        rng.random(len(y_true)) < 0.3)
    return y_true, y_pred, referred


@pytest.fixture(scope="module")
def table(metadata, predictions):
    y_true, y_pred, referred = predictions
    return audit.subgroup_metrics(metadata, y_true, y_pred, referred, min_images=MIN_IMAGES,
                                      n_resamples=200, seed=0)


def test_age_bands():
    ages = pd.Series([0, 25, 29.9, 30, 44, 45, 59, 60, 74, 75, 85, None, "n/a"])
    assert list(audit.age_band(ages)) == [
        "<30", "<30", "<30", "30-44", "30-44", "45-59", "45-59", "60-74", "60-74", "75+",
        "75+", "unknown", "unknown"]


def test_the_groups_and_counts_are_those_of_the_metadata(metadata, table):
    assert list(table.columns) == ["attribute", "group", "n", "metric", "value", "ci_low",
                                   "ci_high"]
    accuracy = table[table["metric"] == "balanced_accuracy"]
    counts = {(a, g): n for a, g, n in accuracy[["attribute", "group", "n"]].itertuples(
        index=False)}
    expected = {("all", "all"): len(metadata)}
    for column in ("sex", "localization", "dx_type"):
        for group, n in metadata[column].fillna("unknown").value_counts().items():
            expected[(column, group)] = n
    ages = pd.to_numeric(metadata["age"])
    bands = {"<30": ages < 30, "30-44": (ages >= 30) & (ages < 45),
             "45-59": (ages >= 45) & (ages < 60), "60-74": (ages >= 60) & (ages < 75),
             "75+": ages >= 75, "unknown": ages.isna()}
    expected |= {("age_band", band): int(mask.sum()) for band, mask in bands.items()}
    assert counts == expected
    # The real metadata: 57 images of unknown sex, 15 sites (with 'unknown'), 4 dx_types.
    assert counts[("sex", "unknown")] == 57
    assert len([g for a, g in counts if a == "localization"]) == 15
    assert {g for a, g in counts if a == "dx_type"} == {"histo", "follow_up", "consensus",
                                                         "confocal"}
    assert [g for a, g in counts if a == "age_band"] == list(audit.AGE_BANDS)


def test_small_groups_are_listed_with_their_count_and_no_figure(table):
    small = table[table["n"] < MIN_IMAGES]
    assert len(small) > 0 and small[["value", "ci_low", "ci_high"]].isna().all().all()
    large = table[table["n"] >= MIN_IMAGES]
    assert large[["value", "ci_low", "ci_high"]].notna().all().all()
    assert (large["ci_low"] <= large["value"]).all() and (large["value"] <= large["ci_high"]).all()
    # Referral sensitivity counts malignant images: follow-up (nevi only) has none.
    follow_up = table[(table["group"] == "follow_up")].set_index("metric")
    assert follow_up.loc["referral_sensitivity", "n"] == 0
    assert math.isnan(follow_up.loc["referral_sensitivity", "value"])
    assert follow_up.loc["balanced_accuracy", "n"] == follow_up.loc["referral_specificity", "n"]


def test_each_figure_is_computed_on_its_group(metadata, predictions, table):
    y_true, y_pred, referred = predictions
    female = (metadata["sex"] == "female").to_numpy()
    row = table[(table["attribute"] == "sex") & (table["group"] == "female")].set_index("metric")
    assert row.loc["balanced_accuracy", "value"] == pytest.approx(
        balanced_accuracy_score(y_true[female], y_pred[female]))
    malignant = is_malignant(y_true[female])
    assert row.loc["referral_sensitivity", "value"] == pytest.approx(
        recall_score(malignant, referred[female]))
    assert row.loc["referral_sensitivity", "n"] == malignant.sum()
    assert row.loc["referral_specificity", "value"] == pytest.approx(
        recall_score(~malignant, ~referred[female]))


def test_gaps_are_best_minus_worst_over_groups_with_a_figure(table):
    gaps = audit.gaps(table)
    localization = table[(table["attribute"] == "localization")
                         & (table["metric"] == "balanced_accuracy") & table["value"].notna()]
    entry = gaps["balanced_accuracy"]["localization"]
    assert entry["gap"] == pytest.approx(localization["value"].max() - localization["value"].min())
    assert entry["groups"] == len(localization) < 15  # small sites have no figure
    metrics = audit.gap_metrics(table)
    assert metrics["gap_balanced_accuracy_sex"] == pytest.approx(
        gaps["balanced_accuracy"]["sex"]["gap"])
    assert "gap_referral_sensitivity_dx_type" not in metrics  # only histo has malignant images


def test_the_files_and_the_markdown(table, tmp_path):
    csv_path, md_path = audit.write(table, tmp_path / "subgroups")
    assert csv_path.name == "subgroup_metrics.csv" and md_path.name == "subgroup_metrics.md"
    pd.testing.assert_frame_equal(pd.read_csv(csv_path, keep_default_na=False,
                                              na_values=[""]), table, check_dtype=False)
    text = md_path.read_text()
    assert "| sex | female |" in text and "resampled by lesion" in text
    assert "- (n=" in text and "Largest gap" in text


# -- the bootstrap resamples whole lesions -------------------------------------------------------

def test_every_image_of_a_lesion_shares_its_weight(metadata):
    lesions = metadata["lesion_id"].to_numpy()
    weights = LesionBootstrap(lesions, n_resamples=50, seed=1).image_weights()
    assert weights.shape == (50, len(metadata))
    per_lesion = pd.DataFrame(weights.T).groupby(lesions).nunique()
    assert (per_lesion == 1).all().all()
    # Each resample draws as many lesions as there are (7,470 in HAM10000).
    first_image = ~pd.Series(lesions).duplicated().to_numpy()
    np.testing.assert_array_equal(weights[:, first_image].sum(axis=1), 7470)


def test_more_photos_of_the_same_lesions_give_the_same_intervals(metadata, predictions):
    """Images of a lesion are one observation: doubling every lesion's photos must not narrow
    the interval (an image bootstrap would narrow it by about a factor of 1.4)."""
    y_true, y_pred, referred = predictions
    lesions = metadata["lesion_id"].to_numpy()
    once = LesionBootstrap(lesions, 300, seed=2)
    twice = LesionBootstrap(np.concatenate([lesions, lesions]), 300, seed=2)
    malignant = is_malignant(y_true)
    np.testing.assert_allclose(once.recall(referred, malignant),
                               twice.recall(np.tile(referred, 2), np.tile(malignant, 2)))
    np.testing.assert_allclose(once.balanced_accuracy(y_true, y_pred),
                               twice.balanced_accuracy(np.tile(y_true, 2), np.tile(y_pred, 2)))


def test_bootstrap_metrics_equal_weighting_every_image_by_its_lesion(predictions, metadata):
    y_true, y_pred, referred = predictions
    resamples = LesionBootstrap(metadata["lesion_id"].to_numpy(), 20, seed=3)
    weights = resamples.image_weights()
    malignant = is_malignant(y_true)
    by_image = (weights @ (referred & malignant)) / (weights @ malignant)
    np.testing.assert_allclose(resamples.recall(referred, malignant), by_image)
    for b in range(3):
        assert resamples.balanced_accuracy(y_true, y_pred)[b] == pytest.approx(
            balanced_accuracy_score(y_true, y_pred, sample_weight=weights[b]))


def test_a_manifest_without_the_metadata_is_refused(metadata, predictions):
    y_true, y_pred, referred = predictions
    with pytest.raises(ValueError, match="localization"):
        audit.subgroup_metrics(metadata.drop(columns="localization"), y_true, y_pred,
                                   referred)
    with pytest.raises(ValueError, match="same images"):
        audit.subgroup_metrics(metadata.iloc[:10], y_true, y_pred, referred)
