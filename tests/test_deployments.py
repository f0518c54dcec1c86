"""The deployments of `skinsense-pipeline`: prefect.yaml and the served definitions agree.

Runs of them on real servers are in tests/test_stack_runs.py (SQLite, two workers) and
tests/test_team_stack.py (Postgres, logins on).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deployments import definitions

ROOT = Path(__file__).resolve().parents[1]




@pytest.mark.parametrize("prefect_file", ["prefect.yaml", "docker/prefect.compose.yaml"])
def test_prefect_yaml_matches_the_definitions(prefect_file):
    spec = yaml.safe_load((ROOT / prefect_file).read_text())
    by_name = {d["name"]: d for d in spec["deployments"]}
    # The fan-out child: on the same pool, started only by the pipeline (no schedule).
    child = by_name.pop(definitions.TRAIN_DEPLOYMENT_NAME)
    assert child["entrypoint"] == definitions.TRAIN_FLOW_ENTRYPOINT
    assert child["work_pool"]["name"] == definitions.WORK_POOL
    assert child["enforce_parameter_schema"] is True and child["schedules"] == []
    monitor = by_name.pop(definitions.MONITOR_DEPLOYMENT_NAME)
    assert monitor["entrypoint"] == definitions.MONITOR_FLOW_ENTRYPOINT
    assert [s["cron"] for s in monitor["schedules"]] == [definitions.MONITOR_CRON]
    assert set(by_name) == set(definitions.DEPLOYMENTS)
    # The event triggers of the retraining: the same as the runner's, with the deployment's
    # own config repeated (a trigger's parameters replace the deployment's top-level ones).
    scheduled = by_name[definitions.SCHEDULED]
    assert scheduled["triggers"] == definitions.retrain_triggers(
        scheduled["parameters"].get("config"))
    assert "triggers" not in by_name[definitions.MANUAL]
    for name, deployment in by_name.items():
        assert deployment["entrypoint"] == definitions.FLOW_ENTRYPOINT
        assert deployment["work_pool"]["name"] == definitions.WORK_POOL
        assert deployment["enforce_parameter_schema"] is True
        cron = definitions.DEPLOYMENTS[name]["cron"]
        assert [s["cron"] for s in deployment["schedules"]] == ([cron] if cron else [])
    assert by_name[definitions.SCHEDULED]["schedules"][0]["timezone"] == "UTC"


def test_served_deployments_carry_schedule_and_schema():
    from flows.pipeline import skinsense_pipeline

    built = {d.name: d for d in definitions.to_deployments(skinsense_pipeline)}
    assert set(built) == {"scheduled-retraining", "manual"}
    assert built["scheduled-retraining"].schedules[0].schedule.cron == "0 3 * * 1"
    assert not built["manual"].schedules
    assert all(d.enforce_parameter_schema for d in built.values())
    schema = built["manual"]._parameter_openapi_schema.model_dump()
    assert "config" in schema["properties"]  # the UI renders PipelineConfig as a form


def test_training_asks_for_the_gpu_limit_only_where_a_server_keeps_it():
    """Prefect's temporary server keeps no 'gpu' limit: asking there only logs that it does not
    exist (once per architecture in the demo). A configured server is asked."""
    from contextlib import nullcontext

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.training import gpu_slots

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert isinstance(gpu_slots(definitions.GPU_LIMIT, 1), nullcontext)
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        assert not isinstance(gpu_slots(definitions.GPU_LIMIT, 1), nullcontext)
        assert isinstance(gpu_slots(None, 1), nullcontext)  # fanned-out children


def test_retraining_starts_on_the_monitoring_events_with_a_cool_down():
    from prefect.events import DeploymentEventTrigger

    from flows.monitor import skinsense_monitor
    from flows.pipeline import skinsense_pipeline

    built = {d.name: d for d in definitions.to_deployments(skinsense_pipeline)}
    triggers = built["scheduled-retraining"].triggers
    assert all(isinstance(t, DeploymentEventTrigger) for t in triggers)
    assert [sorted(t.expect) for t in triggers] == [["skinsense.drift.detected"],
                                                   ["skinsense.feedback.ready"]]
    assert all(t.within.total_seconds() == definitions.RETRAIN_COOLDOWN_S for t in triggers)
    assert all(t.posture == "Reactive" and t.threshold == 1 for t in triggers)
    # The run's parameters record the event; feedback runs train with the confirmed cases.
    assert all(t.parameters["triggered_by"]["event"] == "{{ event.event }}" for t in triggers)
    assert triggers[1].parameters["config"]["data"]["extra_sources"] == ["feedback"]
    assert not built["manual"].triggers
    monitor = definitions.to_monitor_deployment(skinsense_monitor)
    assert monitor.schedules[0].schedule.cron == definitions.MONITOR_CRON
    assert "config" in monitor._parameter_openapi_schema.model_dump()["properties"]
