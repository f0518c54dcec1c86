"""The layers of DESIGN.md hold: skinsense never imports prefect; data and training code import
without prefect, mlflow and gradio (the GPU benchmark machine has none of them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def modules_after_import(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    return {name.split(".")[0] for name in out.stdout.split()}


# Modules that must import without the orchestration libraries (the GPU machine lacks them).
STANDALONE_MODULES = [
    "skinsense.data.sources", "skinsense.data.metadata", "skinsense.data.split",
    "skinsense.data.oversample", "skinsense.data.cache", "skinsense.data.synth",
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


def test_data_and_training_need_no_orchestration_libraries():
    # One interpreter for all of them: if none of the libraries is loaded after importing
    # every module, no module imports one. Only when one is loaded is each module tried
    # alone, to name the culprit (a fresh interpreter per module costs seconds each).
    loaded = modules_after_import("; ".join(f"import {m}" for m in STANDALONE_MODULES))
    if loaded & ORCHESTRATION:
        culprits = {m: sorted(modules_after_import(f"import {m}") & ORCHESTRATION)
                    for m in STANDALONE_MODULES}
        pytest.fail(f"imports an orchestration library: "
                    f"{ {m: libs for m, libs in culprits.items() if libs} }")


def test_skinsense_never_imports_prefect():
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "skinsense").rglob("*.py")
                 if "import prefect" in p.read_text() or "from prefect" in p.read_text()]
    assert offenders == []
    loaded = modules_after_import("import skinsense.cli, skinsense.stages, skinsense.serving.app")
    assert "prefect" not in loaded


def test_tasks_are_thin():
    for path in (ROOT / "tasks").glob("*.py"):
        for block in path.read_text().split("@task")[1:]:
            body = [line for line in block.splitlines() if line.strip()]
            assert len(body) <= 30, f"a task in {path.name} is {len(body)} lines"
