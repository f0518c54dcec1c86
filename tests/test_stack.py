"""`skinsense.stack`: the local stack comes up on loopback, reports itself and goes away."""

from __future__ import annotations

import socket
import urllib.request

import pytest

from skinsense import stack
from skinsense.processes import pid_alive

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status == 200
    except OSError:
        return False


def test_up_status_down(home, monkeypatch):
    monkeypatch.delenv("PREFECT_HOME", raising=False)
    prefect_port, mlflow_port, app_port = free_ports(3)
    try:
        records = stack.up(home.root, prefect_port=prefect_port, mlflow_port=mlflow_port,
                           app_port=app_port)
        by_name = {r["name"]: r for r in records}
        for name in (stack.PREFECT, stack.MLFLOW, stack.RUNNER):
            assert by_name[name]["running"] and by_name[name]["healthy"], by_name[name]
        # No champion yet in a fresh home: the first pipeline run starts the app.
        assert not by_name[stack.APP]["running"]
        assert "first pipeline run" in by_name[stack.APP]["note"]

        assert answers(f"http://127.0.0.1:{prefect_port}/api/health")
        assert answers(f"http://127.0.0.1:{mlflow_port}/health")
        assert (home.root / "prefect").is_dir()  # PREFECT_HOME under SKINSENSE_HOME
        assert (home.root / "stack" / "prefect-server.log").stat().st_size > 0
        # Calling up again leaves the running parts alone.
        again = stack.up(home.root, prefect_port=prefect_port, mlflow_port=mlflow_port,
                         app_port=app_port)
        assert [r["pid"] for r in again] == [r["pid"] for r in records]
        assert "healthy" in stack.format_status(again)
        pids = [r["pid"] for r in records if r["pid"]]
    finally:
        stopped = stack.down(home.root)
    assert set(stopped) == {stack.PREFECT, stack.MLFLOW, stack.RUNNER}
    assert all(not pid_alive(pid) for pid in pids)
    assert not any(r["running"] for r in stack.status(home.root))
    assert not answers(f"http://127.0.0.1:{prefect_port}/api/health")
    assert stack.down(home.root) == []  # idempotent


def test_a_taken_port_is_a_clear_error(home):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(stack.StackError, match=f"port {port} is already in use"):
            stack.up(home.root, prefect_port=port, parts=(stack.PREFECT,))
    stack.down(home.root)


def test_a_part_that_dies_names_its_log(home, monkeypatch):
    # A Prefect server pointed at a database it cannot open exits at once.
    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", "sqlite+aiosqlite:////nonexistent/dir/x.db")
    (port,) = free_ports(1)
    with pytest.raises(stack.StackError, match="prefect-server.log"):
        stack.up(home.root, prefect_port=port, parts=(stack.PREFECT,), timeout_s=90)
    assert not any(r["running"] for r in stack.status(home.root))
