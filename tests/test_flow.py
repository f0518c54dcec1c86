"""The whole `skinsense-pipeline` flow on a small synthetic sample, ending with a live app."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from skinsense.config import PipelineConfig
from skinsense.serving.deploy import check_prediction, health, stop_app

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def tiny_config(source, port: int, **train) -> PipelineConfig:
    return PipelineConfig.model_validate({
        "data": {"source": str(source), "cache_workers": 2},
        "train": {"archs": ["efficientnet_b0", "resnet18"], "epochs": 2, "image_size": 32,
                  "batch_size": 32, "pretrained": False, "num_workers": 0, **train},
        "serve": {"port": port, "startup_timeout_s": 240},
    })


def test_pipeline_end_to_end_leaves_a_working_app(prefect_harness, home, synthetic_sample,
                                                   free_port):
    from flows.pipeline import skinsense_pipeline

    try:
        result = skinsense_pipeline(config=tiny_config(synthetic_sample, free_port))
        url = f"http://127.0.0.1:{free_port}"
        assert result["app_url"] == url
        assert result["promoted"] is True  # the first model is always promoted
        state = health(url)
        assert state["status"] == "ok" and state["version"] == result["version"]
        assert state["arch"] == result["best"]
        assert check_prediction(url)  # a real image classified through gradio_client

        client = MlflowClient()
        experiment = client.get_experiment_by_name("skinsense")
        runs = client.search_runs([experiment.experiment_id])
        parents = [r for r in runs if r.data.tags.get("skinsense.kind") == "pipeline"]
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert {r.info.run_name for r in children} == {"efficientnet_b0", "resnet18"}
        for child in children:
            assert "test_balanced_accuracy" in child.data.metrics
            assert child.data.tags["dataset_fingerprint"] == parents[0].data.tags["dataset_fingerprint"]
        champion = client.get_model_version_by_alias("skinsense", "champion")
        assert str(champion.version) == result["version"]
    finally:
        stop_app(home.app)
    assert health(f"http://127.0.0.1:{free_port}") is None
