"""Schema checks of the metadata, image validation and the dataset fingerprint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from skinsense.data import metadata as metadata_module
from skinsense.data.metadata import (
    DataValidationError,
    MetadataError,
    dataset_fingerprint,
    load_metadata,
    validate,
)
from skinsense.data.records import IMAGE_PATH_COLUMN, METADATA_COLUMNS, FetchedData
from skinsense.labels import CLASS_CODES

FIXTURE = Path(__file__).parent / "fixtures" / "HAM10000_metadata.csv"


@pytest.fixture(autouse=True)
def _no_rng_leak():
    state = torch.get_rng_state()
    yield
    assert torch.equal(state, torch.get_rng_state()), "test leaked torch RNG state"


def _rows(n_per_class: int = 2, prefix: str = "ISIC_00") -> list[dict]:
    rows = []
    for c, dx in enumerate(CLASS_CODES):
        for j in range(n_per_class):
            rows.append({
                "lesion_id": f"HAM_{c}{j:04d}", "image_id": f"{prefix}{c}{j:04d}", "dx": dx,
                "dx_type": "histo", "age": 45.0, "sex": "female", "localization": "back",
                "dataset": "synthetic",
            })
    return rows


def _write_jpeg(path: Path, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (45, 60, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)


def _dataset(root: Path, rows: list[dict] | None = None, name: str = "meta") -> FetchedData:
    rows = _rows() if rows is None else rows
    images = root / f"{name}_images"
    images.mkdir(parents=True)
    for i, row in enumerate(rows):
        _write_jpeg(images / f"{row['image_id']}.jpg", seed=i)
    csv = root / f"{name}.csv"
    pd.DataFrame(rows, columns=list(METADATA_COLUMNS)).to_csv(csv, index=False)
    return FetchedData(source="local", metadata_csv=csv, images_dir=images)


def _write_csv(path: Path, rows: list[dict], columns=METADATA_COLUMNS) -> Path:
    pd.DataFrame(rows)[list(columns)].to_csv(path, index=False)
    return path


# --- load_metadata -----------------------------------------------------------------------


def test_real_metadata_loads():
    df = load_metadata(FIXTURE)
    assert len(df) == 10_015
    assert df["lesion_id"].nunique() == 7_470
    assert df["dx"].value_counts().to_dict() == {
        "nv": 6705, "mel": 1113, "bkl": 1099, "bcc": 514, "akiec": 327, "vasc": 142, "df": 115,
    }


def test_missing_column_lists_missing_and_expected(tmp_path):
    csv = _write_csv(tmp_path / "m.csv", _rows(), [c for c in METADATA_COLUMNS if c != "dx"])
    with pytest.raises(MetadataError) as err:
        load_metadata(csv)
    message = str(err.value)
    assert str(csv) in message
    assert "['dx']" in message
    assert str(list(METADATA_COLUMNS)) in message


def test_bad_dx_names_file_and_line(tmp_path):
    rows = _rows()
    rows[3]["dx"] = "melanoma"
    csv = _write_csv(tmp_path / "m.csv", rows)
    with pytest.raises(MetadataError) as err:
        load_metadata(csv)
    message = str(err.value)
    assert str(csv) in message and "line 5" in message and "'melanoma'" in message
    assert "akiec" in message  # tells which classes are allowed


def test_duplicate_image_id_names_both_lines(tmp_path):
    rows = _rows()
    rows[6]["image_id"] = rows[1]["image_id"]
    rows[6]["lesion_id"], rows[6]["dx"] = rows[1]["lesion_id"], rows[1]["dx"]
    csv = _write_csv(tmp_path / "m.csv", rows)
    with pytest.raises(MetadataError, match="duplicate image_id") as err:
        load_metadata(csv)
    assert "line 3" in str(err.value) and "line 8" in str(err.value)


@pytest.mark.parametrize("column", ["lesion_id", "image_id"])
def test_empty_id_is_an_error(tmp_path, column):
    rows = _rows()
    rows[2][column] = ""
    csv = _write_csv(tmp_path / "m.csv", rows)
    with pytest.raises(MetadataError, match=f"empty {column}") as err:
        load_metadata(csv)
    assert "line 4" in str(err.value)


def test_lesion_with_two_dx_is_an_error(tmp_path):
    rows = _rows()
    rows[1]["lesion_id"] = rows[0]["lesion_id"]
    rows[1]["dx"] = "mel"
    csv = _write_csv(tmp_path / "m.csv", rows)
    with pytest.raises(MetadataError, match="different dx") as err:
        load_metadata(csv)
    assert rows[0]["lesion_id"] in str(err.value) and str(csv) in str(err.value)


def test_missing_metadata_file_says_to_fetch(tmp_path):
    with pytest.raises(MetadataError, match="skinsense fetch"):
        load_metadata(tmp_path / "nope.csv")
    header_only = tmp_path / "header.csv"
    header_only.write_text(",".join(METADATA_COLUMNS) + "\n")
    with pytest.raises(MetadataError, match="no rows"):
        load_metadata(header_only)


# --- validate ------------------------------------------------------------------------------


def test_validate_writes_manifest_with_absolute_paths(tmp_path):
    fetched = _dataset(tmp_path)
    result = validate(fetched, out_dir=tmp_path / "out", max_bad_fraction=0.0, workers=1)
    manifest = pd.read_csv(result.manifest_csv)
    assert list(manifest.columns) == [*METADATA_COLUMNS, IMAGE_PATH_COLUMN]
    assert result.n_images == len(manifest) == 14 and result.n_bad == 0
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in manifest[IMAGE_PATH_COLUMN])
    assert result.class_counts == {code: 2 for code in CLASS_CODES}
    assert result.isic_test_manifest_csv is None


def test_missing_and_corrupt_images_are_reported_and_left_out(tmp_path, monkeypatch):
    fetched = _dataset(tmp_path)
    rows = _rows()
    missing, truncated, garbage = (rows[i]["image_id"] for i in (0, 5, 9))
    (fetched.images_dir / f"{missing}.jpg").unlink()
    path = fetched.images_dir / f"{truncated}.jpg"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    (fetched.images_dir / f"{garbage}.jpg").write_bytes(b"not a jpeg at all")
    # Small chunks so the process pool really runs with two workers.
    monkeypatch.setattr(metadata_module, "_CHUNK_SIZE", 3)

    result = validate(fetched, out_dir=tmp_path / "out", max_bad_fraction=0.25, workers=2)

    assert result.n_bad == 3 and result.n_images == 11
    reasons = dict(b.split(": ", 1) for b in result.bad_images)
    assert reasons[missing] == "missing"
    assert reasons[truncated].startswith("corrupt") and reasons[garbage].startswith("corrupt")
    kept = set(pd.read_csv(result.manifest_csv)["image_id"])
    assert not kept & {missing, truncated, garbage}


def test_too_many_bad_images_is_an_error(tmp_path):
    fetched = _dataset(tmp_path)
    for row in _rows()[:3]:
        (fetched.images_dir / f"{row['image_id']}.jpg").unlink()
    with pytest.raises(DataValidationError) as err:
        validate(fetched, out_dir=tmp_path / "out", max_bad_fraction=0.1, workers=1)
    message = str(err.value)
    assert "3 of 14" in message and _rows()[0]["image_id"] in message
    assert "skinsense fetch --refresh" in message and "max_bad_fraction" in message
    assert not (tmp_path / "out" / "manifest.csv").exists()


def test_isic_test_set_is_validated_into_its_own_manifest(tmp_path):
    fetched = _dataset(tmp_path)
    test = _dataset(tmp_path, _rows(1, prefix="ISIC_09"), name="isic")
    fetched = fetched.model_copy(update={
        "isic_test_metadata_csv": test.metadata_csv, "isic_test_images_dir": test.images_dir,
    })
    without = validate(
        FetchedData(source="local", metadata_csv=fetched.metadata_csv,
                    images_dir=fetched.images_dir),
        out_dir=tmp_path / "a", max_bad_fraction=0.0, workers=1,
    )
    result = validate(fetched, out_dir=tmp_path / "b", max_bad_fraction=0.0, workers=1)
    assert result.isic_test_manifest_csv.name == "isic_test_manifest.csv"
    assert len(pd.read_csv(result.isic_test_manifest_csv)) == 7
    assert result.fingerprint != without.fingerprint  # the test set is part of the data


# --- fingerprint ---------------------------------------------------------------------------


def test_fingerprint_is_stable_and_changes_with_one_image_byte(tmp_path):
    fetched = _dataset(tmp_path)
    first = validate(fetched, out_dir=tmp_path / "a", max_bad_fraction=0.0, workers=1)
    again = validate(fetched, out_dir=tmp_path / "b", max_bad_fraction=0.0, workers=2)
    assert first.fingerprint == again.fingerprint

    path = fetched.images_dir / f"{_rows()[4]['image_id']}.jpg"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    changed = validate(fetched, out_dir=tmp_path / "c", max_bad_fraction=0.5, workers=1)
    assert changed.fingerprint != first.fingerprint


def test_fingerprint_function():
    hashes = {"ISIC_1": "aa", "ISIC_2": "bb"}
    base = dataset_fingerprint(b"meta", hashes)
    assert base == dataset_fingerprint(b"meta", dict(reversed(hashes.items())))
    assert base != dataset_fingerprint(b"meta!", hashes)
    assert base != dataset_fingerprint(b"meta", {**hashes, "ISIC_2": "bc"})
    assert base != dataset_fingerprint(b"meta", {"ISIC_1": "aa"})
    assert len(base) == 64
