"""The prediction log: every answer of the app is a row, refusals included, durable across a
kill of the app; images only with keep_images; a database that is down loses nothing."""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path

import pytest
import sqlalchemy as sa
from PIL import Image

from test_app import (
    BAD_INPUTS,
    CHAMPION_URI,
    MODEL_NAME,
    app_store,
    exported_template,
    non_dermatoscopic_photo,
    register_version,
    running_app,
)

from skinsense.monitoring.database import Prediction, engine_for
from skinsense.serving.app import example_images
from skinsense.serving.prediction_log import PredictionLog


def rows(home: Path) -> list[dict]:
    engine = engine_for(f"sqlite:///{home / 'monitoring' / 'monitoring.db'}")
    with engine.connect() as connection:
        return [dict(r._mapping) for r in connection.execute(
            sa.select(Prediction).order_by(Prediction.id))]


def app_pid(url: str) -> int:
    """The pid of the app process listening at `url` (its session leader)."""
    import psutil

    port = int(url.rsplit(":", 1)[1])
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return conn.pid
    raise AssertionError(f"no process listens on port {port}")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_every_answer_of_the_app_is_logged_and_survives_a_kill(tmp_path, tmp_path_factory):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    template = exported_template(tmp_path_factory)
    with app_store(tmp_path / "home") as store:
        register_version(store, template)
        real = example_images()[0]
        cat = non_dermatoscopic_photo(tmp_path)
        dark = tmp_path / "dark.jpg"
        dark.write_bytes(BAD_INPUTS["dark.jpg"][0])
        junk = tmp_path / "junk.jpg"
        junk.write_bytes(BAD_INPUTS["not_an_image.jpg"][0])
        with running_app(CHAMPION_URI, tmp_path / "app.log", env=store.env,
                         serve_config={"reload_interval_s": 0, "keep_images": True}) as url:
            client = Client(url, verbose=False)
            client.predict(handle_file(str(real)), api_name="/classify")
            assert client.predict(handle_file(str(cat)), api_name="/assess")["answered"] is False
            with pytest.raises(AppError):
                client.predict(handle_file(str(dark)), api_name="/classify")
            with pytest.raises(AppError):
                client.predict(handle_file(str(junk)), api_name="/assess")
            client.predict(handle_file(str(real)), api_name="/explain")
            # Killed without a chance to flush anything: answered rows are already committed.
            os.killpg(app_pid(url), signal.SIGKILL)
        logged = rows(store.home.root)

    by_endpoint = [(r["endpoint"], r["outcome"]) for r in logged]
    assert by_endpoint == [("classify", "answered"), ("assess", "out_of_domain"),
                           ("classify", "quality"), ("assess", "quality"),
                           ("explain", "answered")]
    first = logged[0]
    assert first["image_sha256"] == sha(real)
    assert (first["width"], first["height"]) == Image.open(real).size
    assert first["model_name"] == MODEL_NAME and first["model_version"] == "1"
    assert first["backend"] and first["latency_ms"] > 0
    assert set(first["probabilities"]) == {"akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"}
    assert first["gate_status"] == "on" and first["in_domain"] is True
    assert first["ood_score"] is not None and first["referral"] is not None
    assert logged[1]["in_domain"] is False and logged[1]["referral"] is None
    assert "dark" in logged[2]["quality_issue"].split(",") and logged[2]["probabilities"] is None
    assert logged[3]["quality_issue"] == "unreadable" and logged[3]["width"] is None
    # keep_images: each upload is kept under its SHA-256.
    assert Path(first["image_path"]).read_bytes() == real.read_bytes()


def test_a_database_that_is_down_loses_no_row_and_catches_up(tmp_path):
    """Rows answered while the database cannot be reached wait in the spool file and move
    into the database with the next write that succeeds; the retention sweep deletes old
    kept images."""
    db = tmp_path / "down" / "log.db"
    real = example_images()[0]
    plog = PredictionLog(f"sqlite:///{db}", tmp_path, keep_images=True, keep_images_days=1)
    db.parent.rename(tmp_path / "gone")  # the database's folder disappears: writes fail
    plog.engine.dispose()
    plog.record(endpoint="assess", image=str(real), latency_ms=5.0)
    plog.record(endpoint="assess", image=real.read_bytes(), latency_ms=6.0)
    assert len(plog.spool.read_text().splitlines()) == 2
    (tmp_path / "gone").rename(db.parent)  # back
    plog.record(endpoint="classify", image=str(real), latency_ms=7.0)
    assert not plog.spool.exists()
    with plog.engine.connect() as connection:
        latencies = connection.execute(sa.select(Prediction.latency_ms)).scalars().all()
    assert sorted(latencies) == [5.0, 6.0, 7.0]
    kept = next(plog.images_dir.iterdir())
    os.utime(kept, (0, 0))  # kept "long ago"
    assert plog.sweep() == 1 and not kept.exists()


def test_nothing_is_kept_without_keep_images(tmp_path):
    real = example_images()[0]
    plog = PredictionLog(f"sqlite:///{tmp_path / 'log.db'}", tmp_path)
    plog.record(endpoint="assess", image=str(real), latency_ms=1.0)
    with plog.engine.connect() as connection:
        assert connection.execute(sa.select(Prediction.image_path)).scalar_one() is None
    assert not plog.images_dir.exists() or not any(plog.images_dir.iterdir())
