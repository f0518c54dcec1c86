"""docker-compose.yml is valid and keeps its promises (no Docker engine needed).

`docker-compose config` (Debian's docker-compose package) resolves the file with
.env.example, its empty secrets filled in as an operator would; the checks then read the
resolved file.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from skinsense.stack import auth as stack_auth

ROOT = Path(__file__).resolve().parents[1]
UIS = {"prefect-server": 4200, "mlflow": 5000, "app": 7860, "minio": 9001}


# What an operator writes into .env: .env.example leaves every secret empty.
SECRETS = {
    "POSTGRES_PASSWORD": "test-postgres-password",
    "PREFECT_SERVER_API_AUTH_STRING": "admin:test-prefect-login",
    "MLFLOW_AUTH_ADMIN_PASSWORD": "test-mlflow-admin-password",
    "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-mlflow-flask-secret",
    "MINIO_ROOT_PASSWORD": "test-minio-password",
    "MLFLOW_APP_PASSWORD": "test-mlflow-app-password",
}


def compose_config(env_file: Path, cwd: Path) -> subprocess.CompletedProcess:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (apt-get install -y docker-compose)")
    return subprocess.run([binary, "--project-directory", str(ROOT), "-f",
                           str(ROOT / "docker-compose.yml"), "--env-file", str(env_file),
                           "config"], capture_output=True, text=True, timeout=60, cwd=cwd,
                          env={"PATH": "/usr/bin:/bin"})


def filled_env(tmp: Path, leave_out: str | None = None) -> Path:
    """.env.example with its empty secrets filled in (all but `leave_out`)."""
    lines = []
    for line in (ROOT / ".env.example").read_text().splitlines():
        key = line.partition("=")[0]
        if key in SECRETS and key != leave_out:
            line = f"{key}={SECRETS[key]}"
        lines.append(line)
    env_file = tmp / ".env"
    env_file.write_text("\n".join(lines) + "\n")
    return env_file


@pytest.fixture(scope="module")
def resolved(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("compose")
    out = compose_config(filled_env(tmp), tmp)
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def test_every_part_of_the_stack_is_there(resolved):
    assert set(resolved["services"]) == {"postgres", "minio", "minio-init", "prefect-server",
                                         "mlflow", "worker", "app"}
    assert set(resolved["volumes"]) >= {"postgres-data", "minio-data", "skinsense-data"}


def test_only_the_uis_are_published_and_on_loopback(resolved):
    for name, service in resolved["services"].items():
        ports = service.get("ports", [])
        if name not in UIS:
            assert not ports, f"{name} publishes {ports}"
            continue
        # docker-compose 1.x prints "127.0.0.1:4200:4200/tcp"; v2 prints mappings.
        parsed = [p if isinstance(p, dict) else dict(zip(
            ("host_ip", "published", "target"), p.split("/")[0].split(":"))) for p in ports]
        assert [int(p["target"]) for p in parsed] == [UIS[name]]
        assert all(p["host_ip"] == "127.0.0.1" for p in parsed), ports


def test_long_running_services_have_health_checks(resolved):
    for name, service in resolved["services"].items():
        if name != "minio-init":
            assert service.get("healthcheck", {}).get("test"), name


def test_worker_reserves_the_gpu_and_talks_to_the_servers(resolved):
    worker = resolved["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert worker["build"]["dockerfile"] == "docker/Dockerfile"


def test_mlflow_uses_postgres_minio_and_checks_host_headers(resolved):
    command = resolved["services"]["mlflow"]["command"]
    assert command[0] == "/opt/skinsense/docker/mlflow-entrypoint.sh"
    args = dict(zip(command[1::2], command[2::2]))
    env = resolved["services"]["mlflow"]["environment"]
    # The same variables `skinsense stack up` reads.
    store = env[stack_auth.MLFLOW_BACKEND_STORE_ENV]
    assert store.startswith("postgresql://") and store.endswith("@postgres:5432/mlflow")
    assert args["--artifacts-destination"].startswith("s3://")
    assert "mlflow:5000" in args["--allowed-hosts"]
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert resolved["services"]["mlflow"]["depends_on"]["minio-init"]["condition"] == \
        "service_completed_successfully"
    assert "mc mb" in " ".join(resolved["services"]["minio-init"]["entrypoint"])


def test_credentials_come_from_the_env_file(resolved):
    text = (ROOT / "docker-compose.yml").read_text()
    example = (ROOT / ".env.example").read_text()
    for key, value in SECRETS.items():
        assert value not in text
        assert f"\n{key}=\n" in example  # no placeholder that would work as a password
    env = resolved["services"]["postgres"]["environment"]
    assert env["POSTGRES_PASSWORD"] == SECRETS["POSTGRES_PASSWORD"]
    init = ROOT / "docker" / "postgres" / "init-databases.sh"
    assert "prefect mlflow mlflow_auth skinsense" in init.read_text()


def test_both_servers_ask_for_a_login_and_every_client_has_it(resolved):
    services = resolved["services"]
    prefect_env = services["prefect-server"]["environment"]
    auth_string = prefect_env[stack_auth.PREFECT_SERVER_AUTH_ENV]
    assert auth_string == SECRETS["PREFECT_SERVER_API_AUTH_STRING"]
    assert prefect_env[stack_auth.PREFECT_DATABASE_ENV].startswith("postgresql+asyncpg://")
    mlflow_env = services["mlflow"]["environment"]
    assert mlflow_env[stack_auth.MLFLOW_AUTH_DATABASE_ENV].endswith("@postgres:5432/mlflow_auth")
    assert mlflow_env[stack_auth.MLFLOW_ADMIN_USERNAME_ENV] == "admin"
    admin_password = mlflow_env[stack_auth.MLFLOW_ADMIN_PASSWORD_ENV]
    assert mlflow_env[stack_auth.MLFLOW_SECRET_KEY_ENV]
    assert "--app-name basic-auth" in (ROOT / "docker" / "mlflow-entrypoint.sh").read_text()
    worker = services["worker"]["environment"]
    assert worker[stack_auth.PREFECT_CLIENT_AUTH_ENV] == auth_string
    env = services["worker"]["environment"]
    assert env[stack_auth.MLFLOW_USERNAME_ENV] == "admin"
    assert env[stack_auth.MLFLOW_PASSWORD_ENV] == admin_password
    # The app reads the champion with its own account, which the MLflow container creates;
    # it holds no admin password and no Prefect login.
    app = services["app"]["environment"]
    assert app[stack_auth.MLFLOW_USERNAME_ENV] == mlflow_env[stack_auth.MLFLOW_APP_USERNAME_ENV] \
        == "skinsense-app"
    assert app[stack_auth.MLFLOW_PASSWORD_ENV] == mlflow_env[stack_auth.MLFLOW_APP_PASSWORD_ENV] \
        == SECRETS["MLFLOW_APP_PASSWORD"]
    assert admin_password not in str(app) and stack_auth.PREFECT_CLIENT_AUTH_ENV not in app
    # The health checks use the paths both servers leave open for probes.
    assert "/api/health" in " ".join(services["prefect-server"]["healthcheck"]["test"])
    assert services["mlflow"]["healthcheck"]["test"][-1].endswith("/health")


@pytest.mark.parametrize("secret", sorted(SECRETS))
def test_compose_refuses_to_start_without_a_secret(tmp_path, secret):
    out = compose_config(filled_env(tmp_path, leave_out=secret), tmp_path)
    assert out.returncode != 0
    assert f"set {secret}" in out.stderr


def test_compose_refuses_the_example_as_it_is(tmp_path):
    """`cp .env.example .env` alone does not start a stack with known passwords."""
    out = compose_config(ROOT / ".env.example", tmp_path)
    assert out.returncode != 0 and "in .env" in out.stderr


@pytest.mark.slow
def test_the_mlflow_entrypoint_starts_mlflow_with_its_logins(tmp_path, monkeypatch):
    """docker/mlflow-entrypoint.sh, run here as compose runs it: the real MLflow server with
    the basic-auth app, its user database from MLFLOW_AUTH_DATABASE_URI (SQLite here)."""
    import os
    import signal
    import socket
    import sys
    import time

    import requests

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           stack_auth.MLFLOW_BACKEND_STORE_ENV: f"sqlite:///{tmp_path / 'mlflow.db'}",
           stack_auth.MLFLOW_AUTH_DATABASE_ENV: f"sqlite:///{tmp_path / 'auth.db'}",
           stack_auth.MLFLOW_AUTH_CONFIG_ENV: str(tmp_path / "auth.ini"),
           stack_auth.MLFLOW_ADMIN_USERNAME_ENV: "admin",
           stack_auth.MLFLOW_ADMIN_PASSWORD_ENV: "entrypoint-admin-password",
           stack_auth.MLFLOW_SECRET_KEY_ENV: "entrypoint-flask-secret-key",
           stack_auth.MLFLOW_APP_USERNAME_ENV: "skinsense-app",
           stack_auth.MLFLOW_APP_PASSWORD_ENV: "entrypoint-app-password",
           # Not under test, and its seven processes slow the server's start and stop.
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = tmp_path / "mlflow.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            ["sh", str(ROOT / "docker" / "mlflow-entrypoint.sh"), "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1", "--artifacts-destination",
             str(tmp_path / "artifacts")], env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or busy starting
                pass
            time.sleep(0.5)
        else:
            pytest.fail(f"MLflow did not start:\n{log.read_text()[-3000:]}")
        search = f"{url}/api/2.0/mlflow/experiments/search"
        assert requests.get(search, params={"max_results": 1}, timeout=30).status_code == 401
        admin = stack_auth.basic_auth_header("admin", "entrypoint-admin-password")
        assert requests.get(search, params={"max_results": 1}, headers=admin,
                            timeout=30).status_code == 200
        config = tmp_path / "auth.ini"
        assert config.stat().st_mode & 0o077 == 0 and "auth.db" in config.read_text()
        # The app's account appears once the server answers: it reads, and changes nothing.
        app = stack_auth.basic_auth_header("skinsense-app", "entrypoint-app-password")
        while requests.get(search, params={"max_results": 1}, headers=app,
                           timeout=30).status_code != 200:
            assert time.monotonic() < deadline + 60, log.read_text()[-3000:]
            time.sleep(0.5)
        created = requests.post(f"{url}/api/2.0/mlflow/experiments/create", headers=admin,
                                json={"name": "owned-by-admin"}, timeout=30)
        experiment_id = created.json()["experiment_id"]
        assert requests.get(f"{url}/api/2.0/mlflow/experiments/get", headers=app, timeout=30,
                            params={"experiment_id": experiment_id}).status_code == 200
        assert requests.post(f"{url}/api/2.0/mlflow/experiments/delete", headers=app,
                             json={"experiment_id": experiment_id},
                             timeout=30).status_code == 403
        assert "read-only account 'skinsense-app' created" in log.read_text()
        # A restart with a changed .env sets the existing account's password to the new one.
        monkeypatch.setenv(stack_auth.MLFLOW_USERNAME_ENV, "admin")
        monkeypatch.setenv(stack_auth.MLFLOW_PASSWORD_ENV, "entrypoint-admin-password")
        assert stack_auth.ensure_mlflow_reader(url, ("skinsense-app", "changed-app-password"),
                                               wait_s=30) == "updated"
        changed = stack_auth.basic_auth_header("skinsense-app", "changed-app-password")
        assert requests.get(search, params={"max_results": 1}, headers=changed,
                            timeout=30).status_code == 200
        with pytest.raises(stack_auth.AuthSettingsError, match="must not be the admin"):
            stack_auth.ensure_mlflow_reader(url, ("admin", "y"), wait_s=1)
        monkeypatch.setenv(stack_auth.MLFLOW_PASSWORD_ENV, "not-the-admin-password")
        with pytest.raises(stack_auth.AuthSettingsError, match="refused to set up the app's "
                                                               "account 'skinsense-app'"):
            stack_auth.ensure_mlflow_reader(url, ("skinsense-app", "other"), wait_s=1)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_compose_refuses_to_start_without_credentials(tmp_path):
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (apt-get install -y docker-compose)")
    empty = tmp_path / "empty.env"
    empty.write_text("")
    out = subprocess.run([binary, "--project-directory", str(ROOT), "-f",
                          str(ROOT / "docker-compose.yml"), "--env-file", str(empty), "config"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path,
                         env={"PATH": "/usr/bin:/bin"})
    assert out.returncode != 0
    assert "POSTGRES_USER" in out.stderr or "POSTGRES_PASSWORD" in out.stderr
