"""The Dataverse client against a local fake Dataverse (tests/fake_dataverse.py)."""

from __future__ import annotations

import hashlib
import os
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_dataverse import DOI, FakeDataverse, FakeFile, Faults, ham_files

from skinsense.data.dataverse import (
    HAM10000_FILES,
    USER_AGENT,
    DataverseClient,
    FetchError,
    RetryPolicy,
    read_stamp,
)

PART_1 = 3172585
METADATA = 4338392
# Tiny waits so retries cost milliseconds; short read timeout for the stall test.
FAST = RetryPolicy(attempts=4, backoff_s=0.001, max_backoff_s=0.01, checksum_attempts=3,
                   connect_timeout_s=2, read_timeout_s=0.5)


@pytest.fixture
def files() -> list[FakeFile]:
    return ham_files()


@pytest.fixture
def faults() -> Faults:
    return Faults()


@pytest.fixture
def server(files: list[FakeFile], faults: Faults) -> Iterator[FakeDataverse]:
    with FakeDataverse(files, faults=faults) as fake:
        yield fake


def client_for(server: FakeDataverse, **kwargs: object) -> DataverseClient:
    # Small chunks: what arrived before a drop is kept, and the tiny fake files are a few KB.
    return DataverseClient(server.url, retry=kwargs.pop("retry", FAST),  # type: ignore[arg-type]
                           progress=False, chunk_size=256, **kwargs)  # type: ignore[arg-type]


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def by_name(files: list[FakeFile]) -> dict[str, FakeFile]:
    return {f.original_name or f.filename: f for f in files}


def assert_all_downloaded(paths: dict[str, Path], files: list[FakeFile]) -> None:
    expected = by_name(files)
    assert set(paths) == set(HAM10000_FILES)
    for name, path in paths.items():
        assert path.name == name
        assert md5(path) == expected[name].listed_md5
    folder = next(iter(paths.values())).parent
    assert not list(folder.glob("*.part"))


def test_full_download(server: FakeDataverse, files: list[FakeFile], tmp_path: Path) -> None:
    paths = client_for(server).fetch(DOI, HAM10000_FILES, tmp_path)

    assert_all_downloaded(paths, files)
    # The ingested metadata comes as the original CSV, under its original name.
    assert paths["HAM10000_metadata.csv"].read_bytes().startswith(b"lesion_id,image_id,dx")
    metadata_requests = server.file_requests(METADATA)
    assert [r.query.get("format") for r in metadata_requests] == [["original"]]
    assert all(r.headers["User-Agent"] == USER_AGENT for r in server.requests)
    # A stamp records the verified checksum so that the next run need not re-hash.
    assert read_stamp(paths["HAM10000_images_part_1.zip"]) == by_name(files)[
        "HAM10000_images_part_1.zip"].listed_md5


def test_listing_with_md5_field(files: list[FakeFile], tmp_path: Path) -> None:
    # Older Dataverse versions list `md5` instead of `checksum: {type, value}`; the listed
    # MD5 is still checked: a download with the wrong bytes is fetched again.
    faults = Faults()
    faults.corrupt_once.add(PART_1)
    with FakeDataverse(files, checksum_style="md5", faults=faults) as server:
        paths = client_for(server).fetch(DOI, HAM10000_FILES, tmp_path)
        assert len(server.file_requests(PART_1)) == 2
    assert_all_downloaded(paths, files)


def test_resume_after_dropped_connection(server: FakeDataverse, faults: Faults,
                                         files: list[FakeFile], tmp_path: Path) -> None:
    faults.drop_once.add(PART_1)

    paths = client_for(server).fetch(DOI, HAM10000_FILES, tmp_path)

    assert_all_downloaded(paths, files)
    first, second = server.file_requests(PART_1)
    assert "Range" not in first.headers
    size = len(by_name(files)["HAM10000_images_part_1.zip"].content)
    offset = int(second.headers["Range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < offset < size  # resumed from what had arrived, not from 0


def test_restart_when_server_ignores_range(server: FakeDataverse, faults: Faults,
                                           files: list[FakeFile], tmp_path: Path) -> None:
    faults.drop_once.add(PART_1)
    faults.ignore_range = True  # answers 200 with the whole file to a Range request

    paths = client_for(server).fetch(DOI, HAM10000_FILES, tmp_path)

    assert_all_downloaded(paths, files)
    assert "Range" in server.file_requests(PART_1)[1].headers


def test_resume_a_part_file_left_by_an_earlier_run(server: FakeDataverse, files: list[FakeFile],
                                                   tmp_path: Path) -> None:
    content = by_name(files)["HAM10000_images_part_1.zip"].content
    (tmp_path / "HAM10000_images_part_1.zip.part").write_bytes(content[:100])

    paths = client_for(server).fetch(DOI, HAM10000_FILES, tmp_path)

    assert_all_downloaded(paths, files)
    (only,) = server.file_requests(PART_1)
    assert only.headers["Range"] == "bytes=100-"


def test_md5_mismatch_then_good_download(server: FakeDataverse, faults: Faults,
                                         files: list[FakeFile], tmp_path: Path) -> None:
    faults.corrupt_once.add(PART_1)

    paths = client_for(server).fetch(DOI, HAM10000_FILES, tmp_path)

    assert_all_downloaded(paths, files)
    requests = server.file_requests(PART_1)
    assert len(requests) == 2
    assert "Range" not in requests[1].headers  # the bad file was deleted, not resumed


def test_md5_mismatch_every_time_is_a_clear_error(server: FakeDataverse, faults: Faults,
                                                  files: list[FakeFile], tmp_path: Path) -> None:
    faults.corrupt_always.add(PART_1)

    with pytest.raises(FetchError) as info:
        client_for(server).fetch(DOI, HAM10000_FILES, tmp_path)

    message = str(info.value)
    expected = by_name(files)["HAM10000_images_part_1.zip"].listed_md5
    assert "HAM10000_images_part_1.zip" in message and "MD5 mismatch" in message
    assert f"expected {expected}" in message and "got " in message
    assert len(server.file_requests(PART_1)) == FAST.checksum_attempts
    assert not (tmp_path / "HAM10000_images_part_1.zip").exists()
    assert not (tmp_path / "HAM10000_images_part_1.zip.part").exists()


def test_503_then_success(server: FakeDataverse, faults: Faults, files: list[FakeFile],
                          tmp_path: Path) -> None:
    faults.status_once[PART_1] = 503

    paths = client_for(server).fetch(DOI, HAM10000_FILES, tmp_path)

    assert_all_downloaded(paths, files)
    assert len(server.file_requests(PART_1)) == 2


def test_persistent_503_gives_up_after_bounded_tries(server: FakeDataverse, faults: Faults,
                                                     tmp_path: Path) -> None:
    faults.status_always[PART_1] = 503

    with pytest.raises(FetchError, match="HAM10000_images_part_1.zip failed 4 times.*503"):
        client_for(server).fetch(DOI, HAM10000_FILES, tmp_path)
    assert len(server.file_requests(PART_1)) == FAST.attempts


def test_read_timeout_is_retried(server: FakeDataverse, faults: Faults, files: list[FakeFile],
                                 tmp_path: Path) -> None:
    faults.stall_once.add(PART_1)
    faults.stall_s = 1.5  # longer than FAST.read_timeout_s

    paths = client_for(server).fetch(DOI, HAM10000_FILES, tmp_path)

    assert_all_downloaded(paths, files)
    # The stalled answer was given up on and asked for again (without a read timeout the
    # client would have waited out the stall and fetched the file once).
    assert len(server.file_requests(PART_1)) == 2


def test_redirect_to_object_storage(server: FakeDataverse, faults: Faults,
                                    files: list[FakeFile], tmp_path: Path) -> None:
    faults.redirect = True

    paths = client_for(server).fetch(DOI, HAM10000_FILES, tmp_path)

    assert_all_downloaded(paths, files)
    storage = [r for r in server.requests if r.path.startswith("/storage/")]
    assert len(storage) == 3
    # The query (format=original) survives the redirect.
    assert [r.query.get("format") for r in storage if r.file_id == METADATA] == [["original"]]


def test_resume_through_redirect_keeps_range(server: FakeDataverse, faults: Faults,
                                             files: list[FakeFile], tmp_path: Path) -> None:
    faults.redirect = True
    faults.drop_once.add(PART_1)

    paths = client_for(server).fetch(DOI, HAM10000_FILES, tmp_path)

    assert_all_downloaded(paths, files)
    storage = [r for r in server.file_requests(PART_1) if r.path.startswith("/storage/")]
    assert "Range" in storage[1].headers


def test_verified_files_are_not_downloaded_again(server: FakeDataverse, files: list[FakeFile],
                                                 tmp_path: Path) -> None:
    client = client_for(server)
    client.fetch(DOI, HAM10000_FILES, tmp_path)
    assert len(server.file_requests()) == 3

    paths = client.fetch(DOI, HAM10000_FILES, tmp_path)
    assert len(server.file_requests()) == 3  # only the listing was asked again
    assert_all_downloaded(paths, files)

    # Without a stamp the file is re-hashed, found good, and still not downloaded.
    (tmp_path / "HAM10000_images_part_1.zip.md5").unlink()
    client.fetch(DOI, HAM10000_FILES, tmp_path)
    assert len(server.file_requests()) == 3
    assert (tmp_path / "HAM10000_images_part_1.zip.md5").exists()


def test_a_changed_file_is_downloaded_again(server: FakeDataverse, files: list[FakeFile],
                                            tmp_path: Path) -> None:
    client = client_for(server)
    paths = client.fetch(DOI, HAM10000_FILES, tmp_path)
    damaged = paths["HAM10000_images_part_1.zip"]
    data = bytearray(damaged.read_bytes())
    data[10] ^= 0xFF
    damaged.write_bytes(bytes(data))
    os.utime(damaged, ns=(1, 1))  # mtime no longer matches the stamp

    paths = client.fetch(DOI, HAM10000_FILES, tmp_path)

    assert len(server.file_requests(PART_1)) == 2
    assert_all_downloaded(paths, files)


def test_listing_404_is_a_clear_error(server: FakeDataverse, tmp_path: Path) -> None:
    with pytest.raises(FetchError, match=r"no dataset doi:10\.5555/NOPE \(HTTP 404\).*DOI"):
        client_for(server).fetch("doi:10.5555/NOPE", HAM10000_FILES, tmp_path)


def test_listing_403_is_a_clear_error(server: FakeDataverse, faults: Faults,
                                      tmp_path: Path) -> None:
    faults.listing_status = 403
    with pytest.raises(FetchError, match=r"refused.*HTTP 403.*--source PATH"):
        client_for(server).fetch(DOI, HAM10000_FILES, tmp_path)


def test_unreachable_server_suggests_a_local_source(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = DataverseClient(f"http://127.0.0.1:{port}", retry=FAST, progress=False)
    with pytest.raises(FetchError, match=r"Cannot list dataset.*--source PATH"):
        client.fetch(DOI, HAM10000_FILES, tmp_path)


def test_missing_file_names_what_the_dataset_has(files: list[FakeFile], tmp_path: Path) -> None:
    without_part_2 = [f for f in files if f.filename != "HAM10000_images_part_2.zip"]
    with FakeDataverse(without_part_2) as server:
        with pytest.raises(FetchError, match=r"no file 'HAM10000_images_part_2.zip'.*"
                                             r"HAM10000_metadata\.tab"):
            client_for(server).fetch(DOI, HAM10000_FILES, tmp_path)


def test_fake_refuses_a_bare_urllib_user_agent(server: FakeDataverse) -> None:
    # Like Dataverse: the reason the client sends its own User-Agent.
    url = f"{server.url}/api/datasets/:persistentId/?persistentId={DOI}"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(url, timeout=5)
    assert info.value.code == 403
    info.value.close()


def test_progress_bar_does_not_break_download(server: FakeDataverse, files: list[FakeFile],
                                              tmp_path: Path) -> None:
    client = DataverseClient(server.url, retry=FAST, progress=True)
    assert_all_downloaded(client.fetch(DOI, HAM10000_FILES, tmp_path), files)
