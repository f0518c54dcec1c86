"""The stack's processes by pid file: start one detached with its log, tell whether it still
runs, stop it together with every process it started."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from skinsense.processes import pid_alive
from skinsense.stack.services import _Service


def _read_pid(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid > 0 else None


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


def _running(service: _Service) -> bool:
    pid = _read_pid(service.pid_file)
    return pid is not None and pid_alive(pid)


def _pid_file_alive(pid_file: Path) -> bool:
    pid = _read_pid(pid_file)
    return pid is not None and pid_alive(pid)


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
