"""Prefect tasks that train, evaluate and choose among architectures."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

from prefect import task
from prefect.concurrency.sync import concurrency
from prefect.settings import PREFECT_API_URL

from skinsense import stages
from skinsense.config import EvalConfig, PipelineConfig
from skinsense.data.records import ImageCache, OversampledData, SplitData
from skinsense.paths import Home


@task(name="start-mlflow-run")
def start_run(cfg: PipelineConfig, home: Path, tags: dict[str, str], split: SplitData,
              oversampled: OversampledData) -> str:
    return stages.start_pipeline_run(cfg, Home(home), tags=tags, split=split,
                                     oversampled=oversampled)


def _not_diverged(task, task_run, state) -> bool:
    """Retry a training unless it diverged: the same seed and settings diverge again."""
    return not getattr(state.result(raise_on_failure=False), "diverged", False)


def gpu_slots(limit: str | None, devices: int):
    """Hold `devices` slots of the global concurrency limit `limit` while training.

    The stack and compose create the limit 'gpu' on their server, one slot per GPU. Prefect's
    temporary server (no PREFECT_API_URL: embedded runs) keeps no limit that anything
    created, so training there asks for none and proceeds unthrottled, as it always did.
    Fanned-out children pass None: the limit counts one machine's GPUs, and each machine's own
    GPU locks (skinsense.training.gpus) already keep trainings apart there.
    """
    if limit and PREFECT_API_URL.value():
        return concurrency(limit, occupy=devices, strict=False)
    return nullcontext()


# A retry resumes from the architecture's last checkpoint (same run folder).
@task(name="train", task_run_name="train-{arch}", retries=1, retry_delay_seconds=30,
      retry_condition_fn=_not_diverged)
def train(cache: ImageCache, arch: str, cfg: PipelineConfig, home: Path,
          class_weights: list[float] | None, parent_run_id: str,
          fingerprint: str, gpu_limit: str | None = "gpu") -> stages.TrainedArch:
    with gpu_slots(gpu_limit, cfg.train.devices):
        return stages.train_architecture(cache, arch, cfg, Home(home),
                                         class_weights=class_weights,
                                         parent_run_id=parent_run_id, fingerprint=fingerprint)


@task(name="evaluate", task_run_name="evaluate-{trained.arch}")
def evaluate(trained: stages.TrainedArch, cache: ImageCache, cfg: EvalConfig,
             home: Path) -> stages.Candidate:
    return stages.evaluate_architecture(trained, cache, cfg, Home(home))


@task(name="compare")
def compare(candidates: list[stages.Candidate], parent_run_id: str, home: Path) -> list[Path]:
    return stages.compare_candidates(candidates, parent_run_id, Home(home))


@task(name="select-best")
def select_best(candidates: list[stages.Candidate], metric: str) -> stages.Candidate:
    return stages.select_best(candidates, metric)


@task(name="finish-mlflow-run")
def finish_run(parent_run_id: str, home: Path, candidates: list[stages.Candidate],
               failed: bool = False) -> None:
    stages.finish_pipeline_run(parent_run_id, Home(home), candidates, failed=failed)
