"""Confirmed diagnoses (feedback): stored next to the prediction log, checked against it,
and exported as a HAM10000-format data source, `feedback`, that training may add to its
training part (`data.extra_sources`).

Who may write: anyone on loopback; beyond loopback only a login (`check_login`): the logins
in `$SKINSENSE_FEEDBACK_AUTH` ("user:password", comma-separated, as Gradio's auth takes
them) or the stack's own login, Prefect's auth string (`PREFECT_SERVER_API_AUTH_STRING` /
`PREFECT_API_AUTH_STRING`, the `user:password` operators already use for the Prefect UI).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pandas as pd
import sqlalchemy as sa
from PIL import Image

from skinsense.data.extra_sources import FEEDBACK_ID_PREFIX
from skinsense.labels import CLASS_CODES
from skinsense.monitoring.database import Feedback, Prediction, engine_for, utc_now

DX_TYPES = ("histo", "follow_up", "consensus", "confocal")
SEXES = ("male", "female", "unknown")
# The sites HAM10000 uses, so a feedback row reads like the others in the subgroup audit.
LOCALIZATIONS = ("abdomen", "acral", "back", "chest", "ear", "face", "foot", "genital", "hand",
                 "lower extremity", "neck", "scalp", "trunk", "unknown", "upper extremity")
FEEDBACK_AUTH_ENV = "SKINSENSE_FEEDBACK_AUTH"
STACK_AUTH_ENVS = ("PREFECT_SERVER_API_AUTH_STRING", "PREFECT_API_AUTH_STRING")
SOURCE_NAME = "feedback"
METADATA_FILE = "HAM10000_metadata.csv"


class FeedbackError(ValueError):
    """A confirmed diagnosis that cannot be stored; the message says what to change."""


class FeedbackRefused(PermissionError):
    """The caller may not write feedback (no login, or a wrong one); nothing was written."""


@dataclass(frozen=True)
class FeedbackRecord:
    image_sha256: str
    image_id: str
    lesion_id: str
    dx: str
    dx_type: str
    image_path: str | None


def feedback_dir(home: Path) -> Path:
    """Where confirmed cases' images live (kept until the operator deletes them)."""
    return Path(home) / "feedback"


def logins(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """user -> password of everyone entitled to write feedback (see the module docstring)."""
    environ = os.environ if environ is None else environ
    found: dict[str, str] = {}
    entries = [e for e in environ.get(FEEDBACK_AUTH_ENV, "").split(",") if e.strip()]
    entries += [environ[k] for k in STACK_AUTH_ENVS if environ.get(k)]
    for entry in entries:
        user, sep, password = entry.strip().partition(":")
        if sep and user and password:
            found.setdefault(user, password)
    return found


def check_login(username: str | None, password: str | None, *, required: bool,
                environ: Mapping[str, str] | None = None) -> str:
    """Who is writing: the username when the login is right, 'local' when none is required.

    Raises:
        FeedbackRefused: a login is required and missing or wrong, or none is configured.
    """
    if not required:
        return username or "local"
    known = logins(environ)
    if not known:
        raise FeedbackRefused(
            "writing confirmed diagnoses needs a login because the app listens beyond this "
            f"machine, and none is configured: set {FEEDBACK_AUTH_ENV}=user:password (or run "
            "the app with the stack's login, PREFECT_SERVER_API_AUTH_STRING)")
    expected = known.get(username or "")
    # compare_digest on both branches, so a wrong user takes as long as a wrong password.
    ok = hmac.compare_digest((password or "").encode(), (expected or "\0").encode())
    if not (expected and ok):
        raise FeedbackRefused("wrong user name or password: confirmed diagnoses may only be "
                              "entered by someone with a login; nothing was written")
    return username  # type: ignore[return-value]


def _check_fields(dx: str, dx_type: str, age: float | None, sex: str | None,
                  localization: str | None) -> None:
    if dx not in CLASS_CODES:
        raise FeedbackError(f"dx {dx!r} is not one of the seven HAM10000 classes "
                            f"{', '.join(CLASS_CODES)}; give the class code, e.g. --dx mel")
    if dx_type not in DX_TYPES:
        raise FeedbackError(f"dx_type {dx_type!r} is not a way HAM10000 confirms a diagnosis; "
                            f"use one of {', '.join(DX_TYPES)}")
    if age is not None and not 0 <= age <= 120:
        raise FeedbackError(f"age {age} is not an age in years (0-120)")
    if sex is not None and sex not in SEXES:
        raise FeedbackError(f"sex {sex!r}: use one of {', '.join(SEXES)}")
    if localization is not None and localization not in LOCALIZATIONS:
        raise FeedbackError(f"body site {localization!r}: use one of {', '.join(LOCALIZATIONS)}")


def image_id_for(sha: str) -> str:
    return f"{FEEDBACK_ID_PREFIX}{sha[:16]}"


def add_feedback(image: bytes | str | Path, *, dx: str, dx_type: str, entered_by: str,
                 home: Path, age: float | None = None, sex: str | None = None,
                 localization: str | None = None, lesion_id: str | None = None,
                 keep_image: bool = True, database_url: str | None = None) -> FeedbackRecord:
    """Attach a confirmed diagnosis to an image the app answered.

    Args:
        image: the image file (path or bytes), the same bytes that were sent to the app.
        dx, dx_type: the confirmed class code and how it was confirmed.
        entered_by: who entered it (a login name, or 'local').
        home: SKINSENSE_HOME (the image is copied under `home/feedback/images`).
        age, sex, localization: optional, as in HAM10000.
        lesion_id: several images of one lesion share it; default one lesion per image.
        keep_image: copy the image into the feedback store (without it, the case counts for
            monitoring but cannot be trained on).
        database_url: the monitoring database (default: see `database.default_database_url`).

    Raises:
        FeedbackError: a wrong field, an image the app never answered, or one that already
            has a confirmed diagnosis.
    """
    _check_fields(dx, dx_type, age, sex, localization)
    data = Path(image).read_bytes() if isinstance(image, (str, Path)) else bytes(image)
    sha = hashlib.sha256(data).hexdigest()
    engine = engine_for(database_url)
    with engine.begin() as connection:
        answered = connection.execute(sa.select(sa.func.count()).select_from(Prediction).where(
            Prediction.image_sha256 == sha)).scalar()
        if not answered:
            raise FeedbackError(
                f"this image (SHA-256 {sha[:16]}...) was never answered by the app, so there "
                f"is no answer to confirm: send it to the app first, and give the very same "
                f"file here")
        earlier = connection.execute(sa.select(
            Feedback.dx, Feedback.dx_type, Feedback.created_at, Feedback.entered_by).where(
            Feedback.image_sha256 == sha)).first()
        if earlier is not None:
            raise FeedbackError(
                f"this image already has a confirmed diagnosis ({earlier.dx}, {earlier.dx_type},"
                f" entered {earlier.created_at:%Y-%m-%d} by {earlier.entered_by})")
        image_id = image_id_for(sha)
        path = _store_image(data, home, image_id) if keep_image else None
        record = FeedbackRecord(sha, image_id, lesion_id or f"FB_lesion_{sha[:12]}", dx,
                                dx_type, str(path) if path else None)
        connection.execute(Feedback.__table__.insert(), [{
            "created_at": utc_now(), "image_sha256": sha, "lesion_id": record.lesion_id,
            "dx": dx, "dx_type": dx_type, "age": age, "sex": sex,
            "localization": localization, "entered_by": entered_by,
            "image_path": record.image_path}])
    return record


def _store_image(data: bytes, home: Path, image_id: str) -> Path:
    """The image as a JPEG in the feedback store (other formats are re-encoded at q=95)."""
    folder = feedback_dir(home) / "images"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{image_id}.jpg"
    if not data.startswith(b"\xff\xd8"):
        buffer = io.BytesIO()
        Image.open(io.BytesIO(data)).convert("RGB").save(buffer, "JPEG", quality=95)
        data = buffer.getvalue()
    tmp = path.with_suffix(".part")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


def confirmed_cases(*, since: datetime | None = None, until: datetime | None = None,
                    database_url: str | None = None) -> pd.DataFrame:
    """Confirmed diagnoses joined with the app's latest answer on the same image.

    Columns: the feedback's (created_at, image_sha256, lesion_id, dx, dx_type, age, sex,
    localization, image_path) plus `top_class`, `referral` and `in_domain` of the answer.
    """
    engine = engine_for(database_url)
    query = sa.select(Feedback)
    if since is not None:
        query = query.where(Feedback.created_at >= since)
    if until is not None:
        query = query.where(Feedback.created_at < until)
    with engine.connect() as connection:
        feedback = pd.DataFrame([dict(r) for r in connection.execute(query).mappings()])
        if feedback.empty:
            return feedback
        answers = pd.DataFrame([dict(r) for r in connection.execute(
            sa.select(Prediction.image_sha256, Prediction.top_class, Prediction.referral,
                      Prediction.in_domain, Prediction.id)
            .where(Prediction.image_sha256.in_(feedback["image_sha256"].tolist()))
            .where(Prediction.top_class.is_not(None))).mappings().all()])
    if answers.empty:
        return feedback.assign(top_class=None, referral=None, in_domain=None)
    latest = answers.sort_values("id").groupby("image_sha256").tail(1).drop(columns="id")
    return feedback.merge(latest, on="image_sha256", how="left")


@dataclass(frozen=True)
class FeedbackSource:
    """The confirmed cases with a kept image, laid out like HAM10000."""

    folder: Path
    metadata_csv: Path
    images_dir: Path
    fingerprint: str
    n_images: int


def export_source(home: Path, *, database_url: str | None = None) -> FeedbackSource:
    """Write the `feedback` data source: `HAM10000_metadata.csv` and `images/FB_*.jpg` in
    `home/feedback/source-<fingerprint>`, with the fingerprint of its metadata and images
    (`skinsense.data.metadata.dataset_fingerprint`, as HAM10000's own).

    Raises:
        FeedbackError: no confirmed case has a kept image.
    """
    from skinsense.data.metadata import dataset_fingerprint

    cases = confirmed_cases(database_url=database_url)
    if not cases.empty:
        cases = cases[cases["image_path"].notna()]
        cases = cases[[Path(p).is_file() for p in cases["image_path"]]]
    if cases.empty:
        raise FeedbackError(
            "data.extra_sources names 'feedback', but no confirmed diagnosis has a kept image "
            "yet: add some with `skinsense feedback add IMAGE --dx ... --dx-type ...` (or the "
            "app's form with serve.keep_images on), or remove 'feedback' from extra_sources")
    cases = cases.sort_values("image_sha256")
    metadata = pd.DataFrame({
        "lesion_id": cases["lesion_id"], "image_id": cases["image_sha256"].map(image_id_for),
        "dx": cases["dx"], "dx_type": cases["dx_type"], "age": cases["age"],
        "sex": cases["sex"].fillna("unknown"),
        "localization": cases["localization"].fillna("unknown"), "dataset": SOURCE_NAME})
    metadata_bytes = metadata.to_csv(index=False).encode()
    hashes = {image_id: hashlib.sha256(Path(p).read_bytes()).hexdigest()
              for image_id, p in zip(metadata["image_id"], cases["image_path"], strict=True)}
    fingerprint = dataset_fingerprint(metadata_bytes, hashes)
    folder = feedback_dir(home) / f"source-{fingerprint[:16]}"
    images_dir = folder / "images"
    if not (folder / METADATA_FILE).is_file():
        images_dir.mkdir(parents=True, exist_ok=True)
        for image_id, p in zip(metadata["image_id"], cases["image_path"], strict=True):
            target = images_dir / f"{image_id}.jpg"
            if not target.exists():
                os.link(p, target) if _same_device(Path(p), images_dir) else \
                    target.write_bytes(Path(p).read_bytes())
        tmp = folder / (METADATA_FILE + ".part")
        tmp.write_bytes(metadata_bytes)
        tmp.replace(folder / METADATA_FILE)
    return FeedbackSource(folder, folder / METADATA_FILE, images_dir, fingerprint,
                          len(metadata))


def _same_device(a: Path, b: Path) -> bool:
    return a.stat().st_dev == b.stat().st_dev
