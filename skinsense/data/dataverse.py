"""A small, robust client for Harvard Dataverse: list a dataset's files and download them.

Only what fetching HAM10000 needs, done carefully:

- a real User-Agent (Dataverse answers 403 to a bare urllib one) and redirects followed
  (downloads may be redirected to object storage);
- ingested tabular files (`.tab`) are fetched with `?format=original`, saved under their
  original name (`HAM10000_metadata.csv`) and checked against the listed checksum, which
  Dataverse computes on the original upload;
- downloads go to `NAME.part`, resume with `Range: bytes=N-` after a dropped connection,
  are checked against the listed MD5 and only then renamed to `NAME`;
- 5xx answers, timeouts, connection errors and truncated bodies are retried with bounded
  exponential backoff; a checksum mismatch deletes the file and downloads it again, a
  bounded number of times;
- a verified file gets a sidecar stamp `NAME.md5` (JSON: checksum, size, mtime). While
  size and mtime still match the stamp, later runs trust it instead of re-hashing 2.5 GB;
  `force_verify=True` (the pipeline's `refresh`) re-hashes anyway.

Every failure the user can act on is a `FetchError` whose message says what went wrong
and what to do. Imports only the standard library and requests (tqdm lazily, for the
progress bar).
requests too is imported on first use, so that `skinsense.data.sources` (and `FetchError`)
work for local sources on a machine without it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import requests

log = logging.getLogger(__name__)

USER_AGENT = "skinsense/0.1 (+https://github.com/skinsense/skinsense; python-requests)"

# Names on local disk (tabular files under their original name), as the pipeline wants them.
HAM10000_FILES: tuple[str, ...] = (
    "HAM10000_images_part_1.zip",
    "HAM10000_images_part_2.zip",
    "HAM10000_metadata.csv",
)
ISIC_TEST_FILES: tuple[str, ...] = (
    "ISIC2018_Task3_Test_Images.zip",
    "ISIC2018_Task3_Test_GroundTruth.csv",
)

LOCAL_SOURCE_HINT = (
    "If you cannot reach Dataverse, download the files elsewhere and pass a local copy "
    "(`skinsense pipeline --data-source PATH`, `skinsense fetch --source PATH`, "
    "DataConfig.source): a folder or zip holding HAM10000_images_part_1.zip, "
    "HAM10000_images_part_2.zip and HAM10000_metadata.csv, or the Kaggle copy "
    "(kmader/skin-cancer-mnist-ham10000)."
)

# Dataverse checksum type names -> hashlib names.
_HASHLIB_NAMES = {"MD5": "md5", "SHA-1": "sha1", "SHA-256": "sha256", "SHA-512": "sha512"}
_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_TABULAR_SUFFIXES = {"text/csv": ".csv", "text/comma-separated-values": ".csv",
                     "text/tab-separated-values": ".tsv"}


class FetchError(RuntimeError):
    """Data could not be fetched; the message says why and what to do about it."""


class _RetryableError(Exception):
    """A failure worth another try (5xx, truncated body); internal to the retry loop."""


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try before giving up.

    Attributes:
        attempts: Tries per request for transient failures (5xx, timeouts, dropped
            connections). Tries that got further into a file than any before do not count,
            so a long download over a flaky link still finishes.
        backoff_s: First wait between tries; doubles each time.
        max_backoff_s: Upper bound of one wait.
        checksum_attempts: Full downloads of one file before a checksum mismatch is fatal.
        connect_timeout_s: Seconds to wait for a connection.
        read_timeout_s: Seconds to wait for the next bytes of an answer.
    """

    attempts: int = 6
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    checksum_attempts: int = 3
    connect_timeout_s: float = 15.0
    read_timeout_s: float = 60.0

    def delay(self, failures: int) -> float:
        """Seconds to wait after the `failures`-th consecutive failure (1-based)."""
        return min(self.max_backoff_s, self.backoff_s * 2 ** max(0, failures - 1))


@dataclass(frozen=True)
class DataverseFile:
    """One file of a dataset, as listed by the Dataverse API.

    Attributes:
        id: The datafile id (`/api/access/datafile/{id}`).
        name: The name to save it under: the original name for an ingested tabular file.
        listed_name: The name Dataverse lists (`HAM10000_metadata.tab`).
        tabular: Ingested tabular file; downloaded with `?format=original`.
        size: Expected bytes of the download, when listed.
        checksum: Expected checksum (lower-case hex), when listed.
        checksum_type: hashlib name of the checksum ('md5' for HAM10000).
        content_type: The listed content type.
    """

    id: int
    name: str
    listed_name: str
    tabular: bool = False
    size: int | None = None
    checksum: str | None = None
    checksum_type: str = "md5"
    content_type: str = ""

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> DataverseFile:
        """Builds a record from one element of `data.latestVersion.files`."""
        df = entry.get("dataFile") or {}
        listed = str(df.get("filename") or entry.get("label") or "")
        original = df.get("originalFileName")
        tabular = bool(df.get("tabularData") or df.get("originalFileFormat") or original)
        name = listed
        if tabular:
            if original:
                name = str(original)
            else:  # older installations list the format but not the original name
                suffix = _TABULAR_SUFFIXES.get(str(df.get("originalFileFormat", "")), "")
                name = str(PurePosixPath(listed).with_suffix(suffix)) if suffix else listed
        size = df.get("originalFileSize") if tabular else df.get("filesize")
        checksum, ctype = None, "md5"
        if isinstance(df.get("checksum"), dict) and df["checksum"].get("value"):
            ctype = _HASHLIB_NAMES.get(str(df["checksum"].get("type", "MD5")).upper(), "md5")
            checksum = str(df["checksum"]["value"]).lower()
        elif df.get("md5"):
            checksum = str(df["md5"]).lower()
        return cls(
            id=int(df["id"]),
            name=name,
            listed_name=listed,
            tabular=tabular,
            size=int(size) if size is not None else None,
            checksum=checksum,
            checksum_type=ctype,
            content_type=str(df.get("contentType", "")),
        )

    def matches(self, wanted: str) -> bool:
        """True when this file is the one a caller asks for by local or listed name.

        An exact name wins; otherwise the stems must agree, so `HAM10000_metadata.csv`
        finds the ingested `HAM10000_metadata.tab` even without `originalFileName`.
        """
        wanted_l = wanted.lower()
        names = {self.name.lower(), self.listed_name.lower()}
        if wanted_l in names:
            return True
        return PurePosixPath(wanted_l).stem in {PurePosixPath(n).stem for n in names}


def select_files(files: Sequence[DataverseFile], wanted: Iterable[str]) -> dict[str, DataverseFile]:
    """Picks the wanted files from a listing, by name, never by id.

    Args:
        files: The dataset's files (`DataverseClient.list_files`).
        wanted: Local names, e.g. `HAM10000_FILES`.

    Returns:
        Wanted name -> file.

    Raises:
        FetchError: A wanted file is not in the dataset.
    """
    chosen: dict[str, DataverseFile] = {}
    for name in wanted:
        exact = [f for f in files if name.lower() in (f.name.lower(), f.listed_name.lower())]
        found = exact or [f for f in files if f.matches(name)]
        if not found:
            available = ", ".join(sorted(f.listed_name for f in files)) or "(none)"
            raise FetchError(
                f"The dataset has no file {name!r}. Files it lists: {available}. "
                "Check the DOI (DataConfig.doi); a new dataset version may have renamed files. "
                + LOCAL_SOURCE_HINT
            )
        chosen[name] = found[0]
    return chosen


def file_checksum(path: Path, algorithm: str = "md5", chunk_size: int = 4 << 20) -> str:
    """Hex digest of a file, read in chunks (the image zips are over 1 GB)."""
    digest = hashlib.new(algorithm)
    with path.open("rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".md5")


def read_stamp(path: Path) -> str | None:
    """The checksum recorded for `path`, if its stamp still matches its size and mtime."""
    try:
        stamp = json.loads(_stamp_path(path).read_text())
        stat = path.stat()
    except (OSError, ValueError):
        return None
    if stamp.get("size") != stat.st_size or stamp.get("mtime_ns") != stat.st_mtime_ns:
        return None
    value = stamp.get("checksum")
    return str(value) if value else None


def write_stamp(path: Path, checksum: str, algorithm: str = "md5") -> None:
    """Records that `path` (as it is now: size and mtime) has this checksum."""
    stat = path.stat()
    payload = {"checksum": checksum, "algorithm": algorithm, "size": stat.st_size,
               "mtime_ns": stat.st_mtime_ns}
    tmp = _stamp_path(path).with_suffix(".md5.tmp")
    tmp.write_text(json.dumps(payload))
    tmp.replace(_stamp_path(path))


@dataclass
class DataverseClient:
    """Lists and downloads the files of a Dataverse dataset.

    Attributes:
        base_url: The installation, e.g. `https://dataverse.harvard.edu`.
        retry: Retry, backoff and timeout settings.
        progress: Show a progress bar (bytes and speed) per download; it also stays off
            when stderr is not a terminal.
        chunk_size: Bytes read per chunk of a download. A dropped connection loses the
            chunk being read (requests discards it), so chunks stay small.
        session: A requests session; one with the SkinSense User-Agent is made if omitted.
    """

    base_url: str
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    progress: bool = True
    chunk_size: int = 64 << 10
    session: requests.Session | None = None

    def __post_init__(self) -> None:
        import requests

        self.base_url = self.base_url.rstrip("/")
        # Transient network failures; ChunkedEncodingError is how requests reports a
        # truncated body.
        self._network_errors: tuple[type[BaseException], ...] = (
            requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)
        if self.session is None:
            self.session = requests.Session()
            self.session.headers["User-Agent"] = USER_AGENT

    @property
    def _timeout(self) -> tuple[float, float]:
        return (self.retry.connect_timeout_s, self.retry.read_timeout_s)

    # -- listing -------------------------------------------------------------------------

    def list_files(self, doi: str) -> list[DataverseFile]:
        """Lists the files of the latest version of a dataset.

        Args:
            doi: Persistent id, e.g. `doi:10.7910/DVN/DBW86T`.

        Raises:
            FetchError: Dataverse is unreachable, refuses, does not know the dataset, or
                answers something that is not a dataset listing.
        """
        url = f"{self.base_url}/api/datasets/:persistentId/"
        failures = 0
        while True:
            try:
                resp = self.session.get(url, params={"persistentId": doi}, timeout=self._timeout)
                if resp.status_code in _RETRY_STATUS:
                    raise _RetryableError(f"HTTP {resp.status_code}")
                break
            except (*self._network_errors, _RetryableError) as exc:
                failures += 1
                if failures >= self.retry.attempts:
                    raise FetchError(
                        f"Cannot list dataset {doi} at {self.base_url} after {failures} tries "
                        f"({_short(exc)}). Check your network connection or proxy. "
                        + LOCAL_SOURCE_HINT
                    ) from exc
                self._sleep(failures, f"listing {doi}", exc)
        if resp.status_code == 404:
            raise FetchError(
                f"Dataverse at {self.base_url} has no dataset {doi} (HTTP 404). Check the DOI "
                "(DataConfig.doi) and the URL (DataConfig.dataverse_url / "
                "SKINSENSE_DATAVERSE_URL)."
            )
        if resp.status_code in (401, 403):
            raise FetchError(
                f"Dataverse at {self.base_url} refused to list dataset {doi} "
                f"(HTTP {resp.status_code}). The dataset may be restricted or the server may "
                "be blocking this client; try again later. " + LOCAL_SOURCE_HINT
            )
        if resp.status_code != 200:
            raise FetchError(
                f"Dataverse at {self.base_url} answered HTTP {resp.status_code} to the listing "
                f"of {doi}: {resp.text[:200]!r}. " + LOCAL_SOURCE_HINT
            )
        try:
            entries = resp.json()["data"]["latestVersion"]["files"]
            return [DataverseFile.from_json(e) for e in entries]
        except (ValueError, KeyError, TypeError) as exc:
            raise FetchError(
                f"{self.base_url} answered the listing of {doi} with something that is not a "
                f"Dataverse dataset ({_short(exc)}); is DataConfig.dataverse_url a Dataverse "
                "installation?"
            ) from exc

    # -- downloading ---------------------------------------------------------------------

    def fetch(self, doi: str, names: Iterable[str], dest_dir: Path, *,
              force_verify: bool = False) -> dict[str, Path]:
        """Lists a dataset and downloads the named files into `dest_dir`.

        Files already there and verified are not downloaded again.

        Args:
            doi: Persistent id of the dataset.
            names: Local names of the files, e.g. `HAM10000_FILES`.
            dest_dir: Folder for the files (created).
            force_verify: Re-hash existing files even when their stamp is current.

        Returns:
            Wanted name -> path of the verified file.
        """
        chosen = select_files(self.list_files(doi), names)
        return {name: self.download(f, dest_dir, force_verify=force_verify)
                for name, f in chosen.items()}

    def file_url(self, file: DataverseFile) -> tuple[str, dict[str, str]]:
        """URL and query parameters that download `file` (the original of a tabular one)."""
        params = {"format": "original"} if file.tabular else {}
        return f"{self.base_url}/api/access/datafile/{file.id}", params

    def download(self, file: DataverseFile, dest_dir: Path, *, force_verify: bool = False) -> Path:
        """Downloads one file into `dest_dir`, resuming and verifying it.

        Args:
            file: The file, from `list_files`.
            dest_dir: Folder for it (created).
            force_verify: Re-hash an existing file even when its stamp is current.

        Returns:
            The path of the verified file.

        Raises:
            FetchError: The download kept failing or its checksum kept being wrong.
        """
        dest_dir.mkdir(parents=True, exist_ok=True)
        final = dest_dir / file.name
        part = final.with_name(final.name + ".part")
        if final.exists():
            if self.verified(final, file, force=force_verify):
                log.info("%s: already downloaded and verified", file.name)
                return final
            log.warning("%s: existing file does not verify; downloading it again", final)
            final.unlink()
            _stamp_path(final).unlink(missing_ok=True)

        got = ""
        for attempt in range(1, self.retry.checksum_attempts + 1):
            self._download_part(file, part)
            got = file_checksum(part, file.checksum_type)
            if file.checksum is None or got == file.checksum:
                part.replace(final)  # only a verified file ever has the final name
                write_stamp(final, got, file.checksum_type)
                return final
            log.warning("%s: %s mismatch (expected %s, got %s), download %d of %d",
                        file.name, file.checksum_type.upper(), file.checksum, got, attempt,
                        self.retry.checksum_attempts)
            part.unlink()
        raise FetchError(
            f"{file.name}: {file.checksum_type.upper()} mismatch after "
            f"{self.retry.checksum_attempts} downloads: expected {file.checksum}, got {got}. "
            "The server or a proxy is corrupting the download, or the dataset changed; "
            "try again later. " + LOCAL_SOURCE_HINT
        )

    def verified(self, path: Path, file: DataverseFile, *, force: bool = False) -> bool:
        """True when `path` holds `file`: its stamp (or, if stale, its hash) matches.

        Without a listed checksum only the size (when listed) can be checked.
        """
        if file.checksum is None:
            return file.size is None or path.stat().st_size == file.size
        if not force and read_stamp(path) == file.checksum:
            return True
        if file.size is not None and path.stat().st_size != file.size:
            return False
        got = file_checksum(path, file.checksum_type)
        if got != file.checksum:
            return False
        write_stamp(path, got, file.checksum_type)
        return True

    def _download_part(self, file: DataverseFile, part: Path) -> None:
        """Completes `part` (resuming what is there), retrying transient failures."""
        failures = 0
        furthest = part.stat().st_size if part.exists() else 0
        while True:
            try:
                self._request_into(file, part)
                return
            except (*self._network_errors, _RetryableError) as exc:
                have = part.stat().st_size if part.exists() else 0
                if have > furthest:  # progress: a flaky link, not a dead one
                    furthest, failures = have, 0
                failures += 1
                if failures >= self.retry.attempts:
                    raise FetchError(
                        f"Downloading {file.name} failed {failures} times in a row "
                        f"({_short(exc)}); {have} bytes are kept in {part} and the next run "
                        "resumes from there. Check your network connection. " + LOCAL_SOURCE_HINT
                    ) from exc
                self._sleep(failures, f"downloading {file.name}", exc)

    def _request_into(self, file: DataverseFile, part: Path) -> None:
        """One GET of `file`, appended to `part` from where it ends."""
        offset = part.stat().st_size if part.exists() else 0
        if file.size is not None and offset > file.size:
            part.unlink()  # longer than the file: not ours to resume
            offset = 0
        if file.size is not None and offset == file.size and offset > 0:
            return  # complete already; the checksum decides
        url, params = self.file_url(file)
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        with self.session.get(url, params=params, headers=headers, stream=True,
                              timeout=self._timeout) as resp:
            if resp.status_code == 416:  # our part is no prefix of the file: start over
                part.unlink(missing_ok=True)
                raise _RetryableError("HTTP 416: range not satisfiable, restarting from 0")
            if resp.status_code in _RETRY_STATUS:
                raise _RetryableError(f"HTTP {resp.status_code}")
            if resp.status_code in (401, 403):
                raise FetchError(
                    f"Dataverse refused to download {file.name} (id {file.id}, HTTP "
                    f"{resp.status_code}); the file may be restricted or this client blocked. "
                    + LOCAL_SOURCE_HINT
                )
            if resp.status_code == 404:
                raise FetchError(
                    f"Dataverse has no datafile {file.id} ({file.name}) any more (HTTP 404); "
                    "the dataset may have a new version, run again to list it afresh."
                )
            if resp.status_code not in (200, 206):
                raise FetchError(
                    f"Unexpected HTTP {resp.status_code} downloading {file.name}: "
                    f"{resp.text[:200]!r}"
                )
            if resp.status_code == 206 and _range_start(resp) != offset:
                part.unlink(missing_ok=True)
                raise _RetryableError("server resumed from the wrong offset; restarting")
            if resp.status_code == 200:
                offset = 0  # the server ignored Range and sends the whole file
            expected_total = file.size
            if expected_total is None and resp.headers.get("Content-Length"):
                expected_total = offset + int(resp.headers["Content-Length"])
            self._write_body(resp, part, offset, expected_total, file.name)
            written = part.stat().st_size
            if expected_total is not None and written < expected_total:
                raise _RetryableError(f"truncated body: {written} of {expected_total} bytes")

    def _write_body(self, resp: requests.Response, part: Path, offset: int,
                    total: int | None, name: str) -> None:
        start = time.monotonic()
        with part.open("ab" if offset else "wb") as fh, self._bar(name, total, offset) as bar:
            for chunk in resp.iter_content(self.chunk_size):
                fh.write(chunk)
                bar.update(len(chunk))
        received = part.stat().st_size - offset
        elapsed = max(time.monotonic() - start, 1e-6)
        log.info("%s: %d bytes in %.1f s (%.1f MB/s)", name, received, elapsed,
                 received / elapsed / 1e6)

    def _bar(self, name: str, total: int | None, initial: int) -> Any:
        if not self.progress:
            return _NoBar()
        from tqdm.auto import tqdm  # lazily: only a download with a bar needs it

        # disable=None: tqdm turns itself off when stderr is not a terminal (logs, CI).
        return tqdm(total=total, initial=initial, unit="B", unit_scale=True,
                    unit_divisor=1024, desc=name, disable=None, leave=False)

    def _sleep(self, failures: int, what: str, exc: BaseException) -> None:
        delay = self.retry.delay(failures)
        log.warning("%s failed (%s); try %d of %d in %.1f s", what, _short(exc), failures + 1,
                    self.retry.attempts, delay)
        time.sleep(delay)


class _NoBar:
    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int) -> None:
        return None


def _range_start(resp: requests.Response) -> int | None:
    """First byte of a 206 answer, from `Content-Range: bytes START-END/TOTAL`."""
    value = resp.headers.get("Content-Range", "")
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


# How long a person waits for the name lookup before the fetch goes ahead as usual: a slow
# resolver is not a missing one.
_RESOLVE_TIMEOUT_S = 10.0


def check_host_resolves(base_url: str, *, timeout_s: float = _RESOLVE_TIMEOUT_S) -> None:
    """Fail at once when the Dataverse host name does not resolve at all (no network, no DNS).

    For commands a person runs at a terminal: the client's retries (and the flow's) are
    meant to outlast an outage of a scheduled run, and would keep a person waiting for
    minutes before saying what to do. Where a proxy is configured for the URL the proxy
    resolves the name, so nothing is checked; a lookup that takes longer than `timeout_s`
    is left to the client too.

    Raises:
        FetchError: the host name does not resolve; the message suggests a local copy.
    """
    import concurrent.futures
    import socket
    import urllib.request
    from urllib.parse import urlsplit

    parts = urlsplit(base_url)
    host = parts.hostname
    if not host:
        return
    if urllib.request.getproxies().get(parts.scheme) and not urllib.request.proxy_bypass(host):
        return  # the proxy looks the name up, not this machine
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    lookup = pool.submit(socket.getaddrinfo, host, parts.port or 443)
    pool.shutdown(wait=False)
    try:
        lookup.result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
        return
    except socket.gaierror as exc:
        raise FetchError(
            f"Cannot reach Dataverse at {base_url}: the host name {host!r} does not resolve "
            f"({exc.strerror or exc}), so this machine has no network or no DNS. "
            + LOCAL_SOURCE_HINT) from None


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def is_transient(exc: BaseException) -> bool:
    """True when a fetch failed on the network (worth retrying later), not on bad settings."""
    cause = exc.__cause__ if isinstance(exc, FetchError) else exc
    if isinstance(cause, _RetryableError | OSError):
        return True
    try:
        import requests
    except ImportError:
        return False
    return isinstance(cause, requests.RequestException)
