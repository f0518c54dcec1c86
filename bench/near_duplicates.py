"""The near-duplicate check (issue 22) against the cache stage, same run, same images.

Writes a synthetic HAM10000 of 10,015 images of 600x450 (`skinsense.data.synth`), then times
on this machine's cores:
  1. the validate stage without the check (read, SHA-256, decode at 1/8 to verify),
  2. the validate stage with the check (the same decode also gives each signature; then the
     bounded Hamming search, the second opinion, the grouping and the report files),
  3. the cache stage alone: every image decoded and squashed to 224 px (`build_split_cache`).
The check's own cost is (2) - (1); the target is at most 1.3x the time of (3).

Usage: python bench/near_duplicates.py [--images 10015] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import zipfile
from pathlib import Path

import pandas as pd

from skinsense.config import NearDuplicateConfig
from skinsense.data.cache import build_split_cache
from skinsense.data.metadata import validate
from skinsense.data.records import FetchedData
from skinsense.data.synth import make_synthetic_ham10000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=10015)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_synthetic_ham10000(root, n_images=args.images, seed=0, workers=args.workers)
        images = root / "images"
        for archive in root.glob("HAM10000_images_part_*.zip"):
            with zipfile.ZipFile(archive) as zipped:
                zipped.extractall(images)
        fetched = FetchedData(source="bench", metadata_csv=root / "HAM10000_metadata.csv",
                              images_dir=images)
        os.sync()
        timings = {}
        for name, cfg in (("validate", None), ("validate+check", NearDuplicateConfig())):
            started = time.perf_counter()
            validated = validate(fetched, out_dir=root / name, max_bad_fraction=0,
                                 workers=args.workers, near_duplicates=cfg)
            timings[name] = time.perf_counter() - started
        manifest = pd.read_csv(validated.manifest_csv)
        lesions_per_group = manifest.groupby("split_group")["lesion_id"].nunique()
        started = time.perf_counter()
        build_split_cache(manifest, size=224, out_dir=root / "cache", name="all",
                          workers=args.workers)
        timings["cache"] = time.perf_counter() - started
    check = timings["validate+check"] - timings["validate"]
    found = validated.near_duplicates
    print(f"{args.images} images of 600x450, {args.workers} worker(s)")
    for name, seconds in timings.items():
        print(f"  {name:15s} {seconds:7.1f} s ({args.images / seconds:6.0f} images/s)")
    print(f"  the check alone {check:7.1f} s = {check / timings['cache']:.2f}x the cache stage "
          f"(target <= 1.3x); validate+check = {timings['validate+check'] / timings['cache']:.2f}x")
    print(f"  found: {found.n_pairs} pair(s) among {args.images * (args.images - 1) // 2:,} "
          f"pairs of images, {found.n_lesions_merged} of {len(set(manifest['lesion_id']))} "
          f"lesions merged into {found.n_groups} groups, the largest of "
          f"{lesions_per_group.max()} lesions")


if __name__ == "__main__":
    main()
