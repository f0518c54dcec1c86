"""The local and team stack: Prefect and MLflow servers, the deployment runner, workers and the
app as processes on this machine (`skinsense stack up|status|down`), and their logins (`auth`).

The commands the CLI runs are importable from here: `from skinsense import stack; stack.up(...)`.
"""

from skinsense.stack.start import (  # noqa: F401
    APP, MLFLOW, PREFECT, RUNNER, SERVICES, WORKER, StackError, champion_exists,
    credentials_file, describe, down, format_status, project_root, stack_dir, status, up)
