"""The GPU benches run end to end on the CPU at toy sizes (their figures mean nothing here;
these tests keep the scripts working for the few sessions that have a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(args: list[str], out: Path, timeout: int = 600) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OUT": str(out)}
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_gpu_pipeline_bench_times_every_stage(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _run(["bench/gpu_pipeline.py", "--metadata", "tests/fixtures/HAM10000_metadata.csv",
          "--images", "200", "--archs", "resnet18", "--size-override", "32", "--epochs", "2",
          "--modes", "sequential", "parallel", "--device", "cpu", "--workers", "1",
          "--work", str(tmp_path / "work")], out)
    report = json.loads((out / "gpu_pipeline.json").read_text())
    stages = [s["stage"] for s in report["stages"]]
    for stage in ("fetch (folder source)", "validate", "split", "oversample", "cache 32 px",
                  "train (sequential)", "evaluate", "train (parallel)"):
        assert stage in stages
    cache = next(s for s in report["stages"] if s["stage"] == "cache 32 px")
    assert cache["loader_cold_s"] > 0 and cache["loader_warm_s"] > 0
    # Whole lesions of the real metadata, no more rows than asked for.
    validate = next(s for s in report["stages"] if s["stage"] == "validate")
    assert 120 <= validate["images"] <= 200
    for mode in ("sequential", "parallel"):
        row = report["training"][mode]["resnet18"]
        assert row["epochs_run"] == 2 and row["steady_epoch_s"] > 0
        # Two epochs measured, eight projected at the steady rate.
        assert row["projected_wall_s"] == pytest.approx(row["wall_s"] + 8 * row["steady_epoch_s"])
    assert 0 <= report["evaluation"]["resnet18"]["balanced_accuracy"] <= 1
    assert report["whole_job_sequential"]["total_s"] > 0


def test_ceiling_check_measures_each_condition(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _run(["bench/ceiling_check.py", "--device", "cpu", "--archs", "resnet18", "--secs", "0.3",
          "--rounds", "2", "--round-steps", "1", "--warmup", "1", "--images", "24",
          "--batch", "4", "--size-override", "32", "--work", str(tmp_path / "work")], out)
    [result] = json.loads((out / "ceiling_check.json").read_text())
    conditions = [r["condition"] for r in result["rows"]]
    assert conditions == ["alone", "short rounds", "resident", "loader busy", "alone again"]
    assert all(r["images_per_s"] > 0 and r["t1"] >= r["t0"] for r in result["rows"])
