"""The `train-architecture` flow: one architecture's train, evaluate and log steps, as a child
run on the work pool (`train.fan_out`). Wires tasks, nothing else.

The pipeline starts it through the deployment `train-architecture/train-architecture`
(`tasks.fanout.train_on_pool`); any worker of the pool `skinsense-gpu`, on any machine that
mounts the pipeline's SKINSENSE_HOME, may run it. Its return value (metrics and where the
model folder is in MLflow) is persisted where the pipeline reads it back.
"""

from __future__ import annotations

from prefect import flow

from skinsense.lifecycle.handoff import ArchRequest, ArchResult, child_result_storage
from skinsense.paths import Home
from tasks import fanout, training


@flow(name="train-architecture", log_prints=True,
      persist_result=True, result_storage=child_result_storage(), result_serializer="json")
def train_architecture(request: ArchRequest) -> ArchResult:
    """Check the data the pipeline prepared, train and evaluate one architecture, and hand
    its model folder and metrics back through MLflow and the persisted result.

    Args:
        request: the architecture, the pipeline's config, its data (fingerprint and
            checksums of the image cache), class weights and MLflow parent run.
    """
    home = Home.default().ensure().root
    cache = fanout.receive_data(request, home)
    trained = training.train(cache, request.arch, request.config, home, request.class_weights,
                             request.parent_run_id, request.data.fingerprint, gpu_limit=None)
    candidate = training.evaluate(trained, cache, request.config.eval, home)
    return fanout.publish_candidate(candidate, home)
