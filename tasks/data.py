"""Prefect tasks of the data stage: thin wrappers around `skinsense.stages`."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from skinsense import stages
from skinsense.config import DataConfig, PipelineConfig
from skinsense.data.dataverse import is_transient
from skinsense.data.records import (
    FetchedData,
    ImageCache,
    OversampledData,
    SplitData,
    ValidatedData,
)
from skinsense.paths import Home


def _network_failure(task, task_run, state) -> bool:
    """Retry a fetch only when the network failed; a wrong path fails at once."""
    return is_transient(state.result(raise_on_failure=False))


# The client already retries each request with backoff; these retries outlast an outage.
@task(name="fetch", retries=2, retry_delay_seconds=[60, 300], retry_condition_fn=_network_failure)
def fetch(cfg: DataConfig, home: Path) -> FetchedData:
    return stages.fetch_data(cfg, Home(home), progress=True)


@task(name="validate")
def validate(fetched: FetchedData, cfg: DataConfig, home: Path) -> ValidatedData:
    validated = stages.validate_data(fetched, cfg, Home(home))
    print(f"{validated.n_images} images valid, {validated.n_bad} left out, "
          f"fingerprint {validated.fingerprint[:16]}")
    for line in validated.bad_images:
        print(f"left out: {line}")
    return validated


@task(name="split")
def split(validated: ValidatedData, cfg: DataConfig, home: Path) -> SplitData:
    return stages.split_data(validated, cfg, Home(home))


@task(name="oversample")
def oversample(split_data: SplitData, cfg: DataConfig, home: Path) -> OversampledData:
    return stages.oversample_data(split_data, cfg, Home(home))


@task(name="image-sizes")
def image_sizes(cfg: PipelineConfig) -> dict[str, int]:
    return stages.image_sizes(cfg)


@task(name="cache-images", task_run_name="cache-images-{size}px")
def cache_images(split_data: SplitData, oversampled: OversampledData, size: int,
                 cfg: DataConfig, home: Path, validated: ValidatedData) -> ImageCache:
    return stages.cache_images(split_data, oversampled, size, cfg, Home(home),
                               validated=validated)
