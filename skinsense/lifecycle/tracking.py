"""MLflow logging: where the tracking store is, parent and child runs, params and metrics.

Without `MLFLOW_TRACKING_URI` SkinSense uses an embedded store under SKINSENSE_HOME
(`sqlite:///.../mlflow/mlflow.db` with artifacts in `.../mlflow/artifacts`).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient

from skinsense.paths import Home


def tracking_uri(home: Home) -> str:
    """`$MLFLOW_TRACKING_URI`, else the embedded SQLite store under `home`."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{home.mlflow / 'mlflow.db'}"


def configure(home: Home) -> str:
    """Point this process's MLflow at the project's store; returns the URI."""
    home.mlflow.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(home)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def refusal_message(exc: Exception, uri: str) -> str | None:
    """What to do when the MLflow server at `uri` refused a login or a change; else None."""
    code = getattr(exc, "error_code", None)
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if code == "UNAUTHENTICATED":
        if user:
            return (f"MLflow at {uri} refused the login of {user!r}: check "
                    f"MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
        return (f"MLflow at {uri} asks for a login: set MLFLOW_TRACKING_USERNAME and "
                f"MLFLOW_TRACKING_PASSWORD (for `skinsense stack`: set -a; . "
                f"$SKINSENSE_HOME/stack/credentials.env; set +a)")
    if code == "PERMISSION_DENIED":
        return (f"MLflow at {uri} does not let {user or 'this user'!r} do that: ask an MLflow "
                f"admin for EDIT or MANAGE on the model (docs/OPERATIONS.md, Logins)")
    return None


def ensure_experiment(name: str, home: Home) -> str:
    """The experiment's id, created with its artifacts under `home` when the store is local."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if tracking_uri(home).startswith("sqlite:"):
        # The SQLite store's default artifact root is ./mlruns of whatever cwd the process has.
        location = (home.mlflow / "artifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def flatten_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {'train.lr': '0.0003', ...}, values cut to MLflow's 6000-char limit."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flatten_params(value, prefix=f"{name}.")
        else:
            flat[name] = str(value)[:6000]
    return flat


def git_commit() -> str:
    """The commit of the code that runs, or 'unknown' outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def start_parent_run(experiment_id: str, *, config: dict[str, Any], tags: dict[str, str]) -> str:
    """Create the pipeline's parent run (left open; `end_run` closes it)."""
    client = MlflowClient()
    run = client.create_run(experiment_id, tags={"skinsense.kind": "pipeline",
                                                 "git_commit": git_commit(), **tags},
                            run_name=tags.get("mlflow.runName"))
    log_params(run.info.run_id, config)
    return run.info.run_id


# Tags a child run copies from its pipeline run, so each run can be traced on its own.
_INHERITED_TAGS = ("prefect_flow_run_id", "dataset_fingerprint", "split_seed", "git_commit")


def start_child_run(parent_run_id: str, *, name: str, config: dict[str, Any],
                    tags: dict[str, str]) -> str:
    """A nested run (one per architecture) under the pipeline's parent run."""
    client = MlflowClient()
    parent = client.get_run(parent_run_id)
    inherited = {k: v for k, v in parent.data.tags.items() if k in _INHERITED_TAGS}
    run = client.create_run(parent.info.experiment_id, run_name=name, tags={
        **inherited, "mlflow.parentRunId": parent_run_id, "skinsense.kind": "architecture",
        "git_commit": git_commit(), **tags})
    log_params(run.info.run_id, config)
    return run.info.run_id


def log_params(run_id: str, config: dict[str, Any]) -> None:
    client = MlflowClient()
    for key, value in flatten_params(config).items():
        client.log_param(run_id, key, value)


def log_metrics(run_id: str, metrics: dict[str, float], *, step: int | None = None,
                prefix: str = "") -> None:
    client = MlflowClient()
    for key, value in metrics.items():
        client.log_metric(run_id, f"{prefix}{key}", float(value), step=step or 0)


def logged_steps(run_id: str, key: str) -> set[int]:
    """Steps at which `key` was already logged in `run_id`."""
    return {m.step for m in MlflowClient().get_metric_history(run_id, key)}


def log_artifact(run_id: str, path: Path, artifact_path: str | None = None) -> None:
    MlflowClient().log_artifact(run_id, str(path), artifact_path)


def end_run(run_id: str, status: str = "FINISHED") -> None:
    MlflowClient().set_terminated(run_id, status=status)


def run_url(run_id: str) -> str:
    """A link to the run in the MLflow UI when the store is a server, else the run id."""
    uri = mlflow.get_tracking_uri()
    run = MlflowClient().get_run(run_id)
    if uri.startswith("http"):
        return f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
    return f"run {run_id} in {uri}"


@contextmanager
def system_metrics(run_id: str) -> Iterator[None]:
    """Sample CPU, memory (and GPU, where nvidia-ml-py is installed) into `run_id` meanwhile.

    The sampler watches the whole machine, so a training child process is measured too. It
    is started directly rather than through `mlflow.start_run`, whose exit would mark the run
    finished while the pipeline still logs to it. Every 10 s unless
    MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL says otherwise.
    """
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, tracking_uri=mlflow.get_tracking_uri())
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def log_dataset(run_id: str, manifest_csv: Path, *, name: str, digest: str, context: str) -> None:
    """Record a manifest as an MLflow dataset input of `run_id` (digest: data fingerprint)."""
    import pandas as pd
    from mlflow.data.dataset_source_registry import get_dataset_source_from_json
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    frame = pd.read_csv(manifest_csv)
    # The source's type named ("local": a file on this machine's disk), not guessed from the
    # path: MLflow registers two local-file source classes, and a guess warns about both.
    source = get_dataset_source_from_json(json.dumps({"uri": str(manifest_csv)}), "local")
    dataset = mlflow.data.from_pandas(frame, source=source, name=name,
                                      digest=digest[:36], targets="dx")
    MlflowClient().log_inputs(run_id, datasets=[DatasetInput(
        dataset._to_mlflow_entity(), tags=[InputTag(key=MLFLOW_DATASET_CONTEXT, value=context)])])
