"""`skinsense.data.sources.fetch` on every kind of source: Dataverse, folders and zips."""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_dataverse import (
    ISIC_TEST_IDS,
    PART_1_IDS,
    PART_2_IDS,
    FakeDataverse,
    FakeFile,
    ham_files,
    images_zip,
    jpeg_bytes,
    metadata_csv,
    zip_bytes,
)

from skinsense.config import DataConfig
from skinsense.data.dataverse import FetchError
from skinsense.data.records import METADATA_COLUMNS, FetchedData
from skinsense.data.sources import fetch
from skinsense.paths import Home

ALL_IDS = PART_1_IDS + PART_2_IDS
METADATA = metadata_csv(ALL_IDS)


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return Home(tmp_path / "home")


def image_ids(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.iterdir())


def assert_ham10000(data: FetchedData) -> None:
    assert image_ids(data.images_dir) == sorted(ALL_IDS)
    assert all(p.suffix == ".jpg" and p.is_file() for p in data.images_dir.iterdir())
    assert data.metadata_csv.suffix == ".csv"
    assert data.metadata_csv.read_bytes() == METADATA


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def dataverse_folder(root: Path, *, metadata_name: str = "HAM10000_metadata.csv",
                     metadata: bytes = METADATA) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "HAM10000_images_part_1.zip").write_bytes(images_zip(PART_1_IDS))
    (root / "HAM10000_images_part_2.zip").write_bytes(images_zip(PART_2_IDS))
    (root / metadata_name).write_bytes(metadata)
    return root


def kaggle_members(prefix: str = "") -> dict[str, bytes]:
    members = {f"{prefix}HAM10000_metadata.csv": METADATA,
               f"{prefix}hmnist_28_28_RGB.csv": b"pixel0000,label\n1,2\n"}
    for folder, ids in (("HAM10000_images_part_1", PART_1_IDS),
                        ("HAM10000_images_part_2", PART_2_IDS)):
        for n, image_id in enumerate(ids):
            members[f"{prefix}{folder}/{image_id}.jpg"] = jpeg_bytes(n)
            # The Kaggle zip holds lower-case duplicates of both folders.
            members[f"{prefix}{folder.lower()}/{image_id}.jpg"] = jpeg_bytes(n)
    return members


# -- Dataverse -------------------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[FakeDataverse]:
    with FakeDataverse(ham_files(include_isic_test=True)) as fake:
        yield fake


def test_dataverse_source(server: FakeDataverse, home: Home) -> None:
    cfg = DataConfig(source="dataverse", dataverse_url=server.url)

    data = fetch(cfg, home, progress=False)

    assert data.source == "dataverse"
    assert_ham10000(data)
    # The verified download is used in place, under the downloads folder.
    assert data.metadata_csv == home.downloads / "doi-10.7910-DVN-DBW86T" / "HAM10000_metadata.csv"
    assert data.images_dir.parent == home.images
    assert data.isic_test_images_dir is None and data.isic_test_metadata_csv is None
    assert len(server.file_requests()) == 3

    # Idempotent: nothing downloaded or extracted again.
    stamp = data.images_dir.with_name(data.images_dir.name + ".done.json")
    before = stamp.stat().st_mtime_ns
    again = fetch(cfg, home, progress=False)
    assert again == data
    assert len(server.file_requests()) == 3
    assert stamp.stat().st_mtime_ns == before


def test_dataverse_with_isic_test_one_hot_truth(server: FakeDataverse, home: Home) -> None:
    cfg = DataConfig(source="dataverse", dataverse_url=server.url, include_isic_test=True)

    data = fetch(cfg, home, progress=False)

    assert_ham10000(data)
    assert data.isic_test_images_dir is not None and data.isic_test_metadata_csv is not None
    assert image_ids(data.isic_test_images_dir) == sorted(ISIC_TEST_IDS)
    rows = read_rows(data.isic_test_metadata_csv)
    assert list(rows[0]) == list(METADATA_COLUMNS)
    # one_hot_truth_csv marks column n % 7 of (MEL, NV, BCC, ...).
    assert [(r["image_id"], r["lesion_id"], r["dx"]) for r in rows] == [
        (ISIC_TEST_IDS[0], ISIC_TEST_IDS[0], "mel"),
        (ISIC_TEST_IDS[1], ISIC_TEST_IDS[1], "nv"),
        (ISIC_TEST_IDS[2], ISIC_TEST_IDS[2], "bcc"),
    ]
    assert rows[0]["age"] == "" and rows[0]["sex"] == ""


def test_dataverse_with_isic_truth_in_metadata_format(home: Home) -> None:
    truth = (b"lesion_id,image_id,dx,dx_type,age,sex,localization,dataset\n"
             b"HAM_7000001,ISIC_0034524,NV,histo,45.0,female,back,rosendahl\n"
             b",ISIC_0034525,mel,histo,,male,face,rosendahl\n")
    with FakeDataverse(ham_files(include_isic_test=True, truth=truth)) as server:
        cfg = DataConfig(source="dataverse", dataverse_url=server.url, include_isic_test=True)
        data = fetch(cfg, home, progress=False)

    assert data.isic_test_metadata_csv is not None
    rows = read_rows(data.isic_test_metadata_csv)
    assert [(r["lesion_id"], r["dx"], r["sex"]) for r in rows] == [
        ("HAM_7000001", "nv", "female"), ("ISIC_0034525", "mel", "male")]


# -- local folders and zips ------------------------------------------------------------------


def test_dataverse_layout_folder(tmp_path: Path, home: Home) -> None:
    source = dataverse_folder(tmp_path / "dl")

    data = fetch(DataConfig(source=str(source)), home, progress=False)

    assert data.source == str(source)
    assert_ham10000(data)
    assert data.metadata_csv == source / "HAM10000_metadata.csv"  # used in place
    assert sorted(p.name for p in source.iterdir()) == [  # the source is left alone
        "HAM10000_images_part_1.zip", "HAM10000_images_part_2.zip", "HAM10000_metadata.csv"]


def test_dataverse_layout_folder_with_ingested_tab(tmp_path: Path, home: Home) -> None:
    # The .tab Dataverse serves without ?format=original: tab-separated, strings quoted.
    tab = b"".join(
        b"\t".join(b'"%s"' % v if not v.replace(b".", b"").isdigit() else v
                   for v in line.split(b",")) + b"\n"
        for line in METADATA.splitlines())
    source = dataverse_folder(tmp_path / "dl", metadata_name="HAM10000_metadata.tab",
                              metadata=tab)

    data = fetch(DataConfig(source=str(source)), home, progress=False)

    assert_ham10000(data)  # converted back to the original CSV's rows
    assert data.metadata_csv.parent == home.images


def test_dataverse_layout_in_a_zip(tmp_path: Path, home: Home) -> None:
    members = {f"HAM10000/{p.name}": p.read_bytes()
               for p in dataverse_folder(tmp_path / "dl").iterdir()}
    source = tmp_path / "ham10000.zip"
    source.write_bytes(zip_bytes(members))

    data = fetch(DataConfig(source=str(source)), home, progress=False)

    assert_ham10000(data)
    assert not [p for p in home.images.iterdir() if p.name.startswith(".")]  # no temp left


def test_kaggle_folder(tmp_path: Path, home: Home) -> None:
    source = tmp_path / "kaggle"
    for name, data in kaggle_members().items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(data)

    data = fetch(DataConfig(source=str(source)), home, progress=False)

    assert_ham10000(data)
    assert data.metadata_csv == source / "HAM10000_metadata.csv"
    image = data.images_dir / f"{PART_1_IDS[0]}.jpg"
    original = source / "HAM10000_images_part_1" / f"{PART_1_IDS[0]}.jpg"
    assert image.read_bytes() == original.read_bytes()


@pytest.mark.parametrize("prefix", ["", "skin-cancer-mnist-ham10000/"])
def test_kaggle_zip(tmp_path: Path, home: Home, prefix: str) -> None:
    source = tmp_path / "archive.zip"
    source.write_bytes(zip_bytes(kaggle_members(prefix)))

    data = fetch(DataConfig(source=str(source)), home, progress=False)

    assert_ham10000(data)
    assert data.metadata_csv.parent == home.images


def test_a_second_fetch_reuses_and_a_missing_stamp_rebuilds(tmp_path: Path, home: Home) -> None:
    cfg = DataConfig(source=str(dataverse_folder(tmp_path / "dl")))
    data = fetch(cfg, home, progress=False)
    marker = data.images_dir / "left-by-an-interrupted-run"

    marker.write_bytes(b"")
    data.images_dir.with_name(data.images_dir.name + ".done.json").unlink()
    again = fetch(cfg, home, progress=False)

    assert again == data
    assert not marker.exists()  # the folder was rebuilt
    assert_ham10000(again)


def test_local_isic_test_files(tmp_path: Path, home: Home, server: FakeDataverse) -> None:
    source = dataverse_folder(tmp_path / "dl")
    by_name = {f.original_name or f.filename: f for f in server.files.values()}
    for name in ("ISIC2018_Task3_Test_Images.zip", "ISIC2018_Task3_Test_GroundTruth.csv"):
        (source / name).write_bytes(by_name[name].content)

    data = fetch(DataConfig(source=str(source), include_isic_test=True), home, progress=False)

    assert data.isic_test_images_dir is not None and data.isic_test_metadata_csv is not None
    assert image_ids(data.isic_test_images_dir) == sorted(ISIC_TEST_IDS)
    assert len(read_rows(data.isic_test_metadata_csv)) == len(ISIC_TEST_IDS)


# -- clear errors ----------------------------------------------------------------------------


def test_missing_isic_test_files_are_named(tmp_path: Path, home: Home) -> None:
    cfg = DataConfig(source=str(dataverse_folder(tmp_path / "dl")), include_isic_test=True)
    with pytest.raises(FetchError, match=r"ISIC2018_Task3_Test_Images\.zip.*"
                                         r"ISIC2018_Task3_Test_GroundTruth\.csv"):
        fetch(cfg, home, progress=False)


def test_a_zip_that_is_not_a_zip(tmp_path: Path, home: Home) -> None:
    source = tmp_path / "HAM10000.zip"
    source.write_bytes(b"<html>Service Unavailable</html>")
    with pytest.raises(FetchError, match=rf"{source}.*not a valid zip.*[Dd]elete it"):
        fetch(DataConfig(source=str(source)), home, progress=False)


def test_a_corrupt_image_zip_in_a_folder_is_named(tmp_path: Path, home: Home) -> None:
    source = dataverse_folder(tmp_path / "dl")
    (source / "HAM10000_images_part_2.zip").write_bytes(b"truncated download")
    with pytest.raises(FetchError, match=r"HAM10000_images_part_2\.zip is not a valid zip"):
        fetch(DataConfig(source=str(source)), home, progress=False)
    assert not [p for p in home.images.iterdir() if p.name.startswith(".tmp")]


def test_a_path_that_does_not_exist(tmp_path: Path, home: Home) -> None:
    with pytest.raises(FetchError, match=r"(?s)does not exist.*HAM10000_images_part_1\.zip"):
        fetch(DataConfig(source=str(tmp_path / "nowhere")), home, progress=False)


def test_an_unknown_layout_lists_what_was_expected(tmp_path: Path, home: Home) -> None:
    source = tmp_path / "photos"
    source.mkdir()
    (source / "HAM10000_images_part_1.zip").write_bytes(images_zip(PART_1_IDS))
    (source / "notes.txt").write_text("hello")
    with pytest.raises(FetchError) as info:
        fetch(DataConfig(source=str(source)), home, progress=False)
    message = str(info.value)
    assert "not laid out like a HAM10000 source" in message
    assert "Found: HAM10000_images_part_1.zip, notes.txt" in message
    assert "HAM10000_images_part_2.zip" in message and "Kaggle" in message


def test_zip_slip_is_refused(tmp_path: Path, home: Home) -> None:
    members = kaggle_members()
    members["HAM10000_images_part_1/../../../evil.jpg"] = jpeg_bytes(0)
    source = tmp_path / "archive.zip"
    source.write_bytes(zip_bytes(members))
    with pytest.raises(FetchError, match="unsafe path"):
        fetch(DataConfig(source=str(source)), home, progress=False)
    assert not (tmp_path / "evil.jpg").exists()


def test_fake_file_md5_matches_the_listing() -> None:
    # Guards the fixtures: the listed MD5 is the original file's.
    f = FakeFile(1, "x.tab", b"a,b\n", original_name="x.csv")
    assert f.listing("checksum")["dataFile"]["checksum"]["value"] == hashlib.md5(
        b"a,b\n").hexdigest()
