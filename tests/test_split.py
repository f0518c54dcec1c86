"""Lesion-level split on the real HAM10000 metadata: leakage, proportions, determinism."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from skinsense.config import DataConfig
from skinsense.data.metadata import load_metadata
from skinsense.data.records import IMAGE_PATH_COLUMN, ValidatedData
from skinsense.data.split import (
    run_split,
    split_by_lesion,
    split_with_test_set,
    subsample_per_class,
    write_split,
)
from skinsense.labels import CLASS_CODES

FIXTURE = Path(__file__).parent / "fixtures" / "HAM10000_metadata.csv"


@pytest.fixture(scope="module")
def metadata() -> pd.DataFrame:
    return load_metadata(FIXTURE)


def _shares(df: pd.DataFrame) -> pd.Series:
    return df["dx"].value_counts(normalize=True).reindex(list(CLASS_CODES), fill_value=0.0)


@pytest.mark.parametrize("seed", [42, 0, 7])
def test_no_lesion_in_two_parts_and_every_image_once(metadata, seed):
    train, val, test = split_by_lesion(metadata, seed=seed)
    lesions = [set(p["lesion_id"]) for p in (train, val, test)]
    assert not lesions[0] & lesions[1]
    assert not lesions[0] & lesions[2]
    assert not lesions[1] & lesions[2]
    all_ids = pd.concat([train, val, test])["image_id"]
    assert all_ids.is_unique and set(all_ids) == set(metadata["image_id"])


@pytest.mark.parametrize("seed", [42, 0, 7])
def test_class_shares_within_two_points_in_every_part(metadata, seed):
    overall = _shares(metadata)
    for name, part in zip(("train", "val", "test"), split_by_lesion(metadata, seed=seed)):
        gap = (_shares(part) - overall).abs()
        assert gap.max() < 0.02, f"{name}: {gap.idxmax()} off by {gap.max():.2%}"
        assert (part["dx"].value_counts() > 0).all() and part["dx"].nunique() == 7


def test_fractions_are_about_70_15_15(metadata):
    train, val, test = split_by_lesion(metadata, val_fraction=0.15, test_fraction=0.15, seed=42)
    n = len(metadata)
    assert len(train) / n == pytest.approx(0.70, abs=0.02)
    assert len(val) / n == pytest.approx(0.15, abs=0.015)
    assert len(test) / n == pytest.approx(0.15, abs=0.015)
    n_lesions = metadata["lesion_id"].nunique()
    assert val["lesion_id"].nunique() / n_lesions == pytest.approx(0.15, abs=0.005)


def test_rows_keep_all_columns_in_sorted_order(metadata):
    for part in split_by_lesion(metadata, seed=42):
        assert list(part.columns) == list(metadata.columns)
        assert part["image_id"].is_monotonic_increasing
        assert list(part.index) == list(range(len(part)))


def test_same_seed_same_split_different_seed_different(metadata):
    first = split_by_lesion(metadata, seed=42)
    shuffled = metadata.sample(frac=1.0, random_state=1)  # input order does not matter
    second = split_by_lesion(shuffled, seed=42)
    for a, b in zip(first, second):
        pd.testing.assert_frame_equal(a, b)
    other = split_by_lesion(metadata, seed=43)
    assert set(other[2]["image_id"]) != set(first[2]["image_id"])


def _fake_isic_test(metadata: pd.DataFrame, n: int = 300) -> pd.DataFrame:
    test = metadata.sample(n=n, random_state=0).copy()
    test["image_id"] = [f"ISIC_09{i:05d}" for i in range(n)]
    test["lesion_id"] = [f"HAMTEST_{i:05d}" for i in range(n)]
    return test


def test_isic_test_set_is_the_test_part(metadata):
    isic = _fake_isic_test(metadata)
    train, val, test = split_with_test_set(metadata, isic, val_fraction=0.15, seed=42)
    assert set(test["image_id"]) == set(isic["image_id"])
    assert not set(train["lesion_id"]) & set(val["lesion_id"])
    assert len(train) + len(val) == len(metadata)
    assert len(val) / len(metadata) == pytest.approx(0.15, abs=0.015)
    overall = _shares(metadata)
    for part in (train, val):
        assert (_shares(part) - overall).abs().max() < 0.02


def test_isic_test_lesions_are_dropped_from_training(metadata):
    isic = _fake_isic_test(metadata)
    shared_lesion = metadata["lesion_id"].iloc[0]
    isic.iloc[0, isic.columns.get_loc("lesion_id")] = shared_lesion
    train, val, _ = split_with_test_set(metadata, isic, val_fraction=0.15, seed=42)
    assert shared_lesion not in set(train["lesion_id"]) | set(val["lesion_id"])


def test_subsample_keeps_fraction_of_each_class(metadata):
    train, _, _ = split_by_lesion(metadata, seed=42)
    small = subsample_per_class(train, 0.1, seed=0)
    counts, before = small["dx"].value_counts(), train["dx"].value_counts()
    for dx in CLASS_CODES:
        assert counts[dx] == max(1, round(0.1 * before[dx]))
    assert set(small["image_id"]) <= set(train["image_id"])
    pd.testing.assert_frame_equal(small, subsample_per_class(train, 0.1, seed=0))
    # Mostly whole lesions: few lesions are cut (at most the one topping up each class).
    kept_per_lesion = small.groupby("lesion_id").size()
    full_per_lesion = train.groupby("lesion_id").size().loc[kept_per_lesion.index]
    assert (kept_per_lesion < full_per_lesion).sum() <= len(CLASS_CODES)


def test_subsample_keeps_at_least_one_per_class(metadata):
    tiny = subsample_per_class(metadata, 0.0001, seed=3)
    assert tiny["dx"].value_counts().to_dict() == {dx: 1 for dx in CLASS_CODES}


def test_write_split_on_bare_metadata(metadata, tmp_path):
    split = write_split(FIXTURE, tmp_path / "split", seed=5)  # a path, as the CLI passes
    assert split == write_split(metadata, tmp_path / "again", seed=5).model_copy(
        update={"train_csv": split.train_csv, "val_csv": split.val_csv, "test_csv": split.test_csv}
    )
    parts = {name: pd.read_csv(getattr(split, f"{name}_csv")) for name in ("train", "val", "test")}
    assert sum(len(p) for p in parts.values()) == len(metadata)
    for name, part in parts.items():
        assert split.class_counts[name] == {
            dx: int((part["dx"] == dx).sum()) for dx in CLASS_CODES
        }
    assert split.seed == 5 and len(split.fingerprint) == 64


def test_run_split_thins_training_part_only(metadata, tmp_path):
    paths = [f"/data/{image_id}.jpg" for image_id in metadata["image_id"]]
    manifest = metadata.assign(**{IMAGE_PATH_COLUMN: paths})
    manifest_csv = tmp_path / "manifest.csv"
    manifest.to_csv(manifest_csv, index=False)
    validated = ValidatedData(
        manifest_csv=manifest_csv, fingerprint="f" * 64, n_images=len(manifest), n_bad=0,
        class_counts={dx: int((manifest["dx"] == dx).sum()) for dx in CLASS_CODES},
    )
    full = run_split(validated, DataConfig(), tmp_path / "full")
    half = run_split(validated, DataConfig(train_fraction=0.5), tmp_path / "half")
    assert half.fingerprint == "f" * 64
    assert half.class_counts["val"] == full.class_counts["val"]
    assert half.class_counts["test"] == full.class_counts["test"]
    for dx in CLASS_CODES:
        assert half.class_counts["train"][dx] == round(0.5 * full.class_counts["train"][dx])
    train = pd.read_csv(half.train_csv)
    assert IMAGE_PATH_COLUMN in train.columns

    with pytest.raises(ValueError, match="include_isic_test"):
        run_split(validated, DataConfig(isic_test_as_test=True), tmp_path / "isic")
