"""After deployment, end to end on the local stack (Prefect server, MLflow server and the
deployment runner on loopback, SQLite): drifted traffic to the app -> the monitoring
deployment emits `skinsense.drift.detected` -> the automation of prefect's trigger starts
`scheduled-retraining` with the event in its parameters; then confirmed cases up to the
threshold -> `skinsense.feedback.ready` -> the next run trains with them in the training part
only (its manifests say so), and the drift trigger's cool-down holds back a second drift run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest

from flow_runs import wait_final
from test_app import non_dermatoscopic_photo, running_app
from test_stack import free_ports

from skinsense.serving.app import example_images


def tiny_defaults(source: Path) -> dict:
    return {"data": {"source": str(source), "cache_workers": 2},
            "train": {"archs": ["resnet18"], "epochs": 1, "image_size": 32, "batch_size": 32,
                      "pretrained": False, "num_workers": 0},
            "eval": {"measure_efficiency": False}, "serve": {"deploy": False}}


def triggered_runs(client, deployment_id, event: str) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    runs = client.read_flow_runs(deployment_filter=DeploymentFilter(
        id=DeploymentFilterId(any_=[deployment_id])))
    return [r for r in runs if (r.parameters.get("triggered_by") or {}).get("event") == event]


def wait_for_runs(client, deployment_id, event: str, timeout_s: float = 120) -> list:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if runs := triggered_runs(client, deployment_id, event):
            return runs
        time.sleep(2)
    raise AssertionError(f"no run of scheduled-retraining started by {event} in {timeout_s} s")


def run_monitor(client, **config) -> dict:
    deployment = client.read_deployment_by_name("skinsense-monitor/daily")
    created = client.create_flow_run_from_deployment(deployment.id,
                                                     parameters={"config": config})
    run = wait_final(client, created.id, timeout_s=300)
    assert run.state.is_completed(), run.state
    return run


@pytest.mark.slow
@pytest.mark.e2e
def test_drift_and_feedback_start_retraining_on_the_local_stack(synthetic_sample, tmp_path,
                                                                monkeypatch):
    from gradio_client import Client, handle_file
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from skinsense import stack
    from skinsense.monitoring.feedback import add_feedback

    root = tmp_path / "home"
    prefect_port, mlflow_port, app_port = free_ports(3)
    monkeypatch.setenv("SKINSENSE_HOME", str(root))
    monkeypatch.delenv("PREFECT_HOME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("PREFECT_RUNNER_POLL_FREQUENCY", "2")
    monkeypatch.setenv("SKINSENSE_PIPELINE_DEFAULTS", json.dumps(tiny_defaults(synthetic_sample)))
    mlflow_url = f"http://127.0.0.1:{mlflow_port}"
    try:
        stack.up(root, prefect_port=prefect_port, mlflow_port=mlflow_port, app_port=app_port,
                 with_app=False)
        with temporary_settings(updates={PREFECT_API_URL:
                                         f"http://127.0.0.1:{prefect_port}/api"}), \
                get_client(sync_client=True) as client:
            retraining = client.read_deployment_by_name("skinsense-pipeline/scheduled-retraining")
            manual = client.read_deployment_by_name("skinsense-pipeline/manual")
            first = wait_final(client, client.create_flow_run_from_deployment(manual.id).id,
                               timeout_s=600)
            assert first.state.is_completed(), f"{first.state}: see {root}/stack/runner.log"

            # 1. Traffic unlike the test part: mostly photos that are not dermatoscopic.
            photos = [non_dermatoscopic_photo(tmp_path, name) for name in
                      ("cat", "astronaut", "coffee", "horse", "rocket")]
            with running_app("models:/skinsense@champion", tmp_path / "app.log",
                             env={"MLFLOW_TRACKING_URI": mlflow_url,
                                  "SKINSENSE_HOME": str(root)},
                             serve_config={"reload_interval_s": 0,
                                           "keep_images": True}) as url:
                app = Client(url, verbose=False)
                for i in range(40):
                    app.predict(handle_file(str(photos[i % len(photos)])), api_name="/assess")
                for path in example_images():
                    app.predict(handle_file(str(path)), api_name="/assess")

            # 2. The monitor emits the drift event; 3. the automation starts a retraining.
            run_monitor(client, min_requests=20, retrain_min_feedback=1000)
            drift_runs = wait_for_runs(client, retraining.id, "skinsense.drift.detected")
            assert len(drift_runs) == 1
            triggered_by = drift_runs[0].parameters["triggered_by"]
            assert triggered_by["payload"]["tests"], triggered_by
            assert {t["test"] for t in triggered_by["payload"]["tests"]} & {
                "ood_rate", "ood_score_ks", "class_mix_psi"}
            done = wait_final(client, drift_runs[0].id, timeout_s=600)
            assert done.state.is_completed(), f"{done.state}: see {root}/stack/runner.log"

            # 4. Confirmed cases up to the threshold -> feedback.ready -> a run with them.
            images = example_images()
            for path in images[:4]:
                add_feedback(path, dx="mel", dx_type="histo", entered_by="e2e", home=root)
            run_monitor(client, min_requests=20, retrain_min_feedback=4)
            feedback_runs = wait_for_runs(client, retraining.id, "skinsense.feedback.ready")
            assert feedback_runs[0].parameters["config"]["data"]["extra_sources"] == ["feedback"]
            done = wait_final(client, feedback_runs[0].id, timeout_s=600)
            assert done.state.is_completed(), f"{done.state}: see {root}/stack/runner.log"
            # The cool-down: the second monitoring run's drift event started no second run.
            assert len(triggered_runs(client, retraining.id, "skinsense.drift.detected")) == 1

        manifests = list((root / "datasets").rglob("extra_sources.json"))
        assert manifests, "the feedback run wrote no extra_sources.json"
        report = json.loads(manifests[0].read_text())["feedback"]
        assert len(report["added"]) == 4 and report["refused"] == []
        split_dir = manifests[0].parent.parent
        train = pd.read_csv(manifests[0].parent / "train.csv")
        assert set(report["added"]) <= set(train["image_id"])
        for part in ("val", "test"):
            held_out = pd.read_csv(split_dir / f"{part}.csv")
            assert not held_out["image_id"].str.startswith("FB_").any()
        # The feedback run's models record the confirmed cases they trained on, and the run
        # judged the champion (trained before them) on all four.
        cards = [json.loads(p.read_text()) for p in (root / "runs").rglob("model_card.json")]
        assert any(c.get("trained_feedback_ids") == sorted(report["added"]) for c in cards)
        from mlflow import MlflowClient

        tracking = MlflowClient(mlflow_url)
        judged = [r for r in tracking.search_runs(
            [tracking.get_experiment_by_name("skinsense").experiment_id])
            if "champion_in_field" in r.data.params]
        assert [r.data.metrics["champion.field_n"] for r in judged] == [4.0]
    finally:
        stack.down(root)
