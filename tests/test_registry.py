"""Champion/challenger promotion against a local SQLite MLflow store."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from skinsense import registry, tracking
from skinsense.models import build_model
from skinsense.packaging import ModelCard, save_model_dir


@pytest.fixture
def store(home):
    tracking.configure(home)
    return tracking.ensure_experiment("skinsense-test", home)


def candidate(tmp_path: Path, name: str, experiment_id: str) -> tuple[Path, str]:
    model_dir = save_model_dir(build_model("resnet18", image_size=32),
                               ModelCard(arch="resnet18", image_size=32), tmp_path / name)
    run_id = MlflowClient().create_run(experiment_id).info.run_id
    return model_dir, run_id


def register(tmp_path, experiment_id, name, score, test_key="k1", rescore=None):
    model_dir, run_id = candidate(tmp_path, name, experiment_id)
    version = registry.register_candidate(model_dir, run_id=run_id, model_name="skin",
                                          metric="balanced_accuracy", score=score,
                                          tags={"test_key": test_key})
    return registry.promote_if_better(
        "skin", version, metric="balanced_accuracy", challenger_score=score, min_delta=0.0,
        test_key=test_key, score_champion=rescore or (lambda _: pytest.fail("no re-scoring")))


def test_better_worse_better_gives_the_right_champion(tmp_path, store):
    first = register(tmp_path, store, "a", 0.50)
    assert first.promoted and registry.current_champion("skin") == first.version
    worse = register(tmp_path, store, "b", 0.40)
    assert not worse.promoted and registry.current_champion("skin") == first.version
    assert worse.champion_score == pytest.approx(0.50)
    equal = register(tmp_path, store, "c", 0.50)
    assert not equal.promoted  # min_delta 0 means strictly better
    better = register(tmp_path, store, "d", 0.60)
    assert better.promoted and registry.current_champion("skin") == better.version
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("skin", "challenger").version) == better.version
    assert "promoted" in client.get_model_version("skin", better.version).tags["promotion_decision"]


def test_champion_from_another_split_is_scored_again(tmp_path, store):
    register(tmp_path, store, "a", 0.90, test_key="old-split")
    scored = []
    decision = register(tmp_path, store, "b", 0.55, test_key="new-split",
                        rescore=lambda d: scored.append((d / "model_card.json").exists()) or 0.50)
    assert scored == [True]
    assert decision.promoted and decision.champion_score == pytest.approx(0.50)


def test_failure_while_registering_leaves_the_champion(tmp_path, store, monkeypatch):
    first = register(tmp_path, store, "a", 0.5)

    def broken(*args, **kwargs):
        raise RuntimeError("artifact store unavailable")

    monkeypatch.setattr(mlflow.pyfunc, "log_model", broken)
    with pytest.raises(RuntimeError, match="artifact store"):
        register(tmp_path, store, "b", 0.99)
    assert registry.current_champion("skin") == first.version


def test_pyfunc_model_returns_probabilities(tmp_path, store):
    import pandas as pd

    from skinsense.serving.app import EXAMPLES_DIR

    register(tmp_path, store, "a", 0.5)
    model = mlflow.pyfunc.load_model("models:/skin@champion")
    images = [p.read_bytes() for p in sorted(EXAMPLES_DIR.glob("*.jpg"))[:2]]
    probabilities = model.predict(pd.DataFrame({"image": images}))
    assert probabilities.shape == (2, 7)
    assert probabilities.sum(axis=1).round(5).tolist() == [1.0, 1.0]
