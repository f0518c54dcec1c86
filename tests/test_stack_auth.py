"""Logins and database URLs of the team stack, without starting servers (fast).

The servers themselves refusing strangers is tested end to end in test_team_stack.py.
"""

from __future__ import annotations

import stat

import pytest

from skinsense import stack
from skinsense.stack import auth as stack_auth
from skinsense.stack.auth import AuthSettingsError, StackCredentials

GOOD = StackCredentials(prefect_auth_string="admin:a-long-prefect-secret",
                        mlflow_username="admin", mlflow_password="a-long-mlflow-secret",
                        mlflow_secret_key="a-long-flask-secret-key")


@pytest.fixture
def no_secrets(monkeypatch):
    for name in (*stack_auth.SERVER_SECRET_ENVS, stack_auth.PREFECT_DATABASE_ENV,
                 stack_auth.MLFLOW_BACKEND_STORE_ENV, stack_auth.MLFLOW_AUTH_DATABASE_ENV):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("host,loopback", [
    ("127.0.0.1", True), ("127.0.0.5", True), ("::1", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("192.168.1.20", False), ("10.0.0.1", False)])
def test_only_loopback_counts_as_private(host, loopback):
    assert stack_auth.is_loopback(host) is loopback


def test_logins_turn_on_off_loopback_on_request_or_with_a_secret():
    assert not stack_auth.auth_wanted("127.0.0.1", False, {})
    assert stack_auth.auth_wanted("127.0.0.1", True, {})
    assert stack_auth.auth_wanted("0.0.0.0", False, {})
    assert stack_auth.auth_wanted("192.168.1.20", False, {})
    assert stack_auth.auth_wanted("127.0.0.1", False,
                                  {"PREFECT_SERVER_API_AUTH_STRING": "admin:x" * 3})
    # A client-side login in your shell (for another server) does not turn them on.
    assert not stack_auth.auth_wanted("127.0.0.1", False, {"MLFLOW_TRACKING_PASSWORD": "x"})


def test_secrets_are_generated_once_stored_privately_and_reused(tmp_path):
    path = tmp_path / "stack" / "credentials.env"
    first = stack_auth.resolve_credentials(path, {})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    user, _, password = first.prefect_auth_string.partition(":")
    assert user == "admin" and len(password) >= 32
    assert first.mlflow_username == "admin" and len(first.mlflow_password) >= 32
    assert len({password, first.mlflow_password, first.mlflow_secret_key}) == 3
    assert stack_auth.resolve_credentials(path, {}) == first
    assert stack_auth.load_credentials(path) == first
    # Secrets never show in a repr (tracebacks, logs).
    assert password not in repr(first) and first.mlflow_password not in repr(first)


def test_the_environment_wins_and_odd_characters_survive_the_file(tmp_path):
    path = tmp_path / "credentials.env"
    stack_auth.resolve_credentials(path, {})
    env = {"PREFECT_SERVER_API_AUTH_STRING": "ops:it's a \"long\" $ecret",
           "MLFLOW_AUTH_ADMIN_USERNAME": "mlops", "MLFLOW_AUTH_ADMIN_PASSWORD": "pa ss $word 12"}
    given = stack_auth.resolve_credentials(path, env)
    assert given.prefect_auth_string == env["PREFECT_SERVER_API_AUTH_STRING"]
    assert (given.mlflow_username, given.mlflow_password) == ("mlops", "pa ss $word 12")
    assert stack_auth.load_credentials(path) == given
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_the_file_is_sourceable_by_a_shell(tmp_path):
    import subprocess

    path = tmp_path / "credentials.env"
    stack_auth.save_credentials(path, StackCredentials(
        prefect_auth_string="ops:it's a \"long\" $ecret", mlflow_username="mlops",
        mlflow_password="pa ss $word 12", mlflow_secret_key="k" * 20))
    out = subprocess.run(["bash", "-c", f"set -a; . {path}; set +a; "
                          "printf '%s\\n' \"$PREFECT_API_AUTH_STRING\" \"$MLFLOW_TRACKING_PASSWORD\""],
                         capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["ops:it's a \"long\" $ecret", "pa ss $word 12"]


@pytest.mark.parametrize("env,message", [
    ({"PREFECT_SERVER_API_AUTH_STRING": "no-colon-in-this-string"}, "user:password"),
    ({"PREFECT_SERVER_API_AUTH_STRING": "admin:short"}, "at least 12"),
    ({"MLFLOW_AUTH_ADMIN_PASSWORD": "short"}, "MLFLOW_AUTH_ADMIN_PASSWORD"),
    ({"MLFLOW_AUTH_ADMIN_PASSWORD": "password1234"}, "old published default"),
    ({"MLFLOW_FLASK_SERVER_SECRET_KEY": "tiny"}, "MLFLOW_FLASK_SERVER_SECRET_KEY"),
])
def test_weak_or_malformed_secrets_are_refused_with_the_variable_to_fix(tmp_path, env, message):
    with pytest.raises(AuthSettingsError, match=message):
        stack_auth.resolve_credentials(tmp_path / "credentials.env", env)
    assert not (tmp_path / "credentials.env").exists()


def test_headers_are_what_the_servers_expect():
    import base64

    token = GOOD.prefect_headers()["Authorization"].removeprefix("Basic ")
    assert base64.b64decode(token).decode() == "admin:a-long-prefect-secret"
    token = GOOD.mlflow_headers()["Authorization"].removeprefix("Basic ")
    assert base64.b64decode(token).decode() == "admin:a-long-mlflow-secret"


@pytest.mark.slow  # importing MLflow's server package takes seconds
def test_mlflow_reads_the_auth_config_we_write(tmp_path, monkeypatch):
    from mlflow.server.auth.config import read_auth_config

    uri = "postgresql://skinsense:pg-password@db.example:5432/mlflow_auth"
    path = stack_auth.write_mlflow_auth_config(tmp_path / "auth.ini", uri)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # the URI holds a password
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(path))
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "a-long-mlflow-secret")
    config = read_auth_config()
    assert config.database_uri == uri
    assert config.default_permission == "READ"
    assert config.admin_password == "a-long-mlflow-secret"
    assert config.auth_cache_ttl_seconds == 60


@pytest.mark.parametrize("url,for_,message", [
    ("postgresql://u:secret@h/prefect", "prefect", r"async driver: postgresql\+asyncpg://"),
    ("postgresql+asyncpg://u:secret@h/mlflow", "mlflow", "synchronous driver"),
    ("mongodb://u:secret@h/x", "mlflow", "use one of"),
])
def test_a_database_url_with_the_wrong_driver_is_refused_without_its_password(url, for_,
                                                                              message):
    with pytest.raises(AuthSettingsError, match=message) as refused:
        stack_auth.check_database_url(url, for_=for_)
    assert "secret" not in str(refused.value) and "u:***@h" in str(refused.value)


def test_good_database_urls_pass_and_passwords_are_masked():
    stack_auth.check_database_url("postgresql+asyncpg://u:p@h:5432/prefect", for_="prefect")
    stack_auth.check_database_url("sqlite+aiosqlite:////tmp/x.db", for_="prefect")
    stack_auth.check_database_url("postgresql://u:p@h/mlflow", for_="mlflow")
    stack_auth.check_database_url("sqlite:////tmp/auth.db", for_="mlflow-auth")
    assert stack_auth.mask_password("postgresql://u:p%40ss@h:1/db") == "postgresql://u:***@h:1/db"
    assert stack_auth.mask_password("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
    assert stack_auth.database_address("postgresql://u:p@db:6543/x") == ("db", 6543)
    assert stack_auth.database_address("postgresql://u:p@db/x") == ("db", 5432)
    assert stack_auth.database_address("sqlite:////tmp/x.db") is None


def test_servers_get_urls_and_secrets_by_environment_never_by_command_line(tmp_path):
    from skinsense.paths import Home

    home = Home(tmp_path).ensure()
    services = stack.services._services(
        home, host="127.0.0.1", prefect_port=1, mlflow_port=2, app_port=3,
        prefect_database_url="postgresql+asyncpg://u:pg-secret@h/prefect",
        mlflow_backend_store_uri="postgresql://u:pg-secret@h/mlflow",
        mlflow_auth_database_uri="postgresql://u:pg-secret@h/mlflow_auth", credentials=GOOD)
    secrets = ("pg-secret", "a-long-prefect-secret", "a-long-mlflow-secret",
               "a-long-flask-secret-key")
    for service in services.values():
        assert not any(secret in arg for arg in service.cmd for secret in secrets), service.name
    prefect, mlflow = services[stack.PREFECT], services[stack.MLFLOW]
    assert prefect.env["PREFECT_API_DATABASE_CONNECTION_URL"].endswith("@h/prefect")
    assert prefect.env["PREFECT_SERVER_API_AUTH_STRING"] == GOOD.prefect_auth_string
    assert mlflow.env["MLFLOW_BACKEND_STORE_URI"] == "postgresql://u:pg-secret@h/mlflow"
    assert mlflow.cmd[mlflow.cmd.index("--app-name") + 1] == "basic-auth"
    assert mlflow.env["MLFLOW_AUTH_ADMIN_PASSWORD"] == GOOD.mlflow_password
    assert mlflow.env["MLFLOW_AUTH_CONFIG_PATH"].endswith("mlflow-auth.ini")
    for name in (stack.RUNNER, stack.APP):
        env = services[name].env
        assert env["PREFECT_API_AUTH_STRING"] == GOOD.prefect_auth_string
        assert env["MLFLOW_TRACKING_USERNAME"] == "admin"
        assert env["MLFLOW_TRACKING_PASSWORD"] == GOOD.mlflow_password
    assert services[stack.RUNNER].health_headers == GOOD.prefect_headers()

    plain = stack.services._services(home, host="127.0.0.1", prefect_port=1, mlflow_port=2, app_port=3)
    assert "--app-name" not in plain[stack.MLFLOW].cmd
    assert plain[stack.MLFLOW].env["MLFLOW_BACKEND_STORE_URI"] == \
        f"sqlite:///{home.mlflow / 'mlflow.db'}"


def test_up_refuses_a_wrong_driver_before_starting_anything(home, no_secrets):
    with pytest.raises(AuthSettingsError, match="asyncpg"):
        stack.up(home.root, prefect_database_url="postgresql://u:p@127.0.0.1/prefect")
    assert not list((home.root / "stack").glob("*.pid"))


def test_up_says_when_the_database_is_unreachable(home, no_secrets):
    from test_stack import free_ports

    db_port, prefect_port = free_ports(2)  # nothing listens on db_port
    with pytest.raises(stack.StackError, match=rf"cannot reach Prefect's database \(\w+\) "
                                               rf"at 127.0.0.1:{db_port}") as refused:
        stack.up(home.root, prefect_port=prefect_port, parts=(stack.PREFECT,),
                 prefect_database_url=f"postgresql+asyncpg://u:pg-secret@127.0.0.1:{db_port}/p")
    assert "pg-secret" not in str(refused.value)
    assert not any(r["running"] for r in stack.status(home.root))


def test_cli_passes_database_urls_and_reports_refusals(home, no_secrets, capsys):
    from skinsense.cli import main

    assert main(["stack", "up", "--mlflow-backend-store-uri",
                 "postgresql+asyncpg://u:pg-secret@127.0.0.1/mlflow"]) == 1
    err = capsys.readouterr().err
    assert "synchronous driver" in err and "pg-secret" not in err


def test_cli_takes_urls_from_the_environment(home, no_secrets, monkeypatch, capsys):
    from skinsense.cli import main

    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", "postgresql://u:pg-secret@h/p")
    assert main(["stack", "up", "--no-app"]) == 1
    err = capsys.readouterr().err
    assert "PREFECT_API_DATABASE_CONNECTION_URL" in err and "asyncpg" in err


def test_partial_up_keeps_what_running_servers_were_started_with(home, no_secrets):
    """A runner restart (`up(parts=(RUNNER,))`) must not rewrite the recorded databases."""
    import json
    import os

    sdir = home.root / "stack"
    sdir.mkdir(parents=True, exist_ok=True)
    # Pretend the servers run: pid files of this very process.
    for name in (stack.PREFECT, stack.MLFLOW):
        (sdir / f"{name}.pid").write_text(str(os.getpid()))
    recorded = {"prefect": "postgresql+asyncpg://u:***@h/prefect",
                "mlflow": "postgresql://u:***@h/mlflow"}
    (sdir / "stack.json").write_text(json.dumps({
        "host": "127.0.0.1", "prefect_port": 1, "mlflow_port": 2, "app_port": 3,
        "with_app": False, "auth": False, "databases": recorded}))
    try:
        stack.up(home.root, prefect_port=1, mlflow_port=2, app_port=3, parts=())
        assert stack.describe(home.root)["databases"] == recorded
    finally:
        for name in (stack.PREFECT, stack.MLFLOW):
            (sdir / f"{name}.pid").unlink()
