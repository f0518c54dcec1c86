"""The deployments, end to end: a real Prefect server, MLflow server and runner on loopback.

The `manual` deployment is started through the Prefect API (the call the UI's Run button
makes) on a small synthetic sample; the run must leave its parent and child runs and the
`champion` alias on the MLflow server and an app that answers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from deployments import definitions
from test_stack import free_ports

ROOT = Path(__file__).resolve().parents[1]




@pytest.mark.parametrize("prefect_file", ["prefect.yaml", "docker/prefect.compose.yaml"])
def test_prefect_yaml_matches_the_definitions(prefect_file):
    spec = yaml.safe_load((ROOT / prefect_file).read_text())
    by_name = {d["name"]: d for d in spec["deployments"]}
    # The fan-out child: on the same pool, started only by the pipeline (no schedule).
    child = by_name.pop(definitions.TRAIN_DEPLOYMENT_NAME)
    assert child["entrypoint"] == definitions.TRAIN_FLOW_ENTRYPOINT
    assert child["work_pool"]["name"] == definitions.WORK_POOL
    assert child["enforce_parameter_schema"] is True and child["schedules"] == []
    assert set(by_name) == set(definitions.DEPLOYMENTS)
    for name, deployment in by_name.items():
        assert deployment["entrypoint"] == definitions.FLOW_ENTRYPOINT
        assert deployment["work_pool"]["name"] == definitions.WORK_POOL
        assert deployment["enforce_parameter_schema"] is True
        cron = definitions.DEPLOYMENTS[name]["cron"]
        assert [s["cron"] for s in deployment["schedules"]] == ([cron] if cron else [])
    assert by_name[definitions.SCHEDULED]["schedules"][0]["timezone"] == "UTC"


def test_served_deployments_carry_schedule_and_schema():
    from flows.pipeline import skinsense_pipeline

    built = {d.name: d for d in definitions.to_deployments(skinsense_pipeline)}
    assert set(built) == {"scheduled-retraining", "manual"}
    assert built["scheduled-retraining"].schedules[0].schedule.cron == "0 3 * * 1"
    assert not built["manual"].schedules
    assert all(d.enforce_parameter_schema for d in built.values())
    schema = built["manual"]._parameter_openapi_schema.model_dump()
    assert "config" in schema["properties"]  # the UI renders PipelineConfig as a form


@pytest.fixture(scope="module")
def live_stack(tmp_path_factory):
    """Prefect server + MLflow server + runner in a fresh SKINSENSE_HOME; a client on them."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from skinsense import stack

    root = tmp_path_factory.mktemp("stack-home")
    prefect_port, mlflow_port, app_port = free_ports(3)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SKINSENSE_HOME", str(root))
        mp.delenv("PREFECT_HOME", raising=False)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        try:
            stack.up(root, prefect_port=prefect_port, mlflow_port=mlflow_port,
                     app_port=app_port, with_app=False)
            api = f"http://127.0.0.1:{prefect_port}/api"
            with temporary_settings(updates={PREFECT_API_URL: api}):
                with get_client(sync_client=True) as client:
                    yield {"client": client, "root": root, "api": api,
                           "mlflow": f"http://127.0.0.1:{mlflow_port}",
                           "prefect_home": root / "prefect",
                           "ports": {"prefect_port": prefect_port,
                                     "mlflow_port": mlflow_port, "app_port": app_port}}
        finally:
            stack.down(root)


def wait_final(client, flow_run_id, timeout_s: float = 300):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = client.read_flow_run(flow_run_id)
        if run.state is not None and run.state.is_final():
            return run
        time.sleep(2)
    raise AssertionError(f"flow run {flow_run_id} did not finish in {timeout_s} s")


def tiny_parameters(source: Path, port: int, deploy: bool = True) -> dict:
    return {"config": {
        "data": {"source": str(source), "cache_workers": 2},
        "train": {"archs": ["resnet18"], "epochs": 1, "image_size": 32, "batch_size": 32,
                  "pretrained": False, "num_workers": 0},
        "serve": {"deploy": deploy, "port": port, "startup_timeout_s": 240},
    }}


@pytest.mark.slow
@pytest.mark.e2e
def test_a_bad_parameter_is_refused_before_anything_runs(live_stack):
    from prefect.exceptions import PrefectHTTPStatusError

    client = live_stack["client"]
    deployment = client.read_deployment_by_name("skinsense-pipeline/manual")
    with pytest.raises(PrefectHTTPStatusError) as refused:
        client.create_flow_run_from_deployment(
            deployment.id, parameters={"config": {"train": {"epochs": 0}}})
    assert refused.value.response.status_code == 409
    detail = refused.value.response.json()["detail"]
    assert "config.train.epochs" in detail and "minimum of 1" in detail
    # Nothing was created for it (the server's scheduler may already have queued the weekly
    # deployment's next runs, so only this deployment's runs count).
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    assert client.read_flow_runs(deployment_filter=DeploymentFilter(
        id=DeploymentFilterId(any_=[deployment.id]))) == []


@pytest.mark.slow
@pytest.mark.e2e
def test_manual_deployment_runs_the_pipeline_through_the_api(live_stack, synthetic_sample):
    from mlflow import MlflowClient

    from skinsense.paths import Home
    from skinsense.serving.deploy import health, stop_app

    client = live_stack["client"]
    limit = client.read_global_concurrency_limit_by_name(definitions.GPU_LIMIT)
    assert limit.limit >= 1

    deployment = client.read_deployment_by_name("skinsense-pipeline/manual")
    (port,) = free_ports(1)
    url = f"http://127.0.0.1:{port}"
    try:
        created = client.create_flow_run_from_deployment(
            deployment.id, parameters=tiny_parameters(synthetic_sample, port))
        run = wait_final(client, created.id)
        assert run.state.is_completed(), f"{run.state}: see {live_stack['root']}/stack/runner.log"

        # Both URIs: another test may have set this process's default registry elsewhere.
        mlflow = MlflowClient(tracking_uri=live_stack["mlflow"], registry_uri=live_stack["mlflow"])
        experiment = mlflow.get_experiment_by_name("skinsense")
        runs = mlflow.search_runs([experiment.experiment_id])
        parents = [r for r in runs if r.data.tags.get("skinsense.kind") == "pipeline"]
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert parents[0].data.tags["prefect_flow_run_id"] == str(created.id)
        assert [c.info.run_name for c in children] == ["resnet18"]
        assert children[0].data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        champion = mlflow.get_model_version_by_alias("skinsense", "champion")
        assert champion.run_id in {parents[0].info.run_id, children[0].info.run_id} or champion.version

        state = health(url)
        assert state is not None and state["status"] == "ok"
        assert str(state["version"]) == str(champion.version)
    finally:
        stop_app(Home(live_stack["root"]).app)
    assert health(url) is None



@pytest.mark.slow
@pytest.mark.e2e
def test_a_second_run_takes_the_data_stage_from_the_cache(live_stack, synthetic_sample):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    client = live_stack["client"]
    deployment = client.read_deployment_by_name("skinsense-pipeline/manual")
    (port,) = free_ports(1)
    created = client.create_flow_run_from_deployment(
        deployment.id, parameters=tiny_parameters(synthetic_sample, port, deploy=False))
    run = wait_final(client, created.id)
    assert run.state.is_completed(), str(run.state)
    task_runs = client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[created.id])))
    data_states = {t.name: t.state.name for t in task_runs
                   if t.name.split("-")[0] in ("fetch", "validate", "split", "oversample", "cache")}
    assert data_states and all(s == "Cached" for s in data_states.values()), data_states


@pytest.mark.slow
@pytest.mark.e2e
def test_the_weekly_schedule_survives_a_runner_restart(live_stack):
    from skinsense import stack
    from skinsense.processes import pid_alive

    client, root = live_stack["client"], live_stack["root"]

    def schedule() -> tuple[bool, list[bool]]:
        deployment = client.read_deployment_by_name(
            f"skinsense-pipeline/{definitions.SCHEDULED}")
        return deployment.paused, [s.active for s in deployment.schedules]

    assert schedule() == (False, [True])
    runner = next(r for r in stack.status(root) if r["name"] == stack.RUNNER)
    assert runner["running"]
    # A graceful stop (what Ctrl-C, systemd or a container stop sends first): the runner has
    # every chance to pause its schedules on the way out, as Prefect's default would.
    os.kill(runner["pid"], signal.SIGTERM)
    deadline = time.monotonic() + 120
    while pid_alive(runner["pid"]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not pid_alive(runner["pid"]), "the runner did not stop within 120 s of SIGTERM"
    assert schedule() == (False, [True])

    stack.up(root, with_app=False, parts=(stack.RUNNER,), **live_stack["ports"])
    assert schedule() == (False, [True])
    assert next(r for r in stack.status(root) if r["name"] == stack.RUNNER)["healthy"]


@pytest.mark.slow
@pytest.mark.e2e
def test_prefect_deploy_registers_the_yaml_deployments_on_a_process_pool(live_stack):
    env = {**os.environ, "PREFECT_API_URL": live_stack["api"],
           "PREFECT_HOME": str(live_stack["prefect_home"])}
    prefect = [sys.executable, "-m", "prefect"]
    subprocess.run([*prefect, "work-pool", "create", definitions.WORK_POOL, "--type", "process"],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=120)
    out = subprocess.run([*prefect, "--no-prompt", "deploy", "--all"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    client = live_stack["client"]
    scheduled = client.read_deployment_by_name("skinsense-pipeline/scheduled-retraining")
    manual = client.read_deployment_by_name("skinsense-pipeline/manual")
    assert scheduled.work_pool_name == manual.work_pool_name == definitions.WORK_POOL
    assert scheduled.schedules[0].schedule.cron == definitions.RETRAIN_CRON
    assert scheduled.schedules[0].active and not manual.schedules
    assert scheduled.pull_steps[0]["prefect.deployments.steps.set_working_directory"][
        "directory"] == str(ROOT)
