"""Whether the stack's parts answer: HTTP health checks, workers online on the pool, the
champion in the registry, databases that accept connections and servers that take the logins."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.parse
import urllib.request

from skinsense.stack import auth as stack_auth
from skinsense.stack.auth import StackCredentials
from skinsense.stack.pids import _log_tail, _stop_pid
from skinsense.stack.services import (
    LOGIN_TIMEOUT_S,
    MLFLOW,
    MODEL_NAME,
    PREFECT,
    WORKER,
    StackError,
    _client_host,
    _Service,
)


def _http_ok(url: str, timeout_s: float = 2.0, headers: dict[str, str] | None = None) -> bool:
    return 200 <= _http_status(url, timeout_s, headers) < 300


_http_status = stack_auth.http_status


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((_client_host(host), port)) == 0


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


def champion_exists(mlflow_url: str, model_name: str = MODEL_NAME,
                    headers: dict[str, str] | None = None) -> bool:
    """Whether the MLflow server at `mlflow_url` has a `champion` version of `model_name`.

    `headers` carry the login when the server runs MLflow's basic-auth app.
    """
    query = urllib.parse.urlencode({"name": model_name, "alias": "champion"})
    return _http_ok(f"{mlflow_url}/api/2.0/mlflow/registered-models/alias?{query}",
                    LOGIN_TIMEOUT_S if headers else 2.0, headers)


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


def _check_logins(services: dict[str, _Service], credentials: StackCredentials,
                  names: list[str], urls: dict[str, str | None]) -> None:
    """The servers refuse strangers and accept the stack's logins, or a clear StackError.

    A server left running by an earlier `stack up` keeps the settings it started with; so do
    MLflow's users, whose admin password is set only when the user database is created.
    """
    if PREFECT in names:
        _check_login(services[PREFECT].url, "/api/admin/version", "the Prefect server",
                     credentials.prefect_headers(),
                     f"it runs with another {stack_auth.PREFECT_SERVER_AUTH_ENV}. Run "
                     f"`skinsense stack down`, then `stack up` again with the one you mean")
    if MLFLOW in names:
        _check_login(
            services[MLFLOW].url, "/api/2.0/mlflow/experiments/search?max_results=1",
            "the MLflow server", credentials.mlflow_headers(),
            f"its admin {credentials.mlflow_username!r} has another password: its user "
            f"database ({stack_auth.mask_password(urls['mlflow-auth'] or '')}) was created "
            f"with another password ({stack_auth.MLFLOW_ADMIN_PASSWORD_ENV} sets it only "
            f"when that database is new). Set {stack_auth.MLFLOW_ADMIN_PASSWORD_ENV} to the "
            f"password it was created with, or change the password through MLflow's API "
            f"(PATCH /api/2.0/mlflow/users/update-password as that admin)")


def _check_login(url: str, path: str, server: str, headers: dict[str, str],
                 refused: str) -> None:
    """`server` answers `path` with 401 to a stranger and 200 to the stack's login."""
    if _http_status(url + path, LOGIN_TIMEOUT_S) != 401:
        raise StackError(
            f"{server} at {url} answers without a login: it was started without logins by an "
            f"earlier `stack up`. Run `skinsense stack down`, then `stack up` again")
    if _http_status(url + path, LOGIN_TIMEOUT_S, headers) != 200:
        raise StackError(f"{server} at {url} refuses the stack's login: {refused}")
