"""Load the model to serve: a registered MLflow model URI or an exported model folder."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from skinsense.serving.predictor import Predictor


@dataclass
class LoadedModel:
    """A predictor and where it came from (shown by /health and the app's footer)."""

    predictor: Predictor
    model_uri: str
    model_name: str | None = None
    version: str | None = None
    loaded_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())


_ALIAS_URI = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/]+)$")
_VERSION_URI = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$")


def load_model(model_uri: str) -> LoadedModel:
    """Load `models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/...` or a model folder path.

    Raises:
        FileNotFoundError / mlflow's MlflowException: with the URI in the message.
    """
    path = Path(model_uri).expanduser()
    if path.is_dir():
        return LoadedModel(Predictor.from_model_dir(path), model_uri=str(path.resolve()))

    import mlflow
    from mlflow import MlflowClient

    name = version = None
    if m := _ALIAS_URI.match(model_uri):
        name = m["name"]
        version = str(MlflowClient().get_model_version_by_alias(name, m["alias"]).version)
        # Pin the version so the predictor and the reported version cannot disagree.
        model_uri_pinned = f"models:/{name}/{version}"
    elif m := _VERSION_URI.match(model_uri):
        name, version = m["name"], m["version"]
        model_uri_pinned = model_uri
    else:
        model_uri_pinned = model_uri
    pyfunc = mlflow.pyfunc.load_model(model_uri_pinned)
    predictor = pyfunc.unwrap_python_model().predictor
    return LoadedModel(predictor, model_uri=model_uri, model_name=name, version=version)
