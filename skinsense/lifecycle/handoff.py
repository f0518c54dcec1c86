"""What crosses machines when training fans out over the work pool (`train.fan_out`).

The pipeline run (the parent) prepares the data once; each architecture then trains in a
child flow run that any worker of the pool may pick up, on any machine. Two things cross:

- **Data, parent -> child.** The image cache lives under SKINSENSE_HOME, which in this first
  version is storage that every worker mounts (NFS and the like; not necessarily at the same
  path). `publish_cache` records the cache as paths *relative to* SKINSENSE_HOME, with the
  data fingerprint and a SHA-256 of every file; the child's `receive_cache` resolves them
  under its own SKINSENSE_HOME and refuses to train unless it sees exactly those bytes of
  exactly that data.
- **Results, child -> parent.** Metrics travel in the child's flow-run result (Prefect
  result persistence); the model folder is logged to the architecture's MLflow run
  (`MODEL_ARTIFACT`) with its checksums. `receive_candidate` uses the shared copy when its
  checksums match and otherwise downloads it from MLflow, so the parent never depends on a
  path only the child's machine can see.

Designed for an object store next: a `DataHandoff` already names every file by key
(its home-relative path) and checksum, so an fsspec version uploads those keys to
`s3://bucket/skinsense/...` in `publish_cache` (skipping keys whose stored checksum
matches) and downloads and verifies them into the worker's local SKINSENSE_HOME in
`receive_cache`; nothing else changes (docs/OPERATIONS.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from skinsense.config import PipelineConfig
from skinsense.data.records import CachedSplit, ImageCache
from skinsense.evaluation.evaluate import EvalResult
from skinsense.paths import Home

HANDOFF_FILE = "handoff.json"
# The folder of the model, as logged to the architecture's MLflow run by `publish_candidate`.
MODEL_ARTIFACT = "model_folder"
_SPLITS = ("train", "val", "test", "isic_test")

# Where the children run: the deployment the pipeline starts one run of per architecture, on
# the work pool whose workers may be on any machine (`deployments/` deploys it under these
# names, `tasks/fanout.py` starts its runs, `flows/train_architecture.py` is its flow).
WORK_POOL = "skinsense-gpu"
TRAIN_DEPLOYMENT_NAME = "train-architecture"
TRAIN_DEPLOYMENT = f"train-architecture/{TRAIN_DEPLOYMENT_NAME}"
# A Prefect block slug (e.g. an S3 bucket block) for the children's results instead of the
# shared SKINSENSE_HOME; the pipeline reads them back wherever it runs.
RESULT_STORAGE_ENV = "SKINSENSE_RESULT_STORAGE"


class HandoffError(RuntimeError):
    """Data or a model folder is missing or is not what the other side prepared."""


class DataHandoff(BaseModel):
    """The image cache one size of a pipeline run trains on, as every worker can find it."""

    fingerprint: str                 # the validated data's fingerprint (`ValidatedData`)
    cache: ImageCache                # its paths relative to SKINSENSE_HOME
    files: dict[str, str]            # home-relative path -> SHA-256 of the file


class ArchRequest(BaseModel):
    """Everything one child run needs to train, evaluate and log one architecture."""

    arch: str
    config: PipelineConfig
    data: DataHandoff
    class_weights: list[float] | None
    parent_run_id: str               # the pipeline's MLflow run; the child's run nests in it


class ArchResult(BaseModel):
    """What a child run hands back: metrics, and where its model folder is."""

    arch: str
    run_id: str                      # the architecture's MLflow run
    image_size: int
    test_metrics: dict[str, float]
    evaluation: EvalResult           # its paths are under the child's SKINSENSE_HOME
    child_home: str                  # that SKINSENSE_HOME, to find the shared copies
    model_dir: str                   # the model folder, relative to SKINSENSE_HOME
    model_files: dict[str, str]      # file name -> SHA-256
    model_uri: str                   # the same folder in MLflow: runs:/RUN_ID/model_folder
    worker: str                      # which worker (and host) trained it


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file, read in 8 MiB blocks."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _relative(path: Path, home: Home) -> Path:
    try:
        return Path(path).resolve().relative_to(home.root.resolve())
    except ValueError:
        raise HandoffError(
            f"{path} is not under SKINSENSE_HOME ({home.root}): with fan_out every file a child "
            f"run reads must be under the shared SKINSENSE_HOME") from None


def _splits(cache: ImageCache) -> dict[str, CachedSplit]:
    return {name: getattr(cache, name) for name in _SPLITS if getattr(cache, name) is not None}


def _rebased(cache: ImageCache, to_path) -> ImageCache:
    update = {name: split.model_copy(update={
        "images_npy": to_path(split.images_npy), "labels_npy": to_path(split.labels_npy),
        # The evaluation reads lesions and subgroups from it: it crosses machines too.
        "manifest_csv": to_path(split.manifest_csv) if split.manifest_csv else None})
        for name, split in _splits(cache).items()}
    return cache.model_copy(update=update)


def _cache_files(cache: ImageCache) -> list[Path]:
    """Every file a child reads: the arrays first (their folder holds the record), then the
    manifests the parts were cached from."""
    splits = _splits(cache).values()
    arrays = [Path(p) for split in splits for p in (split.images_npy, split.labels_npy)]
    manifests = {Path(split.manifest_csv) for split in splits if split.manifest_csv}
    return arrays + sorted(manifests)


def _checksums(files: dict[str, Path], record: Path) -> tuple[dict[str, str], dict[str, dict]]:
    """SHA-256 of each file, reusing those in `record` for files unchanged since then.

    Args:
        files: key (the home-relative path) -> the file.

    Returns:
        `(key -> SHA-256, key -> {"stamp": [size, mtime_ns], "sha256": ...})`.
    """
    try:
        known = json.loads(record.read_text()).get("stat", {})
    except (OSError, ValueError):
        known = {}
    sums, stats = {}, {}
    for key, path in files.items():
        stat = path.stat()
        stamp = [stat.st_size, stat.st_mtime_ns]
        entry = known.get(key)
        sums[key] = (entry["sha256"] if entry and entry.get("stamp") == stamp
                     else sha256_file(path))
        stats[key] = {"stamp": stamp, "sha256": sums[key]}
    return sums, stats


def publish_cache(cache: ImageCache, fingerprint: str, home: Home) -> DataHandoff:
    """Record the cache for child runs: home-relative paths, fingerprint and checksums.

    Also writes `handoff.json` into the cache folder, so a child can tell which data the
    folder holds. Checksums of files unchanged since the last run are reused (a 300 px
    HAM10000 cache is about 3 GB).

    Raises:
        HandoffError: a cache file is not under SKINSENSE_HOME.
    """
    paths = _cache_files(cache)
    record = paths[0].parent / HANDOFF_FILE
    files, stats = _checksums({str(_relative(p, home)): p for p in paths}, record)
    tmp = record.with_name(f"{HANDOFF_FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"fingerprint": fingerprint, "files": files,
                               "stat": stats}, indent=1, sort_keys=True))
    os.replace(tmp, record)
    return DataHandoff(fingerprint=fingerprint, files=files,
                       cache=_rebased(cache, lambda p: _relative(p, home)))


def receive_cache(handoff: DataHandoff, home: Home) -> ImageCache:
    """The parent's image cache as found under this worker's SKINSENSE_HOME, verified.

    Raises:
        HandoffError: the cache is not there (SKINSENSE_HOME is not the shared one), it
            holds other data than the parent prepared, or a file's bytes differ.
    """
    cache = _rebased(handoff.cache, lambda p: home.root / p)
    missing = [rel for rel in handoff.files if not (home.root / rel).is_file()]
    if missing:
        raise HandoffError(
            f"the image cache the pipeline prepared is not on this worker: {missing[0]} is "
            f"missing under SKINSENSE_HOME={home.root}. With train.fan_out every worker must "
            f"mount the pipeline's SKINSENSE_HOME (shared storage) and set SKINSENSE_HOME to it")
    record = home.root / next(iter(handoff.files)).rsplit("/", 1)[0] / HANDOFF_FILE
    try:
        found = json.loads(record.read_text()).get("fingerprint")
    except (OSError, ValueError):
        found = None
    if found != handoff.fingerprint:
        raise HandoffError(
            f"data fingerprint mismatch: the pipeline prepared data {handoff.fingerprint[:16]}, "
            f"but the image cache under this worker's SKINSENSE_HOME ({home.root}) holds "
            f"{(found or 'unknown data')[:16]}. Refusing to train on other data; check that "
            f"every worker mounts the same SKINSENSE_HOME, then run the pipeline again")
    for rel, expected in handoff.files.items():
        if sha256_file(home.root / rel) != expected:
            raise HandoffError(
                f"data fingerprint {handoff.fingerprint[:16]}: {rel} under SKINSENSE_HOME="
                f"{home.root} does not have the checksum the pipeline recorded (changed or "
                f"rebuilt since). Refusing to train on other data; run the pipeline again")
    return cache


def worker_name() -> str:
    """The Prefect worker running this process (when one does), and this host."""
    worker = os.environ.get("PREFECT__WORKER_NAME")
    return f"{worker}@{socket.gethostname()}" if worker else socket.gethostname()


def _model_files(model_dir: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(model_dir.iterdir()) if p.is_file()}


def publish_candidate(arch: str, run_id: str, image_size: int, test_metrics: dict[str, float],
                      evaluation: EvalResult, model_dir: Path, home: Home) -> ArchResult:
    """Log the model folder to the architecture's MLflow run; the record the parent gets."""
    from mlflow import MlflowClient

    files = _model_files(model_dir)
    client = MlflowClient()
    client.log_artifacts(run_id, str(model_dir), MODEL_ARTIFACT)
    worker = worker_name()
    client.set_tag(run_id, "skinsense.worker", worker)
    return ArchResult(arch=arch, run_id=run_id, image_size=image_size, test_metrics=test_metrics,
                      evaluation=evaluation, child_home=str(home.root),
                      model_dir=str(_relative(model_dir, home)), model_files=files,
                      model_uri=f"runs:/{run_id}/{MODEL_ARTIFACT}", worker=worker)


def receive_model_dir(result: ArchResult, home: Home) -> Path:
    """The child's model folder on this machine: the shared copy when its checksums match,
    else downloaded from the child's MLflow run and verified.

    Raises:
        HandoffError: the downloaded folder does not match the checksums the child recorded.
    """
    shared = home.root / result.model_dir
    if shared.is_dir() and _model_files(shared) == result.model_files:
        return shared
    import mlflow

    target = home.runs / "received" / result.run_id
    target.mkdir(parents=True, exist_ok=True)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=result.model_uri,
                                                     dst_path=str(target)))
    got = _model_files(local)
    if got != result.model_files:
        differ = sorted(set(got.items()) ^ set(result.model_files.items()))
        raise HandoffError(
            f"the model folder of {result.arch} downloaded from {result.model_uri} does not "
            f"match what its child run recorded ({differ[0][0]} differs)")
    return local


def rebase_evaluation(result: ArchResult, home: Home, model_dir: Path) -> EvalResult:
    """The child's evaluation record with its paths moved under this SKINSENSE_HOME."""
    child = Path(result.child_home)

    def moved(path: Path) -> Path:
        try:
            return home.root / Path(path).relative_to(child)
        except ValueError:
            return Path(path)

    evaluation = result.evaluation
    update: dict[str, Any] = {"model_dir": model_dir}
    for name, value in evaluation:
        if name != "model_dir" and isinstance(value, Path):
            update[name] = moved(value)
        elif isinstance(value, list) and value and all(isinstance(v, Path) for v in value):
            update[name] = [moved(v) for v in value]
    return evaluation.model_copy(update=update)


def child_result_storage() -> str | Path:
    """Where `train-architecture` runs persist their results: `$SKINSENSE_RESULT_STORAGE`
    (a block slug), else `SKINSENSE_HOME/prefect-results` on the shared storage."""
    from skinsense.config import skinsense_home

    return os.environ.get(RESULT_STORAGE_ENV) or skinsense_home() / "prefect-results"
