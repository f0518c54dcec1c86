"""The layers of DESIGN.md hold: skinsense never imports prefect; data and training code import
without prefect, mlflow and gradio (the GPU benchmark machine has none of them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def modules_after_import(*statements: str) -> list[set[str]]:
    """Top-level modules loaded after each statement, run one after the other in one fresh
    interpreter (each interpreter costs seconds: torch, gradio)."""
    steps = "; ".join(f"{statement}; print('\\n'.join(sys.modules)); print('--')"
                      for statement in statements)
    out = subprocess.run([sys.executable, "-c", f"import sys; {steps}"], capture_output=True,
                         text=True, cwd=ROOT, check=True)
    return [{name.split(".")[0] for name in part.split()} for part in out.stdout.split("--")[:-1]]


# Modules that must import without the orchestration libraries (the GPU machine lacks them).
STANDALONE_MODULES = [
    "skinsense.data.sources", "skinsense.data.metadata", "skinsense.data.split",
    "skinsense.data.oversample", "skinsense.data.cache", "skinsense.data.synth",
    "skinsense.data.duplicates",
    "skinsense.data.datasets", "skinsense.training.loop", "skinsense.training.launcher",
    "skinsense.training.worker", "skinsense.training.batches", "skinsense.models",
    "skinsense.presets", "skinsense.packaging",
    # Serving applies calibration and the referral rule; evaluation adds the audit.
    "skinsense.calibration", "skinsense.referral", "skinsense.bootstrap", "skinsense.subgroups",
    # The out-of-domain gate, the quality checks and the reference images are used by
    # evaluation (on the GPU machine) as well as by serving.
    "skinsense.gate", "skinsense.quality", "skinsense.ood_reference", "skinsense.evaluation",
    "skinsense.serving.predictor", "skinsense.serving.explain",
]
ORCHESTRATION = {"prefect", "mlflow", "gradio"}


def test_data_and_training_need_no_orchestration_libraries_and_skinsense_no_prefect():
    # One interpreter: first every standalone module (if none of the libraries is loaded
    # after importing all of them, no module imports one), then the CLI, the stages and the
    # app, which may load mlflow and gradio but never prefect. Only when a library shows up
    # is each module tried alone, to name the culprit.
    standalone, everything = modules_after_import(
        "; ".join(f"import {m}" for m in STANDALONE_MODULES),
        "import skinsense.cli, skinsense.stages, skinsense.serving.app")
    if standalone & ORCHESTRATION:
        culprits = {m: sorted(modules_after_import(f"import {m}")[0] & ORCHESTRATION)
                    for m in STANDALONE_MODULES}
        pytest.fail(f"imports an orchestration library: "
                    f"{ {m: libs for m, libs in culprits.items() if libs} }")
    assert "prefect" not in everything


def test_skinsense_never_imports_prefect_in_its_source():
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "skinsense").rglob("*.py")
                 if "import prefect" in p.read_text() or "from prefect" in p.read_text()]
    assert offenders == []


def test_tasks_are_thin():
    for path in (ROOT / "tasks").glob("*.py"):
        for block in path.read_text().split("@task")[1:]:
            body = [line for line in block.splitlines() if line.strip()]
            assert len(body) <= 30, f"a task in {path.name} is {len(body)} lines"
