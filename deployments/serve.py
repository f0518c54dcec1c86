"""Serve both deployments of `skinsense-pipeline` from one long-running process.

For one machine without a work pool or worker: `skinsense deploy serve` (or
`python -m deployments.serve`) registers `scheduled-retraining` and `manual` with the Prefect
server at PREFECT_API_URL and runs whatever the schedule or the UI's Run button starts.

Schedules live on the server. The runner is started with `pause_on_shutdown=False`, so
stopping or restarting this process does not pause the weekly schedule: a run due while it
is down waits (Late) and starts when the runner is back.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from deployments.concurrency import ensure_gpu_limit
from deployments.definitions import to_deployments, to_monitor_deployment

log = logging.getLogger("skinsense.deployments")


def main() -> None:
    """Register the deployments and the `gpu` limit, then run flows until stopped.

    Raises:
        RuntimeError: no Prefect server is configured (PREFECT_API_URL): a runner on Prefect's
            temporary server would register its schedules where nothing keeps them.
    """
    from prefect import serve
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise RuntimeError(
            "serving the deployments needs a Prefect server that outlives this process, and "
            "PREFECT_API_URL is not set (without it Prefect would start a temporary server "
            "that takes the schedules with it when it stops). Start the whole local stack "
            "with `./run stack up` (it runs this runner too), or start `prefect server start` "
            "and set PREFECT_API_URL=http://127.0.0.1:4200/api")

    # Served deployments record the working directory as the flow's location: make it the
    # checkout holding `flows/`, whatever directory the command was started from.
    os.chdir(Path(__file__).resolve().parents[1])
    from flows.monitor import skinsense_monitor
    from flows.pipeline import skinsense_pipeline

    slots = ensure_gpu_limit()
    log.info("global concurrency limit 'gpu' has %d slot(s)", slots)
    # One pipeline run at a time by default: a second one would only wait for the GPU slot
    # while holding the data stage's memory and disk bandwidth.
    limit = int(os.environ.get("SKINSENSE_RUNNER_LIMIT", "1"))
    serve(*to_deployments(skinsense_pipeline), to_monitor_deployment(skinsense_monitor),
          pause_on_shutdown=False, limit=limit)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per API poll otherwise
    main()
