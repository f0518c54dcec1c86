"""Training fanned out over the work pool (`train.fan_out`).

Unit tests of what crosses machines (the image cache by home-relative path and checksum, the
model folder through MLflow); the end-to-end run on two workers is in tests/test_stack_runs.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from skinsense import stages
from skinsense.config import PipelineConfig, TrainConfig
from skinsense.evaluation.evaluate import EvalResult
from skinsense.lifecycle.handoff import (
    HANDOFF_FILE,
    ArchResult,
    HandoffError,
    publish_cache,
    publish_candidate,
    receive_cache,
    receive_model_dir,
)
from skinsense.paths import Home


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
    # The evaluation reads the test part's manifest (lesions, subgroups) on the child too.
    manifest = parent.root / "splits" / "seed0" / "test.csv"
    manifest.parent.mkdir(parents=True)
    manifest.write_text("image_id,lesion_id,dx\n" + "".join(
        f"ISIC_{i},HAM_{i},nv\n" for i in range(4)))
    splits["test"] = splits["test"].model_copy(update={"manifest_csv": manifest})
    shutil.copytree(parent.root, child.root, dirs_exist_ok=True)
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
    assert received.test.manifest_csv == child.root / "splits" / "seed0" / "test.csv"
    assert "splits/seed0/test.csv" in handoff.files
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

    labels.write_bytes(labels.read_bytes()[:-1] + b"\x00")
    manifest = child.root / "splits" / "seed0" / "test.csv"
    manifest.write_text(manifest.read_text().replace("nv", "mel"))
    with pytest.raises(HandoffError, match="test.csv .* does not have the checksum"):
        receive_cache(handoff, child)


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


def test_a_model_that_cannot_be_received_is_reported_with_the_failed_children(tmp_path):
    """Receiving comes before the children are checked: its failure names both."""
    lost = ArchResult.model_construct(arch="resnet18", run_id="0" * 32, worker="w1@host",
                                      model_dir="runs/gone/model", model_files={},
                                      model_uri=f"runs:/{'0' * 32}/model_folder")
    outcomes = [
        stages.ChildOutcome(arch="resnet18", flow_run_id="1", flow_run_name="p-resnet18",
                            state="Completed", result=lost),
        stages.ChildOutcome(arch="maxvit_t", flow_run_id="2", flow_run_name="p-maxvit_t",
                            state="Crashed", message="worker lost"),
    ]
    with pytest.raises(stages.FanOutError) as failure:
        stages.receive_candidates(outcomes, Home(tmp_path / "home").ensure())
    text = str(failure.value)
    assert "2 of 2 architecture(s) failed" in text
    assert "maxvit_t: child run 'p-maxvit_t' (2) ended Crashed: worker lost" in text
    assert "resnet18: its child run completed, but its model (runs:/" in text


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
