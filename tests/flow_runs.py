"""Helpers of the tests that start deployment runs on real servers (test_stack_runs,
test_team_stack)."""

from __future__ import annotations

import time
from pathlib import Path


def wait_final(client, flow_run_id, timeout_s: float = 300):
    """The flow run once it is in a final state (Completed, Failed, Crashed, ...)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = client.read_flow_run(flow_run_id)
        if run.state is not None and run.state.is_final():
            return run
        time.sleep(2)
    raise AssertionError(f"flow run {flow_run_id} did not finish in {timeout_s} s")


def tiny_parameters(source: Path, port: int, deploy: bool = True) -> dict:
    """Deployment parameters of a pipeline run that takes about a minute on 2 cores."""
    return {"config": {
        "data": {"source": str(source), "cache_workers": 2},
        "train": {"archs": ["resnet18"], "epochs": 1, "image_size": 32, "batch_size": 32,
                  "pretrained": False, "num_workers": 0},
        "serve": {"deploy": deploy, "port": port, "startup_timeout_s": 240},
    }}
