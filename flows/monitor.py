"""The `skinsense-monitor` flow: wires the monitoring tasks, nothing else."""

from __future__ import annotations

from prefect import flow

from skinsense.config import MonitorConfig
from skinsense.paths import Home
from tasks import monitoring


@flow(name="skinsense-monitor", log_prints=True)
def skinsense_monitor(config: MonitorConfig = MonitorConfig()) -> dict:  # noqa: B008
    """Compare the prediction log's last `config.window_hours` with the champion's test part;
    write a Prefect artifact and an MLflow run; emit `skinsense.drift.detected` and
    `skinsense.feedback.ready` when their thresholds are crossed.

    Args:
        config: the window and the thresholds (the Prefect UI renders them as a form).
    """
    home = Home.default().ensure().root
    result = monitoring.compare_window(config, home)
    monitoring.publish_artifact(result)
    emitted = monitoring.emit_events(result, config)
    return {"message": result.message, "events": emitted,
            "champion_version": result.champion_version, "mlflow_run_id": result.mlflow_run_id}
