"""Small records the data stages hand to each other (paths and counts, never arrays).

Prefect tasks return these, so they stay small, picklable and JSON-friendly.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel

# Columns of the real HAM10000 metadata, in its order.
METADATA_COLUMNS: tuple[str, ...] = (
    "lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization", "dataset",
)
# Manifests (validated metadata, splits) carry the metadata columns plus these.
IMAGE_PATH_COLUMN = "image_path"          # absolute path of the JPEG
SOURCE_IMAGE_COLUMN = "source_image_id"   # for an oversampled copy: the image it came from
# The unit of the split: lesions linked by near-duplicate images share one (the smallest
# lesion_id of the group); a lesion without near-duplicates is its own group.
SPLIT_GROUP_COLUMN = "split_group"


class NearDuplicates(BaseModel):
    """What the near-duplicate check found (see `skinsense.data.duplicates`)."""

    settings: dict                   # the check's settings (part of the data fingerprint)
    pairs_csv: Path                  # image and lesion ids of both images, distance, similarity
    n_pairs: int
    n_lesions_merged: int            # lesions that share a split group with another lesion
    n_groups: int                    # groups of two or more lesions
    signatures_npz: Path             # each image's hash and thumbnail, in manifest order
    preview_png: Path | None = None  # a few pairs side by side
    # The ISIC 2018 test set against HAM10000 (when fetched).
    isic_test_pairs_csv: Path | None = None
    n_isic_test_pairs: int = 0
    n_isic_test_images: int = 0      # test images that nearly duplicate a HAM10000 image
    # Filled by the split: test images whose near-duplicate is in the training part.
    n_isic_test_near_train: int | None = None


class FetchedData(BaseModel):
    """HAM10000 on local disk, as `skinsense.data.sources.fetch` leaves it."""

    source: str                      # 'dataverse', or the local path it came from
    metadata_csv: Path               # the original HAM10000 metadata CSV
    images_dir: Path                 # flat folder of ISIC_*.jpg (both parts together)
    isic_test_metadata_csv: Path | None = None  # ISIC 2018 Task 3 test labels, metadata format
    isic_test_images_dir: Path | None = None


class ValidatedData(BaseModel):
    """The images that passed validation, and the fingerprint of the data."""

    manifest_csv: Path               # metadata columns + image_path, bad images left out
    fingerprint: str                 # sha256 hex of the metadata and of every image's bytes
    n_images: int
    n_bad: int
    bad_images: list[str] = []       # "image_id: reason", at most a few hundred kept
    class_counts: dict[str, int]
    isic_test_manifest_csv: Path | None = None
    near_duplicates: NearDuplicates | None = None


class SplitData(BaseModel):
    """Lesion-level train/val/test parts (CSV manifests with the manifest's columns)."""

    train_csv: Path
    val_csv: Path
    test_csv: Path
    seed: int
    fingerprint: str                 # of the data the split was made from
    class_counts: dict[str, dict[str, int]]   # part -> dx -> images
    near_duplicates: NearDuplicates | None = None   # what grouped the lesions, if checked
    # data.extra_sources added to the training part only: source name -> its fingerprint
    extra_sources: dict[str, str] = {}


class OversampledData(BaseModel):
    """The training part after oversampling, with the loss's class weights."""

    train_csv: Path                  # originals + copies; copies have source_image_id set
    n_added: int
    class_counts_before: dict[str, int]
    class_counts_after: dict[str, int]
    class_weights: list[float] | None  # in skinsense.labels.CLASS_CODES order


class CachedSplit(BaseModel):
    """One part decoded at one size: images (N, H, W, 3) uint8 and labels (N,) int64 .npy."""

    images_npy: Path
    labels_npy: Path
    size: int
    n: int
    # The manifest the part was cached from: row i of it is image i of the cache (lesion,
    # sex, age, site, dx_type for the evaluation's bootstrap and subgroup audit).
    manifest_csv: Path | None = None


class ImageCache(BaseModel):
    """All three parts at one training size."""

    size: int
    key: str                         # folder name: size and data fingerprint
    train: CachedSplit
    val: CachedSplit
    test: CachedSplit
    # The official ISIC 2018 Task 3 test set, when fetched but not used as the test part.
    isic_test: CachedSplit | None = None


def write_csv_atomic(df, path: Path) -> None:
    """Write the DataFrame `df` without its index to `path` via a temporary file and a rename."""
    # A crash then never leaves a half manifest that looks complete.
    tmp = path.with_name(path.name + ".part")
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)
