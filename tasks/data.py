"""Prefect tasks of the data stage: thin wrappers around `skinsense.stages`."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from prefect import Task, task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from skinsense import stages
from skinsense.config import DataConfig, PipelineConfig
from skinsense.data.dataverse import is_transient
from skinsense.data.duplicates import describe as describe_near_duplicates
from skinsense.data.records import (
    FetchedData,
    ImageCache,
    OversampledData,
    SplitData,
    ValidatedData,
)
from skinsense.paths import Home

# The data stages are cached on their inputs (configs and the records of earlier stages,
# which carry paths and the dataset fingerprint), so a second run with the same parameters
# reaches training in seconds.
DATA_CACHE = INPUTS + TASK_SOURCE


def with_home_cache(data_task: Task, home: Path, *, refresh: bool) -> Task:
    """The task with its results persisted under SKINSENSE_HOME, so deleting the home also
    forgets the cache; `refresh` recomputes and overwrites the cached result."""
    return data_task.with_options(result_storage=Path(home) / "prefect-results",
                                  persist_result=True,
                                  refresh_cache=refresh)


def _network_failure(task, task_run, state) -> bool:
    """Retry a fetch only when the network failed; a wrong path fails at once."""
    return is_transient(state.result(raise_on_failure=False))


# The client already retries each request with backoff; these retries outlast an outage.
# A fetch is reused for 12 h only: a weekly retraining looks at Dataverse again (and downloads
# nothing when the files are unchanged and verified).
@task(name="fetch", retries=2, retry_delay_seconds=[60, 300], retry_condition_fn=_network_failure,
      cache_policy=DATA_CACHE, cache_expiration=timedelta(hours=12))
def fetch(cfg: DataConfig, home: Path) -> FetchedData:
    return stages.fetch_data(cfg, Home(home), progress=True)


@task(name="validate", cache_policy=DATA_CACHE)
def validate(fetched: FetchedData, cfg: DataConfig, home: Path) -> ValidatedData:
    validated = stages.validate_data(fetched, cfg, Home(home))
    print(f"{validated.n_images} images valid, {validated.n_bad} left out, "
          f"fingerprint {validated.fingerprint[:16]}")
    for line in validated.bad_images:
        print(f"left out: {line}")
    print(describe_near_duplicates(validated.near_duplicates))
    return validated


@task(name="split", cache_policy=DATA_CACHE)
def split(validated: ValidatedData, cfg: DataConfig, home: Path) -> SplitData:
    return stages.split_data(validated, cfg, Home(home))


@task(name="oversample", cache_policy=DATA_CACHE)
def oversample(split_data: SplitData, cfg: DataConfig, home: Path) -> OversampledData:
    return stages.oversample_data(split_data, cfg, Home(home))


@task(name="image-sizes")
def image_sizes(cfg: PipelineConfig) -> dict[str, int]:
    return stages.image_sizes(cfg)


@task(name="cache-images", task_run_name="cache-images-{size}px", cache_policy=DATA_CACHE)
def cache_images(split_data: SplitData, oversampled: OversampledData, size: int,
                 cfg: DataConfig, home: Path, validated: ValidatedData) -> ImageCache:
    """Each cached part names the manifest it was built from (the evaluation's lesion
    bootstrap and subgroup audit read it). Being part of this task's source, this docstring
    also retires cached results of earlier versions that lacked it; the image arrays
    themselves are reused."""
    return stages.cache_images(split_data, oversampled, size, cfg, Home(home),
                               validated=validated)
