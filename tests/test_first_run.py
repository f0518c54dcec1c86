"""A newcomer's first run: Prefect's temporary server gets the time its first start needs (and
says what to do when it still fails), a person offline hears at once that a local copy is the
way, and the Prefect UI's form shows every default the flow uses."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import time
from pathlib import Path

import pytest

from skinsense.cli import main

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_VARIABLE = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_", "SKINSENSE_"))}
    return env | {"PREFECT_HOME": str(tmp_path / "prefect"),
                  "SKINSENSE_HOME": str(tmp_path / "skinsense"),
                  "PREFECT_SERVER_ANALYTICS_ENABLED": "false"} | extra


# -- Prefect's temporary server ------------------------------------------------------------

def test_the_first_start_gets_time_unless_the_user_chose(monkeypatch):
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    from flows.local_server import FIRST_START_TIMEOUT_S, temporary_server_settings

    monkeypatch.delenv(TIMEOUT_VARIABLE, raising=False)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with temporary_server_settings() as timeout:
            assert timeout == FIRST_START_TIMEOUT_S > 20  # Prefect's own default is 20 s
            assert PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value() == timeout
        # A timeout the user chose is kept.
        monkeypatch.setenv(TIMEOUT_VARIABLE, "7")
        with temporary_settings({PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 7}):
            with temporary_server_settings() as timeout:
                assert timeout == 7
    # With a server configured, no temporary server starts.
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:1/api"}):
        with temporary_server_settings() as timeout:
            assert timeout is None


@pytest.mark.slow
def test_a_temporary_server_that_does_not_start_in_time_says_what_to_do(tmp_path,
                                                                        synthetic_sample):
    # 1 s is far too short for any start: this is the newcomer's failure, made certain.
    env = clean_env(tmp_path, **{TIMEOUT_VARIABLE: "1"})
    done = subprocess.run(
        [sys.executable, "-m", "skinsense.cli", "pipeline", "--data-source",
         str(synthetic_sample), "--no-deploy", "--archs", "resnet18", "--no-pretrained"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
        stdin=subprocess.DEVNULL)
    assert done.returncode == 1
    message = done.stderr[done.stderr.index("skinsense pipeline: "):]
    assert "did not answer within 1 s" in message
    assert "run the same command again" in message and "PREFECT_API_URL" in message
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "skinsense" / "runs").exists() or not any(
        (tmp_path / "skinsense" / "runs").iterdir())


def test_serving_deployments_without_a_server_says_to_start_one(tmp_path):
    done = subprocess.run([sys.executable, "-m", "skinsense.cli", "deploy", "serve"],
                          env=clean_env(tmp_path), cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 1
    assert "PREFECT_API_URL is not set" in done.stderr and "stack up" in done.stderr
    assert not (tmp_path / "prefect" / "prefect.db").exists()  # no temporary server started


# -- offline, at a terminal ----------------------------------------------------------------

def run_at_a_terminal(argv: list[str], env: dict[str, str], cwd: Path,
                      timeout_s: float) -> tuple[int, str, float]:
    """Run a command with a pseudo-terminal as stdin, stdout and stderr, as a person would."""
    controller, terminal = pty.openpty()
    start = time.monotonic()
    process = subprocess.Popen(argv, stdin=terminal, stdout=terminal, stderr=terminal, env=env,
                               cwd=cwd, close_fds=True)
    os.close(terminal)
    output = b""
    try:
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # the terminal closed: the command ended
                break
            if not chunk:
                break
            output += chunk
            if time.monotonic() - start > timeout_s:
                break
        returncode = process.wait(timeout=max(1.0, timeout_s - (time.monotonic() - start)))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(controller)
    return returncode, output.decode(errors="replace"), time.monotonic() - start


def test_offline_at_a_terminal_the_pipeline_stops_at_once_with_advice(tmp_path):
    # .invalid never resolves (RFC 6761): the same as a machine without network or DNS.
    env = clean_env(tmp_path, SKINSENSE_DATAVERSE_URL="https://dataverse.invalid")
    code, output, seconds = run_at_a_terminal(
        [sys.executable, "-m", "skinsense.cli", "pipeline", "--no-pretrained"], env, tmp_path,
        timeout_s=60)
    assert code == 1, output
    assert seconds < 30
    assert "'dataverse.invalid' does not resolve" in output
    assert "--data-source PATH" in output
    assert not (tmp_path / "prefect").exists()  # it stopped before Prefect started


def test_without_a_terminal_the_fetch_keeps_its_retries(monkeypatch):
    """Scheduled and deployment runs (no terminal) do not take the shortcut."""
    from skinsense import cli
    from skinsense.config import DataConfig

    checked = []
    monkeypatch.setattr("skinsense.data.dataverse.check_host_resolves", checked.append)
    cfg = DataConfig(dataverse_url="https://dataverse.invalid")
    monkeypatch.setattr(cli, "at_terminal", lambda: False)
    cli._fail_fast_offline(cfg)
    assert checked == []
    monkeypatch.setattr(cli, "at_terminal", lambda: True)
    cli._fail_fast_offline(cfg)
    cli._fail_fast_offline(DataConfig(source="/some/local/copy"))
    assert checked == ["https://dataverse.invalid"]


def test_an_unresolvable_host_is_not_retried():
    from skinsense.data.dataverse import FetchError, check_host_resolves, is_transient

    with pytest.raises(FetchError, match="does not resolve") as raised:
        check_host_resolves("https://dataverse.invalid")
    assert not is_transient(raised.value)
    check_host_resolves("http://127.0.0.1:9")  # an address needs no lookup


# -- what the CLI passes on ----------------------------------------------------------------

def test_only_given_flags_override_the_config_file(tmp_path, monkeypatch, home):
    import flows.pipeline

    seen = {}
    monkeypatch.setattr(flows.pipeline, "run_pipeline",
                        lambda config, refresh_data: seen.setdefault("config", config) and {})
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({"data": {"source": str(tmp_path)},
                                       "serve": {"deploy": False, "port": 9000}}))
    monkeypatch.setenv("SKINSENSE_APP_PORT", "9100")
    assert main(["pipeline", "--config", str(config_file), "--epochs", "2"]) == 0
    config = seen["config"]
    assert config.data.source == str(tmp_path) and config.serve.deploy is False
    assert config.serve.port == 9000 and config.train.epochs == 2  # the file wins over the env
    seen.clear()
    assert main(["pipeline", "--data-source", str(tmp_path), "--no-deploy"]) == 0
    assert seen["config"].serve.port == 9100  # no port anywhere: SKINSENSE_APP_PORT
    monkeypatch.setenv("SKINSENSE_APP_PORT", "http")
    assert main(["pipeline", "--data-source", str(tmp_path)]) == 1


# -- the Prefect UI's form -----------------------------------------------------------------

def leaf_fields_without_default(schema: dict) -> list[str]:
    """Fields of the parameter schema's definitions that are not sub-configs and lack a default
    (the Prefect UI's form shows only what the schema says)."""
    missing = []
    for model, definition in schema["definitions"].items():
        for name, field in definition.get("properties", {}).items():
            is_sub_config = "$ref" in field or any("$ref" in a for a in field.get("allOf", []))
            if not is_sub_config and "default" not in field:
                missing.append(f"{model}.{name}")
    return missing


def test_every_default_the_flow_uses_is_in_the_form_schema(monkeypatch):
    from prefect.utilities.callables import parameter_schema

    from flows.pipeline import skinsense_pipeline
    from skinsense.config import DEFAULT_ARCHS, PipelineConfig

    schema = parameter_schema(skinsense_pipeline.fn).model_dump()
    assert leaf_fields_without_default(schema) == []
    train = schema["definitions"]["TrainConfig"]["properties"]
    assert train["archs"]["default"] == list(DEFAULT_ARCHS)
    # What the form shows is what runs: a run with the form's values equals a plain one.
    stages = {"data": "DataConfig", "train": "TrainConfig", "eval": "EvalConfig",
              "serve": "ServeConfig"}
    form_values = {stage: {name: field["default"] for name, field in
                           schema["definitions"][model]["properties"].items()}
                   for stage, model in stages.items()}
    monkeypatch.delenv("SKINSENSE_DATAVERSE_URL", raising=False)
    assert PipelineConfig.model_validate(form_values) == PipelineConfig()


def test_the_dataverse_url_variable_applies_when_the_field_is_not_given(monkeypatch):
    from skinsense.config import DEFAULT_DATAVERSE_URL, DataConfig

    monkeypatch.setenv("SKINSENSE_DATAVERSE_URL", "http://127.0.0.1:8080")
    assert DataConfig().dataverse_url == "http://127.0.0.1:8080"
    assert DataConfig(dataverse_url=DEFAULT_DATAVERSE_URL).dataverse_url == DEFAULT_DATAVERSE_URL
    monkeypatch.delenv("SKINSENSE_DATAVERSE_URL")
    assert DataConfig().dataverse_url == DEFAULT_DATAVERSE_URL
