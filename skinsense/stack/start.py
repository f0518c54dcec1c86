"""The local stack: Prefect server, MLflow server, deployment runner and app on one machine,
and optionally process workers on the work pool `skinsense-gpu` (`--workers N`).

`up` starts each part as a background process (its own session, so it outlives the shell
that started it) with a pid file and a log under `SKINSENSE_HOME/stack/`, and waits until
it answers; `status` reports them; `down` stops them. Everything binds to loopback unless the
caller asks for another interface. No Docker is needed; for a team, see docker-compose.yml.

This module only launches commands (`python -m prefect server start`, `python -m mlflow
server`, `python -m deployments.serve`, `python -m skinsense.cli serve`, and with workers
`python -m deployments.pool` and `python -m prefect worker start`) and talks HTTP to them,
so `skinsense` keeps its rule of never importing the orchestrator.

Databases: Prefect's server and MLflow's tracking server use SQLite files under
`SKINSENSE_HOME` unless given SQLAlchemy URLs (for example Postgres); the URLs reach the
servers through their environment, never their command line, where any user could read a
password. Logins (`skinsense.stack.auth`): Prefect's basic auth and MLflow's basic-auth app
are on whenever the stack binds anything but loopback, or when asked.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from skinsense.stack import auth as stack_auth
from skinsense.paths import Home
from skinsense.processes import pid_alive
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


def _http_ok(url: str, timeout_s: float = 2.0, headers: dict[str, str] | None = None) -> bool:
    return 200 <= _http_status(url, timeout_s, headers) < 300


_http_status = stack_auth.http_status


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((_client_host(host), port)) == 0


def _read_pid(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid > 0 else None


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


def _log_tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _start(service: _Service) -> subprocess.Popen:
    service.log_file.parent.mkdir(parents=True, exist_ok=True)
    service.pid_file.parent.mkdir(parents=True, exist_ok=True)
    with open(service.log_file, "ab") as log:
        log.write(f"\n==> {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(service.cmd)}\n"
                  .encode())
        log.flush()
        process = subprocess.Popen(service.cmd, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, cwd=service.cwd, env=service.env,
                                   start_new_session=True)
    service.pid_file.write_text(str(process.pid))
    return process


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


def _worker_online(service: _Service) -> bool:
    """Whether the Prefect server lists this worker of the pool as ONLINE."""
    worker_name = service.cmd[service.cmd.index("--name") + 1]
    request = urllib.request.Request(
        service.health_url, data=b"{}", method="POST",
        headers={"Content-Type": "application/json", **service.health_headers})
    try:
        with urllib.request.urlopen(request, timeout=LOGIN_TIMEOUT_S if service.health_headers
                                    else 3) as response:
            workers = json.load(response)
    except (OSError, ValueError):
        return False
    return any(w.get("name") == worker_name and w.get("status") == "ONLINE" for w in workers)


def _answers(service: _Service) -> bool:
    if service.name.startswith(WORKER):
        return _worker_online(service)
    return _http_ok(service.health_url, headers=service.health_headers)


def _prepare_pool(runner: _Service, timeout_s: float) -> None:
    """Create the work pool and deploy `train-architecture` on it (`deployments.pool`)."""
    log_file = runner.log_file.with_name("pool.log")
    with open(log_file, "ab") as log:
        log.write(f"\n==> {time.strftime('%Y-%m-%d %H:%M:%S')} python -m deployments.pool\n"
                  .encode())
        log.flush()
        try:
            done = subprocess.run([sys.executable, "-m", "deployments.pool"], stdout=log,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  cwd=project_root(), env=runner.env, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            done = None
    if done is None or done.returncode != 0:
        raise StackError(f"creating the work pool {WORK_POOL} and its train-architecture "
                         f"deployment failed; see {log_file}\n--- end of {log_file} ---\n"
                         f"{_log_tail(log_file)}")


def _wait_healthy(services: list[tuple[_Service, subprocess.Popen]], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    pending = list(services)
    while pending:
        for service, process in list(pending):
            if process.poll() is not None:
                _stop_pid(service.pid_file)
                raise StackError(
                    f"{service.name} exited with code {process.returncode} while starting; "
                    f"see {service.log_file}\n--- end of {service.log_file} ---\n"
                    f"{_log_tail(service.log_file)}")
            if _answers(service):
                pending.remove((service, process))
        if not pending:
            return
        if time.monotonic() > deadline:
            names = ", ".join(s.name for s, _ in pending)
            for service, _ in pending:
                _stop_pid(service.pid_file)
            service = pending[0][0]
            raise StackError(
                f"{names} did not answer within {timeout_s:.0f} s "
                f"({service.health_url}); see {service.log_file}\n"
                f"--- end of {service.log_file} ---\n{_log_tail(service.log_file)}")
        time.sleep(0.5)


def _running(service: _Service) -> bool:
    pid = _read_pid(service.pid_file)
    return pid is not None and pid_alive(pid)


def champion_exists(mlflow_url: str, model_name: str = MODEL_NAME,
                    headers: dict[str, str] | None = None) -> bool:
    """Whether the MLflow server at `mlflow_url` has a `champion` version of `model_name`.

    `headers` carry the login when the server runs MLflow's basic-auth app.
    """
    query = urllib.parse.urlencode({"name": model_name, "alias": "champion"})
    return _http_ok(f"{mlflow_url}/api/2.0/mlflow/registered-models/alias?{query}",
                    LOGIN_TIMEOUT_S if headers else 2.0, headers)


def _databases(home: Home, prefect_database_url: str | None, mlflow_backend_store_uri: str | None,
               mlflow_auth_database_uri: str | None) -> dict[str, str | None]:
    """The three database URLs: argument, else the environment, else SQLite under `home`."""
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
    return urls


def _check_reachable(name: str, url: str | None) -> None:
    """Fail fast, and say so, when a networked database does not accept connections."""
    address = stack_auth.database_address(url) if url else None
    if address is None:
        return
    try:
        with socket.create_connection(address, timeout=5):
            return
    except OSError as exc:
        raise StackError(
            f"cannot reach {stack_auth.DATABASE_NAMES[name]} at {address[0]}:{address[1]} "
            f"({stack_auth.mask_password(url)}): {exc.strerror or exc}. Start that database "
            f"server, or check the host, port and firewall") from exc


def _pid_file_alive(pid_file: Path) -> bool:
    pid = _read_pid(pid_file)
    return pid is not None and pid_alive(pid)


def _check_logins(services: dict[str, _Service], credentials: StackCredentials,
                  names: list[str], urls: dict[str, str | None]) -> None:
    """The servers refuse strangers and accept the stack's logins, or a clear StackError.

    A server left running by an earlier `stack up` keeps the settings it started with; so do
    MLflow's users, whose admin password is set only when the user database is created.
    """
    if PREFECT in names:
        probe = f"{services[PREFECT].url}/api/admin/version"
        if _http_status(probe, LOGIN_TIMEOUT_S) != 401:
            raise StackError(
                f"the Prefect server at {services[PREFECT].url} answers without a login: it was "
                f"started without logins by an earlier `stack up`. Run `skinsense stack down`, "
                f"then `stack up` again")
        if _http_status(probe, LOGIN_TIMEOUT_S, credentials.prefect_headers()) != 200:
            raise StackError(
                f"the Prefect server at {services[PREFECT].url} refuses the stack's login: it "
                f"runs with another {stack_auth.PREFECT_SERVER_AUTH_ENV}. Run `skinsense stack "
                f"down`, then `stack up` again with the one you mean")
    if MLFLOW in names:
        probe = f"{services[MLFLOW].url}/api/2.0/mlflow/experiments/search?max_results=1"
        if _http_status(probe, LOGIN_TIMEOUT_S) != 401:
            raise StackError(
                f"the MLflow server at {services[MLFLOW].url} answers without a login: it was "
                f"started without logins by an earlier `stack up`. Run `skinsense stack down`, "
                f"then `stack up` again")
        if _http_status(probe, LOGIN_TIMEOUT_S, credentials.mlflow_headers()) != 200:
            raise StackError(
                f"MLflow refuses the admin login {credentials.mlflow_username!r}: its user "
                f"database ({stack_auth.mask_password(urls['mlflow-auth'] or '')}) was created "
                f"with another password ({stack_auth.MLFLOW_ADMIN_PASSWORD_ENV} sets it only "
                f"when that database is new). Set {stack_auth.MLFLOW_ADMIN_PASSWORD_ENV} to the "
                f"password it was created with, or change the password through MLflow's API "
                f"(PATCH /api/2.0/mlflow/users/update-password as that admin)")


def up(home: Home | Path | str, *, host: str = "127.0.0.1", prefect_port: int = 4200,
       mlflow_port: int = 5000, app_port: int = 7860, with_app: bool = True,
       parts: tuple[str, ...] = SERVICES, timeout_s: float = 180.0,
       prefect_database_url: str | None = None, mlflow_backend_store_uri: str | None = None,
       mlflow_auth_database_uri: str | None = None, auth: bool = False,
       workers: int = 0) -> list[dict]:
    """Start the stack (parts already running are left alone) and wait until it answers.

    Args:
        home: SKINSENSE_HOME; pid files and logs go to `home/stack/`.
        host: interface every part binds to; loopback unless you mean to expose the UIs.
            Any other address turns the logins on.
        prefect_port, mlflow_port, app_port: ports of the Prefect UI/API, the MLflow UI and
            the app (the runner passes `app_port` to the pipeline's deploy step).
        with_app: also start the app when a `champion` model exists (otherwise the first
            pipeline run starts it).
        parts: which parts to start (default all of `SERVICES`).
        timeout_s: how long each group of parts may take to answer.
        prefect_database_url: SQLAlchemy URL of Prefect's database
            (`postgresql+asyncpg://...`); default `$PREFECT_API_DATABASE_CONNECTION_URL`,
            else SQLite in PREFECT_HOME.
        mlflow_backend_store_uri: MLflow's backend store (`postgresql://...`); default
            `$MLFLOW_BACKEND_STORE_URI`, else the embedded store's SQLite file.
        mlflow_auth_database_uri: MLflow's user database when logins are on; default
            `$MLFLOW_AUTH_DATABASE_URI`, else `SKINSENSE_HOME/mlflow/auth.db`.
        auth: turn on the logins on loopback too (see `skinsense.stack.auth` for where the
            secrets come from). They are also on when `host` is not loopback, when the
            environment holds a server-side secret, or when the running servers have them.
        workers: process workers to start on the work pool `skinsense-gpu` (`worker-1`
            ... `worker-N`, one flow run each at a time); meanwhile the pool is created if
            missing and `train-architecture` is deployed on it. They run the architectures
            of pipelines with `train.fan_out`. Workers already running are left alone, and
            none is stopped.

    Returns:
        `status(home)` once everything answers.

    Raises:
        StackError: a part exited or did not answer, a port is taken by something else, a
            database cannot be reached, or a server refuses the logins; the message names
            the log file or what to change.
        stack_auth.AuthSettingsError: a database URL or secret the servers would refuse.
    """
    home = _home(home).ensure()
    sdir = stack_dir(home)
    sdir.mkdir(parents=True, exist_ok=True)
    unknown = set(parts) - set(SERVICES)
    if unknown:
        raise ValueError(f"unknown stack part(s) {sorted(unknown)}; choose from {SERVICES}")

    urls = _databases(home, prefect_database_url, mlflow_backend_store_uri,
                      mlflow_auth_database_uri)
    previous = _settings(home)
    running = {n: _pid_file_alive(sdir / f"{n}.pid") for n in (PREFECT, MLFLOW)}
    # Servers already running keep the logins and databases they started with.
    auth_on = (stack_auth.auth_wanted(host, auth, os.environ)
               or (any(running.values()) and previous.get("auth", False)))
    databases = dict(previous.get("databases", {}))
    for name, keys in ((PREFECT, ("prefect",)), (MLFLOW, ("mlflow", "mlflow-auth"))):
        if not running[name] and name in parts:
            databases |= {k: stack_auth.mask_password(urls[k]) if urls[k] else None
                          for k in keys}
    if not auth_on:
        databases.pop("mlflow-auth", None)

    credentials, stored = None, None
    if auth_on:
        try:
            stored = credentials_file(home).read_text()
        except FileNotFoundError:
            pass
        credentials = stack_auth.resolve_credentials(credentials_file(home), os.environ)
    services = _services(home, host=host, prefect_port=prefect_port, mlflow_port=mlflow_port,
                         app_port=app_port, prefect_database_url=urls["prefect"],
                         mlflow_backend_store_uri=urls["mlflow"],
                         mlflow_auth_database_uri=urls["mlflow-auth"], credentials=credentials)
    (sdir / "stack.json").write_text(json.dumps(
        {"host": host, "prefect_port": prefect_port, "mlflow_port": mlflow_port,
         "app_port": app_port, "with_app": with_app, "auth": auth_on, "workers": workers,
         # Where the data lives, never a password (the servers get the URLs by environment).
         "databases": databases}, indent=2))

    def launch(names: list[str], meanwhile=None) -> list[str]:
        started = []
        for name in (n for n in names if n in parts or n.startswith(WORKER)):
            service = services[name]
            if _running(service):
                continue
            port = int(urllib.parse.urlsplit(service.url).port or 0)
            if port and name in (PREFECT, MLFLOW, APP) and _port_in_use(host, port):
                raise StackError(f"port {port} is already in use, so {name} cannot listen "
                                 f"on it; stop whatever uses it or choose another port")
            if name == PREFECT:
                _check_reachable("prefect", urls["prefect"])
            if name == MLFLOW:
                _check_reachable("mlflow", urls["mlflow"])
                if credentials:
                    _check_reachable("mlflow-auth", urls["mlflow-auth"])
                    stack_auth.write_mlflow_auth_config(sdir / "mlflow-auth.ini",
                                                        urls["mlflow-auth"])
            started.append((service, _start(service)))
        if meanwhile is not None:
            try:
                meanwhile()
            except BaseException:
                for service, _ in started:
                    _stop_pid(service.pid_file)
                raise
        _wait_healthy(started, timeout_s)
        return [n for n in names if n in parts]

    try:
        servers = launch([PREFECT, MLFLOW])
        if credentials:
            _check_logins(services, credentials, servers, urls)
    except StackError:
        # Secrets from the environment that the servers refused must not replace the stored
        # ones that work (generated ones stay: a server may already have been created with them).
        if stored is not None:
            stack_auth.write_private(credentials_file(home), stored)
        raise
    worker_names = [f"{WORKER}-{i}" for i in range(1, workers + 1)]
    if workers:
        services.update(_worker_services(home, services[RUNNER], services[PREFECT].url, workers))
    # The pool and its deployment are set up while the runner and the workers start up (a
    # worker that is quicker creates the same process pool itself).
    launch([RUNNER, *worker_names],
           meanwhile=(lambda: _prepare_pool(services[RUNNER], timeout_s)) if workers else None)
    if with_app and APP in parts and champion_exists(
            services[MLFLOW].url, headers=credentials.mlflow_headers() if credentials else None):
        launch([APP])
    return status(home)


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


def status(home: Home | Path | str) -> list[dict]:
    """One record per part: name, pid, running, healthy, url, log (and a note when useful)."""
    home = _home(home)
    services, credentials = _recorded_services(home)
    mlflow_headers = credentials.mlflow_headers() if credentials else None
    records = []
    for name in SERVICES:
        service = services[name]
        pid = _read_pid(service.pid_file)
        running = pid is not None and pid_alive(pid)
        record = {"name": name, "pid": pid if running else None, "running": running,
                  "healthy": running and _http_ok(service.health_url,
                                                  headers=service.health_headers),
                  "url": service.url, "log": str(service.log_file)}
        if name == APP and not running:
            record["note"] = ("starts after the first pipeline run registers a champion"
                              if not champion_exists(services[MLFLOW].url, headers=mlflow_headers)
                              else "not running")
        records.append(record)
    for service in _known_workers(home, services).values():
        pid = _read_pid(service.pid_file)
        running = pid is not None and pid_alive(pid)
        records.append({"name": service.name, "pid": pid if running else None,
                        "running": running, "healthy": running and _worker_online(service),
                        "url": service.url, "log": str(service.log_file)})
    return records


def _known_workers(home: Home, services: dict[str, _Service]) -> dict[str, _Service]:
    """The workers `stack.json` records and any whose pid file is still there."""
    count = _settings(home).get("workers", 0)
    for pid_file in stack_dir(home).glob(f"{WORKER}-*.pid"):
        suffix = pid_file.stem.removeprefix(f"{WORKER}-")
        count = max(count, int(suffix) if suffix.isdigit() else 0)
    return _worker_services(home, services[RUNNER], services[PREFECT].url, count)


def describe(home: Home | Path | str) -> dict:
    """Logins and databases of the last `up`: `auth`, `credentials` (the file, when logins
    are on) and `databases` (URLs with passwords masked; None is Prefect's own SQLite)."""
    home = _home(home)
    settings = _settings(home)
    return {"auth": bool(settings.get("auth")),
            "credentials": str(credentials_file(home)) if settings.get("auth") else None,
            "databases": settings.get("databases", {})}


def _children(pid: int) -> list[int]:
    """Every descendant of `pid` (flow runs the runner started live in sessions of their own)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _stop_pid(pid_file: Path, timeout_s: float = 20.0) -> bool:
    pid = _read_pid(pid_file)
    stopped = False
    if pid is not None and pid_alive(pid):
        # Descendants that started sessions of their own (the runner's flow runs) are not
        # in the process group; remember them before their parent goes away.
        strays = [p for p in _children(pid) if _pgid(p) not in (pid, None)]
        targets = [pid, *strays]
        for target in targets:
            _signal_group(target, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while any(pid_alive(t) for t in targets) and time.monotonic() < deadline:
            time.sleep(0.2)
        for target in targets:
            if pid_alive(target):
                _signal_group(target, signal.SIGKILL)
        stopped = True
    pid_file.unlink(missing_ok=True)
    return stopped


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def down(home: Home | Path | str, *, timeout_s: float = 20.0) -> list[str]:
    """Stop every part of the stack by its pid file (the whole process group); idempotent.

    The runner goes first so that it takes no new runs, then the app, then the servers.

    Returns:
        The names of the parts that were running and are now stopped.
    """
    home = _home(home)
    services, _ = _recorded_services(home)
    services.update(_known_workers(home, services))
    workers = [name for name in services if name.startswith(WORKER)]
    # The runner and the workers first, together, so that nothing takes new runs: they take
    # ~20 s to finish their loops on SIGTERM while idle, and their flow runs get SIGTERM
    # directly (they are marked Crashed), so a short grace loses nothing.
    with ThreadPoolExecutor(max_workers=1 + len(workers)) as pool:
        first = dict(zip((RUNNER, *workers), pool.map(
            lambda name: _stop_pid(services[name].pid_file, timeout_s=min(timeout_s, 5.0)),
            (RUNNER, *workers))))
    stopped = [name for name, was_running in first.items() if was_running]
    for name in (APP, MLFLOW, PREFECT):
        if _stop_pid(services[name].pid_file, timeout_s=timeout_s):
            stopped.append(name)
    return stopped


def format_status(records: list[dict]) -> str:
    """A small table for `skinsense stack status`."""
    lines = [f"{'part':<15} {'state':<9} {'pid':>7}  url"]
    for r in records:
        state = "healthy" if r["healthy"] else "running" if r["running"] else "stopped"
        line = f"{r['name']:<15} {state:<9} {r['pid'] or '-':>7}  {r['url']}"
        if r.get("note"):
            line += f"  ({r['note']})"
        lines.append(line)
    return "\n".join(lines)
