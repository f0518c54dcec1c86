"""The local and team stack: Prefect and MLflow servers, the deployment runner, workers and the
app as processes on this machine (`skinsense stack up|status|down`), and their logins.

- `services.py`: what each part runs (command, environment, URLs, pid file, log) and where;
- `control.py`: `up` and `down`; `pids.py`: start, find and stop the parts' processes;
- `health.py`: whether the parts answer and take the logins; `report.py`: `status`;
- `auth.py`: the logins and databases the local stack and docker compose agree on.

The commands the CLI runs are importable from here: `from skinsense import stack; stack.up(...)`.
"""

from skinsense.stack.control import down, up
from skinsense.stack.health import champion_exists
from skinsense.stack.report import describe, format_status, status
from skinsense.stack.services import (
    APP, MLFLOW, PREFECT, RUNNER, SERVICES, WORKER, StackError, credentials_file, project_root,
    stack_dir)

__all__ = ["APP", "MLFLOW", "PREFECT", "RUNNER", "SERVICES", "WORKER", "StackError",
           "champion_exists", "credentials_file", "describe", "down", "format_status",
           "project_root", "stack_dir", "status", "up"]
