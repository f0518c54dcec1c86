"""The monitoring stage: one window of the prediction log against the champion, written to
MLflow (experiment `monitor.experiment`), with what the flow should announce.

`run_monitor` is the `run(cfg)`-style entry point the `skinsense-monitor` flow's task wraps;
it imports no prefect (the flow emits the events and writes the artifact from its result).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel

from skinsense.config import MonitorConfig
from skinsense.monitoring.database import Feedback, engine_for
from skinsense.monitoring.drift import compare, read_window, window_bounds
from skinsense.monitoring.feedback import confirmed_cases
from skinsense.monitoring.reference import load_reference
from skinsense.paths import Home

# The Prefect events the monitoring flow emits (prefect.yaml's triggers listen for them).
DRIFT_EVENT = "skinsense.drift.detected"
FEEDBACK_EVENT = "skinsense.feedback.ready"


class MonitorResult(BaseModel):
    """What one monitoring run found (small: the flow's result and the events' payloads)."""

    champion_version: str | None
    report: dict[str, Any]
    message: str
    drift: list[dict[str, Any]]            # the tests that crossed, with their figures
    new_confirmed: int                     # confirmed cases since the champion was trained
    feedback_ready: bool
    champion_trained_at: str | None
    plots: list[Path]
    report_json: Path
    mlflow_run_id: str | None


def new_confirmed_since(when: datetime | None, *, database_url: str | None = None) -> int:
    """Confirmed cases entered since `when` (all of them when None)."""
    query = sa.select(sa.func.count()).select_from(Feedback)
    if when is not None:
        query = query.where(Feedback.created_at >= when)
    with engine_for(database_url).connect() as connection:
        return int(connection.execute(query).scalar())


def champion_reference(cfg: MonitorConfig, home: Home) -> tuple[str, dict, str | None]:
    """The champion's version, its test-part reference and when it was trained.

    Raises:
        RuntimeError: there is no champion, or it was evaluated before monitoring existed.
    """
    from skinsense.lifecycle import registry
    from skinsense.lifecycle.packaging import load_card

    version = registry.current_champion(cfg.model_name)
    if version is None:
        raise RuntimeError(f"no champion of '{cfg.model_name}' in the registry yet: run the "
                           f"pipeline once before monitoring")
    root = home.root / "monitoring" / "champions" / f"{cfg.model_name}-{version}"
    card = next(root.rglob("model_card.json"), None) if root.is_dir() else None
    model_dir = (card.parent if card is not None
                 else registry.download_model_dir(cfg.model_name, version, root))
    reference = load_reference(model_dir)
    if reference is None:
        raise RuntimeError(
            f"champion version {version} has no monitoring reference (it was evaluated "
            f"before SkinSense stored one); run the pipeline again so that the champion is "
            f"evaluated with it")
    return version, reference, load_card(model_dir).trained_at


def run_monitor(cfg: MonitorConfig, home: Home, *, end: datetime | None = None
                ) -> MonitorResult:
    """Compare the last `cfg.window_hours` of the log with the champion's test part.

    Writes `report.json` and the plots under `home/monitoring/runs/<end time>/`, and logs
    them with every figure to an MLflow run in `cfg.experiment`.
    """
    import mlflow

    from skinsense.lifecycle import tracking
    from skinsense.monitoring import plots

    tracking.configure(home)
    version, reference, trained_at = champion_reference(cfg, home)
    start, end = window_bounds(cfg.window_hours, end)
    window = read_window(start, end)
    confirmed = confirmed_cases(since=start, until=end)
    report = compare(window, reference, cfg, start=start, end=end,
                     confirmed=confirmed if len(confirmed) else None)
    since = datetime.fromisoformat(trained_at) if trained_at else None
    new = new_confirmed_since(since)
    out_dir = home.root / "monitoring" / "runs" / end.strftime("%Y%m%dT%H%M%SZ")
    figures = plots.draw(window, reference, out_dir, window_hours=cfg.window_hours)
    report_json = out_dir / "report.json"
    body = {**report.as_dict(), "champion_version": version, "new_confirmed": new,
            "champion_trained_at": trained_at, "thresholds": cfg.model_dump()}
    out_dir.mkdir(parents=True, exist_ok=True)
    report_json.write_text(json.dumps(body, indent=2, default=str))
    # No mlflow.set_experiment: it would stay active in this process and make a later
    # registration into another experiment's run (the pipeline's) fail.
    experiment_id = tracking.ensure_experiment(cfg.experiment, home)
    with mlflow.start_run(experiment_id=experiment_id,
                          run_name=f"monitor {end:%Y-%m-%d %H:%M}") as run:
        mlflow.log_params({"window_hours": cfg.window_hours, "champion_version": version,
                           "window_start": start.isoformat(), "window_end": end.isoformat()})
        mlflow.log_metrics(report.metrics() | {"new_confirmed": float(new)})
        mlflow.set_tags({"drift": str(bool(report.crossed)).lower(),
                         "enough_requests": str(report.enough).lower()})
        for path in [report_json, *figures]:
            mlflow.log_artifact(str(path))
    drift = [{"test": c.name, "value": c.value, "reference": c.reference, "detail": c.detail,
              **{k: v for k, v in c.figures.items() if not isinstance(v, dict)}}
             for c in report.crossed]
    return MonitorResult(champion_version=version, report=body, message=report.message,
                         drift=drift, new_confirmed=new,
                         feedback_ready=new >= cfg.retrain_min_feedback,
                         champion_trained_at=trained_at, plots=figures,
                         report_json=report_json, mlflow_run_id=run.info.run_id)
