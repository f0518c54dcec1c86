"""The whole `skinsense-pipeline` flow on a small synthetic sample, ending with a live app."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient
from prefect import get_client

from skinsense.config import PipelineConfig
from skinsense.serving.deploy import check_prediction, health, stop_app

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def tiny_config(source, port: int, **train) -> PipelineConfig:
    return PipelineConfig.model_validate({
        "data": {"source": str(source), "cache_workers": 2},
        "train": {"archs": ["efficientnet_b0", "resnet18"], "epochs": 2, "image_size": 32,
                  "batch_size": 32, "pretrained": False, "num_workers": 0, **train},
        "serve": {"port": port, "startup_timeout_s": 240},
        # A test part of ~37 images: small groups still get figures, so gaps are computed.
        "eval": {"subgroup_min_images": 3, "bootstrap_resamples": 200},
    })


def assert_calibrated_triaged_and_audited(client: MlflowClient, child, tmp_path) -> None:
    """A child run holds the calibration, referral and subgroup figures and artifacts."""
    import mlflow
    import pandas as pd

    metrics = child.data.metrics
    assert {"temperature", "referral_threshold", "val_nll", "val_nll_uncalibrated",
            "test_ece", "test_ece_uncalibrated", "test_nll", "test_nll_uncalibrated",
            "test_referral_sensitivity", "test_referral_sensitivity_ci_low",
            "test_referral_sensitivity_ci_high", "test_referral_specificity",
            "test_referral_specificity_ci_low", "test_referral_specificity_ci_high"} <= set(metrics)
    assert metrics["val_nll"] <= metrics["val_nll_uncalibrated"]  # what the fit minimizes
    assert metrics["val_referral_sensitivity"] >= 0.95            # the default target
    assert any(key.startswith("test_gap_balanced_accuracy_") for key in metrics)
    # The out-of-domain gate: fitted with the calibration, scored against skimage's photos.
    assert {"ood_threshold", "val_ood_rate", "test_ood_auroc", "test_ood_fpr_at_95_tpr",
            "test_ood_rate", "test_ood_auroc_max_softmax"} <= set(metrics)
    evaluation = {a.path for a in client.list_artifacts(child.info.run_id, "evaluation")}
    # The test part's refusal rate on the run is the evaluation's, and the gate's verdict
    # (usable or not, with a warning over twice the nominal rate) follows from its figures.
    from skinsense.evaluation.ood import judge_gate

    report_path = mlflow.artifacts.download_artifacts(
        run_id=child.info.run_id, artifact_path="evaluation/evaluation.json",
        dst_path=str(tmp_path / f"{child.info.run_id}-report"))
    gate = json.loads(Path(report_path).read_text())["ood_gate"]
    assert metrics["test_ood_rate"] == pytest.approx(gate["ood_rate"])
    expected_status, _, expected_warning = judge_gate(gate, 95.0)
    assert gate["status"] == ("unusable" if gate["reason"] else "usable")
    if expected_status == "unusable":
        assert gate["status"] == "unusable"
    assert gate["warning"] == expected_warning
    assert bool(gate["warning"]) is (metrics["test_ood_rate"] > 0.10)
    assert {"evaluation/reliability_diagram.png", "evaluation/referral_roc.png",
            "evaluation/ood_scores.png", "evaluation/ood_reference_scores.csv"} <= evaluation
    csv_path = mlflow.artifacts.download_artifacts(
        run_id=child.info.run_id, artifact_path="subgroups/subgroup_metrics.csv",
        dst_path=str(tmp_path / child.info.run_id))
    table = pd.read_csv(csv_path)
    assert list(table.columns) == ["attribute", "group", "n", "metric", "value", "ci_low",
                                   "ci_high"]
    assert set(table["attribute"]) == {"all", "sex", "age_band", "localization", "dx_type"}


def assert_card_has_the_new_fields(champion, tmp_path) -> None:
    """The registered model card carries the temperature, the rule and the audit's gaps."""
    from skinsense.lifecycle.packaging import load_card
    from skinsense.lifecycle.registry import download_model_dir
    from skinsense.trust.gate import GATE_FILE

    model_dir = download_model_dir("skinsense", str(champion.version), tmp_path / "champ")
    card = load_card(model_dir)
    assert (model_dir / GATE_FILE).is_file() and card.ood_percentile == 95
    assert card.ood_threshold is not None
    assert float(champion.tags["ood_threshold"]) == card.ood_threshold
    assert card.ood_gate["test"]["ood_auroc"] == card.metrics["test_ood_auroc"]
    assert card.ood_gate["status"] in ("usable", "unusable")
    assert champion.tags["ood_gate_status"] == card.ood_gate["status"]
    assert (card.ood_gate["status"] == "unusable") is bool(card.ood_gate["reason"])
    assert card.calibration["temperature"] == card.temperature
    assert card.calibration["helped"] is (
        card.metrics["test_nll"] < card.metrics["test_nll_uncalibrated"]
        and card.metrics["test_ece"] <= card.metrics["test_ece_uncalibrated"])
    assert card.calibrated is card.calibration["helped"]
    assert card.temperature != 1.0 and float(champion.tags["temperature"]) == card.temperature
    assert card.referral_threshold is not None and card.referral_sensitivity_target == 0.95
    assert {"sensitivity", "sensitivity_ci_low", "specificity", "n_malignant"} <= set(
        card.test_referral)
    assert card.subgroups["gaps"]["balanced_accuracy"]
    assert "not a clinical validation" in card.referral_rule
    assert "test_referral_sensitivity" in champion.tags


def test_pipeline_end_to_end_leaves_a_working_app(prefect_harness, home, synthetic_sample,
                                                   free_port, tmp_path):
    from flows.pipeline import skinsense_pipeline

    try:
        result = skinsense_pipeline(config=tiny_config(synthetic_sample, free_port))
        url = f"http://127.0.0.1:{free_port}"
        assert result["app_url"] == url
        assert result["promoted"] is True  # the first model is always promoted
        state = health(url)
        assert state["status"] == "ok" and state["version"] == result["version"]
        assert state["arch"] == result["best"]
        # A model trained this briefly may have features that barely vary (issue 19): its
        # gate is then unusable, the app serves it without the gate and /health says why.
        from skinsense.lifecycle.packaging import load_card
        from skinsense.lifecycle.registry import download_model_dir

        served = load_card(download_model_dir("skinsense", result["version"],
                                              tmp_path / "served"))
        if served.ood_gate["status"] == "unusable":
            assert state["ood_gate"]["status"] == "unusable" and state["ood_threshold"] is None
            assert served.ood_gate["reason"] in state["ood_gate"]["note"]
        else:
            assert state["ood_gate"]["status"] == "on" and state["ood_threshold"] > 0
        assert check_prediction(url)  # a real image run through the model via gradio_client

        client = MlflowClient()
        experiment = client.get_experiment_by_name("skinsense")
        runs = client.search_runs([experiment.experiment_id])
        parents = [r for r in runs if r.data.tags.get("skinsense.kind") == "pipeline"]
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        contexts = {tag.value for ds in parents[0].inputs.dataset_inputs for tag in ds.tags}
        assert contexts == {"train", "validation", "test"}
        assert {r.info.run_name for r in children} == {"efficientnet_b0", "resnet18"}
        comparison = {a.path for a in client.list_artifacts(parents[0].info.run_id, "comparison")}
        assert {"comparison/comparison.csv", "comparison/model_comparison.png"} <= comparison
        for child in children:
            assert "test_balanced_accuracy" in child.data.metrics
            assert "cpu_latency_ms" in child.data.metrics
            assert any(key.startswith("system/") for key in child.data.metrics)
            assert child.data.tags["prefect_flow_run_id"] == parents[0].data.tags["prefect_flow_run_id"]
            evaluation = {a.path for a in client.list_artifacts(child.info.run_id, "evaluation")}
            assert "evaluation/confusion_matrix.png" in evaluation
            assert child.data.tags["dataset_fingerprint"] == parents[0].data.tags["dataset_fingerprint"]
            assert_calibrated_triaged_and_audited(client, child, tmp_path)
        champion = client.get_model_version_by_alias("skinsense", "champion")
        assert str(champion.version) == result["version"]
        assert_card_has_the_new_fields(champion, tmp_path)

        # A second run taking its data stages from Prefect's cache is shown on a real server
        # (tests/test_stack_runs.py); reloading a running app in place in tests/test_deploy.py.
        keys = {a.key for a in get_client(sync_client=True).read_artifacts()}
        assert {"skinsense-data-summary", "skinsense-metrics", "skinsense-promotion",
                "skinsense-app", "skinsense-subgroups"} <= keys
    finally:
        stop_app(home.app)
    assert health(f"http://127.0.0.1:{free_port}") is None


def test_bad_parameters_are_rejected_before_anything_runs(prefect_harness, home):
    from prefect.exceptions import ParameterTypeError

    from flows.pipeline import skinsense_pipeline

    with pytest.raises(ParameterTypeError, match="epochs"):
        skinsense_pipeline(config={"train": {"epochs": 0}})
    assert not any(home.downloads.iterdir())


def test_a_missing_local_source_fails_at_once_with_a_clear_message(prefect_harness, home,
                                                                    tmp_path):
    from flows.pipeline import skinsense_pipeline
    from skinsense.data.dataverse import FetchError

    with pytest.raises(FetchError, match="does not exist"):
        skinsense_pipeline(config=PipelineConfig.model_validate(
            {"data": {"source": str(tmp_path / "nowhere")}, "train": {"pretrained": False}}))


def test_fetch_is_retried_for_network_failures_only():
    import requests

    from skinsense.data.dataverse import FetchError, is_transient

    try:
        try:
            raise requests.ConnectionError("connection reset")
        except requests.ConnectionError as exc:
            raise FetchError("download failed 6 times") from exc
    except FetchError as network_failure:
        assert is_transient(network_failure)
    assert not is_transient(FetchError("The data source 'x' does not exist"))
