"""Deploy the app: a detached process that outlives the flow, proven by a real prediction."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from pydantic import BaseModel

from skinsense.serving.app import EXAMPLES_DIR


class DeployError(RuntimeError):
    """The app did not come up serving the expected model."""


class Deployment(BaseModel):
    url: str
    pid: int
    version: str | None
    log: Path
    top_class: str


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    # A zombie child (ours, not yet reaped) still answers kill(0).
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def stop_app(app_dir: Path, *, timeout_s: float = 20.0) -> bool:
    """Stop the app whose pid file is in `app_dir`; True when one was running."""
    pid_file = app_dir / "app.pid"
    if not pid_file.exists():
        return False
    pid = int(pid_file.read_text().strip() or 0)
    stopped = False
    if pid and _alive(pid):
        os.killpg(pid, signal.SIGTERM)  # the app leads its own session (start_new_session)
        deadline = time.monotonic() + timeout_s
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):
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


def check_prediction(url: str) -> str:
    """Classify a real example image through the app's API; returns the top class label."""
    from gradio_client import Client, handle_file

    example = sorted(EXAMPLES_DIR.glob("*.jpg"))[0]
    client = Client(url, verbose=False)
    label, _ = client.predict(handle_file(str(example)), api_name="/classify")
    return str(label["label"])


def deploy_app(model_uri: str, *, expected_version: str | None, app_dir: Path, host: str,
               port: int, env: dict[str, str] | None = None,
               startup_timeout_s: float = 180.0) -> Deployment:
    """(Re)start the app serving `model_uri` as a detached process and prove it works.

    The previous app (pid file in `app_dir`) is stopped first. Success means `/health` reports
    `expected_version` and a real prediction through gradio_client returns a class.

    Raises:
        DeployError: the app did not start, served another version, or failed to predict;
            the message holds the end of its log.
    """
    app_dir.mkdir(parents=True, exist_ok=True)
    stop_app(app_dir)
    log_path = app_dir / "app.log"
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    if health(url) is not None:
        raise DeployError(f"another process already answers on {url}; stop it or choose "
                          f"another port (--port)")
    cmd = [sys.executable, "-m", "skinsense.cli", "serve", "--model-uri", model_uri,
           "--host", host, "--port", str(port)]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True,
                                   env={**os.environ, **(env or {})})
    (app_dir / "app.pid").write_text(str(process.pid))
    deadline = time.monotonic() + startup_timeout_s
    state = None
    while time.monotonic() < deadline and process.poll() is None:
        state = health(url)
        if state is not None:
            break
        time.sleep(0.5)
    try:
        if state is None:
            raise DeployError(f"the app did not answer on {url} within {startup_timeout_s:.0f} s")
        if expected_version is not None and str(state.get("version")) != str(expected_version):
            raise DeployError(f"the app serves version {state.get('version')}, "
                              f"expected {expected_version}")
        top = check_prediction(url)
        deployment = Deployment(url=url, pid=process.pid, version=state.get("version") and str(state["version"]),
                                log=log_path, top_class=top)
    except Exception as exc:
        stop_app(app_dir)
        tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
        raise DeployError(f"deploying the app failed: {exc}\n--- end of {log_path} ---\n{tail}") from exc
    return deployment
