"""Prefect tasks of training fanned out over the work pool (`train.fan_out`).

The pipeline publishes the image cache, starts one child flow run of the deployment
`train-architecture/train-architecture` per architecture (`run_deployment`, linked as a subflow
run), waits for all of them, and takes back the candidates of those that completed. The child
flow (`flows/train_architecture.py`) runs the same train and evaluate tasks as the pipeline.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.runtime import flow_run

from skinsense import stages
from skinsense.config import PipelineConfig
from skinsense.data.records import ImageCache
from skinsense.lifecycle.handoff import (
    TRAIN_DEPLOYMENT,
    WORK_POOL,
    ArchRequest,
    ArchResult,
    DataHandoff,
)
from skinsense.paths import Home


@task(name="check-work-pool")
def check_work_pool() -> int:
    """Fail at once when the child deployment is missing; say so when no worker is online."""
    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(TRAIN_DEPLOYMENT)
        except ObjectNotFound:
            raise RuntimeError(
                f"train.fan_out needs the deployment {TRAIN_DEPLOYMENT} on the Prefect server "
                f"and workers on its pool: `skinsense stack up --workers N`, or `prefect "
                f"--no-prompt deploy --name train-architecture` from the repository root and "
                f"`prefect worker start --pool {WORK_POOL}` on each training machine") from None
        online = [w for w in client.read_workers_for_work_pool(deployment.work_pool_name)
                  if str(w.status).upper().endswith("ONLINE")]
    if not online:
        print(f"no worker of pool {deployment.work_pool_name!r} is online: the architectures' "
              f"child runs wait (Late) until one starts")
    return len(online)


@task(name="publish-data", task_run_name="publish-data-{cache.size}px")
def publish_data(cache: ImageCache, fingerprint: str, home: Path) -> DataHandoff:
    return stages.publish_data(cache, fingerprint, Home(home))


@task(name="train-on-pool", task_run_name="train-on-pool-{arch}")
def train_on_pool(arch: str, data: DataHandoff, cfg: PipelineConfig,
                  class_weights: list[float] | None, parent_run_id: str) -> stages.ChildOutcome:
    request = ArchRequest(arch=arch, config=cfg, data=data, class_weights=class_weights,
                          parent_run_id=parent_run_id)
    name = f"{flow_run.get_name()}-{arch}"
    try:
        child = run_deployment(TRAIN_DEPLOYMENT,
                               parameters={"request": request.model_dump(mode="json")},
                               flow_run_name=name, tags=["skinsense", f"arch:{arch}"],
                               job_variables=stages.job_variables_for(cfg, arch) or None)
    except Exception as exc:  # e.g. job variables the pool refuses: this child never ran
        return stages.ChildOutcome(arch=arch, flow_run_id="-", flow_run_name=name,
                                   state="NotCreated", message=f"{type(exc).__name__}: {exc}")
    state, result, message = child.state, None, child.state.message
    if state.is_completed():
        try:
            result = state.result()
        except Exception as exc:  # a result store the parent cannot read is a failure too
            message = (f"completed, but its result could not be read ({exc}); with fan_out the "
                       f"result storage (SKINSENSE_HOME/prefect-results) must be shared")
    return stages.ChildOutcome(
        arch=arch, flow_run_id=str(child.id), flow_run_name=child.name, state=state.name,
        message=message, worker=(child.labels or {}).get("prefect.worker.name"),
        result=result if isinstance(result, ArchResult) else None)


@task(name="receive-candidates")
def receive_candidates(outcomes: list[stages.ChildOutcome], home: Path) -> list[stages.Candidate]:
    return stages.receive_candidates(outcomes, Home(home))


@task(name="check-children")
def check_children(outcomes: list[stages.ChildOutcome]) -> None:
    stages.check_children(outcomes)


@task(name="receive-data")
def receive_data(request: ArchRequest, home: Path) -> ImageCache:
    return stages.receive_data(request, Home(home))


@task(name="publish-candidate", task_run_name="publish-candidate-{candidate.arch}")
def publish_candidate(candidate: stages.Candidate, home: Path) -> ArchResult:
    return stages.publish_candidate(candidate, Home(home))
