"""The image cache and the torch datasets over it, on a tiny synthetic HAM10000."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from skinsense.data import cache
from skinsense.data.cache import (
    CacheBuildError,
    build_image_cache,
    build_split_cache,
    read_cached_manifest,
)
from skinsense.data.datasets import CachedImageDataset, load_split_tensors
from skinsense.data.synth import make_synthetic_ham10000
from skinsense.labels import CODE_TO_INDEX


def _extract(data_dir: Path, images_dir: Path) -> pd.DataFrame:
    """Unpack the synthetic zips and return the metadata with `image_path` (a manifest)."""
    images_dir.mkdir()
    for part in ("HAM10000_images_part_1.zip", "HAM10000_images_part_2.zip"):
        with zipfile.ZipFile(data_dir / part) as archive:
            archive.extractall(images_dir)
    manifest = pd.read_csv(data_dir / "HAM10000_metadata.csv")
    manifest["image_path"] = [str(images_dir / f"{i}.jpg") for i in manifest["image_id"]]
    return manifest


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    root = tmp_path_factory.mktemp("ham")
    data = make_synthetic_ham10000(root / "data", n_images=40, seed=5, workers=1,
                                   image_size=(64, 48))
    return _extract(data, root / "images")


def _plain_resize(path: str, size: int) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR))


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def test_shapes_dtypes_and_labels(manifest: pd.DataFrame, tmp_path: Path) -> None:
    cached = build_split_cache(manifest, size=32, out_dir=tmp_path, name="train", workers=2)
    assert cached.n == 40 and cached.size == 32
    images = np.load(cached.images_npy)
    labels = np.load(cached.labels_npy)
    assert images.shape == (40, 32, 32, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int64
    assert labels.tolist() == [CODE_TO_INDEX[dx] for dx in manifest["dx"]]
    # Every row was written, in manifest order (no row left at zero).
    for row in (0, 17, 39):
        assert np.array_equal(images[row], cache.load_square(manifest["image_path"][row], 32))
    assert _leftovers(tmp_path) == []
    stamp = json.loads((tmp_path / "train.json").read_text())
    assert stamp["n"] == 40 and stamp["size"] == 32


def test_oversampled_copies_get_the_rows_of_their_source(
    manifest: pd.DataFrame, tmp_path: Path
) -> None:
    # Oversampling adds rows that point at the same file (with source_image_id set).
    copies = manifest.iloc[[3, 3, 7]].assign(source_image_id=lambda d: d["image_id"])
    oversampled = pd.concat([manifest, copies], ignore_index=True)
    cached = build_split_cache(oversampled, size=24, out_dir=tmp_path, name="train", workers=2)
    images = np.load(cached.images_npy)
    assert images.shape == (43, 24, 24, 3)
    assert np.array_equal(images[40], images[3]) and np.array_equal(images[41], images[3])
    assert np.array_equal(images[42], images[7]) and images[42].any()


def test_rows_are_close_to_a_plain_pil_resize(tmp_path: Path) -> None:
    # 200x150 images at 64 px take the draft path (the decoder scales by 1/2 first).
    data = make_synthetic_ham10000(tmp_path / "data", n_images=14, seed=1, workers=1,
                                   image_size=(200, 150))
    manifest = _extract(data, tmp_path / "images")
    cached = build_split_cache(manifest, size=64, out_dir=tmp_path / "cache", name="val",
                               workers=1)
    images = np.load(cached.images_npy).astype(np.int16)
    plain = np.stack([_plain_resize(p, 64) for p in manifest["image_path"]]).astype(np.int16)
    difference = np.abs(images - plain)
    assert difference.mean() < 2.0
    assert difference.max() < 40


def test_complete_cache_is_reused_without_rebuilding(
    manifest: pd.DataFrame, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = build_split_cache(manifest, size=24, out_dir=tmp_path, name="train", workers=1)
    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}

    def no_rebuild(*args: object, **kwargs: object) -> None:
        raise AssertionError("a complete cache was rebuilt")

    monkeypatch.setattr(cache, "_fill_images", no_rebuild)
    again = build_split_cache(manifest, size=24, out_dir=tmp_path, name="train", workers=1)
    assert again == first
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == mtimes


def test_changed_manifest_or_size_is_rebuilt(manifest: pd.DataFrame, tmp_path: Path) -> None:
    build_split_cache(manifest, size=24, out_dir=tmp_path, name="train", workers=1)
    fewer = build_split_cache(manifest.iloc[:30], size=24, out_dir=tmp_path, name="train",
                              workers=1)
    assert fewer.n == 30 and np.load(fewer.images_npy).shape == (30, 24, 24, 3)
    bigger = build_split_cache(manifest.iloc[:30], size=28, out_dir=tmp_path, name="train",
                               workers=1)
    assert np.load(bigger.images_npy).shape == (30, 28, 28, 3)


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_interrupted_cache_is_rebuilt(manifest: pd.DataFrame, tmp_path: Path) -> None:
    # What a killed build leaves: a half-written temp file, and final files without a stamp.
    pid = _dead_pid()
    stale = tmp_path / f"train_images.tmp-{pid}-0badf00d.npy"
    stale.write_bytes(b"\x93NUMPY half-written")
    np.save(tmp_path / "train_images.npy", np.zeros((40, 24, 24, 3), np.uint8))
    np.save(tmp_path / "train_labels.npy", np.zeros(40, np.int64))

    cached = build_split_cache(manifest, size=24, out_dir=tmp_path, name="train", workers=1)
    images = np.load(cached.images_npy)
    assert images.any(), "the zero-filled leftovers were taken for a cache"
    assert np.array_equal(images[5], cache.load_square(manifest["image_path"][5], 24))
    assert np.load(cached.labels_npy).tolist() == [CODE_TO_INDEX[d] for d in manifest["dx"]]
    assert _leftovers(tmp_path) == []
    assert (tmp_path / "train.json").exists()


def test_a_stamp_from_another_manifest_is_not_trusted(
    manifest: pd.DataFrame, tmp_path: Path
) -> None:
    build_split_cache(manifest, size=24, out_dir=tmp_path, name="train", workers=1)
    shuffled = manifest.sample(frac=1, random_state=0).reset_index(drop=True)
    cached = build_split_cache(shuffled, size=24, out_dir=tmp_path, name="train", workers=1)
    assert np.load(cached.labels_npy).tolist() == [CODE_TO_INDEX[d] for d in shuffled["dx"]]


def test_corrupt_image_raises_an_error_naming_the_file(
    manifest: pd.DataFrame, tmp_path: Path
) -> None:
    broken = manifest.copy()
    bad_path = tmp_path / "ISIC_9999999.jpg"
    bad_path.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    broken.loc[23, "image_path"] = str(bad_path)
    out = tmp_path / "cache"
    with pytest.raises(CacheBuildError, match="ISIC_9999999.jpg"):
        build_split_cache(broken, size=24, out_dir=out, name="train", workers=2)
    # Nothing that could pass for a cache, and no temp files, is left behind.
    assert sorted(p.name for p in out.iterdir()) == []


def test_missing_image_raises_an_error_naming_the_file(
    manifest: pd.DataFrame, tmp_path: Path
) -> None:
    broken = manifest.copy()
    broken.loc[0, "image_path"] = str(tmp_path / "gone.jpg")
    with pytest.raises(CacheBuildError, match="gone.jpg"):
        build_split_cache(broken, size=24, out_dir=tmp_path / "c", name="val", workers=1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": 0}, "size"),
        ({"size": 32.0}, "size"),
        ({"workers": 0}, "workers"),
        ({"name": ""}, "name"),
    ],
)
def test_invalid_arguments(
    manifest: pd.DataFrame, tmp_path: Path, kwargs: dict, message: str
) -> None:
    arguments = {"size": 24, "out_dir": tmp_path, "name": "train", "workers": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        build_split_cache(manifest, **arguments)


def test_bad_manifests_are_rejected(manifest: pd.DataFrame, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image_path"):
        build_split_cache(manifest.drop(columns="image_path"), size=24, out_dir=tmp_path,
                          name="train")
    odd = manifest.copy()
    odd.loc[0, "dx"] = "melanoma"
    with pytest.raises(ValueError, match="melanoma"):
        build_split_cache(odd, size=24, out_dir=tmp_path, name="train")


def test_build_image_cache_keys_by_fingerprint_and_size(
    manifest: pd.DataFrame, tmp_path: Path
) -> None:
    csvs = {}
    for name, part in (("train", manifest.iloc[:24]), ("val", manifest.iloc[24:32]),
                       ("test", manifest.iloc[32:])):
        csvs[name] = tmp_path / f"{name}.csv"
        part.to_csv(csvs[name], index=False)
    fingerprint = "0123456789abcdef" + "f" * 48
    image_cache = build_image_cache(csvs["train"], csvs["val"], csvs["test"], size=24,
                                    fingerprint=fingerprint, cache_root=tmp_path / "cache",
                                    workers=1)
    assert image_cache.key == "0123456789abcdef-24px"
    assert image_cache.train.images_npy.parent == tmp_path / "cache" / image_cache.key
    assert (image_cache.train.n, image_cache.val.n, image_cache.test.n) == (24, 8, 8)

    # Each part names its manifest, whose rows describe its images in order.
    assert image_cache.test.manifest_csv == csvs["test"]
    rows = read_cached_manifest(image_cache.test)
    assert list(rows["image_id"]) == list(manifest.iloc[32:]["image_id"])
    manifest.iloc[33:].to_csv(csvs["test"], index=False)  # changed after the cache was built
    with pytest.raises(ValueError, match="no longer matches"):
        read_cached_manifest(image_cache.test)
    with pytest.raises(ValueError, match="--refresh-data"):
        read_cached_manifest(image_cache.test.model_copy(update={"manifest_csv": None}))


def test_dataset_works_with_dataloader_workers(manifest: pd.DataFrame, tmp_path: Path) -> None:
    cached = build_split_cache(manifest, size=24, out_dir=tmp_path, name="train", workers=1)
    dataset = CachedImageDataset(cached)
    image, label = dataset[3]
    assert image.dtype == torch.uint8 and image.shape == (3, 24, 24)
    assert label == CODE_TO_INDEX[manifest["dx"][3]]

    loader = DataLoader(dataset, batch_size=8, num_workers=2, shuffle=False)
    batches = list(loader)
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    expected = torch.from_numpy(np.load(cached.images_npy)).permute(0, 3, 1, 2)
    assert torch.equal(images, expected)
    assert labels.tolist() == np.load(cached.labels_npy).tolist()

    all_images, all_labels = load_split_tensors(cached)
    assert all_images.shape == (40, 24, 24, 3) and all_images.dtype == torch.uint8
    assert all_labels.dtype == torch.int64 and torch.equal(all_labels, labels)


def test_dataset_applies_its_transform(manifest: pd.DataFrame, tmp_path: Path) -> None:
    cached = build_split_cache(manifest, size=24, out_dir=tmp_path, name="val", workers=1)
    dataset = CachedImageDataset(cached, transform=lambda x: x.float() / 255)
    image, _ = dataset[0]
    assert image.dtype == torch.float32 and float(image.max()) <= 1.0
