"""Bring the local stack up and down: Prefect server, MLflow server, deployment runner and app
on one machine, and optionally process workers on the work pool `skinsense-gpu` (`--workers N`).

`up` starts each part as a background process (its own session, so it outlives the shell
that started it) with a pid file and a log under `SKINSENSE_HOME/stack/`, and waits until
it answers; `status` (`report.py`) reports them; `down` stops them. Everything binds to
loopback unless the caller asks for another interface. No Docker is needed; for a team, see
docker-compose.yml.

Databases: Prefect's server and MLflow's tracking server use SQLite files under
`SKINSENSE_HOME` unless given SQLAlchemy URLs (for example Postgres). Logins
(`skinsense.stack.auth`): Prefect's basic auth and MLflow's basic-auth app are on whenever the
stack binds anything but loopback, or when asked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from skinsense.paths import Home
from skinsense.stack import auth as stack_auth
from skinsense.stack.auth import StackCredentials
from skinsense.stack.health import (
    _check_logins,
    _check_reachable,
    _port_in_use,
    _wait_healthy,
    champion_exists,
)
from skinsense.stack.pids import _log_tail, _pid_file_alive, _running, _start, _stop_pid
from skinsense.stack.report import status
from skinsense.stack.services import (
    APP,
    MLFLOW,
    PREFECT,
    RUNNER,
    SERVICES,
    WORK_POOL,
    WORKER,
    StackError,
    _databases,
    _home,
    _known_workers,
    _recorded_services,
    _Service,
    _services,
    _settings,
    _worker_services,
    credentials_file,
    project_root,
    stack_dir,
)


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
    auth_on, databases = _logins_and_databases(home, host, auth, parts, urls)
    credentials, stored = _credentials(home) if auth_on else (None, None)
    services = _services(home, host=host, prefect_port=prefect_port, mlflow_port=mlflow_port,
                         app_port=app_port, prefect_database_url=urls["prefect"],
                         mlflow_backend_store_uri=urls["mlflow"],
                         mlflow_auth_database_uri=urls["mlflow-auth"], credentials=credentials)
    _record_settings(sdir, {
        "host": host, "prefect_port": prefect_port, "mlflow_port": mlflow_port,
        "app_port": app_port, "with_app": with_app, "auth": auth_on, "workers": workers,
        # Where the data lives, never a password (the servers get the URLs by environment).
        "databases": databases})
    launcher = _Launcher(services, parts, host, urls, credentials, sdir, timeout_s)
    starts_mlflow = MLFLOW in parts and not _pid_file_alive(sdir / f"{MLFLOW}.pid")
    _start_servers(launcher, home, stored)
    if starts_mlflow:  # before the runner and the app: they find the log by this file
        _prepare_log_database(home, urls)
    worker_names = [f"{WORKER}-{i}" for i in range(1, workers + 1)]
    if workers:
        services.update(_worker_services(home, services[RUNNER], services[PREFECT].url, workers))
    # The pool and its deployment are set up while the runner and the workers start up (a
    # worker that is quicker creates the same process pool itself).
    launcher.launch([RUNNER, *worker_names],
                    meanwhile=(lambda: _prepare_pool(services[RUNNER], timeout_s))
                    if workers else None)
    if with_app and APP in parts and champion_exists(
            services[MLFLOW].url, headers=credentials.mlflow_headers() if credentials else None):
        launcher.launch([APP])
    return status(home)


def _logins_and_databases(home: Home, host: str, auth: bool, parts: tuple[str, ...],
                          urls: dict[str, str | None]) -> tuple[bool, dict[str, str | None]]:
    """Whether the logins are on, and the databases to record (passwords masked).

    Servers already running keep the logins and databases they started with.
    """
    sdir = stack_dir(home)
    previous = _settings(home)
    running = {n: _pid_file_alive(sdir / f"{n}.pid") for n in (PREFECT, MLFLOW)}
    auth_on = (stack_auth.auth_wanted(host, auth, os.environ)
               or (any(running.values()) and previous.get("auth", False)))
    databases = dict(previous.get("databases", {}))
    for name, keys in ((PREFECT, ("prefect",)), (MLFLOW, ("mlflow", "mlflow-auth", "log"))):
        if not running[name] and name in parts:
            databases |= {k: stack_auth.mask_password(urls[k]) if urls[k] else None
                          for k in keys}
    if not auth_on:
        databases.pop("mlflow-auth", None)
    return auth_on, databases


def _prepare_log_database(home: Home, urls: dict[str, str | None]) -> None:
    """Make the prediction log's database (`services.log_database_url`) the one every
    process of this home uses: its URL written (0600) where they look
    (`skinsense.monitoring.database.STACK_URL_FILE`), so that a shell's `skinsense feedback`
    finds it too; the `skinsense` database beside MLflow's created when missing. SQLite
    (None): the file is removed.

    Raises:
        StackError: the database could not be created; says how to make it.
    """
    import sqlalchemy as sa

    from skinsense.monitoring import database

    url, recorded = urls["log"], home.root / database.STACK_URL_FILE
    if url is None:
        recorded.unlink(missing_ok=True)
        return
    if not os.environ.get(database.DATABASE_URL_ENV):  # derived: beside MLflow's database
        try:
            database.ensure_database(url, via=urls["mlflow"])
        except sa.exc.SQLAlchemyError as exc:
            raise StackError(
                f"the prediction log's database '{database.LOG_DATABASE}' on MLflow's "
                f"Postgres server ({stack_auth.mask_password(url)}) could not be created: "
                f"{str(exc).splitlines()[0]}. Create it (CREATE DATABASE "
                f"{database.LOG_DATABASE}) or set {database.DATABASE_URL_ENV} to a database "
                f"the log may use, then run `stack up` again") from exc
    stack_auth.write_private(recorded, url + "\n")


def _credentials(home: Home) -> tuple[StackCredentials, str | None]:
    """The stack's logins (stored, from the environment or generated), and the stored file's
    text before this `up`, to put back if the servers refuse the new ones."""
    try:
        stored = credentials_file(home).read_text()
    except FileNotFoundError:
        stored = None
    return stack_auth.resolve_credentials(credentials_file(home), os.environ), stored


def _record_settings(sdir: Path, settings: dict) -> None:
    """`stack.json`: what `status` and `down` read back (`services._settings`)."""
    (sdir / "stack.json").write_text(json.dumps(settings, indent=2))


@dataclass
class _Launcher:
    """Starts the parts of one `up` that are not running yet, and waits until they answer."""

    services: dict[str, _Service]
    parts: tuple[str, ...]
    host: str
    urls: dict[str, str | None]
    credentials: StackCredentials | None
    sdir: Path
    timeout_s: float

    def launch(self, names: list[str], meanwhile=None) -> list[str]:
        started = []
        for name in (n for n in names if n in self.parts or n.startswith(WORKER)):
            service = self.services[name]
            if _running(service):
                continue
            self._check_can_start(name, service)
            started.append((service, _start(service)))
        if meanwhile is not None:
            try:
                meanwhile()
            except BaseException:
                for service, _ in started:
                    _stop_pid(service.pid_file)
                raise
        _wait_healthy(started, self.timeout_s)
        return [n for n in names if n in self.parts]

    def _check_can_start(self, name: str, service: _Service) -> None:
        """Its port is free and its databases answer (and MLflow's login config is written)."""
        port = int(urllib.parse.urlsplit(service.url).port or 0)
        if port and name in (PREFECT, MLFLOW, APP) and _port_in_use(self.host, port):
            raise StackError(f"port {port} is already in use, so {name} cannot listen "
                             f"on it; stop whatever uses it or choose another port")
        if name == PREFECT:
            _check_reachable("prefect", self.urls["prefect"])
        if name == MLFLOW:
            _check_reachable("mlflow", self.urls["mlflow"])
            if self.credentials:
                _check_reachable("mlflow-auth", self.urls["mlflow-auth"])
                stack_auth.write_mlflow_auth_config(self.sdir / "mlflow-auth.ini",
                                                    self.urls["mlflow-auth"])


def _start_servers(launcher: _Launcher, home: Home, stored: str | None) -> None:
    """Start the Prefect and MLflow servers and check that they take the stack's logins."""
    try:
        servers = launcher.launch([PREFECT, MLFLOW])
        if launcher.credentials:
            _check_logins(launcher.services, launcher.credentials, servers, launcher.urls)
    except StackError:
        # Secrets from the environment that the servers refused must not replace the stored
        # ones that work (generated ones stay: a server may already have been created with them).
        if stored is not None:
            stack_auth.write_private(credentials_file(home), stored)
        raise


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
