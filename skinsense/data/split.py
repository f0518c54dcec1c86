"""Lesion-level train/val/test split, stratified by diagnosis.

HAM10000 has several images of many lesions (4,501 of 10,015 images); an image-level
split puts photos of the same lesion on both sides and inflates test scores. Every split
here assigns whole lesions to one part.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from skinsense.config import DataConfig
from skinsense.data.metadata import (
    class_counts,
    dataset_fingerprint,
    load_metadata,
    write_csv_atomic,
)
from skinsense.data.records import SPLIT_GROUP_COLUMN, SplitData, ValidatedData

log = logging.getLogger(__name__)

PART_NAMES = ("train", "val", "test")
# Lesions with 1, 2 or 3+ images. Stratifying lesions by dx alone lets a part draw
# by chance the lesions with many images and miss a class's image share by up to ~2 pp on
# the real metadata; adding this bucket keeps every share within ~0.5 pp.
_MAX_SIZE_BUCKET = 3


def _unit(df: pd.DataFrame) -> str:
    """The column whose values are split as wholes: `split_group` when the near-duplicate
    check made one (lesions linked by near-duplicate images), else `lesion_id`."""
    return SPLIT_GROUP_COLUMN if SPLIT_GROUP_COLUMN in df.columns else "lesion_id"


def _lesion_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per split unit (sorted): its dx and number of images.

    A unit is a lesion, or a group of lesions linked by near-duplicate images. A lesion
    has one dx (`load_metadata` checks it); a group may join lesions of different dx (one
    photograph filed twice with two diagnoses), and is then stratified by its most common
    dx (ties: the first class code in alphabetical order).
    """
    unit = _unit(df)
    lesions = df.groupby(unit, sort=True).agg(
        dx=("dx", _most_common), n_dx=("dx", "nunique"), n_images=("image_id", "size")
    )
    mixed = lesions.index[lesions["n_dx"] > 1]
    if len(mixed) and unit == "lesion_id":
        raise ValueError(
            f"{len(mixed)} lesion(s) have images of different dx (e.g. {list(mixed[:3])}); "
            "a lesion-level split needs one dx per lesion (see load_metadata)"
        )
    if len(mixed):
        log.warning("%d group(s) of near-duplicate lesions join different dx (e.g. %s); each "
                    "is stratified by its most common dx", len(mixed), list(mixed[:3]))
    return lesions


def _most_common(dx: pd.Series) -> str:
    counts = dx.value_counts()
    return str(min(counts.index[counts == counts.max()]))


def _strata(lesions: pd.DataFrame, test_size: float) -> np.ndarray:
    """Stratum of each lesion: dx and size bucket, coarsened where a stratum is too small."""
    size = np.minimum(lesions["n_images"].to_numpy(), _MAX_SIZE_BUCKET).astype(str)
    dx = lesions["dx"].to_numpy(dtype=object)
    fine = np.asarray([f"{d}|{s}" for d, s in zip(dx, size, strict=True)], dtype=object)
    # A stratum needs enough lesions to expect at least one in the smaller part.
    min_members = max(2, math.ceil(1 / min(test_size, 1 - test_size)))
    strata = fine.copy()
    for coarser in (dx, np.full(len(dx), "rare", dtype=object)):
        values, counts = np.unique(strata, return_counts=True)
        small = set(values[counts < min_members])
        if small:
            strata = np.where(np.isin(strata, list(small)), coarser, strata)
    return strata


def _split_lesions(
    lesions: pd.DataFrame, test_size: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split lesion ids into (rest, held out), stratified as finely as the data allows."""
    ids = lesions.index.to_numpy(dtype=object)
    attempts = (_strata(lesions, test_size), lesions["dx"].to_numpy(dtype=object), None)
    for stratify in attempts:
        try:
            rest, held = train_test_split(
                ids, test_size=test_size, stratify=stratify, random_state=seed
            )
        except ValueError:
            # Too few lesions for this stratification (tiny or subsampled data): try a
            # coarser one; the real metadata always takes the first.
            continue
        return np.asarray(rest, dtype=object), np.asarray(held, dtype=object)
    raise ValueError(
        f"cannot split {len(ids)} lesion(s) with test_size={test_size}; need more lesions"
    )


def _rows_of(df: pd.DataFrame, lesion_ids: np.ndarray) -> pd.DataFrame:
    part = df[df[_unit(df)].isin(set(lesion_ids))]
    # Sorted by image_id so that a part's file is the same whatever the input order.
    return part.sort_values("image_id", kind="stable").reset_index(drop=True)


def split_by_lesion(
    df: pd.DataFrame,
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 42,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Split images into train/val/test so that no lesion is in two parts.

    With a `split_group` column (the validate stage's near-duplicate check), whole groups
    of lesions are split instead, so that no near-duplicate pair straddles two parts.
    Lesions are stratified by dx and by how many images they have (1, 2, 3+), then split
    with scikit-learn's `train_test_split`: first test from the rest, then val from the
    remainder. Fractions are of lesions; image fractions follow closely.

    Args:
        df: Metadata or manifest rows (at least lesion_id, image_id, dx).
        val_fraction: Fraction of lesions for validation.
        test_fraction: Fraction of lesions for testing.
        seed: Seed of both splits; the same seed and data give the same parts.

    Returns:
        (train, val, test), each with all of `df`'s columns, sorted by image_id.

    Raises:
        ValueError: A lesion has images of different dx, or there are too few lesions.
    """
    if not 0 < val_fraction < 1 or not 0 < test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in (0, 1) "
            "and leave room for training"
        )
    lesions = _lesion_table(df)
    rest, test = _split_lesions(lesions, test_fraction, seed)
    # val is a fraction of all lesions, so of the remainder it is a larger share.
    _, val = _split_lesions(lesions.loc[rest], val_fraction / (1 - test_fraction), seed)
    val_set = set(val)
    train = np.asarray([i for i in rest if i not in val_set], dtype=object)
    return _rows_of(df, train), _rows_of(df, val), _rows_of(df, test)


def split_with_test_set(
    df: pd.DataFrame,
    test_df: pd.DataFrame,
    *,
    val_fraction: float = 0.15,
    seed: int = 42,
    near_test_lesions: set[str] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Use an external test set (the official ISIC 2018 Task 3 test set) as the test part.

    `df` (HAM10000) is split into train and val by lesion, stratified as in
    `split_by_lesion`. Any HAM10000 image or lesion that also appears in `test_df` is
    dropped from train/val (with a warning), so the test set never leaks into training;
    so is every lesion in `near_test_lesions` (HAM10000 lesions with an image that nearly
    duplicates a test image), with its whole split group.

    Args:
        df: HAM10000 metadata or manifest rows.
        test_df: The test set's rows, same columns.
        val_fraction: Fraction of HAM10000 lesions for validation.
        seed: Seed of the split.
        near_test_lesions: HAM10000 lesion_ids to keep out of train and val.

    Returns:
        (train, val, test), each sorted by image_id.
    """
    overlap = df["image_id"].isin(set(test_df["image_id"])) | df["lesion_id"].isin(
        set(test_df["lesion_id"])
    )
    if near_test_lesions:
        unit = _unit(df)
        near_units = set(df.loc[df["lesion_id"].isin(near_test_lesions), unit])
        overlap |= df[unit].isin(near_units)
    if overlap.any():
        log.warning(
            "dropping %d HAM10000 image(s) whose image or lesion is in the test set, or "
            "nearly duplicates a test image",
            int(overlap.sum()),
        )
        df = df.loc[~overlap]
    lesions = _lesion_table(df)
    train, val = _split_lesions(lesions, val_fraction, seed)
    test = test_df.sort_values("image_id", kind="stable").reset_index(drop=True)
    return _rows_of(df, train), _rows_of(df, val), test


def subsample_per_class(df: pd.DataFrame, fraction: float, seed: int = 0) -> pd.DataFrame:
    """Keep `fraction` of each class's images (for quick experiments on the training part).

    Whole lesions are taken in a seeded random order while they fit the class's quota; the
    rest of the quota is topped up with single images, so each class keeps exactly
    `max(1, round(fraction * n))` images.

    Args:
        df: Rows of one part (normally the training part).
        fraction: In (0, 1]; 1 returns a copy of `df`.
        seed: Seed of the choice.

    Returns:
        The kept rows, sorted by image_id.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return df.sort_values("image_id", kind="stable").reset_index(drop=True)
    rng = np.random.default_rng(seed)
    kept: list[str] = []
    for dx in sorted(df["dx"].unique()):
        rows = df[df["dx"] == dx].sort_values(["lesion_id", "image_id"], kind="stable")
        quota = max(1, round(fraction * len(rows)))
        by_lesion = {lid: list(g["image_id"]) for lid, g in rows.groupby("lesion_id", sort=True)}
        order = rng.permutation(sorted(by_lesion))
        chosen: list[str] = []
        leftovers: list[str] = []
        for lesion_id in order:
            images = by_lesion[lesion_id]
            if len(chosen) + len(images) <= quota:
                chosen.extend(images)
            else:
                leftovers.extend(images)
        kept.extend(chosen + leftovers[: quota - len(chosen)])
    out = df[df["image_id"].isin(set(kept))]
    return out.sort_values("image_id", kind="stable").reset_index(drop=True)


def write_split(
    df: pd.DataFrame | Path | str,
    out_dir: Path,
    *,
    seed: int = 42,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    train_fraction: float = 1.0,
    test_df: pd.DataFrame | None = None,
    fingerprint: str | None = None,
    near_test_lesions: set[str] | None = None,
) -> SplitData:
    """Split `df` by lesion and write `train.csv`, `val.csv` and `test.csv` to `out_dir`.

    Works on a bare metadata CSV's rows as well as on a validated manifest (the columns
    are carried through), so `skinsense split --metadata CSV --out DIR` can use it.

    Args:
        df: Rows to split (HAM10000 metadata columns, optionally `image_path`), or the
            path of such a CSV (read and checked with `load_metadata`).
        out_dir: Folder for the three CSVs (created).
        seed: Seed of the split and of the training subsample.
        val_fraction: Fraction of lesions for validation.
        test_fraction: Fraction of lesions for testing; unused with `test_df`.
        train_fraction: Keep this fraction of each class of the training part only.
        test_df: An external test set to use as the test part (see `split_with_test_set`).
        fingerprint: Fingerprint of the data; None computes one from `df`'s rows alone.
        near_test_lesions: With `test_df`: HAM10000 lesions kept out of train and val
            because an image of theirs nearly duplicates a test image.

    Returns:
        Paths of the parts, the seed, the fingerprint and images per class in each part.
    """
    if not isinstance(df, pd.DataFrame):
        df = load_metadata(df)
    if test_df is not None:
        train, val, test = split_with_test_set(df, test_df, val_fraction=val_fraction,
                                               seed=seed, near_test_lesions=near_test_lesions)
    else:
        train, val, test = split_by_lesion(
            df, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed
        )
    if train_fraction < 1:
        # Only training data is thinned: val and test stay comparable across runs.
        train = subsample_per_class(train, train_fraction, seed=seed)
    if fingerprint is None:
        fingerprint = dataset_fingerprint(df.to_csv(index=False).encode(), {})

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, part in zip(PART_NAMES, (train, val, test), strict=True):
        paths[name] = (out_dir / f"{name}.csv").resolve()
        write_csv_atomic(part, paths[name])
    return SplitData(
        train_csv=paths["train"],
        val_csv=paths["val"],
        test_csv=paths["test"],
        seed=seed,
        fingerprint=fingerprint,
        class_counts={
            name: class_counts(part["dx"])
            for name, part in zip(PART_NAMES, (train, val, test), strict=True)
        },
    )


def run_split(validated: ValidatedData, cfg: DataConfig, out_dir: Path) -> SplitData:
    """The split stage: split the validated manifest as `cfg` says and write the parts.

    Args:
        validated: Output of the validate stage.
        cfg: Uses split_seed, val_fraction, test_fraction, train_fraction and
            isic_test_as_test.
        out_dir: Folder for train.csv, val.csv and test.csv.

    Returns:
        The written split; its fingerprint is the validated data's.

    Raises:
        ValueError: `isic_test_as_test` is set but the ISIC test set was not validated.
    """
    df = load_metadata(validated.manifest_csv)
    found = validated.near_duplicates
    test_df = near_test = None
    if cfg.isic_test_as_test:
        if validated.isic_test_manifest_csv is None:
            raise ValueError(
                "isic_test_as_test is set but no ISIC 2018 test manifest was validated; "
                "fetch with include_isic_test=True (or unset isic_test_as_test)"
            )
        test_df = load_metadata(validated.isic_test_manifest_csv)
        if found is not None and found.isic_test_pairs_csv is not None:
            pairs = pd.read_csv(found.isic_test_pairs_csv, dtype=str)
            near_test = set(pairs["lesion_id_b"])
    split = write_split(
        df,
        out_dir,
        seed=cfg.split_seed,
        val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction,
        train_fraction=cfg.train_fraction,
        test_df=test_df,
        fingerprint=validated.fingerprint,
        near_test_lesions=near_test,
    )
    if found is not None:
        from skinsense.data.duplicates import isic_test_near_train

        train_ids = pd.read_csv(split.train_csv, dtype={"image_id": str})["image_id"]
        split.near_duplicates = found.model_copy(
            update={"n_isic_test_near_train": isic_test_near_train(found, train_ids)})
    return split
