"""Deploy the app: keep one detached app process serving the champion, proven by a prediction.

A running app is never stopped to deploy a new model: it is asked to reload (`POST
/reload`), which swaps the model only once the new one has loaded and classified a test
image. So a new model that fails leaves the old one serving, and the deploy step fails with
the reason. Only when no app answers is a new process started (its own session, pid file
and log in the app folder), so it outlives the flow that started it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from skinsense.config import ServeConfig
from skinsense.processes import pid_alive
from skinsense.serving.app import SERVE_CONFIG_ENV, example_images

PID_FILE, LOG_FILE = "app.pid", "app.log"


class DeployError(RuntimeError):
    """The app did not come up serving the expected model (an old app keeps serving)."""


class VersionMismatch(DeployError):
    """The app works but serves another version than the one expected."""


class Deployment(BaseModel):
    """A proven deployment: the app answers /health and classified a real image."""

    url: str
    pid: int | None  # None when the app was not started by a deploy (no pid file)
    version: str | None
    log: Path
    top_class: str
    action: Literal["started", "reloaded"]


def _running_pid(app_dir: Path) -> int | None:
    """The pid in the app folder's pid file when that process is alive."""
    try:
        pid = int((app_dir / PID_FILE).read_text().strip() or 0)
    except (OSError, ValueError):
        return None
    return pid if pid and pid_alive(pid, signalable=True) else None


def stop_app(app_dir: Path, *, timeout_s: float = 20.0) -> bool:
    """Stop the app whose pid file is in `app_dir`; True when one was running."""
    pid_file = app_dir / PID_FILE
    if not pid_file.exists():
        return False
    pid = _running_pid(app_dir)
    stopped = False
    if pid:
        os.killpg(pid, signal.SIGTERM)  # the app leads its own session (start_new_session)
        deadline = time.monotonic() + timeout_s
        while pid_alive(pid, signalable=True) and time.monotonic() < deadline:
            time.sleep(0.2)
        if pid_alive(pid, signalable=True):
            os.killpg(pid, signal.SIGKILL)
        stopped = True
    pid_file.unlink(missing_ok=True)
    return stopped


def health(url: str, timeout_s: float = 2.0) -> dict | None:
    """The app's /health JSON, or None when it does not answer."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout_s) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


def request_reload(url: str, *, force: bool = False, timeout_s: float = 300.0) -> dict:
    """Ask the app to check the registry now; its answer (`swapped`, `version`, `error`).

    Blocks while the app loads and tests the new model (seconds to a minute on a CPU).
    """
    request = urllib.request.Request(f"{url}/reload{'?force=1' if force else ''}",
                                     data=b"", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:  # 500: the new model failed; 403: not local
        body = exc.read()
        try:
            return json.loads(body)
        except ValueError:
            return {"error": f"HTTP {exc.code}: {body[:300]!r}"}


def check_prediction(url: str) -> str:
    """Run a real example image through the app's API (`/assess`: the quality checks, the
    model and its out-of-domain gate); returns the top class code.

    `/assess` rather than `/classify`: a model trained on other data than HAM10000 (the
    synthetic sample of the tests and the offline demo) may rightly call the real example
    out of its domain, and `/classify` then answers with that refusal instead of a class.

    Raises:
        RuntimeError: the model did not run on the example (a quality check refused it).
    """
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False, ssl_verify=False)
    answer = client.predict(handle_file(str(example_images()[0])), api_name="/assess")
    if not answer.get("top_class"):
        raise RuntimeError(f"the app did not classify the example image: {answer}")
    return str(answer["top_class"])


def _url(host: str, port: int) -> str:
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{port}"


def _log_tail(log_path: Path) -> str:
    tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
    return f"\n--- end of {log_path} ---\n{tail}"


def deploy_app(model_uri: str, *, expected_version: str | None, app_dir: Path, host: str,
               port: int, env: dict[str, str] | None = None,
               startup_timeout_s: float = 180.0, reload_timeout_s: float = 300.0,
               serve_config: ServeConfig | None = None) -> Deployment:
    """Make the app at `host:port` serve `model_uri` and prove it.

    If an app answers there (started by an earlier deploy, or by `skinsense serve` with the
    same URI), it is asked to reload and keeps running whatever happens. Otherwise a new
    detached process is started (pid file and log in `app_dir`). Success means `/health`
    reports `expected_version` and a real image is classified through gradio_client.

    Args:
        model_uri: what the app serves, normally `models:/NAME@champion`.
        expected_version: the version that must be served; None accepts any.
        app_dir: holds `app.pid` and `app.log`.
        host, port: where the app listens (the URL uses 127.0.0.1 for a wildcard host).
        env: extra environment of a started app (MLFLOW_TRACKING_URI, SKINSENSE_HOME).
        startup_timeout_s: how long a started app may take to answer /health.
        reload_timeout_s: how long a running app may take to load the new model.
        serve_config: reload interval, upload limit, concurrency of a started app.

    Raises:
        DeployError: with the reason (and the end of the app's log). A running app is
            never stopped; an app this call started is stopped only if it does not work.
    """
    app_dir.mkdir(parents=True, exist_ok=True)
    url = _url(host, port)
    pid = _running_pid(app_dir)
    state = health(url)
    if state is None and pid is not None:
        # An app of an earlier deploy may still be starting: give it the startup time.
        state = _wait_for_health(url, pid, startup_timeout_s)
        if state is None:
            stop_app(app_dir)  # alive but not answering: it serves nobody
    if state is not None:
        if state.get("model_uri") != model_uri:
            who = f"the app of {app_dir / PID_FILE}" if pid else "another process"
            raise DeployError(f"{who} answers on {url} serving {state.get('model_uri')!r}, not "
                              f"{model_uri!r}; stop it or choose another port (--port)")
        return _reload_running(url, pid, app_dir, expected_version, reload_timeout_s)
    return _start(model_uri, url, app_dir, host, port, env, serve_config, expected_version,
                  startup_timeout_s)


def _wait_for_health(url: str, pid: int, timeout_s: float) -> dict | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and pid_alive(pid, signalable=True):
        if (state := health(url)) is not None:
            return state
        time.sleep(0.5)
    return None


def _prove(url: str, expected_version: str | None, log_path: Path) -> tuple[dict, str]:
    """/health with the expected version and a real prediction, or DeployError."""
    state = health(url, timeout_s=10.0)
    if state is None:
        raise DeployError(f"the app at {url} stopped answering /health")
    if expected_version is not None and str(state.get("version")) != str(expected_version):
        raise VersionMismatch(
            f"the app at {url} serves version {state.get('version')}, expected "
            f"{expected_version} (the alias may have moved meanwhile)")
    try:
        top = check_prediction(url)
    except Exception as exc:
        raise DeployError(f"the app at {url} failed a real prediction through gradio_client: "
                          f"{type(exc).__name__}: {exc}{_log_tail(log_path)}") from exc
    return state, top


def _reload_running(url: str, pid: int | None, app_dir: Path, expected_version: str | None,
                    reload_timeout_s: float) -> Deployment:
    log_path = app_dir / LOG_FILE
    answer = request_reload(url, timeout_s=reload_timeout_s)
    if answer.get("error"):
        raise DeployError(f"the app at {url} could not switch to the new model and keeps "
                          f"serving version {answer.get('version')}: {answer['error']}")
    state, top = _prove(url, expected_version, log_path)
    return Deployment(url=url, pid=pid, version=_version(state), log=log_path, top_class=top,
                      action="reloaded")


def _start(model_uri: str, url: str, app_dir: Path, host: str, port: int,
           env: dict[str, str] | None, serve_config: ServeConfig | None,
           expected_version: str | None, startup_timeout_s: float) -> Deployment:
    log_path = app_dir / LOG_FILE
    cmd = [sys.executable, "-m", "skinsense.cli", "serve", "--model-uri", model_uri,
           "--host", host, "--port", str(port)]
    child_env = {**os.environ, **(env or {})}
    if serve_config is not None:
        child_env[SERVE_CONFIG_ENV] = serve_config.model_dump_json()
    with open(log_path, "ab") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True,
                                   env=child_env)
    (app_dir / PID_FILE).write_text(str(process.pid))
    state = _wait_for_health(url, process.pid, startup_timeout_s)
    if state is None:
        try:
            # Its main thread may be gone (a zombie leader) while other threads still exit.
            process.wait(timeout=10)
            why = f"exited with status {process.returncode}"
        except subprocess.TimeoutExpired:
            why = f"did not answer on {url} within {startup_timeout_s:.0f} s"
        stop_app(app_dir)
        raise DeployError(f"the app {why}{_log_tail(log_path)}")
    try:
        state, top = _prove(url, expected_version, log_path)
    except VersionMismatch as exc:
        # It works and serves the alias's current version: better up than down.
        raise VersionMismatch(f"{exc}; the app was left running") from exc
    except DeployError:
        stop_app(app_dir)
        raise
    return Deployment(url=url, pid=process.pid, version=_version(state), log=log_path,
                      top_class=top, action="started")


def _version(state: dict) -> str | None:
    return None if state.get("version") is None else str(state["version"])
