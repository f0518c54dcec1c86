"""A synthetic HAM10000 in the Dataverse layout, for tests and benchmarks.

`make_synthetic_ham10000` writes the same files the Dataverse dataset has
(`HAM10000_metadata.csv`, `HAM10000_images_part_1.zip`, `HAM10000_images_part_2.zip` and,
optionally, the ISIC 2018 Task 3 test images and labels), with the real column set, the
real class proportions and several images per lesion. The JPEGs are drawn so that the
class is visible in them (a small CNN learns it above chance even at 32 px): a skin-tone
background with noise and a dermatoscope vignette, and an elliptical lesion whose colour,
size, border and pattern depend on the class. The lesion's own look (shape, colours,
pattern phase, the patient's skin tone) is drawn once per lesion and shared by all its
images; each image adds its own framing (position, rotation, scale) and lighting, as
photos of the same lesion would.

Output is deterministic for a seed: the same arguments give the same bytes, whatever the
number of workers (every image has its own random stream, keyed by seed and index).
"""

from __future__ import annotations

import io
import math
import multiprocessing
import os
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageChops

from skinsense.data.records import METADATA_COLUMNS
from skinsense.labels import CLASS_CODES

METADATA_CSV = "HAM10000_metadata.csv"
IMAGES_PART_1_ZIP = "HAM10000_images_part_1.zip"
IMAGES_PART_2_ZIP = "HAM10000_images_part_2.zip"
ISIC_TEST_IMAGES_ZIP = "ISIC2018_Task3_Test_Images.zip"
ISIC_TEST_GROUND_TRUTH_CSV = "ISIC2018_Task3_Test_GroundTruth.csv"
# The real test archive keeps its images in a folder named after the archive.
ISIC_TEST_IMAGES_FOLDER = "ISIC2018_Task3_Test_Images"
# Which planted near-duplicate copies which image, and how (see `near_duplicate_copy`).
PLANTED_NEAR_DUPLICATES_CSV = "planted_near_duplicates.csv"
# How far a planted copy may stray from its source: the bounds the near-duplicate check
# (`skinsense.data.duplicates`) is held to.
COPY_BOUNDS = {
    "scale": (0.6, 1.5),          # resized to this factor of the source's size
    "crop": (0.01, 0.03),         # this share of each side's length cut off, split at random
    "angle": (0.5, 2.0),          # rotated by this many degrees, either way
    "gain": 0.08,                 # each colour channel times 1 +- this (a colour shift)
    "offset": 8.0,                # plus up to this many grey levels, all channels
    "quality": (60, 92),          # re-encoded at this JPEG quality
}

# Real HAM10000 image counts per class (sum 10,015), in CLASS_CODES order.
HAM10000_CLASS_COUNTS: dict[str, int] = {
    "akiec": 327, "bcc": 514, "bkl": 1099, "df": 115, "mel": 1113, "nv": 6705, "vasc": 142,
}
# Real ISIC 2018 Task 3 test set counts (sum 1,511).
ISIC_TEST_CLASS_COUNTS: dict[str, int] = {
    "akiec": 43, "bcc": 93, "bkl": 217, "df": 44, "mel": 171, "nv": 908, "vasc": 35,
}
# Real number of lesions with 1..6 images (7,470 lesions, 1.34 images per lesion).
_IMAGES_PER_LESION = np.array([5514, 1423, 490, 34, 5, 4], dtype=float)
_IMAGES_PER_LESION /= _IMAGES_PER_LESION.sum()

# First image/lesion numbers as in the real data (ISIC_0024306..ISIC_0034320; the official
# test set starts at ISIC_0034524).
_FIRST_IMAGE_NUMBER = 24306
_FIRST_TEST_IMAGE_NUMBER = 34524
# Real part 1 holds 5,000 of the 10,015 images.
_PART_1_FRACTION = 5000 / 10015
_JPEG_QUALITY = 90
# A fixed timestamp makes the zip archives byte-for-byte reproducible.
_ZIP_DATE = (2018, 6, 1, 0, 0, 0)

# Metadata value distributions measured on the real metadata, per class where it differs.
_DX_TYPE = {
    "akiec": {"histo": 1.0},
    "bcc": {"histo": 1.0},
    "bkl": {"histo": 766, "consensus": 264, "confocal": 69},
    "df": {"histo": 55, "consensus": 60},
    "mel": {"histo": 1.0},
    "nv": {"follow_up": 3704, "histo": 2498, "consensus": 503},
    "vasc": {"histo": 67, "consensus": 75},
}
_DATASET = {
    "akiec": {"rosendahl": 295, "vidir_modern": 32},
    "bcc": {"rosendahl": 296, "vidir_modern": 211, "vidir_molemax": 2, "vienna_dias": 5},
    "bkl": {"rosendahl": 490, "vidir_modern": 475, "vidir_molemax": 124, "vienna_dias": 10},
    "df": {"rosendahl": 30, "vidir_modern": 51, "vidir_molemax": 30, "vienna_dias": 4},
    "mel": {"rosendahl": 342, "vidir_modern": 680, "vidir_molemax": 24, "vienna_dias": 67},
    "nv": {"rosendahl": 803, "vidir_modern": 1832, "vidir_molemax": 3720, "vienna_dias": 350},
    "vasc": {"rosendahl": 3, "vidir_modern": 82, "vidir_molemax": 54, "vienna_dias": 3},
}
_MEAN_AGE = {"akiec": 66.5, "bcc": 66.8, "bkl": 64.3, "df": 53.0, "mel": 60.7, "nv": 46.5,
             "vasc": 51.4}
_SEX = {"male": 5406, "female": 4552, "unknown": 57}
_LOCALIZATION = {
    "back": 2192, "lower extremity": 2077, "trunk": 1404, "upper extremity": 1118,
    "abdomen": 1022, "face": 745, "chest": 407, "foot": 319, "unknown": 234, "neck": 168,
    "scalp": 128, "hand": 90, "ear": 56, "genital": 48, "acral": 7,
}
_AGE_MISSING_FRACTION = 57 / 10015


@dataclass(frozen=True)
class _ClassStyle:
    """How one class looks: colours (RGB in 0..1), size, border and pattern."""

    color: tuple[float, float, float]
    color2: tuple[float, float, float]    # the pattern's second colour
    radius: tuple[float, float]           # semi-major axis, fraction of half the short side
    irregularity: float                   # amplitude of the border's angular harmonics
    edge: float                           # soft border width (in lesion radii)
    pattern: str


_STYLES: dict[str, _ClassStyle] = {
    "nv": _ClassStyle((0.45, 0.28, 0.18), (0.30, 0.17, 0.10), (0.45, 0.70), 0.04, 0.10,
                      "reticular"),
    "mel": _ClassStyle((0.22, 0.13, 0.10), (0.36, 0.40, 0.52), (0.65, 1.00), 0.22, 0.20,
                       "multicolor"),
    "bkl": _ClassStyle((0.70, 0.56, 0.28), (0.90, 0.86, 0.55), (0.50, 0.80), 0.08, 0.06,
                       "dots"),
    "bcc": _ClassStyle((0.93, 0.72, 0.76), (0.72, 0.10, 0.20), (0.45, 0.70), 0.10, 0.15,
                       "lines"),
    "akiec": _ClassStyle((0.80, 0.42, 0.36), (0.96, 0.93, 0.88), (0.50, 0.75), 0.15, 0.25,
                         "scaly"),
    "df": _ClassStyle((0.55, 0.36, 0.26), (0.93, 0.88, 0.82), (0.32, 0.48), 0.05, 0.20,
                      "ring"),
    "vasc": _ClassStyle((0.62, 0.10, 0.26), (0.35, 0.05, 0.25), (0.32, 0.52), 0.06, 0.05,
                        "lobules"),
}
# Classes that look alike in real dermoscopy (the errors of real classifiers cluster in
# nv/mel/bkl, then akiec/bcc/bkl). A lesion borrows the look of one of its look-alikes with
# `_MIMIC_PROBABILITY`: part of its colours and shape, and half the time its pattern. So the
# synthetic sample is learnable but not trivially: some lesions of a class look more like
# another one, as in the real data, and no model reaches a perfect score on it.
_LOOKALIKES: dict[str, tuple[str, ...]] = {
    "nv": ("mel", "bkl", "df"), "mel": ("nv", "bkl"), "bkl": ("nv", "mel", "akiec"),
    "bcc": ("akiec", "vasc"), "akiec": ("bcc", "bkl"), "df": ("nv", "bkl"), "vasc": ("bcc",),
}
_MIMIC_PROBABILITY = 0.3
# How much of the look-alike's colours and shape a mimicking lesion takes.
_MIMIC_WEIGHT = (0.45, 0.85)
# The pattern's contrast against the lesion's base colour, per lesion: faint patterns are
# common, so the class is not always visible at a glance.
_PATTERN_CONTRAST = (0.4, 1.0)
# Patients' skin tones (RGB 0..1), light to medium.
_SKIN_TONES = np.array([
    [0.93, 0.76, 0.67], [0.88, 0.68, 0.58], [0.84, 0.62, 0.52], [0.78, 0.56, 0.45],
    [0.90, 0.72, 0.66], [0.80, 0.60, 0.50],
])


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
    _validate_args(n_images, image_size, workers, isic_test_images)
    if not isinstance(near_duplicates, (int, np.integer)) or not 0 <= near_duplicates <= n_images:
        raise ValueError(f"near_duplicates must be an integer within 0..n_images ({n_images}), "
                         f"got {near_duplicates!r}")
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
        metadata, copies = _plant_near_duplicates(metadata, jobs_of_sources, near_duplicates,
                                                  seed=seed)
    # Images go to the two parts in image_id order, like the real archives.
    ordered = metadata.sort_values("image_id", kind="stable").reset_index(drop=True)
    n_part_1 = int(round(len(ordered) * _PART_1_FRACTION))
    jobs = _image_jobs(ordered, seed=seed, stream=0, width=width, height=height,
                       copies=copies)
    _write_zips(
        jobs,
        [(out / IMAGES_PART_1_ZIP, n_part_1, ""), (out / IMAGES_PART_2_ZIP, None, "")],
        workers=workers,
    )
    if copies is not None:
        planted = pd.DataFrame(
            [{"image_id": image_id, "lesion_id": lesion, "source_image_id": source.name[:-4],
              "source_lesion_id": source_lesion}
             for image_id, (source, lesion, source_lesion, _) in sorted(copies.items())])
        _write_csv_atomic(planted, out / PLANTED_NEAR_DUPLICATES_CSV)
    # The metadata goes last: a folder with it is a complete sample.
    _write_csv_atomic(metadata, out / METADATA_CSV)

    if isic_test_images:
        last_lesion = int(metadata["lesion_id"].str[4:].astype(int).max())
        test_meta = make_synthetic_metadata(
            isic_test_images, seed=seed + 1_000_003, class_counts=ISIC_TEST_CLASS_COUNTS,
            # Above the HAM10000 numbers, so that the two sets never share an id.
            first_image_number=max(_FIRST_TEST_IMAGE_NUMBER, _FIRST_IMAGE_NUMBER + len(metadata)),
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
    return out


def make_synthetic_metadata(
    n_images: int,
    *,
    seed: int = 0,
    class_counts: dict[str, int] | None = None,
    first_image_number: int = _FIRST_IMAGE_NUMBER,
    first_lesion_number: int = 0,
) -> pd.DataFrame:
    """Draw HAM10000-style metadata: real columns, class proportions and lesion groups.

    Args:
        n_images: Number of rows (images); at least 2 per class.
        seed: Seed of the draw.
        class_counts: Class proportions to follow (default: the real HAM10000 counts).
        first_image_number: Number of the first `ISIC_%07d` image id.
        first_lesion_number: Smallest `HAM_%07d` lesion number.

    Returns:
        A DataFrame with `METADATA_COLUMNS`, rows grouped by lesion.
    """
    rng = np.random.default_rng([seed, 7])
    counts = _allocate_class_counts(n_images, class_counts or HAM10000_CLASS_COUNTS)
    lesion_dx: list[str] = []
    lesion_sizes: list[int] = []
    for code in CLASS_CODES:
        sizes = _lesion_sizes(counts[code], rng)
        lesion_dx += [code] * len(sizes)
        lesion_sizes += sizes
    n_lesions = len(lesion_sizes)
    # Real lesion numbers have gaps (7,470 used of 0..7628).
    lesion_numbers = first_lesion_number + np.sort(
        rng.choice(int(n_lesions * 1.02) + 1, size=n_lesions, replace=False)
    )
    lesion_order = rng.permutation(n_lesions)  # classes interleaved in the id order
    lesion_ids = {i: f"HAM_{lesion_numbers[k]:07d}" for k, i in enumerate(lesion_order)}
    # Image numbers are contiguous but not grouped by lesion, as in the real data.
    image_numbers = first_image_number + rng.permutation(n_images)

    rows = []
    k = 0
    for i in range(n_lesions):
        code = lesion_dx[i]
        # Every image of a lesion shares the lesion's metadata (one patient, one diagnosis).
        dx_type = _pick(rng, _DX_TYPE[code])
        age = float(np.clip(5 * round(rng.normal(_MEAN_AGE[code], 15) / 5), 0, 85))
        if rng.random() < _AGE_MISSING_FRACTION:
            age = float("nan")
        sex = _pick(rng, _SEX)
        localization = _pick(rng, _LOCALIZATION)
        dataset = _pick(rng, _DATASET[code])
        for _ in range(lesion_sizes[i]):
            rows.append((lesion_ids[i], f"ISIC_{image_numbers[k]:07d}", code, dx_type, age,
                         sex, localization, dataset))
            k += 1
    frame = pd.DataFrame(rows, columns=list(METADATA_COLUMNS))
    return frame.sort_values(["lesion_id", "image_id"], kind="stable").reset_index(drop=True)


def _validate_args(
    n_images: int, image_size: tuple[int, int], workers: int | None, isic_test_images: int
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


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _allocate_class_counts(n: int, proportions: dict[str, int]) -> dict[str, int]:
    """Split n images over the classes in the given proportions, at least 2 per class."""
    total = sum(proportions.values())
    exact = {c: n * proportions[c] / total for c in CLASS_CODES}
    counts = {c: max(2, math.floor(exact[c])) for c in CLASS_CODES}
    # Largest remainders first, then take back from the largest classes if the minimum
    # of 2 overshot.
    by_remainder = sorted(CLASS_CODES, key=lambda c: (-(exact[c] - math.floor(exact[c])), c))
    i = 0
    while sum(counts.values()) < n:
        counts[by_remainder[i % len(by_remainder)]] += 1
        i += 1
    while sum(counts.values()) > n:
        largest = max(CLASS_CODES, key=lambda c: counts[c])
        counts[largest] -= 1
    return counts


def _lesion_sizes(n_images: int, rng: np.random.Generator) -> list[int]:
    """Images per lesion for one class: the real 1..6 distribution, at least 2 lesions."""
    sizes: list[int] = []
    remaining = n_images
    while remaining > 0:
        size = min(int(rng.choice(6, p=_IMAGES_PER_LESION)) + 1, remaining)
        sizes.append(size)
        remaining -= size
    if len(sizes) == 1 and n_images >= 2:
        sizes = [n_images - n_images // 2, n_images // 2]
    return sizes


def _pick(rng: np.random.Generator, weights: dict[str, float]) -> str:
    keys = list(weights)
    p = np.array([weights[k] for k in keys], dtype=float)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


# --------------------------------------------------------------------------------------
# Drawing the images


@dataclass(frozen=True)
class _ImageJob:
    name: str            # file name inside the zip, e.g. ISIC_0024306.jpg
    code: str            # dx
    lesion_key: int      # keys of the lesion's and the image's random streams
    image_key: int
    seed: int
    width: int
    height: int
    copy_key: int = -1   # >= 0: a planted near-duplicate of the image this job draws


def _image_jobs(
    ordered: pd.DataFrame, *, seed: int, stream: int, width: int, height: int,
    copies: dict | None = None,
) -> list[_ImageJob]:
    lesion_keys = {lid: int(lid[4:]) for lid in ordered["lesion_id"].unique()}
    if copies:
        # A copy draws its source's photo (then alters it), under its own name.
        return [
            replace(copies[image_id][0], name=f"{image_id}.jpg", copy_key=copies[image_id][3])
            if image_id in copies else job
            for image_id, job in zip(ordered["image_id"],
                                     _image_jobs(ordered, seed=seed, stream=stream, width=width,
                                                 height=height), strict=True)
        ]
    return [
        _ImageJob(
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
    jobs: list[_ImageJob],
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


def _plant_near_duplicates(
    metadata: pd.DataFrame, jobs: list[_ImageJob], count: int, *, seed: int
) -> tuple[pd.DataFrame, dict]:
    """Metadata with `count` copies added under new ids, and what each copy draws.

    Returns:
        (metadata, {copy image_id: (source job, copy lesion_id, source lesion_id, key)}).
    """
    rng = np.random.default_rng([seed, 8])
    sources = np.sort(rng.choice(len(metadata), size=count, replace=False))
    last_image = int(metadata["image_id"].str[5:].astype(int).max())
    last_lesion = int(metadata["lesion_id"].str[4:].astype(int).max())
    rows, copies = [], {}
    for k, row_index in enumerate(sources):
        source = metadata.iloc[int(row_index)]
        image_id, lesion_id = f"ISIC_{last_image + 1 + k:07d}", f"HAM_{last_lesion + 1 + k:07d}"
        rows.append({**source.to_dict(), "image_id": image_id, "lesion_id": lesion_id})
        copies[image_id] = (jobs[int(row_index)], lesion_id, source["lesion_id"], k)
    planted = pd.concat([metadata, pd.DataFrame(rows, columns=metadata.columns)],
                        ignore_index=True)
    return (planted.sort_values(["lesion_id", "image_id"], kind="stable")
            .reset_index(drop=True), copies)


def near_duplicate_copy(image: Image.Image, rng: np.random.Generator) -> bytes:
    """A near-duplicate of a photo as JPEG bytes: rotated, cropped, colour-shifted, resized
    and re-encoded, each by a random amount within `COPY_BOUNDS`.

    The rotation's corners are filled with black, as an image editor leaves them.
    """
    bounds = COPY_BOUNDS
    width, height = image.size
    angle = float(rng.uniform(*bounds["angle"]) * rng.choice([-1, 1]))
    image = image.convert("RGB").rotate(angle, resample=Image.Resampling.BILINEAR)
    crop = rng.uniform(*bounds["crop"], size=2)             # share cut off, x and y
    left, top = rng.uniform(0, 1, 2) * crop * (width, height)
    box = (round(left), round(top), round(left + width * (1 - crop[0])),
           round(top + height * (1 - crop[1])))
    image = image.crop(box)
    pixels = np.asarray(image, np.float32) * rng.uniform(1 - bounds["gain"], 1 + bounds["gain"], 3)
    pixels += rng.uniform(-bounds["offset"], bounds["offset"])
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    scale = rng.uniform(*bounds["scale"])
    image = image.resize((max(16, round(image.width * scale)), max(16, round(image.height * scale))),
                         Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=int(rng.integers(bounds["quality"][0],
                                                        bounds["quality"][1] + 1)))
    return buffer.getvalue()


def _render_chunk(jobs: list[_ImageJob]) -> list[tuple[str, bytes]]:
    return [(job.name, _render_jpeg(job)) for job in jobs]


@lru_cache(maxsize=8)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates scaled so that half the short side is 1, centred."""
    half = min(h, w) / 2
    y = (np.arange(h, dtype=np.float32) - (h - 1) / 2) / half
    x = (np.arange(w, dtype=np.float32) - (w - 1) / 2) / half
    return y[:, None], x[None, :]


@lru_cache(maxsize=2)
def _grains(seed: int, width: int, height: int) -> tuple[Image.Image, ...]:
    """A few fixed full-size film grains (0..2*_GRAIN per channel); each photo takes one."""
    rng = np.random.default_rng([seed, 3])
    return tuple(
        Image.fromarray(rng.integers(0, 2 * _GRAIN + 1, size=(height, width, 3), dtype=np.uint8))
        for _ in range(_N_GRAINS)
    )


_N_GRAINS = 8
# Amplitude (grey levels) of the full-resolution grain. It gives the JPEGs about the size
# and decoding cost of the real full-quality ones (60-80 kB), so benchmarks are honest.
_GRAIN = 6


def _render_jpeg(job: _ImageJob) -> bytes:
    image = _render_image(job)
    if job.copy_key >= 0:
        return near_duplicate_copy(image, np.random.default_rng([job.seed, 6, job.copy_key]))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=_JPEG_QUALITY)
    return buffer.getvalue()


def _lesion_style(code: str, look: np.random.Generator) -> tuple[_ClassStyle, float]:
    """The look of one lesion: its class's style, or a blend with a look-alike's; and the
    contrast of its pattern."""
    style = _STYLES[code]
    contrast = float(look.uniform(*_PATTERN_CONTRAST))
    if look.random() >= _MIMIC_PROBABILITY:
        return style, contrast
    other = _STYLES[_LOOKALIKES[code][int(look.integers(len(_LOOKALIKES[code])))]]
    w = float(look.uniform(*_MIMIC_WEIGHT))

    def mix(a, b):
        return tuple(float(x) for x in (1 - w) * np.asarray(a) + w * np.asarray(b))

    pattern = other.pattern if look.random() < 0.5 else style.pattern
    return _ClassStyle(mix(style.color, other.color), mix(style.color2, other.color2),
                       mix(style.radius, other.radius),
                       (1 - w) * style.irregularity + w * other.irregularity,
                       (1 - w) * style.edge + w * other.edge, pattern), contrast


def _render_image(job: _ImageJob) -> Image.Image:
    """Draw one photo of one lesion as a PIL image of (job.width, job.height)."""
    # A stream of its own for the look, so the other draws of a lesion stay as they were.
    style, contrast = _lesion_style(job.code, np.random.default_rng([job.seed, 4, job.lesion_key]))
    lesion = np.random.default_rng([job.seed, 1, job.lesion_key])
    photo = np.random.default_rng([job.seed, 2, job.image_key])

    # Draw at a quarter of the size and upscale: the look is smooth at that scale, and it
    # keeps drawing cheaper than JPEG encoding (the target is >= 300 images/s on 2 cores).
    factor = max(1, min(4, min(job.width, job.height) // 64))
    w, h = max(16, job.width // factor), max(16, job.height // factor)
    y, x = _grid(h, w)

    # --- what the lesion is (shared by all photos of it)
    color = np.clip(np.array(style.color) * lesion.uniform(0.92, 1.08, 3), 0, 1)
    color2 = np.clip(np.array(style.color2) * lesion.uniform(0.94, 1.06, 3), 0, 1)
    color2 = color + contrast * (color2 - color)
    radius = lesion.uniform(*style.radius)
    aspect = lesion.uniform(0.65, 1.0)
    harmonics = np.arange(2, 6)
    amplitudes = style.irregularity * lesion.uniform(0.3, 1.0, 4) / harmonics * 2
    phases = lesion.uniform(0, 2 * np.pi, 4)
    freq = lesion.uniform(14, 22)
    pattern_phase = lesion.uniform(0, 2 * np.pi, 4).astype(np.float32)
    skin = np.clip(_SKIN_TONES[lesion.integers(len(_SKIN_TONES))]
                   * lesion.uniform(0.95, 1.05, 3), 0, 1)
    lobes = lesion.uniform(-0.5, 0.5, (5, 2)).astype(np.float32)

    # --- how this photo frames it
    cx, cy = photo.uniform(-0.25, 0.25, 2) * np.array([w / min(h, w) * 0.6, 0.6])
    theta = photo.uniform(0, 2 * np.pi)
    scale = photo.uniform(0.85, 1.15)
    light_dir = photo.uniform(0, 2 * np.pi)
    light = photo.uniform(0.0, 0.15)
    brightness = photo.uniform(0.92, 1.08)
    vignette = photo.uniform(0.2, 0.6)

    cos_t, sin_t = np.float32(math.cos(theta)), np.float32(math.sin(theta))
    xc, yc = x - np.float32(cx), y - np.float32(cy)
    u = (cos_t * xc + sin_t * yc) / np.float32(radius * scale)
    v = (-sin_t * xc + cos_t * yc) / np.float32(radius * scale * aspect)
    r = np.sqrt(u * u + v * v)
    # Border: 1 + sum_k a_k cos(k*angle + p_k), from powers of the unit complex number
    # (u + iv) / r rather than arctan2 and four cosines (about 3x cheaper).
    unit = (u + 1j * v) / np.maximum(r, 1e-6)
    power = unit
    border = np.ones_like(r)
    for a, p in zip(amplitudes, phases, strict=True):  # harmonics 2..5
        power = power * unit
        border += np.float32(a) * (power * np.complex64(np.exp(1j * p))).real
    rr = r / border
    alpha = np.clip((1 - rr) / style.edge + 0.5, 0, 1)[..., None]

    lesion_rgb = _pattern(style.pattern, u, v, rr, color, color2, freq, pattern_phase,
                          lobes, photo)
    # float32 throughout: a float64 colour would silently promote every image-sized array.
    skin32 = skin.astype(np.float32)
    rgb = skin32 * (1 - alpha) + lesion_rgb * alpha

    # Light falls off across the field and towards the dermatoscope's rim.
    shade = (1 + light * (math.cos(light_dir) * x + math.sin(light_dir) * y)
             - vignette * np.clip(x * x + y * y - 1.2, 0, None))
    rgb = rgb * (shade * brightness)[..., None]
    rgb += photo.normal(0, 0.03, rgb.shape).astype(np.float32)
    # Leave room for the grain so that a plain modulo add cannot wrap (PIL's saturating
    # add costs 15x more); the offset keeps the mean level unchanged.
    low = np.clip(rgb * 255 + (0.5 - _GRAIN), 0, 255 - 2 * _GRAIN).astype(np.uint8)
    image = Image.fromarray(low, "RGB")
    if factor >= 2:
        # Bilinear to half size, then nearest 2x: the 2x2 pixel pairs vanish under the
        # grain and the JPEG, and it costs 0.6 ms instead of 1.5 ms for a bilinear 4x.
        half = ((job.width + 1) // 2, (job.height + 1) // 2)
        image = image.resize(half, Image.BILINEAR).resize((job.width, job.height),
                                                          Image.NEAREST)
    else:
        image = image.resize((job.width, job.height), Image.BILINEAR)
    grain = _grains(job.seed, job.width, job.height)[int(photo.integers(_N_GRAINS))]
    return ImageChops.add_modulo(image, grain)


def _pattern(
    pattern: str,
    u: np.ndarray,
    v: np.ndarray,
    rr: np.ndarray,
    color: np.ndarray,
    color2: np.ndarray,
    freq: float,
    phase: np.ndarray,
    lobes: np.ndarray,
    photo: np.random.Generator,
) -> np.ndarray:
    """The lesion's colour at each pixel, (h, w, 3) float32, by class pattern."""
    if pattern == "reticular":    # nv: a regular pigment network, darker in the centre
        net = 0.5 + 0.5 * np.cos(freq * u + phase[0]) * np.cos(freq * v + phase[1])
        mix = np.clip(0.6 * net + 0.4 * (1 - rr), 0, 1)
    elif pattern == "multicolor":  # mel: dark with blue-grey veils, asymmetric
        field = np.sin(2.5 * u + phase[0] + 1.5 * np.sin(3 * v + phase[1])) \
            + 0.6 * np.sin(4 * v + phase[2] + u)
        mix = np.clip(field * 0.8, 0, 1)
    elif pattern == "dots":       # bkl: waxy tan with milia-like light dots
        dots = np.cos(freq * 0.8 * u + phase[0]) * np.cos(freq * 0.8 * v + phase[1])
        mix = np.clip((dots - 0.4) * 3, 0, 1)
    elif pattern == "lines":      # bcc: pearly pink crossed by branching red vessels
        wave = np.sin(freq * 0.5 * (u + 0.5 * v) + 2 * np.sin(3 * v + phase[0]) + phase[1])
        wave2 = np.sin(freq * 0.4 * (v - 0.3 * u) + 2 * np.sin(3 * u + phase[2]) + phase[3])
        mix = np.exp(-np.minimum(wave * wave, wave2 * wave2) / 0.03)
    elif pattern == "scaly":      # akiec: red and rough, with white scale
        rough = photo.random(u.shape, dtype=np.float32)
        mix = np.clip((rough - 0.6) * 3, 0, 1) * np.clip(1.2 - rr, 0, 1)
    elif pattern == "ring":       # df: brown ring around a white scar-like centre
        mix = np.clip(1 - (rr - 0.2) / 0.3, 0, 1)
    elif pattern == "lobules":    # vasc: red-purple lobes with lighter septa
        d = np.min([(u - a) ** 2 + (v - b) ** 2 for a, b in lobes], axis=0)
        mix = np.clip(1 - d / 0.12, 0, 1)
    else:  # pragma: no cover - styles are fixed above
        raise AssertionError(pattern)
    mix = mix.astype(np.float32)[..., None]
    return color.astype(np.float32) * (1 - mix) + color2.astype(np.float32) * mix
