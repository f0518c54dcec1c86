"""A private PostgreSQL server for tests: Debian's binaries, its own port and data folder.

`./run test` installs Debian's `postgresql` package (as root). PostgreSQL refuses to run as
root, so when the tests run as root (CI) the server runs as the unprivileged `postgres`
user the package creates, through `runuser`; otherwise as the current user. It listens on
127.0.0.1 only, with a Unix socket in its own folder, and requires a password
(scram-sha-256) like a real deployment. `destroy()` stops it and removes every file.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from glob import glob
from pathlib import Path


def postgres_bindir() -> Path | None:
    """The newest Debian PostgreSQL binaries (/usr/lib/postgresql/N/bin), or initdb on PATH."""
    found = sorted(glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parts[4]) if Path(p).parts[4].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def unavailable_reason() -> str | None:
    """Why a private PostgreSQL cannot run here (None when it can)."""
    if postgres_bindir() is None:
        return "PostgreSQL is not installed (apt-get install -y postgresql; ./run test does it)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run PostgreSQL as"
        if shutil.which("runuser") is None:
            return "running as root and runuser (util-linux) is missing"
    return None


class LocalPostgres:
    """One PostgreSQL cluster in a temporary folder, on `port` of 127.0.0.1."""

    def __init__(self, port: int, *, user: str = "skinsense") -> None:
        self.port = port
        self.user = user
        self.password = secrets.token_urlsafe(18)
        self.bindir = postgres_bindir()
        # Under /tmp, not pytest's tmp_path: that is private to root, and the server may run
        # as the `postgres` user, which must reach its folder.
        self.root = Path(tempfile.mkdtemp(prefix="skinsense-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self._as_root = os.geteuid() == 0
        if self._as_root:
            shutil.chown(self.root, "postgres", "postgres")

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self._as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        out = subprocess.run(cmd, cwd=self.root, capture_output=True, text=True,
                             timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({out.returncode}):\n{out.stdout}"
                               f"{out.stderr}\n--- {self.log} ---\n{self.log_tail()}")
        return out

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def initdb(self) -> None:
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._as_root:
            shutil.chown(pwfile, "postgres", "postgres")
        try:
            self._run("initdb", "-D", str(self.data), "-U", self.user, f"--pwfile={pwfile}",
                      "--auth=scram-sha-256", "--encoding=UTF8", "--no-instructions")
        finally:
            pwfile.unlink(missing_ok=True)

    def start(self) -> None:
        """Start the server (initializing the cluster the first time) and wait for it."""
        if not (self.data / "PG_VERSION").exists():
            self.initdb()
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 "
                   f"-c unix_socket_directories={self.root} -c fsync=off")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options,
                  "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (`fast`: disconnect clients, as a service manager's stop does)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def running(self) -> bool:
        if not (self.data / "PG_VERSION").exists():
            return False
        cmd = [str(self.bindir / "pg_ctl"), "-D", str(self.data), "status"]
        if self._as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, cwd=self.root, capture_output=True).returncode == 0

    def destroy(self) -> None:
        """Stop the server if it runs and remove its folder."""
        try:
            if self.running():
                self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str, driver: str = "postgresql") -> str:
        """An SQLAlchemy URL of `database`, e.g. driver 'postgresql+asyncpg' for Prefect."""
        return f"{driver}://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str = "postgres"):
        """A psycopg (3) connection, autocommit, to `database`."""
        import psycopg

        return psycopg.connect(host="127.0.0.1", port=self.port, user=self.user,
                               password=self.password, dbname=database, connect_timeout=10,
                               autocommit=True)

    def create_databases(self, *names: str) -> None:
        connection = self.connect()
        try:
            with connection.cursor() as cursor:
                for name in names:
                    cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()

    def query(self, database: str, sql: str, params: tuple = ()) -> list[tuple]:
        """Rows of one SQL query, read straight from the database."""
        connection = self.connect(database)
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql, params)
                return cursor.fetchall()
        finally:
            connection.close()
