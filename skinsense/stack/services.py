"""What the stack runs: each part's command, environment, URLs, pid file and log, its
databases, and what the last `up` recorded in `SKINSENSE_HOME/stack/stack.json`.

Only commands are described here (`python -m prefect server start`, `python -m mlflow
server`, `python -m deployments.serve`, `python -m skinsense.cli serve`, and with workers
`python -m prefect worker start`), so `skinsense` keeps its rule of never importing the
orchestrator. Database URLs reach the servers through their environment, never their command
line, where any user could read a password.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from skinsense.paths import Home
from skinsense.stack import auth as stack_auth
from skinsense.stack.auth import StackCredentials

PREFECT = "prefect-server"
MLFLOW = "mlflow-server"
RUNNER = "runner"
APP = "app"
SERVICES = (PREFECT, MLFLOW, RUNNER, APP)

# Process workers of the work pool: `worker-1`, `worker-2`, ... (`up(workers=N)`); they run
# the `train-architecture` child runs of pipelines with train.fan_out.
WORKER = "worker"
WORK_POOL = "skinsense-gpu"

# The pipeline registers its model under this name (ServeConfig.model_name).
MODEL_NAME = "skinsense"
RUNNER_DEPLOYMENT = "skinsense-pipeline/manual"
# MLflow checks each password with scrypt, which takes seconds on a busy small machine.
LOGIN_TIMEOUT_S = 30.0



class StackError(RuntimeError):
    """A part of the stack did not start; the message names its log file."""


@dataclass(frozen=True)
class _Service:
    name: str
    cmd: list[str]
    env: dict[str, str]
    url: str  # what a person opens (or the API the part serves)
    health_url: str
    pid_file: Path
    log_file: Path
    cwd: Path = field(default_factory=Path.cwd)
    # Sent with the health check (the runner's needs Prefect's login when it is on).
    health_headers: dict[str, str] = field(default_factory=dict)


def _home(home: Home | Path | str) -> Home:
    return home if isinstance(home, Home) else Home(Path(home).expanduser().resolve())


def stack_dir(home: Home | Path | str) -> Path:
    """`SKINSENSE_HOME/stack`: pid files, logs and `stack.json` of the running stack."""
    return _home(home).root / "stack"


def project_root() -> Path:
    """The checkout holding `flows/` and `deployments/` (the runner's working directory)."""
    return Path(__file__).resolve().parents[2]


def _client_host(host: str) -> str:
    # A server bound to every interface is still reached through loopback from here.
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _allowed_hosts(host: str) -> str:
    """MLflow's Host-header allow list (it compares `host:port` as sent by the client)."""
    names = ["localhost", "127.0.0.1"]
    if host not in ("0.0.0.0", "::", "", *names):
        names.append(host)
    if host in ("0.0.0.0", "::"):
        names.append(socket.gethostname())
    return ",".join(f"{n},{n}:*" for n in names)


def default_mlflow_backend_store(home: Home) -> str:
    """The SQLite file the embedded store uses: runs made before the stack show up in it."""
    return f"sqlite:///{home.mlflow / 'mlflow.db'}"


def default_mlflow_auth_database(home: Home) -> str:
    """MLflow's user database when the stack's logins are on and no URI is given."""
    return f"sqlite:///{home.mlflow / 'auth.db'}"


def credentials_file(home: Home | Path | str) -> Path:
    """`SKINSENSE_HOME/stack/credentials.env`: the stack's logins (0600), sourceable."""
    return stack_dir(home) / stack_auth.CREDENTIALS_FILE


def _services(home: Home, *, host: str, prefect_port: int, mlflow_port: int,
              app_port: int, prefect_database_url: str | None = None,
              mlflow_backend_store_uri: str | None = None,
              mlflow_auth_database_uri: str | None = None,
              credentials: StackCredentials | None = None) -> dict[str, _Service]:
    sdir = stack_dir(home)
    client = _client_host(host)
    prefect_url = f"http://{client}:{prefect_port}"
    mlflow_url = f"http://{client}:{mlflow_port}"
    app_url = f"http://{client}:{app_port}"
    prefect_home = os.environ.get("PREFECT_HOME") or str(home.root / "prefect")
    common = {
        **os.environ,
        "SKINSENSE_HOME": str(home.root),
        "PREFECT_HOME": prefect_home,
        "PREFECT_API_URL": f"{prefect_url}/api",
        "MLFLOW_TRACKING_URI": mlflow_url,
        # Offline machines: no telemetry, no update checks.
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "DO_NOT_TRACK": "1",
        "PYTHONUNBUFFERED": "1",
        # Every client of the stack (runner, its flow runs, the app) logs in when logins are on.
        **(credentials.client_env() if credentials else {}),
    }
    prefect_env = {**common, **(credentials.prefect_server_env() if credentials else {})}
    if prefect_database_url:
        prefect_env[stack_auth.PREFECT_DATABASE_ENV] = prefect_database_url
    mlflow_env = {**common, stack_auth.MLFLOW_BACKEND_STORE_ENV:
                  mlflow_backend_store_uri or default_mlflow_backend_store(home),
                  # MLflow's job runner (seven huey processes for GenAI jobs SkinSense never
                  # submits) costs memory and holds up `stack down` by 10-20 s; opt back in by
                  # setting the variable.
                  "MLFLOW_SERVER_ENABLE_JOB_EXECUTION":
                  os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")}
    mlflow_auth_args: list[str] = []
    if credentials:
        mlflow_env |= {**credentials.mlflow_server_env(),
                       stack_auth.MLFLOW_AUTH_CONFIG_ENV: str(sdir / "mlflow-auth.ini")}
        mlflow_auth_args = ["--app-name", "basic-auth"]
    py = sys.executable
    return {
        PREFECT: _Service(
            PREFECT, [py, "-m", "prefect", "server", "start", "--host", host,
                      "--port", str(prefect_port)],
            prefect_env, prefect_url, f"{prefect_url}/api/health",
            sdir / f"{PREFECT}.pid", sdir / f"{PREFECT}.log", home.root),
        MLFLOW: _Service(
            # The backend store comes from MLFLOW_BACKEND_STORE_URI in its environment.
            MLFLOW, [py, "-m", "mlflow", "server", *mlflow_auth_args,
                     "--artifacts-destination", str(home.mlflow / "artifacts"),
                     "--host", host, "--port", str(mlflow_port),
                     # One worker is plenty for one team member and saves ~300 MB per worker.
                     "--workers", "1",
                     "--allowed-hosts", _allowed_hosts(host)],
            mlflow_env, mlflow_url, f"{mlflow_url}/health",
            sdir / f"{MLFLOW}.pid", sdir / f"{MLFLOW}.log", home.mlflow),
        RUNNER: _Service(
            RUNNER, [py, "-m", "deployments.serve"],
            {**common, "SKINSENSE_APP_HOST": host, "SKINSENSE_APP_PORT": str(app_port)},
            f"{prefect_url}/deployments",
            f"{prefect_url}/api/deployments/name/{RUNNER_DEPLOYMENT}",
            sdir / f"{RUNNER}.pid", sdir / f"{RUNNER}.log", project_root(),
            health_headers=credentials.prefect_headers() if credentials else {}),
        # The same pid file and log as the app the pipeline's deploy step starts, so that a
        # retraining run replaces this app instead of fighting it for the port.
        APP: _Service(
            APP, [py, "-m", "skinsense.cli", "serve", "--model-uri",
                  f"models:/{MODEL_NAME}@champion", "--host", host, "--port", str(app_port)],
            common, app_url, f"{app_url}/health", home.app / "app.pid", home.app / "app.log",
            home.root),
    }


def _worker_services(home: Home, runner: _Service, prefect_url: str,
                     count: int) -> dict[str, _Service]:
    """`count` process workers of the pool, each with its own name, pid file and log.

    Each takes one flow run at a time (`--limit 1`): one training per worker, so the
    architectures of a fanned-out pipeline spread over the workers instead of queueing on one.
    """
    sdir = stack_dir(home)
    workers = {}
    for index in range(1, count + 1):
        name = f"{WORKER}-{index}"
        cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", WORK_POOL,
               "--type", "process", "--name", f"{socket.gethostname()}-{name}", "--limit", "1"]
        workers[name] = _Service(name, cmd, runner.env,
                                 f"{prefect_url}/work-pools/work-pool/{WORK_POOL}",
                                 f"{prefect_url}/api/work_pools/{WORK_POOL}/workers/filter",
                                 sdir / f"{name}.pid", sdir / f"{name}.log", project_root(),
                                 health_headers=runner.health_headers)
    return workers


def _databases(home: Home, prefect_database_url: str | None, mlflow_backend_store_uri: str | None,
               mlflow_auth_database_uri: str | None) -> dict[str, str | None]:
    """The database URLs: argument, else the environment, else SQLite under `home`; and the
    prediction log's (`log_database_url`)."""
    env = os.environ
    urls = {
        "prefect": prefect_database_url or env.get(stack_auth.PREFECT_DATABASE_ENV) or None,
        "mlflow": (mlflow_backend_store_uri or env.get(stack_auth.MLFLOW_BACKEND_STORE_ENV)
                   or default_mlflow_backend_store(home)),
        "mlflow-auth": (mlflow_auth_database_uri or env.get(stack_auth.MLFLOW_AUTH_DATABASE_ENV)
                        or default_mlflow_auth_database(home)),
    }
    for name, url in urls.items():
        if url:
            stack_auth.check_database_url(url, for_=name)
    return urls | {"log": log_database_url(urls["mlflow"])}


def log_database_url(mlflow_url: str) -> str | None:
    """The prediction log's database on this stack: `$SKINSENSE_LOG_DATABASE_URL`; else,
    with MLflow's store on Postgres, the database `skinsense` on the same server with the
    same login; else None (SQLite under SKINSENSE_HOME)."""
    import sqlalchemy as sa

    from skinsense.monitoring import database

    explicit = os.environ.get(database.DATABASE_URL_ENV)
    if explicit:
        return explicit
    mlflow = sa.make_url(mlflow_url)
    if mlflow.get_backend_name() != "postgresql":
        return None
    return mlflow.set(database=database.LOG_DATABASE).render_as_string(hide_password=False)


def _settings(home: Home) -> dict:
    try:
        return json.loads((stack_dir(home) / "stack.json").read_text())
    except (OSError, ValueError):
        return {"host": "127.0.0.1", "prefect_port": 4200, "mlflow_port": 5000,
                "app_port": 7860, "with_app": True, "auth": False, "workers": 0}


def _recorded_services(home: Home) -> tuple[dict[str, _Service], StackCredentials | None]:
    """The parts as the last `up` described them (with its logins, when they were on)."""
    settings = _settings(home)
    credentials = (stack_auth.load_credentials(credentials_file(home))
                   if settings.get("auth") else None)
    services = _services(home, host=settings["host"], prefect_port=settings["prefect_port"],
                         mlflow_port=settings["mlflow_port"], app_port=settings["app_port"],
                         credentials=credentials)
    return services, credentials


def _known_workers(home: Home, services: dict[str, _Service]) -> dict[str, _Service]:
    """The workers `stack.json` records and any whose pid file is still there."""
    count = _settings(home).get("workers", 0)
    for pid_file in stack_dir(home).glob(f"{WORKER}-*.pid"):
        suffix = pid_file.stem.removeprefix(f"{WORKER}-")
        count = max(count, int(suffix) if suffix.isdigit() else 0)
    return _worker_services(home, services[RUNNER], services[PREFECT].url, count)
