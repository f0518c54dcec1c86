"""The Kubernetes work-pool job template (deployments/kubernetes-job-template.json), checked
against prefect-kubernetes' own worker without a cluster.

`prefect work-pool create skinsense-gpu --type kubernetes --base-job-template
deployments/kubernetes-job-template.json` must accept it, the worker must build a valid Job
from it, and a run's `gpu` job variable must become the pod's `nvidia.com/gpu` limit.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import jsonschema
import pytest

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "deployments" / "kubernetes-job-template.json"

kubernetes_worker = pytest.importorskip("prefect_kubernetes.worker")


@pytest.fixture(scope="module")
def template() -> dict:
    return json.loads(TEMPLATE.read_text())


def test_the_template_extends_the_workers_default_and_the_server_accepts_it(template):
    from prefect.server.schemas.actions import WorkPoolCreate

    default = kubernetes_worker.KubernetesWorker.get_default_base_job_template()
    # Every setting the worker fills in is still there, with the schema it expects.
    assert set(template["job_configuration"]) == set(default["job_configuration"])
    ours = template["variables"]["properties"]
    for name, schema in default["variables"]["properties"].items():
        expected = {k: v for k, v in schema.items() if k not in ("default", "description")}
        assert {k: v for k, v in ours[name].items()
                if k not in ("default", "description")} == expected, name
    assert template["variables"]["definitions"] == default["variables"]["definitions"]
    jsonschema.Draft202012Validator.check_schema(template["variables"])
    # What the server checks on `prefect work-pool create`: every placeholder is declared.
    WorkPoolCreate(name="skinsense-gpu", type="kubernetes", base_job_template=template)
    # Every default is valid against its own schema.
    defaults = {k: v["default"] for k, v in ours.items() if "default" in v}
    jsonschema.validate(defaults, template["variables"])


def test_the_gpu_job_variable_is_checked_like_the_server_does(template):
    from prefect.utilities.schema_tools import validate
    from prefect.utilities.schema_tools.validation import ValidationError

    validate({"gpu": 2}, template["variables"], raise_on_error=True, preprocess=True,
             ignore_required=True)
    for bad in ({"gpu": -1}, {"gpu": "two"}):
        with pytest.raises(ValidationError):
            validate(bad, template["variables"], raise_on_error=True, preprocess=True,
                     ignore_required=True)


@pytest.mark.slow  # the shared Prefect test server takes ~15 s to start
def test_the_worker_renders_a_job_that_asks_for_the_gpus(template, prefect_harness):
    # The worker resolves block references through the API: the shared test server.
    from prefect.client.schemas.objects import FlowRun

    config_class = kubernetes_worker.KubernetesWorkerJobConfiguration
    config = asyncio.run(config_class.from_template_and_values(
        template, {"gpu": 2, "image": "registry.example.org/skinsense:1.4",
                   "env": {"OMP_NUM_THREADS": "8"}}))
    config.prepare_for_flow_run(FlowRun(id=uuid.uuid4(), flow_id=uuid.uuid4(),
                                        name="pipeline-maxvit_t"))
    manifest = config.job_manifest
    pod = manifest["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["image"] == "registry.example.org/skinsense:1.4"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["SKINSENSE_HOME"] == "/data/skinsense"
    assert env["OMP_NUM_THREADS"] == "8" and "PREFECT__FLOW_RUN_ID" in env
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"skinsense-home": "/data/skinsense", "dshm": "/dev/shm"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["skinsense-home"]["persistentVolumeClaim"]["claimName"] == "skinsense-home"
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert manifest["kind"] == "Job" and pod["restartPolicy"] == "Never"

    # Without the variable, the pool's default: one GPU.
    default = asyncio.run(config_class.from_template_and_values(template, {}))
    assert default.job_manifest["spec"]["template"]["spec"]["containers"][0]["resources"][
        "limits"]["nvidia.com/gpu"] == 1
