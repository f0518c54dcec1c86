"""A synthetic HAM10000 in the Dataverse layout, for tests and benchmarks.

`make_synthetic_ham10000` writes the same files the Dataverse dataset has
(`HAM10000_metadata.csv`, `HAM10000_images_part_1.zip`, `HAM10000_images_part_2.zip` and,
optionally, the ISIC 2018 Task 3 test images and labels), with the real column set, the
real class proportions and several images per lesion. This module puts the parts together
and writes the files; the parts live apart by purpose:

- `synth_metadata`: the metadata table (columns, class proportions, lesion groups);
- `synth_painter`: one photo of one lesion, drawn so that its class is visible;
- `synth_copies`: near-duplicates planted under new lesion ids, and their list.

Output is deterministic for a seed: the same arguments give the same bytes, whatever the
number of workers (every image has its own random stream, keyed by seed and index).
"""

from __future__ import annotations

import io
import multiprocessing
import os
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from skinsense.data.records import METADATA_COLUMNS
from skinsense.data.synth_copies import (
    COPY_BOUNDS,
    PLANTED_NEAR_DUPLICATES_CSV,
    alterations_of,
    altered_copy,
    near_duplicate_copy,
    plant_near_duplicates,
    planted_table,
    with_copies,
)
from skinsense.data.synth_metadata import (
    FIRST_IMAGE_NUMBER,
    FIRST_TEST_IMAGE_NUMBER,
    HAM10000_CLASS_COUNTS,
    ISIC_TEST_CLASS_COUNTS,
    make_synthetic_metadata,
)
from skinsense.data.synth_painter import ImageJob, render_image
from skinsense.labels import CLASS_CODES

__all__ = [
    "COPY_BOUNDS", "HAM10000_CLASS_COUNTS", "IMAGES_PART_1_ZIP", "IMAGES_PART_2_ZIP",
    "ISIC_TEST_CLASS_COUNTS", "ISIC_TEST_GROUND_TRUTH_CSV", "ISIC_TEST_IMAGES_FOLDER",
    "ISIC_TEST_IMAGES_ZIP", "METADATA_CSV", "PLANTED_NEAR_DUPLICATES_CSV",
    "make_synthetic_ham10000", "make_synthetic_metadata", "near_duplicate_copy",
]

METADATA_CSV = "HAM10000_metadata.csv"
IMAGES_PART_1_ZIP = "HAM10000_images_part_1.zip"
IMAGES_PART_2_ZIP = "HAM10000_images_part_2.zip"
ISIC_TEST_IMAGES_ZIP = "ISIC2018_Task3_Test_Images.zip"
ISIC_TEST_GROUND_TRUTH_CSV = "ISIC2018_Task3_Test_GroundTruth.csv"
# The real test archive keeps its images in a folder named after the archive.
ISIC_TEST_IMAGES_FOLDER = "ISIC2018_Task3_Test_Images"

# Real part 1 holds 5,000 of the 10,015 images.
_PART_1_FRACTION = 5000 / 10015
_JPEG_QUALITY = 90
# A fixed timestamp makes the zip archives byte-for-byte reproducible.
_ZIP_DATE = (2018, 6, 1, 0, 0, 0)


def make_synthetic_ham10000(
    out_dir: str | os.PathLike[str],
    *,
    n_images: int = 10015,
    seed: int = 0,
    workers: int | None = None,
    image_size: tuple[int, int] = (600, 450),
    isic_test_images: int = 0,
    metadata: pd.DataFrame | None = None,
    near_duplicates: int = 0,
) -> Path:
    """Write a synthetic HAM10000 sample laid out like the Dataverse files.

    Args:
        out_dir: Folder to write into (created if missing).
        n_images: Number of HAM10000 images; at least 14 (2 per class).
        seed: Seed of everything random; the same seed gives the same bytes.
        workers: Processes that draw and encode the JPEGs; None means all cores.
        image_size: (width, height) of every JPEG; the real images are 600x450.
        isic_test_images: When > 0, also write `ISIC2018_Task3_Test_Images.zip` and
            `ISIC2018_Task3_Test_GroundTruth.csv` (metadata format) with this many images
            (0, or at least 7: one per class).
        metadata: Draw one image for each row of this HAM10000-format metadata (e.g. the
            real `HAM10000_metadata.csv`, so that its lesion groups and classes are kept)
            instead of drawing metadata; `n_images` is then its number of rows.
        near_duplicates: Plant this many near-duplicates: copies of randomly chosen images
            (each at most once), re-encoded, resized, cropped, rotated and colour-shifted
            within `COPY_BOUNDS`, filed under new image and lesion ids with the source's
            diagnosis and patient metadata, as a photograph filed twice would be. They come
            on top of the `n_images` and are listed in `planted_near_duplicates.csv`.

    Returns:
        `out_dir` as a Path.

    Raises:
        ValueError: On an invalid argument.
    """
    if metadata is not None:
        missing = [c for c in METADATA_COLUMNS if c not in metadata.columns]
        if missing:
            raise ValueError(f"metadata lacks the HAM10000 columns {missing}; pass a frame read "
                             f"from a HAM10000_metadata.csv")
        n_images = len(metadata)
    _validate_args(n_images, image_size, workers, isic_test_images, near_duplicates)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    width, height = int(image_size[0]), int(image_size[1])
    workers = workers or _cpu_count()

    if metadata is None:
        metadata = make_synthetic_metadata(n_images, seed=seed)
    else:
        metadata = metadata[list(METADATA_COLUMNS)].reset_index(drop=True)
    jobs_of_sources = _image_jobs(metadata, seed=seed, stream=0, width=width, height=height)
    copies = None
    if near_duplicates:
        metadata, copies = plant_near_duplicates(metadata, jobs_of_sources, near_duplicates,
                                                 seed=seed)
    # Images go to the two parts in image_id order, like the real archives.
    ordered = metadata.sort_values("image_id", kind="stable").reset_index(drop=True)
    n_part_1 = int(round(len(ordered) * _PART_1_FRACTION))
    jobs = _image_jobs(ordered, seed=seed, stream=0, width=width, height=height)
    if copies is not None:
        jobs = with_copies(list(ordered["image_id"]), jobs, copies)
    _write_zips(
        jobs,
        [(out / IMAGES_PART_1_ZIP, n_part_1, ""), (out / IMAGES_PART_2_ZIP, None, "")],
        workers=workers,
    )
    if copies is not None:
        _write_csv_atomic(planted_table(copies), out / PLANTED_NEAR_DUPLICATES_CSV)
    # The metadata goes last: a folder with it is a complete sample.
    _write_csv_atomic(metadata, out / METADATA_CSV)
    if isic_test_images:
        _write_isic_test_set(out, metadata, isic_test_images, seed=seed, width=width,
                             height=height, workers=workers)
    return out


def _write_isic_test_set(out: Path, metadata: pd.DataFrame, n_images: int, *, seed: int,
                         width: int, height: int, workers: int) -> None:
    """The ISIC 2018 Task 3 test images and labels, with ids above the HAM10000 ones."""
    last_lesion = int(metadata["lesion_id"].str[4:].astype(int).max())
    test_meta = make_synthetic_metadata(
        n_images, seed=seed + 1_000_003, class_counts=ISIC_TEST_CLASS_COUNTS,
        # Above the HAM10000 numbers, so that the two sets never share an id.
        first_image_number=max(FIRST_TEST_IMAGE_NUMBER, FIRST_IMAGE_NUMBER + len(metadata)),
        first_lesion_number=max(10000, last_lesion + 1),
    )
    test_ordered = test_meta.sort_values("image_id", kind="stable").reset_index(drop=True)
    test_jobs = _image_jobs(test_ordered, seed=seed, stream=1, width=width, height=height)
    _write_zips(
        test_jobs,
        [(out / ISIC_TEST_IMAGES_ZIP, None, ISIC_TEST_IMAGES_FOLDER + "/")],
        workers=workers,
    )
    _write_csv_atomic(test_meta, out / ISIC_TEST_GROUND_TRUTH_CSV)


def _validate_args(
    n_images: int, image_size: tuple[int, int], workers: int | None, isic_test_images: int,
    near_duplicates: int,
) -> None:
    n_classes = len(CLASS_CODES)
    if not isinstance(n_images, (int, np.integer)) or isinstance(n_images, bool):
        raise ValueError(f"n_images must be an integer, got {n_images!r}")
    if n_images < 2 * n_classes:
        raise ValueError(
            f"n_images must be at least {2 * n_classes} (at least 2 per class, "
            f"{n_classes} classes), got {n_images}"
        )
    try:
        width, height = image_size
    except (TypeError, ValueError):
        raise ValueError(f"image_size must be (width, height), got {image_size!r}") from None
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
               for v in (width, height)):
        raise ValueError(f"image_size must be two integers (width, height), got {image_size!r}")
    if not (16 <= width <= 4096 and 16 <= height <= 4096):
        raise ValueError(f"image_size sides must be within 16..4096 px, got {image_size!r}")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be None or a positive integer, got {workers!r}")
    if not isinstance(isic_test_images, (int, np.integer)) or isic_test_images < 0 or (
        0 < isic_test_images < n_classes
    ):
        raise ValueError(
            f"isic_test_images must be 0 or at least {n_classes} (one per class), "
            f"got {isic_test_images!r}"
        )
    if not isinstance(near_duplicates, (int, np.integer)) or not 0 <= near_duplicates <= n_images:
        raise ValueError(f"near_duplicates must be an integer within 0..n_images ({n_images}), "
                         f"got {near_duplicates!r}")


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1

def _image_jobs(
    ordered: pd.DataFrame, *, seed: int, stream: int, width: int, height: int,
) -> list[ImageJob]:
    lesion_keys = {lid: int(lid[4:]) for lid in ordered["lesion_id"].unique()}
    return [
        ImageJob(
            name=f"{image_id}.jpg",
            code=dx,
            lesion_key=lesion_keys[lesion_id] + stream * 10_000_000,
            image_key=int(image_id[5:]) + stream * 10_000_000,
            seed=seed,
            width=width,
            height=height,
        )
        for lesion_id, image_id, dx in zip(
            ordered["lesion_id"], ordered["image_id"], ordered["dx"], strict=True
        )
    ]


def _write_zips(
    jobs: list[ImageJob],
    archives: list[tuple[Path, int | None, str]],
    *,
    workers: int,
) -> None:
    """Render `jobs` in order and store them in the archives (path, how many, folder).

    Each archive is written to a `.part` file and renamed when complete, so an interrupted
    run never leaves a zip that looks whole.
    """
    chunk = 32
    chunks = [jobs[i:i + chunk] for i in range(0, len(jobs), chunk)]
    if workers > 1 and len(chunks) > 1:
        # forkserver: safe even when the caller has torch (and its threads) loaded.
        ctx = multiprocessing.get_context("forkserver")
        executor = ProcessPoolExecutor(max_workers=min(workers, len(chunks)), mp_context=ctx)
        rendered = executor.map(_render_chunk, chunks)
    else:
        executor = None
        rendered = map(_render_chunk, chunks)
    parts = [path.with_name(path.name + ".part") for path, _, _ in archives]
    try:
        stream = (item for batch in rendered for item in batch)
        for (path, count, folder), part in zip(archives, parts, strict=True):
            with zipfile.ZipFile(part, "w", compression=zipfile.ZIP_STORED) as archive:
                if folder:
                    info = zipfile.ZipInfo(folder, date_time=_ZIP_DATE)
                    info.external_attr = 0o40755 << 16 | 0x10
                    archive.writestr(info, b"")
                written = 0
                for name, data in stream:
                    info = zipfile.ZipInfo(folder + name, date_time=_ZIP_DATE)
                    info.external_attr = 0o644 << 16
                    # JPEGs do not compress; storing them keeps writing and reading fast.
                    archive.writestr(info, data, compress_type=zipfile.ZIP_STORED)
                    written += 1
                    if count is not None and written >= count:
                        break
            os.replace(part, path)
    finally:
        if executor is not None:
            executor.shutdown(cancel_futures=True)
        for part in parts:
            part.unlink(missing_ok=True)


def _write_csv_atomic(frame: pd.DataFrame, path: Path) -> None:
    part = path.with_name(path.name + ".part")
    frame.to_csv(part, index=False)
    os.replace(part, path)


def _render_chunk(jobs: list[ImageJob]) -> list[tuple[str, bytes]]:
    return [(job.name, _render_jpeg(job)) for job in jobs]


def _render_jpeg(job: ImageJob) -> bytes:
    image = render_image(job)
    if job.copy_key >= 0:
        return altered_copy(image, alterations_of(job.seed, job.copy_key))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=_JPEG_QUALITY)
    return buffer.getvalue()
