"""Load the model to serve: a registered MLflow model URI or an exported model folder."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from skinsense.serving.predictor import Predictor


def utc_now() -> str:
    """The current time as an ISO 8601 UTC string (what /health reports)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class LoadedModel:
    """A predictor and where it came from (shown by /health and the app's footer).

    Frozen: the app swaps whole `LoadedModel`s, so a request that holds one sees a
    predictor and a version that belong together.
    """

    predictor: Predictor
    model_uri: str
    model_name: str | None = None
    version: str | None = None
    loaded_at: str = field(default_factory=utc_now)


@dataclass(frozen=True)
class ResolvedModel:
    """What a model URI points at right now."""

    model_name: str | None
    version: str | None
    # The URI to load: an alias is replaced by the version it points at, so the predictor
    # and the reported version cannot disagree when the alias moves during the load.
    pinned_uri: str


_ALIAS_URI = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/]+)$")
_VERSION_URI = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$")


def is_model_dir(model_uri: str) -> bool:
    """True when `model_uri` is a local model folder rather than an MLflow URI."""
    return Path(model_uri).expanduser().is_dir()


def resolve_model(model_uri: str) -> ResolvedModel:
    """Resolve an alias URI to the version it points at now (one registry call).

    Raises:
        mlflow's MlflowException: the alias or registry does not exist or cannot be reached.
    """
    if is_model_dir(model_uri):
        return ResolvedModel(None, None, str(Path(model_uri).expanduser().resolve()))
    if m := _ALIAS_URI.match(model_uri):
        from mlflow import MlflowClient

        version = str(MlflowClient().get_model_version_by_alias(m["name"], m["alias"]).version)
        return ResolvedModel(m["name"], version, f"models:/{m['name']}/{version}")
    if m := _VERSION_URI.match(model_uri):
        return ResolvedModel(m["name"], m["version"], model_uri)
    return ResolvedModel(None, None, model_uri)


def load_model(model_uri: str, resolved: ResolvedModel | None = None, *,
               precision: str = "auto", threads: int | None = None,
               concurrency: int | None = None) -> LoadedModel:
    """Load `models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/...` or a model folder path.

    Args:
        model_uri: what the app was asked to serve (kept for /health).
        resolved: `resolve_model(model_uri)` when the caller already has it.
        precision, threads, concurrency: `ServeConfig.precision`, `model_threads` and
            `concurrency_limit` (see `Predictor.from_model_dir`); a registered model gets
            them as the pyfunc's `model_config`.

    Raises:
        FileNotFoundError / mlflow's MlflowException: with the URI in the message.
    """
    resolved = resolved or resolve_model(model_uri)
    if is_model_dir(resolved.pinned_uri):
        return LoadedModel(Predictor.from_model_dir(Path(resolved.pinned_uri), precision=precision,
                                                    threads=threads, concurrency=concurrency),
                           model_uri=resolved.pinned_uri)

    import mlflow

    pyfunc = mlflow.pyfunc.load_model(resolved.pinned_uri, model_config={
        "precision": precision, "threads": threads, "concurrency": concurrency})
    predictor = pyfunc.unwrap_python_model().predictor
    return LoadedModel(predictor, model_uri=model_uri, model_name=resolved.model_name,
                       version=resolved.version)
