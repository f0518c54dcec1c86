"""The deployments of `skinsense-pipeline`: names, parameters, schedules, work pool.

Only definitions live here. `deployments/serve.py` serves them from one long-running
process (one machine, no work pool); `prefect.yaml` at the repository root holds the same
two deployments for `prefect deploy` onto the process work pool `WORK_POOL`.
"""

from __future__ import annotations

import os
from typing import Any

# The pool, the child deployment's name and where children keep their results are the fan-out's
# contract (`skinsense.lifecycle.handoff`): the flows and tasks that start and run the children
# read them there, so that nothing below `deployments/` imports it.
from skinsense.lifecycle.handoff import (  # noqa: F401
    RESULT_STORAGE_ENV,
    TRAIN_DEPLOYMENT,
    TRAIN_DEPLOYMENT_NAME,
    WORK_POOL,
    child_result_storage,
)

FLOW_ENTRYPOINT = "flows/pipeline.py:skinsense_pipeline"

# One architecture's training as a child run on the pool (`train.fan_out`); only on the pool
# (prefect.yaml), never served by the runner: its runs must reach workers on every machine.
TRAIN_FLOW_ENTRYPOINT = "flows/train_architecture.py:train_architecture"

# Defaults of the served pipeline deployments' `config` (JSON of a partial PipelineConfig),
# e.g. a local data source: what schedule- and event-started runs use.
PIPELINE_DEFAULTS_ENV = "SKINSENSE_PIPELINE_DEFAULTS"

SCHEDULED = "scheduled-retraining"
MANUAL = "manual"

# Monday 03:00 UTC: a quiet hour for the GPU, and early enough in the week that a regression
# found in Monday's evaluation is looked at during working days.
RETRAIN_CRON = "0 3 * * 1"
RETRAIN_TIMEZONE = "UTC"

TAGS = ["skinsense"]
# Global concurrency limit that training takes one slot of; one slot per GPU.
GPU_LIMIT = "gpu"


def default_parameters() -> dict[str, Any]:
    """Deployment defaults: the flow's own defaults, except where the app is served.

    The pipeline's last step (re)deploys the app on `config.serve.host:port`; a runner started
    by `skinsense stack up --app-port N` passes SKINSENSE_APP_HOST/PORT so that retraining
    replaces the app the stack started instead of starting a second one on 7860.
    `$SKINSENSE_PIPELINE_DEFAULTS` (JSON) gives the rest of the runs' defaults, e.g. a local
    data source for the weekly and the event-started retraining.
    """
    import json

    config: dict[str, Any] = json.loads(os.environ.get(PIPELINE_DEFAULTS_ENV) or "{}")
    serve: dict[str, Any] = dict(config.get("serve", {}))
    if os.environ.get("SKINSENSE_APP_HOST"):
        serve["host"] = os.environ["SKINSENSE_APP_HOST"]
    if os.environ.get("SKINSENSE_APP_PORT"):
        serve["port"] = int(os.environ["SKINSENSE_APP_PORT"])
    if serve:
        config["serve"] = serve
    return {"config": config} if config else {}


DEPLOYMENTS: dict[str, dict[str, Any]] = {
    SCHEDULED: {
        "description": "Weekly retraining with the default parameters: fetches HAM10000 again "
        "(nothing is downloaded when unchanged), retrains, promotes only a better model and "
        "redeploys the app when the champion changed.",
        "cron": RETRAIN_CRON,
        "timezone": RETRAIN_TIMEZONE,
    },
    MANUAL: {
        "description": "Start a run by hand (Prefect UI: Run -> Custom run to change the "
        "parameters).",
        "cron": None,
        "timezone": None,
    },
}


# The monitoring flow: once a day, after the night's traffic, before working hours in Europe.
MONITOR_FLOW_ENTRYPOINT = "flows/monitor.py:skinsense_monitor"
MONITOR_DEPLOYMENT_NAME = "daily"
MONITOR_CRON = "0 6 * * *"
MONITOR_DESCRIPTION = (
    "Compare the last day of the app's prediction log with the champion's test part (Run -> "
    "Custom run: config.window_hours for another window); writes the artifact "
    "'skinsense-monitoring' and an MLflow run, and emits skinsense.drift.detected / "
    "skinsense.feedback.ready, which start scheduled-retraining.")
# One retraining per event kind per day at most: a noisy day emits the drift event at every
# monitoring run, and one retraining answers all of them. A reactive trigger fires at the
# first event and then ignores the same event until its `within` has passed.
RETRAIN_COOLDOWN_S = 24 * 3600
_EVENT_RECORD = {"event": "{{ event.event }}", "id": "{{ event.id|string }}",
                 "occurred": "{{ event.occurred|string }}", "payload": "{{ event.payload }}"}


def retrain_triggers(config: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The event triggers of `scheduled-retraining`, in prefect.yaml's `triggers:` form.

    Args:
        config: the deployment's own `config` parameter: the trigger's parameters replace
            the deployment's top-level ones, so they repeat it (e.g. the app's host and port).
    """
    from skinsense.monitoring.monitor import DRIFT_EVENT, FEEDBACK_EVENT

    config = config or {}
    with_feedback = {**config, "data": {**config.get("data", {}),
                                        "extra_sources": ["feedback"]}}
    specs = []
    for name, event, cfg, why in (
            ("skinsense-retrain-on-drift", DRIFT_EVENT, config,
             "the monitoring flow found drift"),
            ("skinsense-retrain-on-feedback", FEEDBACK_EVENT, with_feedback,
             "enough confirmed diagnoses arrived; train with them in the training part")):
        parameters: dict[str, Any] = {"triggered_by": dict(_EVENT_RECORD)}
        if cfg:
            parameters["config"] = cfg
        specs.append({"type": "event", "name": name, "enabled": True,
                      "description": f"Retrain when {why} (at most once per "
                                     f"{RETRAIN_COOLDOWN_S // 3600} h).",
                      "match": {"prefect.resource.id": "skinsense.model.*"},
                      "expect": [event], "posture": "Reactive", "threshold": 1,
                      "within": RETRAIN_COOLDOWN_S, "parameters": parameters})
    return specs


def to_monitor_deployment(flow):  # noqa: ANN001, ANN201 (a Prefect flow and its deployment)
    """The runner deployment of the `skinsense-monitor` flow for `prefect.serve`."""
    from prefect.schedules import Cron

    return flow.to_deployment(name=MONITOR_DEPLOYMENT_NAME, description=MONITOR_DESCRIPTION,
                              tags=TAGS, schedules=[Cron(MONITOR_CRON, timezone="UTC")],
                              enforce_parameter_schema=True)


def to_deployments(flow) -> list:
    """Runner deployments of `flow` (the `skinsense-pipeline` flow) for `prefect.serve`."""
    from prefect.events import DeploymentEventTrigger
    from prefect.schedules import Cron

    built = []
    for name, spec in DEPLOYMENTS.items():
        schedules = [Cron(spec["cron"], timezone=spec["timezone"])] if spec["cron"] else None
        triggers = ([DeploymentEventTrigger.model_validate(t) for t in retrain_triggers(
            default_parameters().get("config"))] if name == SCHEDULED else None)
        built.append(flow.to_deployment(
            name=name, description=spec["description"], tags=TAGS, schedules=schedules,
            triggers=triggers, parameters=default_parameters(),
            # The server checks parameters against the flow's schema (PipelineConfig), so a
            # bad value in the UI's form or an API call is refused before anything runs.
            enforce_parameter_schema=True))
    return built

