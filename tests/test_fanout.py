"""Training fanned out over the work pool (`train.fan_out`).

Unit tests of what crosses machines (the image cache by home-relative path and checksum, the
model folder through MLflow), and one end-to-end test: the local stack with two process
workers runs a pipeline whose two architectures train in two child runs on two workers.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from skinsense import stages
from skinsense.config import PipelineConfig, TrainConfig
from skinsense.evaluation import EvalResult
from skinsense.handoff import (
    HANDOFF_FILE,
    ArchResult,
    HandoffError,
    publish_cache,
    publish_candidate,
    receive_cache,
    receive_model_dir,
)
from skinsense.paths import Home
from test_stack import free_ports


@pytest.fixture
def two_homes(tmp_path):
    """A small image cache in one home, copied into a second home at another path: one
    "shared" folder as two machines that mount it at different points would see it."""
    import numpy as np

    from skinsense.data.records import CachedSplit, ImageCache

    parent, child = (Home(tmp_path / name / "skinsense_home").ensure()
                     for name in ("parent", "child"))
    folder = parent.cache / "0123456789abcdef-32px"
    folder.mkdir()
    rng = np.random.default_rng(0)
    splits = {}
    for name, n in (("train", 12), ("val", 4), ("test", 4)):
        images, labels = folder / f"{name}_images.npy", folder / f"{name}_labels.npy"
        np.save(images, rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))
        np.save(labels, rng.integers(0, 7, n).astype(np.int64))
        splits[name] = CachedSplit(images_npy=images, labels_npy=labels, size=32, n=n)
    shutil.copytree(parent.cache, child.cache, dirs_exist_ok=True)
    return ImageCache(size=32, key=folder.name, **splits), parent, child


def _copy_record(parent: Home, child: Home, handoff) -> Path:
    """What shared storage does: the child sees the parent's handoff.json."""
    rel = next(iter(handoff.files)).rsplit("/", 1)[0]
    shutil.copy(parent.root / rel / HANDOFF_FILE, child.root / rel / HANDOFF_FILE)
    return child.root / rel


def test_a_child_reads_the_cache_the_parent_prepared_by_home_relative_path(two_homes):
    cache, parent, child = two_homes
    handoff = publish_cache(cache, "f" * 64, parent)
    assert all(not Path(p).is_absolute() for p in handoff.files)
    assert not Path(handoff.cache.train.images_npy).is_absolute()
    _copy_record(parent, child, handoff)
    received = receive_cache(handoff, child)
    assert received.train.images_npy == child.root / handoff.cache.train.images_npy
    assert received.train.n == cache.train.n and received.key == cache.key
    # A second publication of unchanged files reuses their checksums.
    again = publish_cache(cache, "f" * 64, parent)
    assert again == handoff


def test_a_child_refuses_other_data_with_a_clear_error(two_homes, tmp_path):
    cache, parent, child = two_homes
    handoff = publish_cache(cache, "f" * 64, parent)
    folder = _copy_record(parent, child, handoff)

    other = handoff.model_copy(update={"fingerprint": "e" * 64})
    with pytest.raises(HandoffError, match="data fingerprint mismatch: the pipeline prepared "
                                           "data eeeeeeeeeeeeeeee.*holds ffffffffffffffff"):
        receive_cache(other, child)

    labels = folder / "val_labels.npy"
    labels.write_bytes(labels.read_bytes()[:-1] + b"\x01")
    with pytest.raises(HandoffError, match="val_labels.npy .* does not have the checksum"):
        receive_cache(handoff, child)

    with pytest.raises(HandoffError, match="not on this worker.*must mount the pipeline's "
                                           "SKINSENSE_HOME"):
        receive_cache(handoff, Home(tmp_path / "empty").ensure())


@pytest.mark.slow  # an MLflow SQLite store takes ~8 s to create
def test_the_model_folder_comes_back_through_mlflow_with_its_checksums(tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("PREFECT__WORKER_NAME", "gpu-worker-7")
    child, parent = Home(tmp_path / "child").ensure(), Home(tmp_path / "parent").ensure()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    experiment = client.create_experiment("fanout", artifact_location=(tmp_path / "art").as_uri())
    run_id = client.create_run(experiment).info.run_id
    model_dir = child.runs / "abc" / "model"
    model_dir.mkdir(parents=True)
    (model_dir / "weights.safetensors").write_bytes(b"weights")
    (model_dir / "model_card.json").write_text("{}")
    evaluation = EvalResult(arch="resnet18", model_dir=model_dir, metrics={"accuracy": 0.5},
                            report_json=child.runs / "abc" / "evaluation" / "evaluation.json",
                            n_images=10)
    result = publish_candidate("resnet18", run_id, 32, {"accuracy": 0.5}, evaluation, model_dir,
                               child)
    assert result.model_uri == f"runs:/{run_id}/model_folder"
    assert result.model_dir == "runs/abc/model" and result.worker.startswith("gpu-worker-7@")
    assert client.get_run(run_id).data.tags["skinsense.worker"] == result.worker
    # JSON, as Prefect persists it, and back.
    result = ArchResult.model_validate_json(result.model_dump_json())

    # No shared copy on the parent's machine: downloaded from MLflow and verified.
    local = receive_model_dir(result, parent)
    assert local.is_relative_to(parent.root)
    assert (local / "weights.safetensors").read_bytes() == b"weights"
    # A shared copy with the same bytes is used as it is.
    assert receive_model_dir(result, child) == model_dir
    candidate = stages.receive_candidates([stages.ChildOutcome(
        arch="resnet18", flow_run_id="1", flow_run_name="x", state="Completed",
        result=result)], parent)[0]
    assert candidate.model_dir == local and candidate.evaluation.model_dir == local
    assert candidate.evaluation.report_json == parent.runs / "abc" / "evaluation" / "evaluation.json"

    tampered = result.model_copy(update={"model_files": {**result.model_files,
                                                         "weights.safetensors": "0" * 64}})
    with pytest.raises(HandoffError, match="weights.safetensors differs"):
        receive_model_dir(tampered, parent)


def test_a_failed_child_is_named_with_its_reason_and_the_others_are_kept():
    done = ArchResult.model_construct(arch="resnet18", run_id="r1", worker="w1@host")
    outcomes = [
        stages.ChildOutcome(arch="resnet18", flow_run_id="1", flow_run_name="p-resnet18",
                            state="Completed", result=done),
        stages.ChildOutcome(arch="maxvit_t", flow_run_id="2", flow_run_name="p-maxvit_t",
                            state="Failed", worker="w2", message="Flow run encountered an "
                            "exception: HandoffError: the image cache ... is not on this worker"),
    ]
    with pytest.raises(stages.FanOutError) as failure:
        stages.check_children(outcomes)
    text = str(failure.value)
    assert "1 of 2 architecture(s) failed" in text
    assert "maxvit_t: child run 'p-maxvit_t' (2) ended Failed on w2: Flow run encountered an " \
           "exception: HandoffError" in text
    assert "resnet18 (MLflow run r1, trained on w1@host)" in text
    stages.check_children(outcomes[:1])  # all completed: nothing raised


def test_job_variables_per_architecture():
    cfg = PipelineConfig.model_validate({"train": {
        "archs": ["resnet18", "efficientnet_b0"], "pretrained": False,
        "job_variables": {"*": {"env": {"A": "1"}, "gpu": 1},
                          "efficientnet_b0": {"env": {"B": "2"}, "gpu": 2}}}})
    assert stages.job_variables_for(cfg, "resnet18") == {"env": {"A": "1"}, "gpu": 1}
    assert stages.job_variables_for(cfg, "efficientnet_b0") == {"env": {"A": "1", "B": "2"},
                                                               "gpu": 2}
    with pytest.raises(ValueError, match="job_variables names architecture"):
        TrainConfig(archs=["resnet18"], pretrained=False, job_variables={"maxvit_t": {}})


@pytest.mark.slow
def test_fan_out_without_the_child_deployment_fails_before_any_data_work(prefect_harness, home,
                                                                       tmp_path):
    from flows.pipeline import skinsense_pipeline

    config = PipelineConfig.model_validate({
        "data": {"source": str(tmp_path / "sample")},
        "train": {"archs": ["resnet18"], "pretrained": False, "fan_out": True}})
    with pytest.raises(RuntimeError, match="needs the deployment train-architecture/"
                                           "train-architecture.*stack up --workers"):
        skinsense_pipeline(config=config)
    assert not any(home.downloads.iterdir()) and not any(home.cache.iterdir())


def test_stack_up_takes_a_worker_count():
    from skinsense.cli import build_parser

    assert build_parser().parse_args(["stack", "up", "--workers", "2"]).workers == 2
    assert build_parser().parse_args(["stack", "up"]).workers == 0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["stack", "up", "--workers", "-1"])


# -- end to end: two workers, one pool -----------------------------------------------------------

@pytest.fixture(scope="module")
def stack_with_two_workers(tmp_path_factory):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from skinsense import stack

    root = tmp_path_factory.mktemp("fanout-home")
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
                    yield {"client": client, "root": root, "records": records,
                           "mlflow": f"http://127.0.0.1:{mlflow_port}"}
        finally:
            stopped = stack.down(root)
            assert {"worker-1", "worker-2"} <= set(stopped)


def wait_final(client, flow_run_id, timeout_s: float = 600):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = client.read_flow_run(flow_run_id)
        if run.state is not None and run.state.is_final():
            return run
        time.sleep(2)
    raise AssertionError(f"flow run {flow_run_id} did not finish in {timeout_s} s")


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
def test_two_workers_train_the_architectures_of_one_pipeline_run(stack_with_two_workers,
                                                                 synthetic_sample, tmp_path):
    from mlflow import MlflowClient

    from deployments.definitions import TRAIN_DEPLOYMENT

    client, root = stack_with_two_workers["client"], stack_with_two_workers["root"]
    by_name = {r["name"]: r for r in stack_with_two_workers["records"]}
    assert by_name["worker-1"]["healthy"] and by_name["worker-2"]["healthy"]
    assert (root / "stack" / "worker-1.log").exists() and (root / "stack" / "worker-2.log").exists()
    train_deployment = client.read_deployment_by_name(TRAIN_DEPLOYMENT)
    assert train_deployment.work_pool_name == "skinsense-gpu"

    pipeline = client.read_deployment_by_name("skinsense-pipeline/manual")
    created = client.create_flow_run_from_deployment(
        pipeline.id, parameters=fan_out_parameters(synthetic_sample))
    run = wait_final(client, created.id)
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

    mlflow = MlflowClient(tracking_uri=stack_with_two_workers["mlflow"],
                          registry_uri=stack_with_two_workers["mlflow"])
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
    run = wait_final(client, created.id)
    assert run.state.is_failed()
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
