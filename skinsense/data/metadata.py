"""Metadata schema checks, image validation and the dataset fingerprint.

`load_metadata` refuses a metadata CSV that would silently corrupt a run (unknown classes,
duplicate images, a lesion with two diagnoses). `validate` then checks that every image
listed exists and decodes, leaves out the few bad ones a real download may have, writes the
manifest the later stages read, and fingerprints the data from the same read of each file.
"""

from __future__ import annotations

import functools
import hashlib
import io
import multiprocessing
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import pandas as pd
from PIL import Image

from skinsense.data import duplicates
from skinsense.data.records import (
    IMAGE_PATH_COLUMN,
    METADATA_COLUMNS,
    FetchedData,
    ValidatedData,
    write_csv_atomic,  # also imported from here by split and oversample
)
from skinsense.labels import CLASS_CODES

if TYPE_CHECKING:
    from skinsense.config import NearDuplicateConfig

MANIFEST_NAME = "manifest.csv"
ISIC_TEST_MANIFEST_NAME = "isic_test_manifest.csv"
# Offending rows quoted in one error message; the count says how many there are in all.
_MAX_ROWS_IN_MESSAGE = 5
# `ValidatedData.bad_images` stays a small record (Prefect persists it).
_MAX_BAD_KEPT = 300
# Images per task sent to a worker: big enough to amortise pickling, small enough to
# keep every core busy until the end.
_CHUNK_SIZE = 128
_IDENTITY_COLUMNS = ("lesion_id", "image_id", "dx")


class DataValidationError(ValueError):
    """The data on disk cannot be used as it is; the message says what to do."""


class MetadataError(DataValidationError):
    """A metadata CSV breaks the HAM10000 schema; the message names the file and rows."""


def _csv_line(index: int) -> int:
    # Row 0 of the frame is line 2 of the file (line 1 is the header); HAM10000 has no
    # quoted newlines, so one row is one line.
    return index + 2


def _quote_rows(df: pd.DataFrame, mask: pd.Series, describe: Callable[[pd.Series], str]) -> str:
    rows = df.index[mask.to_numpy()]
    shown = "; ".join(
        f"line {_csv_line(i)} ({describe(df.loc[i])})" for i in rows[:_MAX_ROWS_IN_MESSAGE]
    )
    extra = len(rows) - _MAX_ROWS_IN_MESSAGE
    more = f" and {extra} more" if extra > 0 else ""
    return f"{shown}{more}"


def load_metadata(csv: Path | str) -> pd.DataFrame:
    """Read a HAM10000-format metadata CSV and check its schema.

    Extra columns (such as `image_path` in a manifest) are kept; the checks concern the
    HAM10000 columns only.

    Args:
        csv: Path of the CSV (the original HAM10000 metadata, the ISIC test labels in the
            same format, or a manifest written by `validate`).

    Returns:
        The metadata, one row per image, in file order, with a fresh RangeIndex.

    Raises:
        MetadataError: The file is missing or unreadable, lacks columns, has an empty
            `lesion_id`/`image_id`, a `dx` outside the seven classes, a duplicate
            `image_id`, or a lesion whose images have different diagnoses. The message
            names the file and the 1-based CSV lines concerned.
    """
    csv = Path(csv)
    df = _read_metadata_csv(csv)
    # In this order: each check relies on the ones before it (columns present, ids filled).
    for check in (_check_columns, _check_ids_filled, _check_dx_known, _check_images_unique,
                  _check_one_dx_per_lesion):
        check(df, csv)
    return df.reset_index(drop=True)


def _read_metadata_csv(csv: Path) -> pd.DataFrame:
    if not csv.is_file():
        raise MetadataError(
            f"{csv}: metadata file not found; run `skinsense fetch` (or point the data "
            "source at a folder that holds HAM10000_metadata.csv)"
        )
    try:
        return pd.read_csv(csv, dtype={c: str for c in _IDENTITY_COLUMNS})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise MetadataError(
            f"{csv}: not a readable CSV ({exc}); re-fetch it with `skinsense fetch --refresh`"
        ) from exc


def _check_columns(df: pd.DataFrame, csv: Path) -> None:
    """The HAM10000 columns are there, with rows under them."""
    missing = [c for c in METADATA_COLUMNS if c not in df.columns]
    if missing:
        raise MetadataError(
            f"{csv}: missing column(s) {missing}; expected the HAM10000 columns "
            f"{list(METADATA_COLUMNS)} (found {list(df.columns)}). Check that this is the "
            "HAM10000 metadata CSV, or re-fetch it with `skinsense fetch --refresh`."
        )
    if df.empty:
        raise MetadataError(
            f"{csv}: no rows under the header; re-fetch it with `skinsense fetch --refresh`"
        )


def _check_ids_filled(df: pd.DataFrame, csv: Path) -> None:
    for column in ("lesion_id", "image_id"):
        empty = df[column].isna() | (df[column].astype(str).str.strip() == "")
        if empty.any():
            raise MetadataError(
                f"{csv}: {int(empty.sum())} row(s) with an empty {column}: "
                + _quote_rows(df, empty, lambda r: f"image_id {r['image_id']!r}, "
                              f"lesion_id {r['lesion_id']!r}")
                + f". Fill in {column} or remove these rows."
            )


def _check_dx_known(df: pd.DataFrame, csv: Path) -> None:
    bad_dx = ~df["dx"].isin(CLASS_CODES)
    if bad_dx.any():
        raise MetadataError(
            f"{csv}: {int(bad_dx.sum())} row(s) with a dx outside the seven HAM10000 classes "
            f"{list(CLASS_CODES)}: "
            + _quote_rows(df, bad_dx, lambda r: f"image_id {r['image_id']}, dx {r['dx']!r}")
            + ". Correct the dx (lower-case class codes) or remove these rows."
        )


def _check_images_unique(df: pd.DataFrame, csv: Path) -> None:
    duplicated = df["image_id"].duplicated(keep=False)
    if duplicated.any():
        raise MetadataError(
            f"{csv}: {int(df['image_id'].duplicated().sum())} duplicate image_id(s): "
            + _quote_rows(df, duplicated, lambda r: f"image_id {r['image_id']}")
            + ". Each image must be listed once; remove the repeated rows."
        )


def _check_one_dx_per_lesion(df: pd.DataFrame, csv: Path) -> None:
    # A lesion is one diagnosis; two would put contradictory labels on the same lesion and
    # break the lesion-level stratified split.
    dx_per_lesion = df.groupby("lesion_id", sort=False)["dx"].nunique()
    mixed = dx_per_lesion.index[dx_per_lesion > 1]
    if len(mixed):
        in_mixed = df["lesion_id"].isin(mixed)
        raise MetadataError(
            f"{csv}: {len(mixed)} lesion(s) whose images have different dx, e.g. "
            + _quote_rows(df, in_mixed, lambda r: f"lesion_id {r['lesion_id']}, "
                          f"image_id {r['image_id']}, dx {r['dx']}")
            + ". Give every image of a lesion the same dx, or split the lesion_id."
        )


def dataset_fingerprint(metadata_bytes: bytes, image_hashes: Mapping[str, str]) -> str:
    """Fingerprint a dataset from its metadata and its images' hashes.

    Args:
        metadata_bytes: The metadata CSV exactly as on disk.
        image_hashes: image_id -> sha256 hex digest of the image file's bytes.

    Returns:
        A sha256 hex digest; it changes when the metadata or any image byte changes, or
        when an image is added or left out, and does not depend on the mapping's order.
    """
    digest = hashlib.sha256()
    # Hash the metadata first, so its bytes cannot run into the image lines.
    digest.update(hashlib.sha256(metadata_bytes).digest())
    for image_id, image_hash in sorted(image_hashes.items()):
        digest.update(f"{image_id}\t{image_hash}\n".encode())
    return digest.hexdigest()


def _check_image(
    path: str, central_fraction: float | None = None
) -> tuple[str | None, str | None, tuple | None]:
    """Read, hash and decode one image: (sha256 hex or None, reason it is bad or None,
    near-duplicate signature or None).

    With `central_fraction`, the near-duplicate signature (`duplicates.signature`) is taken
    from this same decode, so the check costs no second pass over the images.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None, "missing", None
    except OSError as exc:
        return None, f"unreadable ({exc.strerror or exc})", None
    image_hash = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as img:
            # Decoding at 1/8 scale is several times faster and still reads every scan,
            # so `load()` still fails on a truncated file.
            img.draft("RGB", duplicates.draft_request(img.width, img.height))
            img.load()
            found = (None if central_fraction is None
                     else duplicates.signature(img, central_fraction))
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError...)
        return image_hash, f"corrupt ({type(exc).__name__}: {exc})", None
    return image_hash, None, found


def _check_chunk(paths: Sequence[str], central_fraction: float | None = None
                 ) -> list[tuple[str | None, str | None, tuple | None]]:
    return [_check_image(p, central_fraction) for p in paths]


def _check_images(paths: Sequence[str], workers: int | None, central_fraction: float | None
                  ) -> list[tuple[str | None, str | None, tuple | None]]:
    workers = workers or os.cpu_count() or 1
    chunks = [paths[i:i + _CHUNK_SIZE] for i in range(0, len(paths), _CHUNK_SIZE)]
    check = functools.partial(_check_chunk, central_fraction=central_fraction)
    if workers == 1 or len(chunks) <= 1:
        # A pool costs more to start than one chunk takes to check.
        return [r for chunk in chunks for r in check(chunk)]
    # forkserver, not fork: the flow runs stages in threads, and forking a threaded
    # process can deadlock the child.
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(max_workers=min(workers, len(chunks)), mp_context=context) as pool:
        return [r for results in pool.map(check, chunks) for r in results]


class _CheckedPart(NamedTuple):
    """One metadata CSV and its images after `_validate_part`."""

    manifest: pd.DataFrame  # the good rows, with `image_path`
    hashes: dict[str, str]  # image_id -> sha256 of the good images
    bad: list[str]  # "image_id: reason" of the images left out
    metadata_bytes: bytes  # the CSV as on disk
    signatures: list  # near-duplicate signatures of the good rows in order; [] unchecked


def _validate_part(
    metadata_csv: Path,
    images_dir: Path,
    *,
    max_bad_fraction: float,
    workers: int | None,
    what: str,
    central_fraction: float | None = None,
) -> _CheckedPart:
    """Check one metadata CSV's images (near-duplicate signatures only with
    `central_fraction`)."""
    df = load_metadata(metadata_csv)
    metadata_bytes = Path(metadata_csv).read_bytes()
    images_dir = Path(images_dir).resolve()
    paths = [str(images_dir / f"{image_id}.jpg") for image_id in df["image_id"]]
    results = _check_images(paths, workers, central_fraction)

    hashes: dict[str, str] = {}
    bad: list[str] = []
    good = []
    signatures = []
    for image_id, (image_hash, reason, found) in zip(df["image_id"], results, strict=True):
        if reason is None:
            hashes[image_id] = image_hash
            good.append(True)
            if found is not None:
                signatures.append(found)
        else:
            bad.append(f"{image_id}: {reason}")
            good.append(False)

    n = len(df)
    if n and len(bad) / n > max_bad_fraction:
        shown = "; ".join(bad[:_MAX_ROWS_IN_MESSAGE])
        raise DataValidationError(
            f"{what}: {len(bad)} of {n} images in {images_dir} are missing or unreadable "
            f"({len(bad) / n:.1%}, more than max_bad_fraction={max_bad_fraction:g}), e.g. "
            f"{shown}. The download or extraction is probably incomplete: re-fetch with "
            "`skinsense fetch --refresh`, or raise max_bad_fraction to train on the rest."
        )
    manifest = df.loc[good].reset_index(drop=True)
    manifest[IMAGE_PATH_COLUMN] = [p for p, ok in zip(paths, good, strict=True) if ok]
    return _CheckedPart(manifest, hashes, bad, metadata_bytes, signatures)


def class_counts(dx: Iterable[str]) -> dict[str, int]:
    """Images per class in `labels.CLASS_CODES` order, zeros included."""
    counts = pd.Series(list(dx), dtype=object).value_counts()
    return {code: int(counts.get(code, 0)) for code in CLASS_CODES}


def validate(
    fetched: FetchedData,
    *,
    out_dir: Path,
    max_bad_fraction: float,
    workers: int | None = None,
    near_duplicates: NearDuplicateConfig | None = None,
) -> ValidatedData:
    """Check the fetched data and write the manifests the later stages read.

    Every image listed in the metadata must be `{images_dir}/{image_id}.jpg` and decode.
    Missing or corrupt images are reported and left out of the manifest. Each file is read
    once: the same bytes are hashed for the fingerprint and decoded, and the same decode
    gives the near-duplicate signature (`skinsense.data.duplicates`).

    Args:
        fetched: What the fetch stage left on disk.
        out_dir: Folder for `manifest.csv` (metadata columns + absolute `image_path`) and,
            when the ISIC 2018 test set was fetched, `isic_test_manifest.csv`.
        max_bad_fraction: Largest tolerated fraction of bad images (per image set).
        workers: Worker processes for decoding; None means all cores.
        near_duplicates: Settings of the near-duplicate check across lesions; None or
            disabled skips it. When it runs, the manifest gains `split_group` and the
            settings join the fingerprint.

    Returns:
        The manifests, counts, bad images and fingerprint. The fingerprint covers the
        HAM10000 metadata and the images kept; with an ISIC test set it also covers that
        set's metadata and images. `n_images` counts the HAM10000 images kept; `n_bad`
        and `bad_images` cover both sets (ISIC test entries prefixed `isic_test/`).

    Raises:
        MetadataError: A metadata CSV breaks the schema (see `load_metadata`).
        DataValidationError: More than `max_bad_fraction` of the images are bad.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    check = near_duplicates is not None and near_duplicates.enabled
    check_part = functools.partial(
        _validate_part, max_bad_fraction=max_bad_fraction, workers=workers,
        central_fraction=near_duplicates.central_fraction if check else None)
    ham = check_part(fetched.metadata_csv, fetched.images_dir, what=str(fetched.metadata_csv))
    fingerprint = dataset_fingerprint(ham.metadata_bytes, ham.hashes)
    bad = ham.bad

    isic = _validate_isic_test(fetched, out_dir, check_part)
    if isic is not None:
        # Chain the two fingerprints: the test set is part of what a model is judged on.
        fingerprint = _chain_fingerprint(
            fingerprint, dataset_fingerprint(isic.metadata_bytes, isic.hashes))
        bad = bad + [f"isic_test/{b}" for b in isic.bad]

    manifest, found = ham.manifest, None
    if check:
        # The grouping depends on these settings, so they belong to what identifies the data.
        fingerprint = _chain_fingerprint(
            fingerprint, duplicates.fingerprint_suffix(near_duplicates))
        isic_part = (None if isic is None
                     else (isic.manifest, *_stack_signatures(isic.signatures)))
        manifest, found = duplicates.check_near_duplicates(
            manifest, *_stack_signatures(ham.signatures), near_duplicates, out_dir,
            isic=isic_part)
    manifest_csv = out_dir / MANIFEST_NAME
    write_csv_atomic(manifest, manifest_csv)

    return ValidatedData(
        manifest_csv=manifest_csv.resolve(),
        fingerprint=fingerprint,
        n_images=len(manifest),
        n_bad=len(bad),
        bad_images=bad[:_MAX_BAD_KEPT],
        class_counts=class_counts(manifest["dx"]),
        isic_test_manifest_csv=(None if isic is None
                                else (out_dir / ISIC_TEST_MANIFEST_NAME).resolve()),
        near_duplicates=found,
    )


def _validate_isic_test(fetched: FetchedData, out_dir: Path,
                        check_part: Callable[..., _CheckedPart]) -> _CheckedPart | None:
    """Check the ISIC 2018 test set when it was fetched, and write its manifest."""
    if fetched.isic_test_metadata_csv is None:
        return None
    if fetched.isic_test_images_dir is None:
        raise DataValidationError(
            f"{fetched.isic_test_metadata_csv}: ISIC test labels without an images "
            "folder; re-fetch with `skinsense fetch --refresh`"
        )
    isic = check_part(fetched.isic_test_metadata_csv, fetched.isic_test_images_dir,
                      what=str(fetched.isic_test_metadata_csv))
    write_csv_atomic(isic.manifest, out_dir / ISIC_TEST_MANIFEST_NAME)
    return isic


def _chain_fingerprint(fingerprint: str, more: str) -> str:
    return hashlib.sha256(f"{fingerprint}\n{more}".encode()).hexdigest()


def _stack_signatures(signatures: list) -> tuple[np.ndarray, np.ndarray]:
    """(hashes (N,) uint64, thumbnails (N, 16, 16, 3) uint8) from per-image signatures."""
    side = duplicates.THUMB_SIDE
    if not signatures:
        return np.zeros(0, np.uint64), np.zeros((0, side, side, 3), np.uint8)
    return (np.array([h for h, _ in signatures], dtype=np.uint64),
            np.stack([t for _, t in signatures]))
