"""Whether a process still runs: one answer for pid files and per-process temporary names."""

from __future__ import annotations

import os

import psutil


def pid_alive(pid: int, *, signalable: bool = False) -> bool:
    """True while process `pid` runs; one that exited but is not yet reaped (a zombie) is gone.

    Args:
        pid: The process id.
        signalable: Count only processes this user may signal. A pid file whose pid now
            belongs to another user's process is stale: ours would be signalable.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return not signalable
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def is_leftover(pid: int) -> bool:
    """Whether a temporary file or folder marked with `pid` is left over and can go: its
    process is gone, or it is this process (an earlier call that was interrupted)."""
    return pid == os.getpid() or not pid_alive(pid)
