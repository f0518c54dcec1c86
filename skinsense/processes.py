"""Whether a process still runs: one answer for pid files and per-process temporary names."""

from __future__ import annotations

import ipaddress
import os
import socket

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


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps a server on this machine (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        # A host name: loopback only if every address it resolves to is.
        try:
            infos = socket.getaddrinfo(host, None)
        except OSError:
            return False
        return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)
