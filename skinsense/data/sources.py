"""Turn any HAM10000 source into a `FetchedData` record: Dataverse, a local folder or a zip.

Sources understood (`DataConfig.source`):

- `'dataverse'`: the files are downloaded (`skinsense.data.dataverse`) into
  `home.downloads/<slug of the DOI>/` and then handled like a local folder.
- A folder or zip laid out like the Dataverse files: `HAM10000_images_part_1.zip`,
  `HAM10000_images_part_2.zip` and `HAM10000_metadata.csv` (or `.tab`, holding CSV or the
  ingested tab-separated text).
- The Kaggle copy (kmader/skin-cancer-mnist-ham10000), as a folder or its zip:
  `HAM10000_images_part_1/`, `HAM10000_images_part_2/` and `HAM10000_metadata.csv`. Extras
  (the lower-case duplicate folders, `hmnist_*.csv`) are ignored.

Either layout may sit at the top of the folder/zip or inside one top-level folder. With
`include_isic_test`, `ISIC2018_Task3_Test_Images.zip` (or a folder of that name) and
`ISIC2018_Task3_Test_GroundTruth.csv` (or `.tab`) must sit beside the HAM10000 files.

Where things end up (all under `home.images`, one set per source fingerprint `KEY`):

- `ham10000-KEY/`: flat folder of `ISIC_*.jpg`. Zips are extracted (basename only, unsafe
  member paths refused); the images of a Kaggle *folder* are hard-linked (copied across
  file systems), so no space is wasted and the user's files are never modified.
- `ham10000-KEY.metadata.csv`: only when the metadata cannot be used in place (inside a
  zip, or a `.tab`); a `.csv` on disk and the Dataverse download are used where they are.
- `isic2018-test-KEY/` and `isic2018-test-KEY.metadata.csv`: the ISIC 2018 Task 3 test
  images and their labels converted to HAM10000 metadata format.
- `NAME.done.json`: written last, after the folder was renamed into place from a temporary
  one; without it an interrupted extraction is redone. Downloads are never deleted.

`KEY` hashes the identity of the inputs: the MD5 of a verified download (from its stamp),
otherwise name, size and mtime (a 2.5 GB zip is not hashed for a key).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import zipfile
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Literal

from skinsense.config import DataConfig
from skinsense.data.dataverse import (
    HAM10000_FILES,
    ISIC_TEST_FILES,
    DataverseClient,
    FetchError,
    read_stamp,
)
from skinsense.data.records import METADATA_COLUMNS, FetchedData
from skinsense.paths import Home
from skinsense.processes import is_leftover

log = logging.getLogger(__name__)

_LAYOUT_VERSION = 1  # bump when the extracted layout changes, to rebuild old folders

PART_1, PART_2 = "HAM10000_images_part_1", "HAM10000_images_part_2"
METADATA_STEM = "HAM10000_metadata"
ISIC_IMAGES_STEM = "ISIC2018_Task3_Test_Images"
ISIC_TRUTH_STEM = "ISIC2018_Task3_Test_GroundTruth"
# Column order of the challenge's one-hot ground truth; dx is the column's lower-case code.
_ONE_HOT = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")

EXPECTED_LAYOUTS = (
    "Expected one of:\n"
    f"  - the Dataverse files, as a folder or a zip: {PART_1}.zip, {PART_2}.zip and "
    f"{METADATA_STEM}.csv (or .tab)\n"
    f"  - the Kaggle copy (kmader/skin-cancer-mnist-ham10000), as a folder or its zip: "
    f"{PART_1}/, {PART_2}/ and {METADATA_STEM}.csv\n"
    "(at the top or inside one top-level folder), or source='dataverse' to download them."
)


def fetch(cfg: DataConfig, home: Home, *, progress: bool = True) -> FetchedData:
    """Brings HAM10000 (and optionally the ISIC 2018 Task 3 test set) onto local disk.

    Idempotent: a second call with the same inputs downloads and extracts nothing.
    `cfg.refresh` re-hashes downloads and rebuilds the extracted folders.

    Args:
        cfg: Where the data comes from (`source`, `dataverse_url`, `doi`,
            `include_isic_test`, `refresh`).
        home: The `SKINSENSE_HOME` layout.
        progress: Show download progress bars (they also stay off when not a terminal).

    Returns:
        The metadata CSV and the flat image folder(s).

    Raises:
        FetchError: The source is missing, unreachable, corrupt or not laid out as expected;
            the message says what was expected and what to do.
    """
    home.images.mkdir(parents=True, exist_ok=True)
    if cfg.source.strip().lower() == "dataverse":
        download_dir = home.downloads / _slug(cfg.doi)
        names = HAM10000_FILES + (ISIC_TEST_FILES if cfg.include_isic_test else ())
        client = DataverseClient(cfg.dataverse_url, progress=progress)
        client.fetch(cfg.doi, names, download_dir, force_verify=cfg.refresh)
        return _from_source(_FolderSource(download_dir), cfg, home, label="dataverse")

    path = Path(cfg.source).expanduser()
    if not path.exists():
        raise FetchError(
            f"The data source {str(path)!r} does not exist. Pass the path of a folder or zip "
            f"holding HAM10000. {EXPECTED_LAYOUTS}"
        )
    path = path.resolve()
    if path.is_dir():
        return _from_source(_FolderSource(path), cfg, home, label=str(path))
    with _open_zip(path) as zf:
        return _from_source(_ZipSource(path, zf), cfg, home, label=str(path))


# -- sources: a folder or a zip behind one small interface -----------------------------------

Kind = Literal["file", "dir"]


class _Source(ABC):
    """A tree of files (a folder or a zip) the layouts are looked up in."""

    path: Path

    @abstractmethod
    def children(self, prefix: str) -> dict[str, Kind]:
        """Immediate children of folder `prefix` ('' or 'a/b/') -> kind."""

    def find(self, prefix: str, name: str, kind: Kind) -> str | None:
        """Relative path of child `name` of `prefix`: exact case first, then any case."""
        children = self.children(prefix)
        if children.get(name) == kind:
            return prefix + name
        for child, child_kind in sorted(children.items()):
            if child.lower() == name.lower() and child_kind == kind:
                return prefix + child
        return None

    def local_file(self, rel: str) -> Path | None:
        """A path on disk for file `rel`, when it is one (not inside a zip)."""
        return None

    @abstractmethod
    def open(self, rel: str) -> IO[bytes]:
        """A binary file object for file `rel`."""

    @abstractmethod
    def identity(self, rels: list[str]) -> object:
        """Something JSON-able that changes when the content of `rels` changes."""

    @abstractmethod
    def jpegs_into(self, rel: str, dest: Path) -> int:
        """Puts the JPEGs of zip file or folder `rel` into `dest`; returns how many."""


class _FolderSource(_Source):
    def __init__(self, path: Path) -> None:
        self.path = path

    def children(self, prefix: str) -> dict[str, Kind]:
        try:
            with os.scandir(self.path / prefix) as it:
                return {e.name: ("dir" if e.is_dir() else "file") for e in it}
        except OSError:
            return {}

    def local_file(self, rel: str) -> Path | None:
        return self.path / rel

    def open(self, rel: str) -> IO[bytes]:
        return (self.path / rel).open("rb")

    def identity(self, rels: list[str]) -> object:
        ids = []
        for rel in rels:
            p = self.path / rel
            if p.is_dir():  # a Kaggle image folder: its listing
                listing = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns)
                                 for e in os.scandir(p) if e.is_file())
                digest = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
                ids.append([rel, "listing", digest])
            else:
                md5 = read_stamp(p)
                stat = p.stat()
                ids.append([rel, "md5", md5] if md5 else [rel, stat.st_size, stat.st_mtime_ns])
        return ids

    def jpegs_into(self, rel: str, dest: Path) -> int:
        p = self.path / rel
        if p.is_file():
            with _open_zip(p) as zf:
                return _extract_jpegs(zf, p, dest)
        count = 0
        for entry in sorted(os.scandir(p), key=lambda e: e.name):
            name = _jpeg_name(entry.name)
            if name and entry.is_file() and not (dest / name).exists():
                _link_or_copy(Path(entry.path), dest / name)
                count += 1
        return count


class _ZipSource(_Source):
    def __init__(self, path: Path, zf: zipfile.ZipFile) -> None:
        self.path, self.zf = path, zf
        self._children: dict[str, dict[str, Kind]] = {}
        for info in zf.infolist():
            parts = _safe_parts(info.filename, path)
            for depth, part in enumerate(parts):
                prefix = "".join(p + "/" for p in parts[:depth])
                last = depth == len(parts) - 1
                kind: Kind = "file" if last and not info.is_dir() else "dir"
                self._children.setdefault(prefix, {}).setdefault(part, kind)
        self._members = {"/".join(_safe_parts(i.filename, path)): i for i in zf.infolist()}

    def children(self, prefix: str) -> dict[str, Kind]:
        return self._children.get(prefix, {})

    def open(self, rel: str) -> IO[bytes]:
        return self.zf.open(self._members[rel])

    def identity(self, rels: list[str]) -> object:
        stat = self.path.stat()  # the whole zip: hashing gigabytes for a key is not worth it
        return [self.path.name, stat.st_size, stat.st_mtime_ns, rels]

    def jpegs_into(self, rel: str, dest: Path) -> int:
        if rel in self._members and not self._members[rel].is_dir():
            # A zip inside the zip: copy it out first, as reading a nested deflated member
            # at random offsets would re-decompress it from the start for every image.
            with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".inner-") as tmp:
                inner = Path(tmp) / PurePosixPath(rel).name
                with _reading(self.path, rel), self.open(rel) as src, inner.open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                with _open_zip(inner, shown_as=f"{rel} inside {self.path}") as zf:
                    return _extract_jpegs(zf, self.path, dest)
        members = [i for name, i in self._members.items() if name.startswith(rel + "/")]
        return _extract_jpegs(self.zf, self.path, dest, members)


# -- layouts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    kind: Literal["dataverse", "kaggle"]
    part_1: str                 # zip file (dataverse) or folder (kaggle), relative path
    part_2: str
    metadata: str
    isic_images: str | None = None
    isic_truth: str | None = None


def _detect(source: _Source, include_isic_test: bool) -> _Layout:
    prefixes = [""] + [f"{name}/" for name, kind in sorted(source.children("").items())
                       if kind == "dir" and not name.startswith((".", "__MACOSX"))]
    for prefix in prefixes:
        layout = _layout_at(source, prefix)
        if layout is None:
            continue
        if include_isic_test:
            images = (source.find(prefix, f"{ISIC_IMAGES_STEM}.zip", "file")
                      or source.find(prefix, ISIC_IMAGES_STEM, "dir"))
            truth = (source.find(prefix, f"{ISIC_TRUTH_STEM}.csv", "file")
                     or source.find(prefix, f"{ISIC_TRUTH_STEM}.tab", "file"))
            if not (images and truth):
                raise FetchError(
                    f"include_isic_test is set, but {source.path} has no "
                    f"{'' if images else ISIC_IMAGES_STEM + '.zip (or folder) '}"
                    f"{'' if truth else ISIC_TRUTH_STEM + '.csv (or .tab) '}"
                    f"beside the HAM10000 files in {prefix or 'its top level'}. Add them, or "
                    "turn include_isic_test off."
                )
            layout = _Layout(layout.kind, layout.part_1, layout.part_2, layout.metadata,
                             images, truth)
        return layout
    found = sorted(source.children(""))
    shown = ", ".join(found[:12]) + (", ..." if len(found) > 12 else "") or "(nothing)"
    raise FetchError(
        f"{source.path} is not laid out like a HAM10000 source. Found: {shown}. "
        f"{EXPECTED_LAYOUTS}"
    )


def _layout_at(source: _Source, prefix: str) -> _Layout | None:
    zip_1 = source.find(prefix, f"{PART_1}.zip", "file")
    zip_2 = source.find(prefix, f"{PART_2}.zip", "file")
    metadata = (source.find(prefix, f"{METADATA_STEM}.csv", "file")
                or source.find(prefix, f"{METADATA_STEM}.tab", "file"))
    if zip_1 and zip_2 and metadata:
        return _Layout("dataverse", zip_1, zip_2, metadata)
    dir_1 = source.find(prefix, PART_1, "dir")
    dir_2 = source.find(prefix, PART_2, "dir")
    metadata_csv = source.find(prefix, f"{METADATA_STEM}.csv", "file")
    if dir_1 and dir_2 and metadata_csv:
        return _Layout("kaggle", dir_1, dir_2, metadata_csv)
    return None


def _from_source(source: _Source, cfg: DataConfig, home: Home, *, label: str) -> FetchedData:
    layout = _detect(source, cfg.include_isic_test)
    log.info("%s: %s layout", source.path, layout.kind)

    metadata_in_place = source.local_file(layout.metadata)
    if metadata_in_place is not None and not (
        metadata_in_place.suffix.lower() == ".csv" and _is_csv_file(metadata_in_place)
    ):
        metadata_in_place = None  # a .tab (tab-separated ingest, or CSV): write a .csv

    def fill(dest: Path) -> int:
        return source.jpegs_into(layout.part_1, dest) + source.jpegs_into(layout.part_2, dest)

    csvs: dict[str, Callable[[Path], None]] = {}
    if metadata_in_place is None:
        csvs["metadata.csv"] = lambda out: _write_metadata_csv(source, layout.metadata, out)
    key = _key(["ham10000", layout.kind, source.identity([layout.part_1, layout.part_2,
                                                          layout.metadata])])
    images_dir, written = _materialize(home, f"ham10000-{key}", fill, csvs, cfg.refresh)
    record = FetchedData(
        source=label,
        metadata_csv=metadata_in_place or written["metadata.csv"],
        images_dir=images_dir,
    )
    if layout.isic_images and layout.isic_truth:
        images_rel, truth_rel = layout.isic_images, layout.isic_truth
        key = _key(["isic2018-test", source.identity([images_rel, truth_rel])])
        test_dir, written = _materialize(
            home,
            f"isic2018-test-{key}",
            lambda dest: source.jpegs_into(images_rel, dest),
            {"metadata.csv": lambda out: _write_truth_csv(source, truth_rel, out)},
            cfg.refresh,
        )
        record.isic_test_images_dir = test_dir
        record.isic_test_metadata_csv = written["metadata.csv"]
    return record


# -- extraction ------------------------------------------------------------------------------


def _materialize(home: Home, name: str, fill: Callable[[Path], int],
                 csvs: dict[str, Callable[[Path], None]],
                 refresh: bool) -> tuple[Path, dict[str, Path]]:
    """Builds `home.images/NAME/` (+ `NAME.<csv>` files) once; returns them.

    The folder is filled under a temporary name and renamed into place; the stamp
    `NAME.done.json` is written last, so anything without a stamp is rebuilt.
    """
    root = home.images
    final = root / name
    stamp = root / f"{name}.done.json"
    outputs = {csv_name: root / f"{name}.{csv_name}" for csv_name in csvs}
    if not refresh and _stamp_ok(stamp, final, outputs):
        log.info("%s: already extracted", final)
        return final, outputs

    stamp.unlink(missing_ok=True)
    _remove_stale_temps(root, name)
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        count = fill(tmp)
        if count == 0:
            raise FetchError(
                f"No JPEG images found for {name}; the archives hold no ISIC_*.jpg files. "
                "Check the source, or delete it and download it again."
            )
        for csv_name, write in csvs.items():
            part = outputs[csv_name].with_name(outputs[csv_name].name + ".part")
            write(part)
            part.replace(outputs[csv_name])
        if final.exists():
            shutil.rmtree(final)  # an earlier, interrupted or refreshed build
        tmp.replace(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    stamp.write_text(json.dumps({"images": count, "layout_version": _LAYOUT_VERSION,
                                 "outputs": sorted(outputs)}))
    log.info("%s: %d images", final, count)
    return final, outputs


def _stamp_ok(stamp: Path, folder: Path, outputs: dict[str, Path]) -> bool:
    try:
        info = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return False
    if info.get("layout_version") != _LAYOUT_VERSION or not folder.is_dir():
        return False
    if not all(p.is_file() for p in outputs.values()):
        return False
    # Counting 10k directory entries is cheap and catches a folder someone emptied.
    return sum(1 for _ in os.scandir(folder)) == info.get("images")


def _remove_stale_temps(root: Path, name: str) -> None:
    """Removes temporary folders of interrupted runs whose process is gone."""
    for tmp in root.glob(f".tmp-{name}-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and is_leftover(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _extract_jpegs(zf: zipfile.ZipFile, archive: Path, dest: Path,
                   members: list[zipfile.ZipInfo] | None = None) -> int:
    """Extracts the JPEGs of a zip flat into `dest` (basename only; first copy wins)."""
    count = 0
    for info in members if members is not None else zf.infolist():
        parts = _safe_parts(info.filename, archive)  # raises on zip-slip paths
        name = _jpeg_name(parts[-1]) if parts and not info.is_dir() else None
        if name is None or "__MACOSX" in parts:
            continue
        try:
            with _reading(archive, info.filename), zf.open(info) as src, \
                    (dest / name).open("xb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except FileExistsError:
            continue  # the same image twice (e.g. the Kaggle zip's duplicate folders)
        count += 1
    return count


def _jpeg_name(basename: str) -> str | None:
    """`ISIC_0024306.jpg` for an image file name, None for anything else."""
    if basename.startswith(".") or not basename.lower().endswith((".jpg", ".jpeg")):
        return None
    return PurePosixPath(basename).stem + ".jpg"


def _safe_parts(member: str, archive: Path) -> list[str]:
    """Path components of a zip member, refusing absolute and `..` paths (zip-slip)."""
    name = member.replace("\\", "/")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in parts:
        raise FetchError(
            f"{archive} contains an unsafe path {member!r} (absolute or with '..'); refusing "
            "to extract it. The archive is not a genuine HAM10000 archive: delete it and "
            "download it again."
        )
    return parts


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # same file system: no copy, and survives moving the source
    except OSError:
        shutil.copy2(src, dst)


@contextmanager
def _open_zip(path: Path, *, shown_as: str | None = None) -> Iterator[zipfile.ZipFile]:
    what = shown_as or str(path)
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise FetchError(
            f"{what} is not a valid zip file ({exc}); it is probably an incomplete or corrupt "
            "download. Delete it and download it again."
        ) from exc
    except OSError as exc:
        raise FetchError(f"Cannot read {what}: {exc}") from exc
    with zf:
        yield zf


@contextmanager
def _reading(archive: Path, member: str) -> Iterator[None]:
    """Turns the errors of a damaged archive into a FetchError naming it."""
    try:
        yield
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise FetchError(
            f"{archive} is damaged: reading {member!r} failed ({exc}). Delete it and "
            "download it again."
        ) from exc


# -- metadata --------------------------------------------------------------------------------


def _read_text(source: _Source, rel: str) -> str:
    with _reading(source.path, rel), source.open(rel) as fh:
        return fh.read().decode("utf-8-sig")


def _rows(text: str) -> list[dict[str, str]]:
    """Rows of a CSV or of Dataverse's tab-separated ingest, keys stripped and lower-case."""
    header = text.split("\n", 1)[0]
    delimiter = "\t" if header.count("\t") > header.count(",") else ","
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    return [{(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
            for row in reader]


def _is_csv_file(path: Path) -> bool:
    with path.open("rb") as fh:
        header = fh.readline().decode("utf-8-sig", errors="replace")
    return header.count(",") >= header.count("\t") and "image_id" in header


def _write_metadata_csv(source: _Source, rel: str, out: Path) -> None:
    """Writes the HAM10000 metadata as CSV; converts Dataverse's tab-separated ingest."""
    with _reading(source.path, rel), source.open(rel) as fh:
        raw = fh.read()
    text = raw.decode("utf-8-sig")
    if _rows_header_is_csv(text):
        out.write_bytes(raw)  # already the original CSV: keep it byte for byte
        return
    rows = _rows(text)
    _require_columns(rows, ("lesion_id", "image_id", "dx"), f"{source.path}/{rel}")
    _write_rows(out, rows)


def _rows_header_is_csv(text: str) -> bool:
    header = text.split("\n", 1)[0]
    return header.count(",") >= header.count("\t")


def _write_truth_csv(source: _Source, rel: str, out: Path) -> None:
    """Writes ISIC 2018 Task 3 test labels in HAM10000 metadata format.

    Accepts the metadata format (lesion_id,image_id,dx,...) and the challenge's one-hot
    format (image,MEL,NV,BCC,AKIEC,BKL,DF,VASC); unknown lesion ids become the image id.
    """
    rows = _rows(_read_text(source, rel))
    where = f"{source.path}/{rel}"
    if rows and "image_id" in rows[0] and "dx" in rows[0]:
        converted = [{**r, "dx": r["dx"].lower(),
                      "lesion_id": r.get("lesion_id") or r["image_id"]} for r in rows]
    elif rows and "image" in rows[0] and all(c.lower() in rows[0] for c in _ONE_HOT):
        converted = []
        for r in rows:
            scores = {c: _as_float(r[c.lower()], where) for c in _ONE_HOT}
            dx = max(scores, key=scores.__getitem__).lower()
            converted.append({"lesion_id": r["image"], "image_id": r["image"], "dx": dx})
    else:
        raise FetchError(
            f"{where} is neither HAM10000 metadata (lesion_id,image_id,dx,...) nor the ISIC "
            f"2018 one-hot ground truth (image,{','.join(_ONE_HOT)}); columns found: "
            f"{sorted(rows[0]) if rows else 'none'}."
        )
    _write_rows(out, converted)


def _as_float(value: str, where: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise FetchError(f"{where}: {value!r} is not a number in a one-hot column") from None


def _require_columns(rows: list[dict[str, str]], columns: tuple[str, ...], where: str) -> None:
    missing = [c for c in columns if not rows or c not in rows[0]]
    if missing:
        raise FetchError(f"{where} lacks the column(s) {missing}; is it HAM10000 metadata?")


def _write_rows(out: Path, rows: list[dict[str, str]]) -> None:
    with out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(METADATA_COLUMNS), extrasaction="ignore",
                                restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


# -- small helpers ---------------------------------------------------------------------------


def _slug(text: str) -> str:
    """`doi:10.7910/DVN/DBW86T` -> `doi-10.7910-DVN-DBW86T` (a safe folder name)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "dataset"


def _key(parts: object) -> str:
    payload = json.dumps([_LAYOUT_VERSION, parts], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
