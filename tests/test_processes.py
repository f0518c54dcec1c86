"""`pid_alive`: running, exited, and exited-but-not-reaped processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from skinsense.processes import pid_alive


def test_a_running_process_is_alive_and_an_exited_one_is_not():
    assert pid_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert pid_alive(child.pid) and pid_alive(child.pid, signalable=True)
    finally:
        child.kill()
        child.wait()
    assert not pid_alive(child.pid)


def test_an_exited_child_not_yet_reaped_counts_as_gone():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 30
        while pid_alive(child.pid) and time.monotonic() < deadline:
            time.sleep(0.05)  # never wait(): the child stays a zombie until reaped
        assert not pid_alive(child.pid)
        assert child.poll() == 0  # it was a zombie, not a reaped (reusable) pid
    finally:
        child.wait()
