"""What `skinsense stack status` shows: each part's pid, health, URL and log, and the logins
and databases of the last `up`."""

from __future__ import annotations

from pathlib import Path

from skinsense.paths import Home
from skinsense.processes import pid_alive
from skinsense.stack.health import _http_ok, _worker_online, champion_exists
from skinsense.stack.pids import _read_pid
from skinsense.stack.services import (
    APP,
    MLFLOW,
    SERVICES,
    _home,
    _known_workers,
    _recorded_services,
    _settings,
    credentials_file,
)


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


def describe(home: Home | Path | str) -> dict:
    """Logins and databases of the last `up`: `auth`, `credentials` (the file, when logins
    are on) and `databases` (URLs with passwords masked; None is Prefect's own SQLite)."""
    home = _home(home)
    settings = _settings(home)
    return {"auth": bool(settings.get("auth")),
            "credentials": str(credentials_file(home)) if settings.get("auth") else None,
            "databases": settings.get("databases", {})}


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
