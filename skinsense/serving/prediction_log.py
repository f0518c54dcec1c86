"""The prediction log: one row per answer of the app, written before the answer leaves.

Every answer of `/classify`, `/assess`, `/explain` and of the page's Classify button is a
row of `skinsense.monitoring.database.Prediction`: time, model name and version, backend,
the image's SHA-256, width and height, the quality issue, the gate's verdict and
`ood_score`, the calibrated probabilities, the referral decision and the latency. Refusals
are rows too (`outcome` 'quality' or 'out_of_domain').

Durability: the row is committed in the request's own worker thread before the answer is
returned, so an answer the user saw is on disk even if the app is killed right after. An
insert into SQLite in WAL mode costs well under a millisecond next to a ~100 ms request
(`bench/serve_latency.py` measures logging on against off). When the database cannot be
reached (a Postgres restart), the row goes to a spool file (`SKINSENSE_HOME/monitoring/
spool.jsonl`, flushed and fsynced) instead, and the next successful write moves the spooled
rows into the database: the request is answered either way, and no row is lost.

The image itself is kept only with `serve.keep_images` (under `SKINSENSE_HOME/monitoring/
images/`, named by SHA-256), and files older than `serve.keep_images_days` are deleted.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from PIL import Image

from skinsense.monitoring.database import Prediction, engine_for, utc_now

log = logging.getLogger(__name__)

# How often the retention sweep runs at most (it also runs at start-up).
_SWEEP_INTERVAL_S = 3600.0


def image_bytes(image: str | bytes | Path) -> bytes:
    """The upload's bytes, whether Gradio handed a path or the bytes themselves."""
    return Path(image).read_bytes() if isinstance(image, (str, Path)) else bytes(image)


def image_size(data: bytes) -> tuple[int | None, int | None]:
    """Width and height from the image header (None, None when it is not an image)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception:  # noqa: BLE001 (whatever PIL raises, the size is unknown)
        return None, None


def _extension(data: bytes) -> str:
    return ".png" if data.startswith(b"\x89PNG") else ".jpg" if data.startswith(b"\xff\xd8") \
        else ".img"


@dataclass
class PredictionLog:
    """Appends answers to the monitoring database (see the module docstring).

    Args:
        database_url: SQLAlchemy URL; None: `skinsense.monitoring.database.default_database_url`.
        home: SKINSENSE_HOME (the spool file and kept images live under `home/monitoring`).
        keep_images: keep each answered upload for `keep_images_days` days.
    """

    database_url: str | None
    home: Path
    keep_images: bool = False
    keep_images_days: int = 30
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _last_sweep: float = field(default=0.0, init=False, repr=False)

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.engine = None
        try:
            self._connect()
        except Exception as exc:  # noqa: BLE001 (the app serves; rows wait in the spool)
            log.warning("prediction log database unreachable at start (%s); answers are "
                        "spooled to %s until it is back", exc, self.spool)
        self.sweep()

    def _connect(self):  # noqa: ANN202
        if self.engine is None:
            self.engine = engine_for(self.database_url)
        return self.engine

    @property
    def folder(self) -> Path:
        return self.home / "monitoring"

    @property
    def images_dir(self) -> Path:
        return self.folder / "images"

    @property
    def spool(self) -> Path:
        return self.folder / "spool.jsonl"

    def record(self, *, endpoint: str, image: str | bytes | Path, latency_ms: float,
               model_name: str | None = None, model_version: str | None = None,
               backend: str | None = None, quality_issues: tuple | list = (),
               gate: Any = None, probabilities: dict[str, float] | None = None,
               top_class: str | None = None, referral: Any = None,
               unreadable: str | None = None) -> None:
        """Append one answer; never raises (a failing log must not fail the request).

        Args:
            endpoint: classify, assess, explain or ui.
            image: the upload (path or bytes).
            latency_ms: time from receiving the upload to the answer.
            quality_issues: `QualityIssue`s that refused the image.
            gate: the `GateResult`.
            probabilities, top_class, referral: the model's answer (None when it did not run).
            unreadable: why the file could not be read as an image at all.
        """
        try:
            data = image_bytes(image)
            row = self._row(endpoint, data, latency_ms, model_name, model_version, backend,
                            quality_issues, gate, probabilities, top_class, referral,
                            unreadable)
            if self.keep_images:
                row["image_path"] = str(self._keep(data, row["image_sha256"]))
        except Exception:  # noqa: BLE001
            log.exception("could not build a prediction-log row; the answer is not logged")
            return
        self._write(row)

    def _row(self, endpoint, data, latency_ms, model_name, model_version, backend,
             quality_issues, gate, probabilities, top_class, referral, unreadable) -> dict:
        width, height = image_size(data)
        checks = [q.check for q in quality_issues] + ([unreadable] if unreadable else [])
        in_domain = getattr(gate, "in_domain", None)
        outcome = "quality" if checks else "out_of_domain" if in_domain is False else "answered"
        return {
            "created_at": utc_now().isoformat(), "endpoint": endpoint, "outcome": outcome,
            "model_name": model_name, "model_version": model_version, "backend": backend,
            "image_sha256": hashlib.sha256(data).hexdigest(), "width": width, "height": height,
            "quality_issue": ",".join(checks) or None,
            "gate_status": getattr(gate, "status", None), "in_domain": in_domain,
            "ood_score": getattr(gate, "score", None),
            "probabilities": probabilities, "top_class": top_class,
            "referral": getattr(referral, "refer", None),
            "referral_score": getattr(referral, "score", None),
            "latency_ms": float(latency_ms), "image_path": None,
        }

    def _write(self, row: dict) -> None:
        with self._lock:
            try:
                self._flush_spool()
                self._insert([row])
            except Exception as exc:  # noqa: BLE001 (any database failure)
                log.warning("prediction log database unreachable (%s); row spooled to %s",
                            exc, self.spool)
                self._append_spool(row)
        if time.monotonic() - self._last_sweep > _SWEEP_INTERVAL_S:
            self.sweep()

    def _insert(self, rows: list[dict]) -> None:
        values = [{**r, "created_at": datetime.fromisoformat(r["created_at"])} for r in rows]
        with self._connect().begin() as connection:
            connection.execute(Prediction.__table__.insert(), values)

    def _append_spool(self, row: dict) -> None:
        with open(self.spool, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _flush_spool(self) -> None:
        """Move spooled rows into the database (then drop the spool); raises if it fails."""
        if not self.spool.exists():
            return
        lines = self.spool.read_text(encoding="utf-8").splitlines()
        # A line cut short by a crash mid-write is the only one that may not parse.
        rows = []
        for line in lines:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("dropping a truncated line of %s", self.spool)
        if rows:
            self._insert(rows)
        self.spool.unlink()
        log.info("moved %d spooled prediction-log rows into the database", len(rows))

    def _keep(self, data: bytes, sha: str) -> Path:
        path = self.images_dir / f"{sha}{_extension(data)}"
        if not path.exists():
            self.images_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(path.suffix + ".part")
            tmp.write_bytes(data)
            tmp.replace(path)
        else:
            path.touch()  # retention counts from the last time the image was sent
        return path

    def sweep(self) -> int:
        """Delete kept images older than the retention (all of them when keeping is off).

        Images a confirmed diagnosis refers to were copied to the feedback store and are
        not affected. Returns how many files were deleted.
        """
        self._last_sweep = time.monotonic()
        if not self.images_dir.is_dir():
            return 0
        limit = (datetime.now(timezone.utc) - timedelta(days=self.keep_images_days)).timestamp()
        deleted = 0
        for path in self.images_dir.iterdir():
            if not self.keep_images or path.stat().st_mtime < limit:
                path.unlink(missing_ok=True)
                deleted += 1
        if deleted:
            log.info("deleted %d kept upload(s) past the retention of %d days", deleted,
                     self.keep_images_days)
        return deleted
