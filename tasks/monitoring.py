"""Prefect tasks of the `skinsense-monitor` flow: thin wrappers around
`skinsense.monitoring.monitor`, the artifact, and the events."""

from __future__ import annotations

import base64
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.events import emit_event

from skinsense.config import MonitorConfig
from skinsense.monitoring.monitor import (
    DRIFT_EVENT,
    FEEDBACK_EVENT,
    MonitorResult,
    run_monitor,
)
from skinsense.paths import Home


@task(name="compare-window")
def compare_window(cfg: MonitorConfig, home: Path) -> MonitorResult:
    result = run_monitor(cfg, Home(home))
    print(result.message)
    return result


@task(name="monitoring-artifact")
def publish_artifact(result: MonitorResult) -> None:
    """A table of every test (key `skinsense-monitoring`) and a report with the plots."""
    report = result.report
    rows = [{"test": c["name"], "value": c["value"], "test part": c["reference"],
             "crossed": c["crossed"], "detail": c["detail"]} for c in report["checks"]]
    rows.insert(0, {"test": "requests", "value": report["requests"], "test part": None,
                    "crossed": False, "detail": report["message"]})
    create_table_artifact(rows, key="skinsense-monitoring-table",
                          description=f"Monitoring of champion version "
                                      f"{result.champion_version}: {result.message}")
    images = "\n\n".join(
        f"![{Path(p).stem}](data:image/png;base64,"
        f"{base64.b64encode(Path(p).read_bytes()).decode()})" for p in result.plots)
    lines = [f"# SkinSense monitoring: {report['window_start'][:16]} to "
             f"{report['window_end'][:16]} UTC",
             f"Champion version {result.champion_version}; {report['requests']} requests; "
             f"**{result.message}**.",
             f"Confirmed cases since the champion was trained: {result.new_confirmed} "
             f"({'enough to retrain' if result.feedback_ready else 'not yet enough'}).",
             "", "| test | value | test part | crossed | detail |", "|---|---|---|---|---|",
             *[f"| {r['test']} | {r['value']} | {r['test part']} | {r['crossed']} | "
               f"{r['detail']} |" for r in rows],
             "", f"MLflow run: `{result.mlflow_run_id}` (experiment skinsense-monitoring)",
             "", images]
    create_markdown_artifact("\n".join(lines), key="skinsense-monitoring",
                             description="Prediction log against the champion's test part")


@task(name="emit-events")
def emit_events(result: MonitorResult, cfg: MonitorConfig) -> list[str]:
    """`skinsense.drift.detected` when a test crossed its threshold and
    `skinsense.feedback.ready` when enough confirmed cases arrived; the names emitted."""
    resource = {"prefect.resource.id": f"skinsense.model.{cfg.model_name}",
                "prefect.resource.name": cfg.model_name}
    emitted = []
    if result.drift:
        emit_event(DRIFT_EVENT, resource=resource, payload={
            "champion_version": result.champion_version, "tests": result.drift,
            "window_start": result.report["window_start"],
            "window_end": result.report["window_end"], "requests": result.report["requests"]})
        emitted.append(DRIFT_EVENT)
    if result.feedback_ready:
        emit_event(FEEDBACK_EVENT, resource=resource, payload={
            "champion_version": result.champion_version,
            "new_confirmed": result.new_confirmed, "since": result.champion_trained_at,
            "threshold": cfg.retrain_min_feedback})
        emitted.append(FEEDBACK_EVENT)
    for name in emitted:
        print(f"emitted {name}")
    return emitted
