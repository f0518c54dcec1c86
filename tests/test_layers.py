"""The layers of DESIGN.md hold: imports point down the layers and never go round in a cycle;
skinsense never imports prefect; data and training code import without prefect, mlflow and
gradio (the GPU benchmark machine has none of them)."""

from __future__ import annotations

import ast
import graphlib
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
    "skinsense.data.synth_metadata", "skinsense.data.synth_painter", "skinsense.data.synth_copies",
    "skinsense.data.duplicates",
    "skinsense.data.datasets", "skinsense.training.loop", "skinsense.training.launcher",
    "skinsense.training.worker", "skinsense.training.batches", "skinsense.models",
    "skinsense.presets", "skinsense.lifecycle.packaging",
    # Serving applies the trust rules; evaluation fits them and adds the audit.
    "skinsense.trust.calibration", "skinsense.trust.referral", "skinsense.trust.gate",
    "skinsense.trust.quality", "skinsense.evaluation.bootstrap", "skinsense.evaluation.subgroups",
    "skinsense.evaluation.ood_reference", "skinsense.evaluation.plots",
    "skinsense.evaluation.predict", "skinsense.evaluation.metrics", "skinsense.evaluation.fit",
    "skinsense.evaluation.evaluate", "skinsense.evaluation.ood", "skinsense.evaluation.compare",
    "skinsense.evaluation.efficiency", "skinsense.evaluation.architecture",
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


# The layers, lowest first (docs/DESIGN.md draws the same map). A module imports only from its
# own layer or the ones below, wherever the import statement is (module level, inside a
# function, or under TYPE_CHECKING). The `skinsense` command sits on top: it is the entry
# point, and imports flows and deployments only when the command that needs them runs.
LAYERS = [
    ("foundations", ["skinsense", "skinsense.labels", "skinsense.config", "skinsense.paths",
                     "skinsense.processes", "skinsense.models", "skinsense.presets",
                     # lifecycle/'s model folder, its ONNX export and the MLflow runs: training,
                     # evaluation and serving all use them (its handoff and registry sit on top)
                     "skinsense.lifecycle.packaging", "skinsense.lifecycle.export",
                     "skinsense.lifecycle.tracking"]),
    ("data", ["skinsense.data"]),
    ("training, trust and the audit", [
        # The audit modules live in evaluation/ but depend on nothing else there.
        "skinsense.training", "skinsense.trust", "skinsense.evaluation.bootstrap",
        "skinsense.evaluation.subgroups", "skinsense.evaluation.ood_reference",
        "skinsense.evaluation.plots",
        # After deployment: the log and feedback store, the feedback source, drift statistics.
        "skinsense.monitoring"]),
    ("evaluation and serving", ["skinsense.evaluation", "skinsense.quantize", "skinsense.serving",
                                # confirmed cases scored by the candidates (field_* metrics)
                                "skinsense.monitoring.field"]),
    ("lifecycle", ["skinsense.lifecycle"]),
    ("stages and the stack", ["skinsense.stages", "skinsense.reports", "skinsense.stack",
                              # the monitoring stage reads the champion from the registry
                              "skinsense.monitoring.monitor"]),
    ("tasks", ["tasks"]),
    ("flows", ["flows"]),
    ("deployments", ["deployments"]),
    ("command", ["skinsense.cli"]),
]
PACKAGES = ("skinsense", "flows", "tasks", "deployments")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def _imported(path: Path) -> set[str]:
    """The project modules `path` imports (`import_module("x")` with a literal name too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                names.add(full if full in MODULES else node.module)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)):
            names.add(node.args[0].value)
    found = set()
    for name in names:
        while name and name not in MODULES:  # `a.b.name` where `name` is not a module
            name = name.rpartition(".")[0]
        if name:
            found.add(name)
    return found


def _layer(module: str) -> int:
    """Index in LAYERS of the longest prefix that names `module`'s place."""
    best, where = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, where = len(prefix), index
    assert where is not None, f"{module} has no place in LAYERS (tests/test_layers.py)"
    return where


GRAPH = {module: _imported(path) - {module} for module, path in MODULES.items()}


def test_imports_point_down_the_layers():
    upward = [f"{module} ({LAYERS[_layer(module)][0]}) imports {target} "
              f"({LAYERS[_layer(target)][0]})"
              for module, targets in sorted(GRAPH.items()) for target in sorted(targets)
              if _layer(target) > _layer(module)]
    assert upward == []


def test_no_import_cycle():
    try:
        graphlib.TopologicalSorter(GRAPH).prepare()
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")


def test_the_layer_checks_see_the_imports():
    # The checks above pass trivially if the graph is empty or misses lazy imports.
    assert "skinsense.serving.predictor" in GRAPH["skinsense.serving.explain"]
    assert "skinsense.lifecycle.tracking" in GRAPH["skinsense.training.worker"]  # inside a function
    assert {"flows.pipeline", "deployments.serve"} <= GRAPH["skinsense.cli"]  # import_module
    assert _layer("skinsense.trust.gate") < _layer("skinsense.serving.predictor")
