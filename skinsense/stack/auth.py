"""Logins and databases of the team stack: what `skinsense stack up` and compose agree on.

Both servers ship their own login, and SkinSense uses exactly those:

- Prefect's basic authentication: the server checks `PREFECT_SERVER_API_AUTH_STRING`
  ("user:password") on every API call except `/api/health` and `/api/ready`; every client
  (CLI, runner, worker, flow run) sends `PREFECT_API_AUTH_STRING`. The UI asks for the same
  string on its login page.
- MLflow's `basic-auth` app (`mlflow server --app-name basic-auth`): users live in its own
  database (`database_uri` of the file at `MLFLOW_AUTH_CONFIG_PATH`); the admin account is
  created once, when that database is empty, from `MLFLOW_AUTH_ADMIN_USERNAME` and
  `MLFLOW_AUTH_ADMIN_PASSWORD`; the Flask secret `MLFLOW_FLASK_SERVER_SECRET_KEY` protects
  its signup form. Clients send `MLFLOW_TRACKING_USERNAME` / `MLFLOW_TRACKING_PASSWORD`.
  Every signed-in user may read (`default_permission = READ`); only the admin, and users
  the admin grants more, may change runs or move the `champion` alias.

The stack's own secrets are the environment's server-side variables above when set, else
those stored by an earlier `stack up` in `SKINSENSE_HOME/stack/credentials.env` (mode 0600),
else freshly generated ones, which are then stored there.
"""

from __future__ import annotations

import base64
import os
import secrets
import shlex
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

# Kept here too: the stack decides its logins by it (`skinsense.processes` holds it).
from skinsense.processes import is_loopback  # noqa: F401

# Server side (what compose's .env sets too).
PREFECT_SERVER_AUTH_ENV = "PREFECT_SERVER_API_AUTH_STRING"
MLFLOW_ADMIN_USERNAME_ENV = "MLFLOW_AUTH_ADMIN_USERNAME"
MLFLOW_ADMIN_PASSWORD_ENV = "MLFLOW_AUTH_ADMIN_PASSWORD"
MLFLOW_SECRET_KEY_ENV = "MLFLOW_FLASK_SERVER_SECRET_KEY"
MLFLOW_AUTH_CONFIG_ENV = "MLFLOW_AUTH_CONFIG_PATH"
# Compose: the app's own MLflow account, which may only read (see `ensure_mlflow_reader`).
MLFLOW_APP_USERNAME_ENV = "MLFLOW_APP_USERNAME"
MLFLOW_APP_PASSWORD_ENV = "MLFLOW_APP_PASSWORD"
# Client side.
PREFECT_CLIENT_AUTH_ENV = "PREFECT_API_AUTH_STRING"
MLFLOW_USERNAME_ENV = "MLFLOW_TRACKING_USERNAME"
MLFLOW_PASSWORD_ENV = "MLFLOW_TRACKING_PASSWORD"
SERVER_SECRET_ENVS = (PREFECT_SERVER_AUTH_ENV, MLFLOW_ADMIN_USERNAME_ENV,
                      MLFLOW_ADMIN_PASSWORD_ENV, MLFLOW_SECRET_KEY_ENV)

# Databases: the servers' own variables, plus one of ours for MLflow's user database (MLflow
# reads that location only from its auth config file, which the stack and compose write).
PREFECT_DATABASE_ENV = "PREFECT_API_DATABASE_CONNECTION_URL"
MLFLOW_BACKEND_STORE_ENV = "MLFLOW_BACKEND_STORE_URI"
MLFLOW_AUTH_DATABASE_ENV = "MLFLOW_AUTH_DATABASE_URI"

CREDENTIALS_FILE = "credentials.env"
DEFAULT_USER = "admin"
# MLflow's own rule for passwords; we hold Prefect's secret to the same.
MIN_PASSWORD_LENGTH = 12
# The admin password older MLflow versions shipped; MLflow refuses it, and so do we.
MLFLOW_LEGACY_ADMIN_PASSWORD = "password1234"


class AuthSettingsError(ValueError):
    """A login secret or a database URL the servers would refuse; the message says which."""


@dataclass(frozen=True)
class StackCredentials:
    """The stack's secrets: Prefect's auth string, MLflow's admin account and Flask key."""

    # repr=False: secrets stay out of tracebacks and logs.
    prefect_auth_string: str = field(repr=False)
    mlflow_username: str
    mlflow_password: str = field(repr=False)
    mlflow_secret_key: str = field(repr=False)

    def client_env(self) -> dict[str, str]:
        """What every client of the stack (runner, flow runs, app, your shell) needs."""
        return {PREFECT_CLIENT_AUTH_ENV: self.prefect_auth_string,
                MLFLOW_USERNAME_ENV: self.mlflow_username,
                MLFLOW_PASSWORD_ENV: self.mlflow_password}

    def prefect_server_env(self) -> dict[str, str]:
        return {PREFECT_SERVER_AUTH_ENV: self.prefect_auth_string}

    def mlflow_server_env(self) -> dict[str, str]:
        return {MLFLOW_ADMIN_USERNAME_ENV: self.mlflow_username,
                MLFLOW_ADMIN_PASSWORD_ENV: self.mlflow_password,
                MLFLOW_SECRET_KEY_ENV: self.mlflow_secret_key}

    def prefect_headers(self) -> dict[str, str]:
        """The header Prefect's clients send (base64 of the whole auth string)."""
        return {"Authorization": "Basic " + _b64(self.prefect_auth_string)}

    def mlflow_headers(self) -> dict[str, str]:
        return basic_auth_header(self.mlflow_username, self.mlflow_password)


def basic_auth_header(username: str, password: str) -> dict[str, str]:
    """An HTTP basic `Authorization` header."""
    return {"Authorization": "Basic " + _b64(f"{username}:{password}")}


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def auth_wanted(host: str, requested: bool, environ: Mapping[str, str]) -> bool:
    """Logins are on when asked for, when the stack leaves loopback, or when the environment
    already holds a server-side secret (setting one means you want it used)."""
    return requested or not is_loopback(host) or any(environ.get(k) for k in SERVER_SECRET_ENVS)


def generate_secret() -> str:
    """A random 32-character URL-safe secret."""
    return secrets.token_urlsafe(24)


def check_credentials(credentials: StackCredentials) -> None:
    """Refuse secrets the servers would refuse, or that anyone could guess.

    Raises:
        AuthSettingsError: naming the variable to change.
    """
    user, sep, password = credentials.prefect_auth_string.partition(":")
    if not sep or not user or not password:
        raise AuthSettingsError(
            f"{PREFECT_SERVER_AUTH_ENV} must look like 'user:password' (the Prefect UI's login "
            f"asks for that whole string); set it again, or unset it to have one generated")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AuthSettingsError(
            f"the password in {PREFECT_SERVER_AUTH_ENV} has {len(password)} characters; use at "
            f"least {MIN_PASSWORD_LENGTH}, or unset it to have one generated")
    if not credentials.mlflow_username:
        raise AuthSettingsError(f"{MLFLOW_ADMIN_USERNAME_ENV} is empty; set a user name or unset it")
    if credentials.mlflow_password == MLFLOW_LEGACY_ADMIN_PASSWORD:
        raise AuthSettingsError(
            f"{MLFLOW_ADMIN_PASSWORD_ENV} is MLflow's old published default; choose another")
    if len(credentials.mlflow_password) < MIN_PASSWORD_LENGTH:
        raise AuthSettingsError(
            f"{MLFLOW_ADMIN_PASSWORD_ENV} has {len(credentials.mlflow_password)} characters; "
            f"MLflow needs at least {MIN_PASSWORD_LENGTH} (or unset it to have one generated)")
    if len(credentials.mlflow_secret_key) < 16:
        raise AuthSettingsError(f"{MLFLOW_SECRET_KEY_ENV} is too short; use at least 16 "
                                f"random characters, or unset it to have one generated")


def read_credentials_file(path: Path) -> dict[str, str]:
    """The KEY=VALUE lines of a credentials file ({} when there is none)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() and not key.lstrip().startswith("#"):
            parsed = shlex.split(value)
            values[key.strip()] = parsed[0] if parsed else ""
    return values


def load_credentials(path: Path) -> StackCredentials | None:
    """The credentials stored at `path` by `resolve_credentials`, or None."""
    stored = read_credentials_file(path)
    try:
        return StackCredentials(
            prefect_auth_string=stored[PREFECT_CLIENT_AUTH_ENV],
            mlflow_username=stored[MLFLOW_USERNAME_ENV],
            mlflow_password=stored[MLFLOW_PASSWORD_ENV],
            mlflow_secret_key=stored[MLFLOW_SECRET_KEY_ENV])
    except KeyError:
        return None


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` readable by its owner only (0600), even if it existed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(text)


def save_credentials(path: Path, credentials: StackCredentials) -> None:
    """Store the credentials as a sourceable file, mode 0600."""
    lines = ["# Logins of the SkinSense stack, written by `skinsense stack up`. Keep private.",
             "# Use them in a shell:  set -a; . " + shlex.quote(str(path)) + "; set +a",
             "# The Prefect UI's login asks for the whole PREFECT_API_AUTH_STRING (user:password);",
             "# the MLflow UI asks for MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD."]
    values = {**credentials.client_env(), MLFLOW_SECRET_KEY_ENV: credentials.mlflow_secret_key}
    lines += [f"{key}={shlex.quote(value)}" for key, value in values.items()]
    write_private(path, "\n".join(lines) + "\n")


def resolve_credentials(path: Path, environ: Mapping[str, str]) -> StackCredentials:
    """The stack's secrets: environment, else the file at `path`, else generated; stored.

    Args:
        path: the credentials file (`SKINSENSE_HOME/stack/credentials.env`).
        environ: where to look for the server-side variables (`os.environ`).

    Raises:
        AuthSettingsError: a given secret is malformed or too weak.
    """
    stored = load_credentials(path)

    def pick(env_key: str, stored_value: str | None, make) -> str:
        return environ.get(env_key) or stored_value or make()

    credentials = StackCredentials(
        prefect_auth_string=pick(PREFECT_SERVER_AUTH_ENV,
                                 stored and stored.prefect_auth_string,
                                 lambda: f"{DEFAULT_USER}:{generate_secret()}"),
        mlflow_username=pick(MLFLOW_ADMIN_USERNAME_ENV, stored and stored.mlflow_username,
                             lambda: DEFAULT_USER),
        mlflow_password=pick(MLFLOW_ADMIN_PASSWORD_ENV, stored and stored.mlflow_password,
                             generate_secret),
        mlflow_secret_key=pick(MLFLOW_SECRET_KEY_ENV, stored and stored.mlflow_secret_key,
                               generate_secret))
    check_credentials(credentials)
    if credentials != stored:
        save_credentials(path, credentials)
    return credentials


def mlflow_auth_config(database_uri: str) -> str:
    """The text of MLflow's auth config (`MLFLOW_AUTH_CONFIG_PATH`) for a user database.

    The admin account comes from the environment (MLFLOW_AUTH_ADMIN_*), not from this file.
    """
    return ("[mlflow]\n"
            "# Signed-in users may read everything; changing runs, models and aliases needs\n"
            "# the admin or a permission the admin grants.\n"
            "default_permission = READ\n"
            f"database_uri = {database_uri}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            "# Remember a correct password for 60 s: MLflow checks each with scrypt (~0.1 s of\n"
            "# CPU), and a pipeline run makes hundreds of calls. A changed or deleted password\n"
            "# may therefore keep working for up to a minute.\n"
            "auth_cache_ttl_seconds = 60\n")


def http_status(url: str, timeout_s: float = 2.0, headers: dict[str, str] | None = None) -> int:
    """The HTTP status `url` answers a GET with, or 0 when nothing answers."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):
        return 0


def ensure_mlflow_reader(url: str, reader: tuple[str, str], *, wait_s: float = 600.0) -> str:
    """Make `reader` an MLflow user that may only read (`default_permission = READ`).

    Compose's app serves the champion with this account, not the admin's: a leaked app
    secret then cannot move the `champion` alias or delete runs. Waits for the server to
    answer, then creates the user through MLflow's `AuthServiceClient`, or sets its password
    to the given one when it exists (so `.env` stays the one place it is written). The
    client logs in as every MLflow client does, with MLFLOW_TRACKING_USERNAME/PASSWORD:
    the admin's.

    Args:
        url: the MLflow server, e.g. http://127.0.0.1:5000.
        reader: (username, password) of the account.
        wait_s: how long to wait for the server to answer.

    Returns:
        'created' or 'updated'.

    Raises:
        AuthSettingsError: the account is the admin's, the server never answered, or it
            refused (e.g. the admin's login is wrong).
    """
    import time

    from mlflow.exceptions import MlflowException, RestException
    from mlflow.server.auth.client import AuthServiceClient

    admin = os.environ.get(MLFLOW_USERNAME_ENV, "")
    if reader[0] == admin:
        raise AuthSettingsError(f"{MLFLOW_APP_USERNAME_ENV} must not be the admin "
                                f"({admin!r}): the app's account may only read")
    deadline = time.monotonic() + wait_s
    while http_status(f"{url}/health") != 200:
        if time.monotonic() > deadline:
            raise AuthSettingsError(f"MLflow at {url} did not answer within {wait_s:.0f} s; "
                                    f"the app's account {reader[0]!r} was not set up")
        time.sleep(2)
    client = AuthServiceClient(url)
    try:
        try:
            client.create_user(*reader)
            return "created"
        except RestException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        client.update_user_password(*reader)
        return "updated"
    except MlflowException as exc:
        raise AuthSettingsError(
            f"MLflow at {url} refused to set up the app's account {reader[0]!r} ({exc}); "
            f"check the admin's login ({MLFLOW_USERNAME_ENV}/{MLFLOW_PASSWORD_ENV}, from "
            f"{MLFLOW_ADMIN_USERNAME_ENV}/{MLFLOW_ADMIN_PASSWORD_ENV})") from exc


def write_mlflow_auth_config(path: Path, database_uri: str) -> Path:
    """Write MLflow's auth config to `path` (0600: the URI may hold a database password)."""
    check_database_url(database_uri, for_="mlflow-auth")
    write_private(path, mlflow_auth_config(database_uri))
    return path


# Which URL schemes each server can use (the driver is part of the scheme).
_SCHEMES = {
    "prefect": ("postgresql+asyncpg", "sqlite+aiosqlite"),
    "mlflow": ("postgresql", "postgresql+psycopg", "postgresql+psycopg2", "sqlite", "mysql",
               "mysql+pymysql", "mssql"),
    "mlflow-auth": ("postgresql", "postgresql+psycopg", "postgresql+psycopg2", "sqlite", "mysql",
                    "mysql+pymysql", "mssql"),
}
DATABASE_NAMES = {"prefect": f"Prefect's database ({PREFECT_DATABASE_ENV})",
          "mlflow": f"MLflow's backend store ({MLFLOW_BACKEND_STORE_ENV})",
          "mlflow-auth": f"MLflow's user database ({MLFLOW_AUTH_DATABASE_ENV})"}


def check_database_url(url: str, *, for_: str) -> None:
    """Refuse a URL whose driver the server cannot use, before anything starts.

    Args:
        url: an SQLAlchemy URL.
        for_: 'prefect', 'mlflow' or 'mlflow-auth'.

    Raises:
        AuthSettingsError: naming the expected form.
    """
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme in _SCHEMES[for_]:
        return
    if for_ == "prefect" and scheme.startswith("postgres"):
        hint = "Prefect's server needs the async driver: postgresql+asyncpg://USER:PASSWORD@HOST:PORT/DB"
    elif for_ != "prefect" and scheme.startswith("postgres"):
        hint = "MLflow needs a synchronous driver: postgresql://USER:PASSWORD@HOST:PORT/DB"
    else:
        hint = "use one of " + ", ".join(f"{s}://" for s in _SCHEMES[for_])
    raise AuthSettingsError(f"{DATABASE_NAMES[for_]} {mask_password(url)!r} cannot be used: {hint}")


def mask_password(url: str) -> str:
    """`url` with its password replaced by '***' (for logs, status and error messages)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = parts.username or ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[-1]}"))


def database_address(url: str) -> tuple[str, int] | None:
    """(host, port) of a networked database URL; None for SQLite or a Unix socket."""
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname:
        return None
    default = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}
    return parts.hostname, parts.port or default.get(parts.scheme.split("+")[0], 0)
