"""Runs on the local stack, end to end: a real Prefect server, MLflow server, the deployment
runner and two process workers on loopback, started once for the whole module.

- A bad parameter is refused by the server before anything runs.
- The `manual` deployment, started through the Prefect API (the call the UI's Run button
  makes), runs a pipeline with `train.fan_out`: its two architectures train in two child runs
  of `train-architecture` on the two workers, at the same time, and the parent registers the
  best. A second run finds its data stages in Prefect's cache, and one child that cannot see
  the shared SKINSENSE_HOME fails the pipeline by name while the other's results are kept.
- The weekly schedule survives a graceful restart of the runner.
- `prefect deploy --all` registers prefect.yaml's deployments on the process pool (last: it
  replaces the runner's `manual` deployment with the pool's).

A plain (not fanned-out) deployment run, with the app it deploys, runs on the team stack in
tests/test_team_stack.py (Postgres, logins on).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deployments import definitions
from flow_runs import wait_final
from test_stack import free_ports

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def local_stack(module_tmp):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from skinsense import stack

    root = module_tmp("fanout-home")
    prefect_port, mlflow_port, app_port = free_ports(3)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SKINSENSE_HOME", str(root))
        mp.delenv("PREFECT_HOME", raising=False)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        # Workers and the runner look for new runs every 2 s instead of 10.
        mp.setenv("PREFECT_WORKER_QUERY_SECONDS", "2")
        mp.setenv("PREFECT_RUNNER_POLL_FREQUENCY", "2")
        try:
            records = stack.up(root, prefect_port=prefect_port, mlflow_port=mlflow_port,
                               app_port=app_port, with_app=False, workers=2)
            api = f"http://127.0.0.1:{prefect_port}/api"
            with temporary_settings(updates={PREFECT_API_URL: api}):
                with get_client(sync_client=True) as client:
                    yield {"client": client, "root": root, "records": records, "api": api,
                           "mlflow": f"http://127.0.0.1:{mlflow_port}",
                           "prefect_home": root / "prefect",
                           "ports": {"prefect_port": prefect_port,
                                     "mlflow_port": mlflow_port, "app_port": app_port}}
        finally:
            stopped = stack.down(root)
            assert {"worker-1", "worker-2"} <= set(stopped)


def fan_out_parameters(source: Path, **train) -> dict:
    return {"config": {
        "data": {"source": str(source), "cache_workers": 2},
        "train": {"archs": ["resnet18", "efficientnet_b0"], "epochs": 1, "image_size": 32,
                  "batch_size": 32, "pretrained": False, "num_workers": 0, "fan_out": True,
                  **train},
        "eval": {"measure_efficiency": False},
        "serve": {"deploy": False},
    }}


def children_of(client, parent_id) -> dict:
    """The child flow runs of a pipeline run, by architecture (their subflow links)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
        parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id])))
    return {r.parameters["request"]["arch"]: r for r in runs}


@pytest.mark.slow
@pytest.mark.e2e
def test_two_workers_train_the_architectures_of_one_pipeline_run(local_stack,
                                                                 synthetic_sample, tmp_path):
    from mlflow import MlflowClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from deployments.definitions import TRAIN_DEPLOYMENT

    client, root = local_stack["client"], local_stack["root"]
    by_name = {r["name"]: r for r in local_stack["records"]}
    assert by_name["worker-1"]["healthy"] and by_name["worker-2"]["healthy"]
    assert (root / "stack" / "worker-1.log").exists() and (root / "stack" / "worker-2.log").exists()
    # The runner sized the global concurrency limit that training takes a slot of.
    assert client.read_global_concurrency_limit_by_name(definitions.GPU_LIMIT).limit >= 1
    train_deployment = client.read_deployment_by_name(TRAIN_DEPLOYMENT)
    assert train_deployment.work_pool_name == "skinsense-gpu"

    pipeline = client.read_deployment_by_name("skinsense-pipeline/manual")
    created = client.create_flow_run_from_deployment(
        pipeline.id, parameters=fan_out_parameters(synthetic_sample))
    run = wait_final(client, created.id, timeout_s=600)
    assert run.state.is_completed(), f"{run.state}: see {root}/stack/runner.log"

    children = children_of(client, created.id)
    assert set(children) == {"resnet18", "efficientnet_b0"}
    assert all(c.state.is_completed() and c.deployment_id == train_deployment.id
               for c in children.values())
    workers = {arch: c.labels["prefect.worker.name"] for arch, c in children.items()}
    assert len(set(workers.values())) == 2, workers  # one child on each worker
    pids = {c.infrastructure_pid for c in children.values()}
    assert len(pids) == 2
    # ... at the same time: each started before the other ended.
    assert max(c.start_time for c in children.values()) < min(c.end_time for c in children.values())
    assert all(c.name == f"{run.name}-{arch}" for arch, c in children.items())

    mlflow = MlflowClient(tracking_uri=local_stack["mlflow"],
                          registry_uri=local_stack["mlflow"])
    runs = mlflow.search_runs([mlflow.get_experiment_by_name("skinsense").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("prefect_flow_run_id") == str(created.id)
                  and r.data.tags.get("skinsense.kind") == "pipeline")
    arch_runs = {r.info.run_name: r for r in runs
                 if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(arch_runs) == {"resnet18", "efficientnet_b0"}
    assert {r.data.tags["skinsense.worker"].split("@")[0] for r in arch_runs.values()} == \
        set(workers.values())
    assert parent.info.status == "FINISHED"
    # The parent registered the best child's model (the first listed wins a tie).
    scores = {arch: r.data.metrics["test_balanced_accuracy"] for arch, r in arch_runs.items()}
    champion = mlflow.get_model_version_by_alias("skinsense", "champion")
    assert champion.run_id == arch_runs[champion.tags["arch"]].info.run_id
    assert scores[champion.tags["arch"]] == max(scores.values()), scores

    # A worker that does not see the shared SKINSENSE_HOME: that child fails with the reason,
    # the pipeline fails naming it, and the other child's results are kept.
    elsewhere = tmp_path / "not-shared"
    created = client.create_flow_run_from_deployment(pipeline.id, parameters=fan_out_parameters(
        synthetic_sample, job_variables={"resnet18": {"env": {"SKINSENSE_HOME": str(elsewhere)}}}))
    run = wait_final(client, created.id, timeout_s=600)
    assert run.state.is_failed()
    # Same data settings as the first run: the data stages come from Prefect's cache.
    task_runs = client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[created.id])))
    data_states = {t.name: t.state.name for t in task_runs
                   if t.name.split("-")[0] in ("fetch", "validate", "split", "oversample", "cache")}
    assert data_states and all(s == "Cached" for s in data_states.values()), data_states
    children = children_of(client, created.id)
    assert children["resnet18"].state.is_failed()
    assert children["efficientnet_b0"].state.is_completed()
    assert "resnet18" in run.state.message and "not on this worker" in run.state.message, \
        run.state.message
    runs = mlflow.search_runs([parent.info.experiment_id])
    failed_parent = next(r for r in runs if r.data.tags.get("prefect_flow_run_id") == str(created.id)
                         and r.data.tags.get("skinsense.kind") == "pipeline")
    assert failed_parent.info.status == "FAILED"
    assert "efficientnet_b0.test_balanced_accuracy" in failed_parent.data.metrics


@pytest.mark.slow
@pytest.mark.e2e
def test_a_bad_parameter_is_refused_before_anything_runs(local_stack):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.exceptions import PrefectHTTPStatusError

    client = local_stack["client"]
    deployment = client.read_deployment_by_name("skinsense-pipeline/manual")

    def runs() -> set:
        # Only this deployment's runs count: the scheduler may already have queued the
        # weekly deployment's next runs.
        return {r.id for r in client.read_flow_runs(deployment_filter=DeploymentFilter(
            id=DeploymentFilterId(any_=[deployment.id])))}

    before = runs()
    with pytest.raises(PrefectHTTPStatusError) as refused:
        client.create_flow_run_from_deployment(
            deployment.id, parameters={"config": {"train": {"epochs": 0}}})
    assert refused.value.response.status_code == 409
    detail = refused.value.response.json()["detail"]
    assert "config.train.epochs" in detail and "minimum of 1" in detail
    assert runs() == before  # nothing was created for it


@pytest.mark.slow
@pytest.mark.e2e
def test_the_weekly_schedule_survives_a_runner_restart(local_stack):
    from skinsense import stack
    from skinsense.processes import pid_alive

    client, root = local_stack["client"], local_stack["root"]

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

    stack.up(root, with_app=False, parts=(stack.RUNNER,), **local_stack["ports"])
    assert schedule() == (False, [True])
    assert next(r for r in stack.status(root) if r["name"] == stack.RUNNER)["healthy"]


@pytest.mark.slow
@pytest.mark.e2e
def test_prefect_deploy_registers_the_yaml_deployments_on_a_process_pool(local_stack):
    env = {**os.environ, "PREFECT_API_URL": local_stack["api"],
           "PREFECT_HOME": str(local_stack["prefect_home"])}
    prefect = [sys.executable, "-m", "prefect"]
    # The stack created the process pool for its workers (`prefect work-pool create
    # skinsense-gpu --type process` by hand).
    assert local_stack["client"].read_work_pool(definitions.WORK_POOL).type == "process"
    out = subprocess.run([*prefect, "--no-prompt", "deploy", "--all"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    client = local_stack["client"]
    scheduled = client.read_deployment_by_name("skinsense-pipeline/scheduled-retraining")
    manual = client.read_deployment_by_name("skinsense-pipeline/manual")
    assert scheduled.work_pool_name == manual.work_pool_name == definitions.WORK_POOL
    assert scheduled.schedules[0].schedule.cron == definitions.RETRAIN_CRON
    assert scheduled.schedules[0].active and not manual.schedules
    assert scheduled.pull_steps[0]["prefect.deployments.steps.set_working_directory"][
        "directory"] == str(ROOT)
