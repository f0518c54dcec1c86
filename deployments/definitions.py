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
    """
    serve: dict[str, Any] = {}
    if os.environ.get("SKINSENSE_APP_HOST"):
        serve["host"] = os.environ["SKINSENSE_APP_HOST"]
    if os.environ.get("SKINSENSE_APP_PORT"):
        serve["port"] = int(os.environ["SKINSENSE_APP_PORT"])
    return {"config": {"serve": serve}} if serve else {}


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


def to_deployments(flow) -> list:
    """Runner deployments of `flow` (the `skinsense-pipeline` flow) for `prefect.serve`."""
    from prefect.schedules import Cron

    built = []
    for name, spec in DEPLOYMENTS.items():
        schedules = [Cron(spec["cron"], timezone=spec["timezone"])] if spec["cron"] else None
        built.append(flow.to_deployment(
            name=name, description=spec["description"], tags=TAGS, schedules=schedules,
            parameters=default_parameters(),
            # The server checks parameters against the flow's schema (PipelineConfig), so a
            # bad value in the UI's form or an API call is refused before anything runs.
            enforce_parameter_schema=True))
    return built

