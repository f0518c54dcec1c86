"""Small records the data stages hand to each other (paths and counts, never arrays).

Prefect tasks return these, so they stay small, picklable and JSON-friendly.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

# Columns of the real HAM10000 metadata, in its order.
METADATA_COLUMNS: tuple[str, ...] = (
    "lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization", "dataset",
)
# Manifests (validated metadata, splits) carry the metadata columns plus these.
IMAGE_PATH_COLUMN = "image_path"          # absolute path of the JPEG
SOURCE_IMAGE_COLUMN = "source_image_id"   # for an oversampled copy: the image it came from


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


class SplitData(BaseModel):
    """Lesion-level train/val/test parts (CSV manifests with the manifest's columns)."""

    train_csv: Path
    val_csv: Path
    test_csv: Path
    seed: int
    fingerprint: str                 # of the data the split was made from
    class_counts: dict[str, dict[str, int]]   # part -> dx -> images
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
