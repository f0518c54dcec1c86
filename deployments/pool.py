"""The process work pool `skinsense-gpu` and the `train-architecture` deployment on it.

`python -m deployments.pool` (what `skinsense stack up --workers N` runs once before starting
its workers) creates the pool when it is missing and deploys `train-architecture` from
`prefect.yaml`, exactly as an operator would by hand:

    prefect work-pool create skinsense-gpu --type process
    prefect --no-prompt deploy --name train-architecture
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from deployments.definitions import TRAIN_DEPLOYMENT_NAME, WORK_POOL

log = logging.getLogger("skinsense.deployments")
ROOT = Path(__file__).resolve().parents[1]


def ensure_work_pool(name: str = WORK_POOL) -> bool:
    """Create the process work pool `name` with Prefect's default job template if missing.

    Returns:
        True when it was created, False when it existed.

    Raises:
        RuntimeError: a pool of that name exists with another type.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            try:
                client.create_work_pool(WorkPoolCreate(
                    name=name, type=ProcessWorker.type,
                    base_job_template=ProcessWorker.get_default_base_job_template()))
                return True
            except ObjectAlreadyExists:  # a process worker starting meanwhile created it
                pool = client.read_work_pool(name)
    if pool.type != ProcessWorker.type:
        raise RuntimeError(f"work pool {name!r} exists with type {pool.type!r}; the local stack's "
                           f"workers are process workers. Delete it or use another server")
    return False


def deploy_train_architecture() -> None:
    """`prefect deploy` of `train-architecture` from prefect.yaml (working dir: the checkout)."""
    subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--name",
                    TRAIN_DEPLOYMENT_NAME], cwd=ROOT, check=True)


def main() -> None:
    """Create the pool if needed, then deploy `train-architecture` onto it."""
    created = ensure_work_pool()
    log.info("work pool %r %s", WORK_POOL, "created" if created else "exists")
    deploy_train_architecture()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
