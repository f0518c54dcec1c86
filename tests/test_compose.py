"""docker-compose.yml is valid and keeps its promises (no Docker engine needed).

`docker-compose config` (Debian's docker-compose package) resolves the file with
.env.example; the checks then read the resolved file.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
UIS = {"prefect-server": 4200, "mlflow": 5000, "app": 7860, "minio": 9001}


@pytest.fixture(scope="module")
def resolved() -> dict:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (apt-get install -y docker-compose)")
    out = subprocess.run([binary, "--project-directory", str(ROOT), "-f",
                          str(ROOT / "docker-compose.yml"), "--env-file",
                          str(ROOT / ".env.example"), "config"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
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
    args = dict(zip(command[2::2], command[3::2]))
    assert args["--backend-store-uri"].startswith("postgresql://")
    assert args["--backend-store-uri"].endswith("@postgres:5432/mlflow")
    assert args["--artifacts-destination"].startswith("s3://")
    assert "mlflow:5000" in args["--allowed-hosts"]
    env = resolved["services"]["mlflow"]["environment"]
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert resolved["services"]["mlflow"]["depends_on"]["minio-init"]["condition"] == \
        "service_completed_successfully"
    assert "mc mb" in " ".join(resolved["services"]["minio-init"]["entrypoint"])


def test_credentials_come_from_the_env_file(resolved):
    text = (ROOT / "docker-compose.yml").read_text()
    for secret in ("change-me-postgres", "change-me-minio"):
        assert secret not in text  # only .env.example holds (placeholder) values
    env = resolved["services"]["postgres"]["environment"]
    assert env["POSTGRES_PASSWORD"] == "change-me-postgres"
    init = ROOT / "docker" / "postgres" / "init-databases.sh"
    assert "prefect mlflow" in init.read_text()


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
