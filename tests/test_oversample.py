"""Offline oversampling of the training part, and class weights."""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.utils.class_weight import compute_class_weight

from skinsense.config import DataConfig
from skinsense.data import oversample as oversample_module
from skinsense.data.oversample import class_weights, oversample_minority, run_oversample
from skinsense.data.records import IMAGE_PATH_COLUMN, SOURCE_IMAGE_COLUMN, SplitData
from skinsense.labels import CLASS_CODES

# Images per class of the synthetic training part: nv is the majority class.
COUNTS = {"nv": 12, "mel": 5, "df": 2}


@pytest.fixture(autouse=True)
def _no_rng_leak():
    state = torch.get_rng_state()
    yield
    assert torch.equal(state, torch.get_rng_state()), "test leaked torch RNG state"


def _sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _make_part(root: Path, counts: dict[str, int], prefix: str) -> pd.DataFrame:
    """Tiny 60x45 JPEGs; every second image shares its lesion with the one before."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(prefix.encode()))  # not hash(): salted
    rows = []
    for dx, n in counts.items():
        for j in range(n):
            image_id = f"ISIC_{prefix}{dx}{j:03d}"
            path = root / f"{image_id}.jpg"
            pixels = rng.integers(0, 256, (45, 60, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path, format="JPEG", quality=90)
            rows.append({
                "lesion_id": f"HAM_{prefix}{dx}{j // 2:03d}", "image_id": image_id, "dx": dx,
                "dx_type": "histo", "age": 50.0, "sex": "male", "localization": "back",
                "dataset": "synthetic", IMAGE_PATH_COLUMN: str(path),
            })
    return pd.DataFrame(rows)


@pytest.fixture()
def train_df(tmp_path) -> pd.DataFrame:
    return _make_part(tmp_path / "images", COUNTS, "tr")


def test_only_minority_classes_grow_with_cap_of_three(train_df, tmp_path):
    out = oversample_minority(train_df, out_dir=tmp_path / "copies", workers=1)
    counts = out["dx"].value_counts().to_dict()
    # mel: 12 - 5 = 7 new (< 5 * 3); df: capped at 2 * 3 = 6 new.
    assert counts == {"nv": 12, "mel": 12, "df": 8}
    copies = out[out[SOURCE_IMAGE_COLUMN].notna()]
    assert len(copies) == 13 and not (copies["dx"] == "nv").any()
    per_source = copies[SOURCE_IMAGE_COLUMN].value_counts()
    assert per_source.max() <= 3
    # Spread evenly: within a class no original has two copies more than another.
    for dx in ("mel", "df"):
        originals = train_df.loc[train_df["dx"] == dx, "image_id"]
        n_copies = per_source.reindex(originals, fill_value=0)
        assert n_copies.max() - n_copies.min() <= 1


def test_copies_record_their_source_and_metadata(train_df, tmp_path):
    out_dir = tmp_path / "copies"
    out = oversample_minority(train_df, out_dir=out_dir, workers=1)
    originals = out.iloc[: len(train_df)]
    assert originals[SOURCE_IMAGE_COLUMN].isna().all()
    pd.testing.assert_frame_equal(
        originals.drop(columns=SOURCE_IMAGE_COLUMN), train_df, check_dtype=False
    )
    by_id = train_df.set_index("image_id")
    copies = out.iloc[len(train_df):]
    assert out["image_id"].is_unique
    for row in copies.itertuples():
        source = by_id.loc[getattr(row, SOURCE_IMAGE_COLUMN)]
        assert row.image_id.startswith(f"{getattr(row, SOURCE_IMAGE_COLUMN)}_aug")
        assert (row.lesion_id, row.dx, row.localization) == (
            source.lesion_id, source.dx, source.localization
        )
        path = Path(getattr(row, IMAGE_PATH_COLUMN))
        assert path == out_dir.resolve() / f"{row.image_id}.jpg"
        with Image.open(path) as img:
            assert img.format == "JPEG" and img.size == (60, 45)
        assert _sha(path) != _sha(source.image_path)  # augmented, not a byte copy


def test_identical_bytes_across_runs_and_worker_counts(train_df, tmp_path, monkeypatch):
    one = oversample_minority(train_df, out_dir=tmp_path / "one", seed=3, workers=1)
    # Chunks of two copies so the pool really spreads the work over two processes.
    monkeypatch.setattr(oversample_module, "_CHUNK_SIZE", 2)
    two = oversample_minority(train_df, out_dir=tmp_path / "two", seed=3, workers=2)
    assert list(one["image_id"]) == list(two["image_id"])
    copies = one[SOURCE_IMAGE_COLUMN].notna()
    assert [_sha(p) for p in one.loc[copies, IMAGE_PATH_COLUMN]] == [
        _sha(p) for p in two.loc[copies, IMAGE_PATH_COLUMN]
    ]
    other = oversample_minority(train_df, out_dir=tmp_path / "other", seed=4, workers=1)
    other_copies = other[SOURCE_IMAGE_COLUMN].notna()
    assert [_sha(p) for p in one.loc[copies, IMAGE_PATH_COLUMN]] != [
        _sha(p) for p in other.loc[other_copies, IMAGE_PATH_COLUMN]
    ]


def test_resumes_without_rewriting_existing_copies(train_df, tmp_path):
    out_dir = tmp_path / "copies"
    first = oversample_minority(train_df, out_dir=out_dir, workers=1)
    paths = list(first.loc[first[SOURCE_IMAGE_COLUMN].notna(), IMAGE_PATH_COLUMN])
    expected = _sha(paths[0])
    Path(paths[0]).unlink()
    Path(paths[1]).write_bytes(b"left by an earlier run")  # a kept file is not touched
    again = oversample_minority(train_df, out_dir=out_dir, workers=1)
    pd.testing.assert_frame_equal(first, again)
    assert _sha(paths[0]) == expected
    assert Path(paths[1]).read_bytes() == b"left by an earlier run"
    assert not list(out_dir.glob("*.part"))


def test_explicit_target_and_refuses_oversampled_input(train_df, tmp_path):
    out = oversample_minority(train_df, out_dir=tmp_path / "a", target=8, workers=1)
    assert out["dx"].value_counts().to_dict() == {"nv": 12, "mel": 8, "df": 8}
    with pytest.raises(ValueError, match="already contains oversampled copies"):
        oversample_minority(out, out_dir=tmp_path / "b", workers=1)
    with pytest.raises(ValueError, match="image_path"):
        oversample_minority(train_df.drop(columns=IMAGE_PATH_COLUMN), out_dir=tmp_path / "c")


def _split(tmp_path: Path, train: pd.DataFrame) -> SplitData:
    val = _make_part(tmp_path / "val_images", {"nv": 2, "mel": 1, "df": 1}, "va")
    test = _make_part(tmp_path / "test_images", {"nv": 2, "mel": 1, "df": 1}, "te")
    csvs = {}
    for name, part in (("train", train), ("val", val), ("test", test)):
        csvs[name] = tmp_path / f"{name}.csv"
        part.to_csv(csvs[name], index=False)
    return SplitData(
        train_csv=csvs["train"], val_csv=csvs["val"], test_csv=csvs["test"], seed=0,
        fingerprint="0" * 64, class_counts={},
    )


def test_run_oversample_touches_only_the_training_part(train_df, tmp_path):
    split = _split(tmp_path, train_df)
    out_dir = tmp_path / "oversampled"
    result = run_oversample(split, DataConfig(cache_workers=1), out_dir)
    assert result.n_added == 13
    assert result.class_counts_before["mel"] == 5 and result.class_counts_after["mel"] == 12
    out = pd.read_csv(result.train_csv)
    sources = set(out[SOURCE_IMAGE_COLUMN].dropna())
    assert sources <= set(train_df["image_id"])
    held_out = {*pd.read_csv(split.val_csv)["image_id"], *pd.read_csv(split.test_csv)["image_id"]}
    written = {p.stem.rsplit("_aug", 1)[0] for p in out_dir.rglob("*.jpg")}
    assert written <= set(train_df["image_id"]) and not written & held_out
    assert result.class_weights == class_weights(result.class_counts_after)


def test_run_oversample_refuses_a_leaky_split(train_df, tmp_path):
    split = _split(tmp_path, train_df)
    val = pd.read_csv(split.val_csv)
    val.loc[0, "lesion_id"] = train_df["lesion_id"].iloc[0]
    val.to_csv(split.val_csv, index=False)
    with pytest.raises(ValueError, match="shares 1 lesion"):
        run_oversample(split, DataConfig(cache_workers=1), tmp_path / "out")


def test_run_oversample_off_keeps_training_part(train_df, tmp_path):
    split = _split(tmp_path, train_df)
    result = run_oversample(
        split, DataConfig(oversample=False, class_weights=False), tmp_path / "out"
    )
    assert result.n_added == 0 and result.class_weights is None
    assert result.class_counts_after == result.class_counts_before


def test_class_weights_are_balanced_in_class_order():
    labels = ["nv"] * 6 + ["mel"] * 3 + ["df"]
    weights = class_weights(labels)
    assert len(weights) == len(CLASS_CODES)
    present = np.array(["df", "mel", "nv"])
    expected = dict(zip(present, compute_class_weight("balanced", classes=present, y=labels)))
    for code, weight in zip(CLASS_CODES, weights):
        assert weight == pytest.approx(expected.get(code, 1.0))  # absent classes: 1.0
    assert weights[CLASS_CODES.index("df")] == pytest.approx(10 / (3 * 1))
    assert class_weights({"nv": 6, "mel": 3, "df": 1, "bcc": 0}) == pytest.approx(weights)
    with pytest.raises(ValueError, match="unknown class"):
        class_weights(["nv", "melanoma"])
