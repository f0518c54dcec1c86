"""The `skinsense-pipeline` flow: wires the tasks, nothing else."""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from skinsense.config import PipelineConfig
from skinsense.paths import Home
from tasks import data, registry, training


@flow(name="skinsense-pipeline", log_prints=True)
def skinsense_pipeline(config: PipelineConfig = PipelineConfig()) -> dict:  # noqa: B008
    """Fetch -> validate -> split -> oversample -> cache -> train/evaluate each architecture
    -> register the best -> promote if better -> deploy the app serving the champion."""
    home = Home.default().ensure().root
    fetched = data.fetch(config.data, home)
    validated = data.validate(fetched, config.data, home)
    split = data.split(validated, config.data, home)
    oversampled = data.oversample(split, config.data, home)
    sizes = data.image_sizes(config)
    caches = {size: data.cache_images(split, oversampled, size, config.data, home, validated)
              for size in sorted(set(sizes.values()))}

    test_key = f"{validated.fingerprint}:seed{config.data.split_seed}:{split.test_csv.parent.name}"
    parent_run_id = training.start_run(config, home, tags={
        "dataset_fingerprint": validated.fingerprint, "split_seed": str(config.data.split_seed),
        "prefect_flow_run_id": str(flow_run.get_id()),
        "mlflow.runName": flow_run.get_name() or "pipeline"}, split=split, oversampled=oversampled)
    candidates = []
    try:
        for arch in config.train.archs:
            cache = caches[sizes[arch]]
            trained = training.train(cache, arch, config, home, oversampled.class_weights,
                                     parent_run_id, validated.fingerprint)
            candidates.append(training.evaluate(trained, cache, config.eval, home))
        training.compare(candidates, parent_run_id, home)
        best = training.select_best(candidates, config.eval.metric)
        decision = registry.register_and_promote(best, caches, config, home, test_key,
                                                 parent_run_id)
    except BaseException:
        training.finish_run(parent_run_id, home, candidates, failed=True)
        raise
    training.finish_run(parent_run_id, home, candidates)

    result = {"best": best.arch, "version": decision.version, "promoted": decision.promoted,
              "reason": decision.reason, "metrics": {c.arch: c.test_metrics for c in candidates}}
    if config.serve.deploy:
        champion = decision.version if decision.promoted else decision.champion_version
        deployment = registry.deploy(config.serve, home, champion)
        result["app_url"] = deployment.url
    return result


def run_pipeline(config: PipelineConfig) -> dict:
    """Entry point for the CLI: run the flow in this process."""
    return skinsense_pipeline(config=config)
