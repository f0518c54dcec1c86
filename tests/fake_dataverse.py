"""A fake Harvard Dataverse on 127.0.0.1 for tests: the dataset listing and file downloads.

Serves `GET /api/datasets/:persistentId/?persistentId=DOI` and
`GET /api/access/datafile/ID[?format=original]` with `Range: bytes=N-` support, and can
misbehave on purpose (`Faults`): drop a connection mid-body, send wrong bytes, answer 503,
redirect to a fake object store, refuse a bare urllib/requests User-Agent, ignore Range,
or answer the listing with an error. Every request is recorded in `requests`.

    with FakeDataverse([FakeFile(1, "a.zip", b"...")]) as server:
        client = DataverseClient(server.url)
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

DOI = "doi:10.7910/DVN/DBW86T"


@dataclass
class FakeFile:
    """One datafile. `original_name` makes it an ingested tabular file (listed as `.tab`)."""

    id: int
    filename: str
    content: bytes
    original_name: str | None = None
    content_type: str = "application/zip"
    md5: str | None = None  # listed MD5; defaults to the content's

    @property
    def listed_md5(self) -> str:
        return self.md5 or hashlib.md5(self.content).hexdigest()

    def listing(self, checksum_style: str) -> dict:
        df: dict = {"id": self.id, "filename": self.filename, "contentType": self.content_type,
                    "filesize": len(self.content)}
        if self.original_name:
            # Dataverse lists the .tab's size; the checksum is the original upload's.
            df.update(filename=self.filename, contentType="text/tab-separated-values",
                      filesize=len(self.content) + 7, originalFileName=self.original_name,
                      originalFileFormat="text/csv", originalFormatLabel="Comma Separated Values",
                      originalFileSize=len(self.content))
        if checksum_style == "md5":
            df["md5"] = self.listed_md5
        else:
            df["checksum"] = {"type": "MD5", "value": self.listed_md5}
        return {"label": self.filename, "restricted": False, "dataFile": df}


@dataclass
class Faults:
    """Misbehaviour, consumed as it happens (the `*_once` sets hold file ids)."""

    drop_once: set[int] = field(default_factory=set)      # close mid-body, once per id
    corrupt_once: set[int] = field(default_factory=set)   # wrong bytes (MD5 mismatch), once
    corrupt_always: set[int] = field(default_factory=set)
    status_once: dict[int, int] = field(default_factory=dict)  # e.g. {id: 503}, once
    status_always: dict[int, int] = field(default_factory=dict)
    stall_once: set[int] = field(default_factory=set)     # sleep `stall_s` before the body
    stall_s: float = 1.0
    redirect: bool = False          # 302 from /api/access/... to /storage/...
    ignore_range: bool = False      # always answer 200 with the whole file
    forbid_bare_user_agent: bool = True
    listing_status: int | None = None  # answer the listing with this status instead


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]

    @property
    def file_id(self) -> int | None:
        for prefix in ("/api/access/datafile/", "/storage/"):
            if self.path.startswith(prefix):
                return int(self.path[len(prefix):])
        return None


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        # A client that timed out or hung up (as tests make it) is expected, not news.
        return None


class FakeDataverse:
    """A threaded HTTP server on a free port; use as a context manager or start()/stop()."""

    def __init__(self, files: list[FakeFile], *, doi: str = DOI, faults: Faults | None = None,
                 checksum_style: str = "checksum") -> None:
        self.files = {f.id: f for f in files}
        self.doi = doi
        self.faults = faults or Faults()
        self.checksum_style = checksum_style
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._server = _QuietServer(("127.0.0.1", 0), _handler_for(self))  # port 0: a free one
        self._server.daemon_threads = True
        # A short poll interval keeps shutdown (each test's teardown) fast.
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeDataverse:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FakeDataverse:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def file_requests(self, file_id: int | None = None) -> list[Request]:
        """Requests for file bytes (not listings), of one file or of all."""
        with self._lock:
            return [r for r in self.requests if r.file_id is not None
                    and (file_id is None or r.file_id == file_id)]

    def _take(self, bucket: set[int], file_id: int) -> bool:
        with self._lock:
            if file_id in bucket:
                bucket.discard(file_id)
                return True
            return False


def _handler_for(server: FakeDataverse) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
            return None

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            split = urlsplit(self.path)
            query = parse_qs(split.query)
            request = Request("GET", split.path, query, dict(self.headers.items()))
            with server._lock:
                server.requests.append(request)
            ua = self.headers.get("User-Agent", "")
            if server.faults.forbid_bare_user_agent and (
                not ua or ua.lower().startswith(("python-urllib", "python-requests"))
            ):
                return self._send(403, b'{"status":"ERROR","message":"Forbidden"}')
            if split.path.rstrip("/") == "/api/datasets/:persistentId":
                return self._listing(query)
            file_id = request.file_id
            if file_id is None or file_id not in server.files:
                return self._send(404, b'{"status":"ERROR","message":"not found"}')
            if split.path.startswith("/api/access/") and server.faults.redirect:
                location = f"/storage/{file_id}" + (f"?{split.query}" if split.query else "")
                return self._send(302, b"", {"Location": location})
            return self._file(server.files[file_id], query)

        def _listing(self, query: dict[str, list[str]]) -> None:
            if server.faults.listing_status:
                return self._send(server.faults.listing_status, b'{"status":"ERROR"}')
            if query.get("persistentId") != [server.doi]:
                return self._send(404, b'{"status":"ERROR","message":"Dataset not found"}')
            body = {"status": "OK", "data": {"latestVersion": {
                "versionState": "RELEASED",
                "files": [f.listing(server.checksum_style) for f in server.files.values()],
            }}}
            self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"})

        def _file(self, f: FakeFile, query: dict[str, list[str]]) -> None:
            faults = server.faults
            with server._lock:
                status = faults.status_always.get(f.id) or faults.status_once.pop(f.id, None)
            if status:
                return self._send(status, b"try again later")
            content = f.content
            if f.original_name and query.get("format") != ["original"]:
                content = b"ingested\t" + content  # the .tab, not the original
            if f.id in faults.corrupt_always or server._take(faults.corrupt_once, f.id):
                content = bytes(b ^ 0xFF for b in content)
            start = 0
            range_header = self.headers.get("Range")
            if range_header and not faults.ignore_range:
                start = int(range_header.removeprefix("bytes=").split("-")[0])
                if start >= len(content):
                    return self._send(416, b"", {"Content-Range": f"bytes */{len(content)}"})
            body = content[start:]
            headers = {"Content-Type": "application/octet-stream",
                       "Content-Length": str(len(body)), "Accept-Ranges": "bytes"}
            status = 206 if start else 200
            if start:
                headers["Content-Range"] = f"bytes {start}-{len(content) - 1}/{len(content)}"
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            if server._take(faults.stall_once, f.id):
                time.sleep(faults.stall_s)
            if server._take(faults.drop_once, f.id):
                # Half the body, then hang up: the client sees a truncated answer.
                self.wfile.write(body[: max(1, len(body) // 2)])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

        def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


# -- tiny HAM10000-shaped data -----------------------------------------------------------------

PART_1_IDS = [f"ISIC_00{n:05d}" for n in range(24306, 24310)]
PART_2_IDS = [f"ISIC_00{n:05d}" for n in range(29306, 29309)]
ISIC_TEST_IDS = [f"ISIC_00{n:05d}" for n in range(34524, 34527)]
_DX = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")


def jpeg_bytes(seed: int, size: tuple[int, int] = (8, 6)) -> bytes:
    """A tiny, valid JPEG whose colour depends on `seed`."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, ((seed * 37) % 256, (seed * 91) % 256, 128)).save(buf, "JPEG")
    return buf.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    """A zip (stored, like the real image zips) of name -> bytes."""
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def images_zip(image_ids: list[str], folder: str = "") -> bytes:
    return zip_bytes({f"{folder}{i}.jpg": jpeg_bytes(n) for n, i in enumerate(image_ids)})


def metadata_csv(image_ids: list[str]) -> bytes:
    lines = ["lesion_id,image_id,dx,dx_type,age,sex,localization,dataset"]
    for n, image_id in enumerate(image_ids):
        lines.append(f"HAM_{n:07d},{image_id},{_DX[n % 7]},histo,50.0,male,back,vidir_modern")
    return ("\n".join(lines) + "\n").encode()


def one_hot_truth_csv(image_ids: list[str]) -> bytes:
    """The ISIC 2018 challenge's ground-truth format."""
    codes = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
    lines = ["image," + ",".join(codes)]
    for n, image_id in enumerate(image_ids):
        lines.append(image_id + "," + ",".join("1.0" if k == n % 7 else "0.0" for k in range(7)))
    return ("\n".join(lines) + "\n").encode()


def ham_files(*, include_isic_test: bool = False, truth: bytes | None = None) -> list[FakeFile]:
    """The Dataverse files of HAM10000 (real ids, tiny content)."""
    files = [
        FakeFile(3172585, "HAM10000_images_part_1.zip", images_zip(PART_1_IDS)),
        FakeFile(3172584, "HAM10000_images_part_2.zip", images_zip(PART_2_IDS)),
        FakeFile(4338392, "HAM10000_metadata.tab", metadata_csv(PART_1_IDS + PART_2_IDS),
                 original_name="HAM10000_metadata.csv", content_type="text/csv"),
        # Not fetched by SkinSense; present in the real dataset.
        FakeFile(3838943, "HAM10000_segmentations_lesion_tschandl.zip", b"PK-not-needed"),
    ]
    if include_isic_test:
        files += [
            FakeFile(3855824, "ISIC2018_Task3_Test_Images.zip",
                     images_zip(ISIC_TEST_IDS, "ISIC2018_Task3_Test_Images/")),
            FakeFile(6924466, "ISIC2018_Task3_Test_GroundTruth.tab",
                     truth if truth is not None else one_hot_truth_csv(ISIC_TEST_IDS),
                     original_name="ISIC2018_Task3_Test_GroundTruth.csv", content_type="text/csv"),
        ]
    return files
