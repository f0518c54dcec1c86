"""The image cache: every image of a split decoded once, at one size, into a uint8 array.

Decoding 600x450 JPEGs is what bounds a typical training pipeline (about 240 images/s per
core), so each split is decoded once into an `(N, size, size, 3)` uint8 `.npy` that the
training loop memory-maps, plus an `(N,)` int64 labels `.npy`.

How an image becomes a cache row (`load_square`): the whole image is squashed to a
`size x size` square (no crop; HAM10000 lesions are not always centred and a centre crop
of a 4:3 photo cuts a quarter of it). The evaluation and serving presets must do the same,
so that the model sees at serving time what it saw in training. For speed the JPEG decoder
is asked for a DCT-scaled draft (`Image.draft`, 1/2, 1/4 or 1/8 of the size, never smaller
than the target) before the bilinear resize; the result matches a full decode followed by
the same resize to within a few grey levels.

A cache is written under temporary names and renamed when complete, and a small JSON stamp
(row count, size, a hash of the manifest's image ids, paths and labels) is written last;
a cache whose stamp matches is reused, anything else is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import time
import uuid
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from skinsense.data.records import IMAGE_PATH_COLUMN, CachedSplit, ImageCache
from skinsense.labels import CODE_TO_INDEX
from skinsense.processes import is_leftover

if TYPE_CHECKING:  # decoding workers import this module; pandas would add 0.25 s to each
    import pandas as pd

log = logging.getLogger(__name__)

# Bump when the way rows are made changes, so that old caches are rebuilt.
CACHE_FORMAT_VERSION = 1
RESAMPLE = Image.Resampling.BILINEAR
# Downscales by 2x or more first reduce by an integer factor (a box filter, cheap) and then
# resample the rest. 1.0 reduces as much as possible: at 300 px (no JPEG draft possible,
# 450 / 2 < 300) it cuts the resize from 1.7 to 1.0 ms per image, while rows differ from a
# full bilinear resize by 0.4 grey levels on average (measured on 600x450 JPEGs).
REDUCING_GAP = 1.0
_TEMP_MARK = ".tmp-"


class CacheBuildError(RuntimeError):
    """An image could not be decoded while building the cache (the message names it)."""


def load_square(path: str | os.PathLike[str], size: int) -> np.ndarray:
    """Decode an image and squash the whole of it to `size x size` RGB.

    Args:
        path: Image file (JPEG gets the fast DCT-scaled draft path; other formats work too).
        size: Side of the square, in pixels.

    Returns:
        A `(size, size, 3)` uint8 array.
    """
    with Image.open(path) as image:
        # draft() only ever scales down to >= the requested size, so the bilinear resize
        # below still does the final (antialiased) step.
        image.draft("RGB", (size, size))
        return np.asarray(resize_square(image, size))


def resize_square(image: Image.Image, size: int) -> Image.Image:
    """Squash a PIL image to `size x size` RGB the way the cache does (no crop)."""
    return image.convert("RGB").resize((size, size), RESAMPLE, reducing_gap=REDUCING_GAP)


def build_split_cache(
    manifest_df: pd.DataFrame,
    *,
    size: int,
    out_dir: str | os.PathLike[str],
    name: str,
    workers: int | None = None,
) -> CachedSplit:
    """Decode every image of a manifest once into `{name}_images.npy` / `{name}_labels.npy`.

    Args:
        manifest_df: Rows with `image_path` (absolute JPEG path) and `dx`; `image_id` when
            present goes into the stamp's hash.
        size: Side of the square images.
        out_dir: Folder of the cache files (created if missing).
        name: Split name, the files' prefix (e.g. 'train').
        workers: Decoding processes; None means all cores.

    Returns:
        The cached split. A complete cache of the same manifest and size is reused.

    Raises:
        ValueError: On a bad argument, a missing column or an unknown `dx`.
        CacheBuildError: When an image cannot be decoded (the message names the file).
    """
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= 4096:
        raise ValueError(f"size must be an integer within 1..4096, got {size!r}")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be None or a positive integer, got {workers!r}")
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"name must be a plain file-name prefix, got {name!r}")
    missing = {IMAGE_PATH_COLUMN, "dx"} - set(manifest_df.columns)
    if missing:
        raise ValueError(f"manifest lacks column(s) {sorted(missing)}")
    unknown = sorted(set(manifest_df["dx"]) - set(CODE_TO_INDEX))
    if unknown:
        raise ValueError(f"manifest has unknown dx value(s) {unknown}")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [str(p) for p in manifest_df[IMAGE_PATH_COLUMN]]
    labels = manifest_df["dx"].map(CODE_TO_INDEX).to_numpy(dtype=np.int64)
    n = len(paths)
    images_npy, labels_npy, stamp_json = _cache_files(out, name)
    stamp = {
        "version": CACHE_FORMAT_VERSION,
        "n": n,
        "size": size,
        "manifest_sha256": _manifest_hash(manifest_df),
    }
    cached = CachedSplit(images_npy=images_npy, labels_npy=labels_npy, size=size, n=n)
    if _is_complete(cached, stamp_json, stamp):
        log.info("image cache %s: reusing %d images at %d px", images_npy, n, size)
        return cached

    # Stamp first: from here on the old files no longer describe a complete cache.
    stamp_json.unlink(missing_ok=True)
    _remove_dead_temps(out, name)
    token = f"{_TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}.npy"
    # Temp names keep the .npy suffix (np.save would append one) and carry the pid, so
    # that a later build can tell an interrupted build's leftovers from a live one's.
    tmp_images = out / f"{name}_images{token}"
    tmp_labels = out / f"{name}_labels{token}"
    try:
        started = time.perf_counter()
        _fill_images(tmp_images, paths, size, workers)
        np.save(tmp_labels, labels, allow_pickle=False)
        os.replace(tmp_images, images_npy)
        os.replace(tmp_labels, labels_npy)
        _write_json_atomic(stamp_json, stamp)
        elapsed = time.perf_counter() - started
        log.info("image cache %s: %d images at %d px in %.1f s (%.0f images/s)",
                 images_npy, n, size, elapsed, n / max(elapsed, 1e-9))
    finally:
        tmp_images.unlink(missing_ok=True)
        tmp_labels.unlink(missing_ok=True)
    return cached


def build_image_cache(
    train_csv: str | os.PathLike[str],
    val_csv: str | os.PathLike[str],
    test_csv: str | os.PathLike[str],
    *,
    size: int,
    fingerprint: str,
    cache_root: str | os.PathLike[str],
    workers: int | None = None,
) -> ImageCache:
    """Cache the three split manifests at one size under `cache_root/{fp[:16]}-{size}px`.

    Args:
        train_csv: Training manifest (after oversampling: copies point at the same files).
        val_csv: Validation manifest.
        test_csv: Test manifest.
        size: Side of the square images.
        fingerprint: Dataset fingerprint (hex); its first 16 characters key the folder.
        cache_root: Root of all caches (normally `Home.cache`).
        workers: Decoding processes; None means all cores.

    Returns:
        The three cached splits.
    """
    if len(fingerprint) < 16:
        raise ValueError(f"fingerprint must have at least 16 characters, got {fingerprint!r}")
    import pandas as pd

    key = f"{fingerprint[:16]}-{size}px"
    out = Path(cache_root) / key
    splits = {}
    for name, csv in (("train", train_csv), ("val", val_csv), ("test", test_csv)):
        manifest = pd.read_csv(csv, dtype={"lesion_id": str, "image_id": str, "dx": str})
        cached = build_split_cache(manifest, size=size, out_dir=out, name=name, workers=workers)
        splits[name] = cached.model_copy(update={"manifest_csv": Path(csv)})
    return ImageCache(size=size, key=key, **splits)


def read_cached_manifest(cached: CachedSplit) -> pd.DataFrame:
    """The manifest rows of a cached part, in cache order (row i describes image i).

    Raises:
        ValueError: the record names no manifest (a cache record from before manifests were
            kept: rebuild it, e.g. with `--refresh-data`), or the manifest no longer matches
            the cached labels (it was changed after the cache was built).
    """
    import pandas as pd

    if cached.manifest_csv is None:
        raise ValueError(f"the cached part {cached.images_npy} does not say which manifest it "
                         "was built from; run the cache stage again (--refresh-data)")
    manifest = pd.read_csv(cached.manifest_csv,
                           dtype={"lesion_id": str, "image_id": str, "dx": str})
    labels = np.load(cached.labels_npy)
    if len(manifest) != len(labels) or not np.array_equal(
            manifest["dx"].map(CODE_TO_INDEX).to_numpy(), labels):
        raise ValueError(f"{cached.manifest_csv} ({len(manifest)} rows) no longer matches the "
                         f"cached part {cached.labels_npy} ({len(labels)} images); run the "
                         f"cache stage again (--refresh-data)")
    return manifest


# --------------------------------------------------------------------------------------


def _cache_files(out: Path, name: str) -> tuple[Path, Path, Path]:
    return out / f"{name}_images.npy", out / f"{name}_labels.npy", out / f"{name}.json"


def _manifest_hash(manifest_df: pd.DataFrame) -> str:
    digest = hashlib.sha256()
    ids = manifest_df["image_id"] if "image_id" in manifest_df else [""] * len(manifest_df)
    for image_id, path, dx in zip(ids, manifest_df[IMAGE_PATH_COLUMN], manifest_df["dx"],
                                  strict=True):
        digest.update(f"{image_id}\t{path}\t{dx}\n".encode())
    return digest.hexdigest()


def _is_complete(cached: CachedSplit, stamp_json: Path, stamp: dict) -> bool:
    try:
        if json.loads(stamp_json.read_text()) != stamp:
            return False
        images = np.load(cached.images_npy, mmap_mode="r")
        labels = np.load(cached.labels_npy, mmap_mode="r")
    except (OSError, ValueError):
        return False
    n, size = cached.n, cached.size
    return (images.shape == (n, size, size, 3) and images.dtype == np.uint8
            and labels.shape == (n,) and labels.dtype == np.int64)


def _remove_dead_temps(out: Path, name: str) -> None:
    """Delete temp files of interrupted builds (their process is gone); keep live ones."""
    patterns = (f"{name}_images{_TEMP_MARK}*", f"{name}_labels{_TEMP_MARK}*",
                f"{name}.json{_TEMP_MARK}*")
    leftovers = [tmp for pattern in patterns for tmp in out.glob(pattern)]
    for tmp in leftovers:
        pid_text = tmp.name.split(_TEMP_MARK, 1)[1].split("-", 1)[0]
        if not pid_text.isdigit() or is_leftover(int(pid_text)):
            tmp.unlink(missing_ok=True)


def _write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + f"{_TEMP_MARK}{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _fill_images(images_npy: Path, paths: list[str], size: int, workers: int | None) -> None:
    """Create the images .npy and fill it, in parallel chunks of rows."""
    n = len(paths)
    if n == 0:  # an empty file cannot be memory-mapped
        np.save(images_npy, np.zeros((0, size, size, 3), np.uint8), allow_pickle=False)
        return
    # open_memmap writes the .npy header and sizes the (sparse) file; the workers then
    # write their rows at their offsets.
    array = np.lib.format.open_memmap(images_npy, mode="w+", dtype=np.uint8,
                                      shape=(n, size, size, 3))
    header = array.offset
    del array

    # Oversampled copies point at the same file: decode each file once and write its row
    # to every position that uses it.
    rows_of: dict[str, list[int]] = {}
    for row, path in enumerate(paths):
        rows_of.setdefault(path, []).append(row)
    items = list(rows_of.items())

    workers = min(workers or _cpu_count(), len(items))
    # Several chunks per worker balance the load; chunks of a few hundred images keep the
    # per-task overhead (one file open, one small message) negligible.
    chunk = max(8, min(256, math.ceil(len(items) / (workers * 8))))
    chunks = [items[start:start + chunk] for start in range(0, len(items), chunk)]
    if workers == 1 or len(chunks) == 1:
        for part in chunks:
            _fill_rows(str(images_npy), header, part, size)
        return
    # forkserver: safe when the caller has torch (and its thread pools) loaded, unlike fork.
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(max_workers=min(workers, len(chunks)),
                             mp_context=context) as executor:
        # Workers write their rows straight into the file and return only a count: no
        # image data is pickled back to this process.
        futures = [executor.submit(_fill_rows, str(images_npy), header, part, size)
                   for part in chunks]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for future in pending:
            future.cancel()
        for future in done:
            error = future.exception()
            if error is not None:
                raise error


def _fill_rows(
    images_npy: str, header: int, items: list[tuple[str, list[int]]], size: int
) -> int:
    """Worker: decode each `(path, rows)` item and write it to those rows of the .npy.

    Rows go in with `pwrite` at their offset (`header` + row * row size) rather than through
    a writable memory map: on ext4 every first write to a page of a shared mapping opens a
    journal transaction, which made 300 px rows 3-4x dearer to store than to `pwrite`.
    """
    row_bytes = size * size * 3
    fd = os.open(images_npy, os.O_WRONLY)
    try:
        for path, rows in items:
            try:
                pixels = load_square(path, size)
            except Exception as exc:  # PIL raises many kinds; all mean "cannot use it"
                raise CacheBuildError(
                    f"cannot decode image {path} (row {rows[0]}) for the image cache: "
                    f"{type(exc).__name__}: {exc}. Validation should have left it out; "
                    "re-run validation or remove the file from the manifest."
                ) from None
            data = memoryview(np.ascontiguousarray(pixels)).cast("B")
            for row in rows:
                view, position = data, header + row * row_bytes
                while view:  # pwrite may write less than asked (rare, but allowed)
                    written = os.pwrite(fd, view, position)
                    view, position = view[written:], position + written
    finally:
        os.close(fd)
    return len(items)
