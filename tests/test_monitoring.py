"""Monitoring: the drift statistics on synthetic windows, and the `skinsense-monitor` flow
against a registered champion (artifact, MLflow run, events on the Prefect server)."""

from __future__ import annotations

import shutil
from datetime import timedelta

import numpy as np
import pandas as pd
import pytest

from skinsense.config import MonitorConfig
from skinsense.labels import CLASS_CODES
from skinsense.monitoring.database import Feedback, Prediction, engine_for, utc_now
from skinsense.monitoring.drift import compare, window_bounds
from skinsense.monitoring.reference import save_reference

RNG_SEED = 0


def reference() -> dict:
    rng = np.random.default_rng(RNG_SEED)
    return {"n_images": 1500, "accuracy": 0.8, "ood_rate": 0.05, "quality_rate": 0.0,
            "referral_rate": 0.25, "referral_sensitivity": 0.95,
            "class_mix": {"akiec": 45, "bcc": 75, "bkl": 165, "df": 17, "mel": 167,
                          "nv": 1006, "vasc": 20},
            "ood_scores": rng.normal(100, 10, 1500).tolist()}


def register_champion(home, tmp_path_factory) -> tuple:
    """The exported template with this module's reference, registered as the champion in an
    MLflow store under `home`; returns its folder, version and the store."""
    from test_app import Store, exported_template, register_version

    from skinsense.lifecycle import tracking

    tracking.configure(home)
    model_dir = shutil.copytree(exported_template(tmp_path_factory), home.root / "champion")
    save_reference(model_dir, reference())
    store = Store(home, tracking.tracking_uri(home), tracking.ensure_experiment("skinsense", home))
    return model_dir, register_version(store, model_dir), store


def window(n: int, *, drifted: bool, seed: int = 1) -> pd.DataFrame:
    """Log rows like the app writes: like the test part, or shifted towards melanomas and
    out-of-domain photos."""
    rng = np.random.default_rng(seed)
    ref = reference()
    mix = np.array([ref["class_mix"][c] for c in CLASS_CODES], float)
    if drifted:
        mix[CLASS_CODES.index("mel")] *= 6
    top = rng.choice(CLASS_CODES, n, p=mix / mix.sum())
    ood_share = 0.35 if drifted else 0.05
    scores = rng.normal(130 if drifted else 100, 10, n)
    outcome = np.where(rng.random(n) < ood_share, "out_of_domain", "answered")
    referral = np.where(outcome == "answered",
                        np.isin(top, ["mel", "bcc", "akiec"]) | (rng.random(n) < 0.05), None)
    now = utc_now()
    return pd.DataFrame({
        "created_at": [now - timedelta(minutes=3 * i + 1) for i in range(n)],
        "endpoint": "assess", "outcome": outcome, "model_name": "skinsense",
        "model_version": "1", "backend": "onnxruntime",
        "image_sha256": [f"{i:064x}" for i in range(n)], "width": 600, "height": 450,
        "quality_issue": None, "gate_status": "on", "in_domain": outcome == "answered",
        "ood_score": scores, "probabilities": None,
        "top_class": top, "referral": referral, "referral_score": None, "latency_ms": 90.0,
        "image_path": None})


def test_too_few_requests_are_reported_not_tested():
    start, end = window_bounds(24)
    report = compare(window(10, drifted=True), reference(), MonitorConfig(), start=start,
                     end=end)
    assert not report.enough and report.checks == []
    assert "only 10 requests" in report.message and "too few" in report.message


def test_a_window_like_the_test_part_crosses_nothing_and_a_drifted_one_does():
    start, end = window_bounds(24)
    calm = compare(window(400, drifted=False), reference(), MonitorConfig(), start=start,
                   end=end)
    assert calm.enough and calm.crossed == [], calm.message
    assert {c.name for c in calm.checks} >= {"quality_rate", "ood_rate", "ood_score_ks",
                                             "class_mix_psi", "referral_rate"}
    drifted = compare(window(400, drifted=True), reference(), MonitorConfig(), start=start,
                      end=end)
    assert {c.name for c in drifted.crossed} >= {"ood_rate", "ood_score_ks", "class_mix_psi",
                                                 "referral_rate"}
    mix = next(c for c in drifted.checks if c.name == "class_mix_psi")
    assert mix.figures["p_value"] < 0.01 and mix.value > 0.2


def test_thresholds_are_config_fields():
    start, end = window_bounds(24)
    lenient = MonitorConfig(psi_threshold=5.0, ood_rate_increase=0.9, p_value=1e-300,
                            referral_rate_change=0.9)
    report = compare(window(400, drifted=True), reference(), lenient, start=start, end=end)
    assert report.crossed == []


def insert(frame: pd.DataFrame) -> None:
    with engine_for().begin() as connection:
        connection.execute(Prediction.__table__.insert(), frame.to_dict("records"))


@pytest.mark.slow
def test_the_monitor_flow_writes_its_artifact_and_run_and_emits_the_events(
        prefect_harness, home, tmp_path_factory):
    import mlflow
    from prefect.client.orchestration import get_client
    from test_app import MODEL_NAME

    from flows.monitor import skinsense_monitor
    from skinsense.lifecycle.packaging import load_card

    model_dir, version, store = register_champion(home, tmp_path_factory)
    insert(window(300, drifted=True))
    trained = pd.Timestamp(load_card(model_dir).trained_at)
    with engine_for().begin() as connection:
        connection.execute(Feedback.__table__.insert(), [
            {"created_at": utc_now(), "image_sha256": f"{i:064x}", "lesion_id": f"L{i}",
             "dx": "mel", "dx_type": "histo", "entered_by": "t"} for i in range(3)])
    assert trained < pd.Timestamp(utc_now())

    result = skinsense_monitor(MonitorConfig(model_name=MODEL_NAME, retrain_min_feedback=3))
    assert result["events"] == ["skinsense.drift.detected", "skinsense.feedback.ready"]
    assert result["champion_version"] == version
    # The monitor leaves no experiment active in the process: a pipeline run later in the
    # same worker process still registers into its own experiment's run.
    from test_app import register_version
    assert int(register_version(store, model_dir, champion=False)) == int(version) + 1

    run = mlflow.get_run(result["mlflow_run_id"])
    assert run.data.tags["drift"] == "true" and run.data.metrics["requests"] == 300
    assert mlflow.get_experiment(run.info.experiment_id).name == "skinsense-monitoring"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"report.json", "over_time.png", "class_mix.png", "ood_scores.png"} <= artifacts

    with get_client(sync_client=True) as client:
        markdown = client.request("POST", "/artifacts/filter", json={
            "artifacts": {"key": {"any_": ["skinsense-monitoring"]}}}).json()
        assert markdown and "data:image/png;base64," in markdown[0]["data"]
        assert "class_mix_psi" in markdown[0]["data"]
        deadline = pd.Timestamp.now() + pd.Timedelta(seconds=30)
        while True:
            events = client.request("POST", "/events/filter", json={"filter": {
                "event": {"prefix": ["skinsense."]}}}).json()["events"]
            names = {e["event"] for e in events}
            if names >= {"skinsense.drift.detected", "skinsense.feedback.ready"} or \
                    pd.Timestamp.now() > deadline:
                break
        assert names >= {"skinsense.drift.detected", "skinsense.feedback.ready"}
        drift = next(e for e in events if e["event"] == "skinsense.drift.detected")
        assert {t["test"] for t in drift["payload"]["tests"]} >= {"class_mix_psi", "ood_rate"}


def test_the_pipeline_judges_the_champion_on_confirmed_cases_it_never_trained_on(
        home, tmp_path_factory):
    """Issue 21: evaluation reports the champion too (not only the candidates) on the
    confirmed cases, on the parent run and in the report."""
    from mlflow import MlflowClient
    from test_app import MODEL_NAME

    from skinsense import reports, stages
    from skinsense.config import PipelineConfig
    from skinsense.monitoring.feedback import add_feedback
    from skinsense.serving.app import example_images
    from skinsense.serving.prediction_log import PredictionLog

    _, version, store = register_champion(home, tmp_path_factory)
    cfg = PipelineConfig.model_validate({"serve": {"model_name": MODEL_NAME},
                                         "eval": {"field_min_cases": 3,
                                                  "bootstrap_resamples": 100}})
    parent = MlflowClient().create_run(store.experiment_id).info.run_id
    assert stages.champion_in_field(cfg, home, parent_run_id=parent) == {}  # no case yet
    log = PredictionLog(None, home.root)
    for path, dx in zip(example_images()[:3], ("mel", "nv", "bcc"), strict=True):
        log.record(endpoint="assess", image=str(path), latency_ms=1.0, top_class="nv")
        add_feedback(path, dx=dx, dx_type="histo", entered_by="t", home=home.root)
    figures = stages.champion_in_field(cfg, home, parent_run_id=parent)
    assert figures["champion_version"] == version and figures["field_n"] == 3.0
    assert (0 <= figures["field_accuracy_ci_low"] <= figures["field_accuracy"]
            <= figures["field_accuracy_ci_high"] <= 1)
    logged = MlflowClient().get_run(parent).data
    assert logged.metrics["champion.field_n"] == 3.0
    assert logged.metrics["champion.field_accuracy"] == figures["field_accuracy"]
    assert logged.params["champion_in_field"] == version
    text = reports.field_markdown(stages.field_rows([], figures))
    assert f"| champion (version {version}) | 3 | {figures['field_accuracy']:.3f} [" in text
