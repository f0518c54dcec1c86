"""Offline oversampling of minority classes, and the loss's class weights.

Oversampling is only ever applied to the training part, after the lesion-level split:
copies of a validation or test image in training would leak it. `run_oversample` checks
that the training part shares no lesion with val/test before it writes anything.

Each copy is an augmented JPEG written once to disk, seeded from (seed, image_id, k) with
a stable hash, so the same inputs give byte-identical files in any run and with any number
of workers, and an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from sklearn.utils.class_weight import compute_class_weight
from torchvision.transforms import v2

from skinsense.config import DataConfig
from skinsense.data.metadata import class_counts, load_metadata, write_csv_atomic
from skinsense.data.records import (
    IMAGE_PATH_COLUMN,
    SOURCE_IMAGE_COLUMN,
    OversampledData,
    SplitData,
)
from skinsense.labels import CLASS_CODES

OVERSAMPLED_TRAIN_NAME = "train_oversampled.csv"
COPIES_DIR_NAME = "oversampled"
JPEG_QUALITY = 95
# Copies per worker task: each copy is ~10 ms at 600x450, so this amortises pickling.
_CHUNK_SIZE = 32

# A copy job: (source path, destination path, torch seed).
_CopyJob = tuple[str, str, int]


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from `parts` that is the same in every process and Python run.

    Python's `hash()` of a str is salted per process, so it cannot seed reproducible copies.
    """
    key = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & (2**63 - 1)


def copy_transform(*, color_jitter: bool = False) -> v2.Compose:
    """The augmentation of oversampled copies (PIL image in, PIL image out).

    Dermatoscopic images have no canonical orientation, so flips and any rotation keep
    the label; perspective and blur mimic camera angle and focus.

    Args:
        color_jitter: Also jitter brightness, contrast, saturation and hue slightly.
            Off by default: colour is diagnostic (e.g. blue-white veil in melanoma).
    """
    transforms: list[v2.Transform] = [
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        v2.RandomRotation(30),
        v2.RandomPerspective(distortion_scale=0.2, p=0.5),
        # Blurring every copy would make copies systematically softer than originals.
        v2.RandomApply([v2.GaussianBlur(kernel_size=5, sigma=(0.1, 1.5))], p=0.3),
    ]
    if color_jitter:
        transforms.append(v2.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.02))
    return v2.Compose(transforms)


def _make_copies(jobs: Sequence[_CopyJob], color_jitter: bool) -> int:
    """Write the copies of `jobs` that are not on disk yet; return how many were written."""
    transform = copy_transform(color_jitter=color_jitter)
    written = 0
    for src, dst, seed in jobs:
        if os.path.exists(dst):
            continue  # resumable: an earlier run already wrote it (atomically, see below)
        with Image.open(src) as img:
            rgb = img.convert("RGB")
        # torchvision's v2 transforms draw from the global torch RNG; fork it so the
        # caller's RNG state is untouched, and seed it per copy so the result depends
        # on nothing but (seed, image_id, k).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = transform(rgb)
        tmp = f"{dst}.part"
        out.save(tmp, format="JPEG", quality=JPEG_QUALITY)
        os.replace(tmp, dst)
        written += 1
    return written


def _init_worker() -> None:
    # One thread per process: the pool already uses every core.
    torch.set_num_threads(1)


def _run_jobs(jobs: list[_CopyJob], *, color_jitter: bool, workers: int | None) -> int:
    workers = workers or os.cpu_count() or 1
    chunks = [jobs[i:i + _CHUNK_SIZE] for i in range(0, len(jobs), _CHUNK_SIZE)]
    if workers == 1 or len(chunks) <= 1:
        return sum(_make_copies(chunk, color_jitter) for chunk in chunks)
    # forkserver, not fork: the flow runs stages in threads, and forking a threaded
    # process can deadlock the child.
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(
        max_workers=min(workers, len(chunks)), mp_context=context, initializer=_init_worker
    ) as pool:
        return sum(pool.map(_make_copies, chunks, [color_jitter] * len(chunks)))


def oversample_minority(
    train_df: pd.DataFrame,
    *,
    out_dir: Path,
    target: int | None = None,
    max_copies_per_image: int = 3,
    color_jitter: bool = False,
    seed: int = 0,
    workers: int | None = None,
) -> pd.DataFrame:
    """Add augmented copies of minority-class images to the training part.

    Give this the training part only, after the lesion-level split: oversampling before
    the split, or of val/test, puts near-duplicates of evaluation images in training.

    Each class with `count` images gets `min(target - count, count * max_copies_per_image)`
    new images (never fewer than zero; no class is undersampled). Copies are spread
    evenly over the class's originals, so each original gets at most
    `max_copies_per_image` copies; which originals get one copy more is a seeded choice.

    Args:
        train_df: Training rows with `image_path`; must not contain copies already.
        out_dir: Folder for the copies, `{image_id}_aug{k}.jpg` (created). Copies already
            there are kept, not rewritten, so an interrupted run resumes.
        target: Images per class to aim for; None means the largest class's count.
        max_copies_per_image: Cap on copies of one original.
        color_jitter: Add colour jitter to the copies' augmentation.
        seed: Seed of the augmentation and of the choice of originals.
        workers: Worker processes; None means all cores. The result does not depend on it.

    Returns:
        The original rows (with an empty `source_image_id`) followed by one row per copy:
        `image_id` `{image_id}_aug{k}`, the original's lesion_id and other metadata, the
        copy's `image_path` and `source_image_id` = the original's image_id.

    Raises:
        ValueError: `train_df` has no image paths or already holds oversampled copies.
    """
    originals = _originals(train_df)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)

    counts = originals["dx"].value_counts()
    target = int(counts.max()) if target is None else int(target)
    copy_rows: list[dict] = []
    jobs: list[_CopyJob] = []
    for dx in sorted(counts.index):
        rows = originals[originals["dx"] == dx].sort_values("image_id", kind="stable")
        n_new = min(max(target - len(rows), 0), len(rows) * max_copies_per_image)
        if n_new:
            class_jobs, class_rows = _plan_copies(rows, n_new, dx=dx, seed=seed, out_dir=out_dir)
            jobs += class_jobs
            copy_rows += class_rows

    _run_jobs(jobs, color_jitter=color_jitter, workers=workers)
    copies = pd.DataFrame(copy_rows, columns=originals.columns)
    if copies.empty:
        return originals.reset_index(drop=True)
    copies = copies.sort_values(["dx", SOURCE_IMAGE_COLUMN, "image_id"], kind="stable")
    return pd.concat([originals, copies], ignore_index=True)


def _originals(train_df: pd.DataFrame) -> pd.DataFrame:
    """A copy of the training rows with an empty `source_image_id`, refusing rows that are
    not a validated manifest's or that hold copies already."""
    if IMAGE_PATH_COLUMN not in train_df.columns:
        raise ValueError(
            f"oversampling needs the {IMAGE_PATH_COLUMN!r} column of a validated manifest; "
            "run `skinsense validate` first"
        )
    originals = train_df.copy()
    if SOURCE_IMAGE_COLUMN in originals.columns and originals[SOURCE_IMAGE_COLUMN].notna().any():
        raise ValueError(
            "train_df already contains oversampled copies (source_image_id set); "
            "oversample the split's train.csv, not an oversampled one"
        )
    originals[SOURCE_IMAGE_COLUMN] = None
    return originals


def _plan_copies(rows: pd.DataFrame, n_new: int, *, dx: str, seed: int, out_dir: Path
                 ) -> tuple[list[_CopyJob], list[dict]]:
    """The jobs and the manifest rows of `n_new` copies of one class's `rows`."""
    n = len(rows)
    jobs: list[_CopyJob] = []
    copy_rows: list[dict] = []
    # A seeded order, so the originals that get the one extra copy are not always the
    # lowest image_ids; copy j goes to original j % n as its (j // n)-th copy.
    order = np.random.default_rng(stable_seed(seed, dx)).permutation(n)
    records = rows.to_dict("records")
    for j in range(n_new):
        row = records[order[j % n]]
        k = j // n
        image_id = f"{row['image_id']}_aug{k}"
        dst = str(out_dir / f"{image_id}.jpg")
        jobs.append((str(row[IMAGE_PATH_COLUMN]), dst, stable_seed(seed, row["image_id"], k)))
        copy_rows.append(
            {**row, "image_id": image_id, IMAGE_PATH_COLUMN: dst,
             SOURCE_IMAGE_COLUMN: row["image_id"]}
        )
    return jobs, copy_rows


def class_weights(labels_or_counts: Iterable[str] | Mapping[str, int]) -> list[float]:
    """Balanced loss weights, `n_samples / (n_classes * count)`, in `CLASS_CODES` order.

    Computed with scikit-learn's `compute_class_weight('balanced')` over the classes
    present. A class absent from the data gets weight 1.0: it is never a target, so its
    weight never applies, and 0 would turn a weighted-mean loss over a batch of that
    class into 0/0.

    Args:
        labels_or_counts: The dx of every training image, or a mapping dx -> count.

    Returns:
        One weight per class of `skinsense.labels.CLASS_CODES`.

    Raises:
        ValueError: A label is not one of the seven classes, or there are no labels.
    """
    if isinstance(labels_or_counts, Mapping):
        counts = {dx: int(n) for dx, n in labels_or_counts.items() if int(n) > 0}
        labels = np.repeat(np.asarray(list(counts), dtype=object), list(counts.values()))
    else:
        labels = np.asarray(list(labels_or_counts), dtype=object)
    unknown = sorted(set(labels) - set(CLASS_CODES))
    if unknown:
        raise ValueError(f"unknown class(es) {unknown}; expected {list(CLASS_CODES)}")
    if labels.size == 0:
        raise ValueError("no labels to compute class weights from")
    present = np.asarray([c for c in CLASS_CODES if c in set(labels)], dtype=object)
    weights = compute_class_weight("balanced", classes=present, y=labels)
    by_class = dict(zip(present, weights, strict=True))
    return [float(by_class.get(code, 1.0)) for code in CLASS_CODES]


def _check_no_shared_lesions(train: pd.DataFrame, split: SplitData) -> None:
    train_lesions = set(train["lesion_id"])
    for name, csv in (("val", split.val_csv), ("test", split.test_csv)):
        other = pd.read_csv(csv, usecols=["lesion_id"], dtype=str)
        shared = train_lesions & set(other["lesion_id"])
        if shared:
            raise ValueError(
                f"{split.train_csv} shares {len(shared)} lesion(s) with {name} "
                f"({sorted(shared)[:3]}...); oversampling would leak them. Re-run the split."
            )


def run_oversample(split: SplitData, cfg: DataConfig, out_dir: Path) -> OversampledData:
    """The oversample stage: oversample the split's training part as `cfg` says.

    Args:
        split: Output of the split stage; only its training part is read for copies.
        cfg: Uses oversample, oversample_target, max_copies_per_image, color_jitter,
            split_seed (as the augmentation seed), class_weights and cache_workers.
        out_dir: Folder for `train_oversampled.csv` and the copies in `oversampled/`.

    Returns:
        The oversampled training manifest, counts before and after, and, if
        `cfg.class_weights`, balanced weights computed on the counts after oversampling
        (the data the loss actually sees).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train = load_metadata(split.train_csv)
    _check_no_shared_lesions(train, split)
    if cfg.oversample and cfg.max_copies_per_image > 0:
        result = oversample_minority(
            train,
            out_dir=out_dir / COPIES_DIR_NAME,
            target=cfg.oversample_target,
            max_copies_per_image=cfg.max_copies_per_image,
            color_jitter=cfg.color_jitter,
            seed=cfg.split_seed,
            workers=cfg.cache_workers,
        )
    else:
        result = train.assign(**{SOURCE_IMAGE_COLUMN: None})
    train_csv = (out_dir / OVERSAMPLED_TRAIN_NAME).resolve()
    write_csv_atomic(result, train_csv)
    after = class_counts(result["dx"])
    return OversampledData(
        train_csv=train_csv,
        n_added=len(result) - len(train),
        class_counts_before=class_counts(train["dx"]),
        class_counts_after=after,
        class_weights=class_weights(after) if cfg.class_weights else None,
    )
