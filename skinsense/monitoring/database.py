"""The monitoring database: every answer of the app (`predictions`) and every confirmed
diagnosis (`feedback`), through SQLAlchemy, migrated with Alembic.

Where it lives: `$SKINSENSE_LOG_DATABASE_URL` when set (docker compose points it at its
Postgres: `postgresql://USER:PASSWORD@postgres:5432/skinsense`); else the URL in
`SKINSENSE_HOME/stack/log-database.url`, which `skinsense stack up` writes (0600): that
variable's URL, or with MLflow's store on Postgres the database `skinsense` on the same
server, created there with MLflow's login (`ensure_database`); so the app, the flows and the
CLI of that home all find it; else SQLite at `SKINSENSE_HOME/monitoring/monitoring.db`. Alembic keeps its revision in the table
`skinsense_alembic_version`, so the log may share a Postgres database with MLflow (whose own
table is `alembic_version`) without either touching the other's migrations.

SQLite runs in WAL mode with `synchronous=NORMAL`: a committed row survives a crash or kill
of the app (only a power cut may lose the last transactions), and readers (the monitoring
flow) never block the writer.
"""

from __future__ import annotations

import threading
from datetime import datetime, timezone
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

DATABASE_URL_ENV = "SKINSENSE_LOG_DATABASE_URL"
VERSION_TABLE = "skinsense_alembic_version"
MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Under SKINSENSE_HOME: the log's URL (with its password, 0600) while the stack runs on Postgres.
STACK_URL_FILE = Path("stack") / "log-database.url"
LOG_DATABASE = "skinsense"  # the stack's database name on MLflow's Postgres server


def utc_now() -> datetime:
    """Now, timezone-aware UTC (what every row's time is)."""
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Prediction(Base):
    """One answer of the app: a classification, a quality refusal or an out-of-domain one."""

    __tablename__ = "predictions"

    id: Mapped[int] = mapped_column(primary_key=True)
    created_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), index=True)
    endpoint: Mapped[str] = mapped_column(sa.String(32))   # classify, assess, explain, ui
    # 'answered', 'quality' (refused by a quality check, or not an image at all),
    # 'out_of_domain' (refused by the gate)
    outcome: Mapped[str] = mapped_column(sa.String(16), index=True)
    model_name: Mapped[str | None] = mapped_column(sa.String(200))
    model_version: Mapped[str | None] = mapped_column(sa.String(50))
    backend: Mapped[str | None] = mapped_column(sa.String(50))
    image_sha256: Mapped[str] = mapped_column(sa.String(64), index=True)
    width: Mapped[int | None]
    height: Mapped[int | None]
    quality_issue: Mapped[str | None] = mapped_column(sa.String(200))  # checks, comma-separated
    gate_status: Mapped[str | None] = mapped_column(sa.String(16))
    in_domain: Mapped[bool | None]
    ood_score: Mapped[float | None] = mapped_column(sa.Float)
    probabilities: Mapped[dict | None] = mapped_column(sa.JSON)   # calibrated, by class code
    top_class: Mapped[str | None] = mapped_column(sa.String(16))
    referral: Mapped[bool | None]
    referral_score: Mapped[float | None] = mapped_column(sa.Float)
    latency_ms: Mapped[float] = mapped_column(sa.Float)
    # Only with serve.keep_images: where the upload is kept (deleted after the retention).
    image_path: Mapped[str | None] = mapped_column(sa.String(500))


class Feedback(Base):
    """A confirmed diagnosis of an image the app answered."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(primary_key=True)
    created_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), index=True)
    image_sha256: Mapped[str] = mapped_column(sa.String(64), unique=True)
    lesion_id: Mapped[str] = mapped_column(sa.String(100), index=True)
    dx: Mapped[str] = mapped_column(sa.String(16))
    dx_type: Mapped[str] = mapped_column(sa.String(16))
    age: Mapped[float | None] = mapped_column(sa.Float)
    sex: Mapped[str | None] = mapped_column(sa.String(16))
    localization: Mapped[str | None] = mapped_column(sa.String(50))
    entered_by: Mapped[str] = mapped_column(sa.String(200))
    # The image in the feedback store (None: no image was kept, so it cannot be trained on).
    image_path: Mapped[str | None] = mapped_column(sa.String(500))


def default_database_url() -> str:
    """`$SKINSENSE_LOG_DATABASE_URL`, else the stack's Postgres database (`STACK_URL_FILE`
    under SKINSENSE_HOME), else SQLite under SKINSENSE_HOME/monitoring."""
    import os

    from skinsense.config import skinsense_home

    url = os.environ.get(DATABASE_URL_ENV)
    if url:
        return url
    home = skinsense_home()
    try:
        url = (home / STACK_URL_FILE).read_text().strip()
    except OSError:
        url = ""
    return url or f"sqlite:///{home / 'monitoring' / 'monitoring.db'}"


def url_origin() -> str:
    """Where `default_database_url` took the URL from, in words (for error messages)."""
    import os

    from skinsense.config import skinsense_home

    if os.environ.get(DATABASE_URL_ENV):
        return f"${DATABASE_URL_ENV}"
    recorded = skinsense_home() / STACK_URL_FILE
    if recorded.is_file():
        return f"{recorded}, written by `skinsense stack up`"
    return "the default under SKINSENSE_HOME"


def ensure_database(url: str, *, via: str) -> None:
    """Create the Postgres database of `url` unless it exists, connected as `via` (a URL of
    another database on the same server whose login may create databases).

    Raises:
        sqlalchemy.exc.SQLAlchemyError: the server refused (e.g. the login lacks CREATEDB).
    """
    name = sa.make_url(url).database
    admin = sa.create_engine(sa.make_url(via), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            exists = connection.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :n"),
                                        {"n": name}).scalar()
            if not exists:
                quoted = admin.dialect.identifier_preparer.quote(name)
                connection.execute(sa.text(f"CREATE DATABASE {quoted}"))
    finally:
        admin.dispose()


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # noqa: ANN001 (DB-API connection)
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


_engines: dict[str, sa.Engine] = {}
_engines_lock = threading.Lock()


def engine_for(url: str | None = None) -> sa.Engine:
    """The (migrated) engine of the monitoring database at `url` (default: see module doc).

    The first call per URL in a process creates the SQLite folder and upgrades the schema to
    the newest Alembic revision; later calls reuse the engine.
    """
    url = url or default_database_url()
    with _engines_lock:
        if url in _engines:
            return _engines[url]
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, pool_pre_ping=True)
        if engine.dialect.name == "sqlite":
            sa.event.listen(engine, "connect", _sqlite_pragmas)
        upgrade(engine)
        _engines[url] = engine
        return engine


def upgrade(engine: sa.Engine) -> None:
    """Bring the schema to the newest Alembic revision (no-op when it is there)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")


def describe_url(url: str) -> str:
    """The URL with its password masked (for messages and /health)."""
    return sa.make_url(url).render_as_string(hide_password=True)
