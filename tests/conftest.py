"""Shared fixtures: one Prefect test harness for the whole run, isolated SKINSENSE_HOME."""

from __future__ import annotations

import os
import shutil
import socket

import pytest
import torch

# Offline machines: no telemetry, no update checks, quiet Gradio.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# Tiny trainings last seconds: sample system metrics every second so they show up.
os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for every flow test (starting one takes ~15 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory, request):
    """`tmp_path_factory.mktemp` for one module's fixtures, removed when the module is done.

    A full run writes about 20 GB of model folders and MLflow artifacts; kept to the end (as
    `mktemp` alone keeps them) they filled CI's disk. With `tmp_path_retention_policy =
    "failed"` for per-test folders, the run holds one module's folders at a time. A module
    with a failed test keeps its folders to be looked at.
    """
    made = []
    failed_before = request.session.testsfailed

    def make(name: str):
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield make
    if request.session.testsfailed == failed_before:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh SKINSENSE_HOME, with MLflow's embedded store inside it."""
    from skinsense.paths import Home

    root = tmp_path / "home"
    monkeypatch.setenv("SKINSENSE_HOME", str(root))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return Home(root).ensure()


@pytest.fixture
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def no_leaked_rng():
    """Tests must not change the global torch RNG state others see."""
    state = torch.get_rng_state()
    yield
    torch.set_rng_state(state)


@pytest.fixture(scope="session")
def synthetic_sample(tmp_path_factory):
    """A small synthetic HAM10000-format sample with the Dataverse file names."""
    from skinsense.data.synth import make_synthetic_ham10000

    out = tmp_path_factory.mktemp("synth")
    make_synthetic_ham10000(out, n_images=240, seed=3, image_size=(120, 90))
    return out


@pytest.fixture(scope="session")
def cached_sample(synthetic_sample, tmp_path_factory):
    """The synthetic sample taken through the data stages and cached at 32 px."""
    from skinsense import stages
    from skinsense.config import DataConfig
    from skinsense.paths import Home

    home = Home(tmp_path_factory.mktemp("cached-home")).ensure()
    cfg = DataConfig(source=str(synthetic_sample), cache_workers=2)
    validated = stages.validate_data(stages.fetch_data(cfg, home, progress=False), cfg, home)
    split = stages.split_data(validated, cfg, home)
    oversampled = stages.oversample_data(split, cfg, home)
    cache = stages.cache_images(split, oversampled, 32, cfg, home)
    return cache, oversampled
