"""Champion/challenger registration in the MLflow model registry.

Every run's best candidate is registered and gets the alias `challenger`. It becomes
`champion` only when it beats the current champion on the same test part (the champion is
evaluated again when it was tested on another split or data), so the registry only ever
promotes a better model. Any failure leaves the champion alias where it was.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from pydantic import BaseModel

from skinsense.packaging import load_card
from skinsense.serving.pyfunc import MODEL_DIR_ARTIFACT

# Models from code: MLflow stores this file, not a cloudpickle of an object, so loading a
# registered model never unpickles code.
PYFUNC_CODE = Path(__file__).parent / "serving" / "pyfunc_model.py"

CHAMPION, CHALLENGER = "champion", "challenger"


class PromotionDecision(BaseModel):
    """What happened to a challenger, with both scores."""

    model_name: str
    version: str
    metric: str
    challenger_score: float
    champion_version: str | None
    champion_score: float | None
    promoted: bool
    reason: str


def register_candidate(model_dir: Path, *, run_id: str, model_name: str,
                       metric: str, score: float, tags: dict[str, str]) -> str:
    """Log the model folder as a pyfunc model in `run_id`, register it, alias `challenger`.

    Returns:
        The new model version.
    """
    card = load_card(model_dir)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_CODE),
            artifacts={MODEL_DIR_ARTIFACT: str(model_dir)},
            registered_model_name=model_name,
            metadata={"model_card": card.model_dump(mode="json")},
            signature=_signature(),
            pip_requirements=_pip_requirements(),
        )
    version = str(info.registered_model_version)
    client = MlflowClient()
    for key, value in {**tags, "arch": card.arch, f"test_{metric}": repr(float(score)),
                       "dataset_fingerprint": card.dataset_fingerprint}.items():
        client.set_model_version_tag(model_name, version, key, str(value))
    client.set_registered_model_alias(model_name, CHALLENGER, version)
    return version


def current_champion(model_name: str) -> str | None:
    """The champion's version, or None when there is none yet."""
    try:
        return str(MlflowClient().get_model_version_by_alias(model_name, CHAMPION).version)
    except MlflowException:
        return None


def download_model_dir(model_name: str, version: str, dst: Path) -> Path:
    """The model folder (weights + card) of a registered version, downloaded into `dst`."""
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{model_name}/{version}", dst_path=str(dst))
    return Path(local) / "artifacts" / Path(_artifact_name(Path(local)))


def _artifact_name(model_root: Path) -> str:
    children = [p for p in (model_root / "artifacts").iterdir() if (p / "model_card.json").exists()]
    if len(children) != 1:
        raise FileNotFoundError(f"{model_root} holds no SkinSense model folder")
    return children[0].name


def promote_if_better(
    model_name: str,
    version: str,
    *,
    metric: str,
    challenger_score: float,
    min_delta: float,
    test_key: str,
    score_champion: Callable[[Path], float],
) -> PromotionDecision:
    """Make `version` the champion if it beats the current one by more than `min_delta`.

    Args:
        model_name: registered model name.
        version: the challenger's version.
        metric: name of the compared metric (higher is better).
        challenger_score: the challenger's score on this run's test part.
        min_delta: required margin; 0 means strictly better.
        test_key: identifies this run's test part (data fingerprint and split seed); a champion
            tagged with another key is scored again with `score_champion`.
        score_champion: evaluates a model folder on this run's test part.
    """
    client = MlflowClient()
    champion = current_champion(model_name)
    champion_score: float | None = None
    if champion is None:
        promoted, reason = True, "no champion yet: the first model is promoted"
    else:
        champion_mv = client.get_model_version(model_name, champion)
        if champion_mv.tags.get("test_key") == test_key and f"test_{metric}" in champion_mv.tags:
            champion_score = float(champion_mv.tags[f"test_{metric}"])
        else:
            with tempfile.TemporaryDirectory(prefix="skinsense-champion-") as tmp:
                champion_score = score_champion(download_model_dir(model_name, champion, Path(tmp)))
        promoted = challenger_score > champion_score + min_delta
        reason = (f"{metric} {challenger_score:.4f} vs champion v{champion} {champion_score:.4f} "
                  f"(min_delta {min_delta}): " + ("promoted" if promoted else "kept the champion"))
    decision = PromotionDecision(
        model_name=model_name, version=version, metric=metric, challenger_score=challenger_score,
        champion_version=champion, champion_score=champion_score, promoted=promoted, reason=reason)
    client.set_model_version_tag(model_name, version, "promotion_decision", reason)
    if champion_score is not None:
        client.set_model_version_tag(model_name, version, "champion_score", repr(float(champion_score)))
    if promoted:
        client.set_registered_model_alias(model_name, CHAMPION, version)
    return decision


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    from skinsense.labels import CLASS_CODES

    return ModelSignature(inputs=Schema([ColSpec("binary", "image")]),
                          outputs=Schema([ColSpec("double", code) for code in CLASS_CODES]))


def _pip_requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in
            ("torch", "torchvision", "pillow", "numpy", "pandas", "safetensors", "mlflow")]
