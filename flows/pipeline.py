"""The `skinsense-pipeline` flow: wires the tasks, nothing else."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from prefect import flow
from prefect.futures import wait
from prefect.runtime import flow_run

from flows.local_server import temporary_server_settings
from skinsense.config import PipelineConfig
from skinsense.data.records import ImageCache, OversampledData, SplitData, ValidatedData
from skinsense.paths import Home
from tasks import data, fanout, feedback, registry, reports, training


class _PreparedData(NamedTuple):
    """What the data stages hand to training."""

    validated: ValidatedData
    split: SplitData
    oversampled: OversampledData
    sizes: dict[str, int]  # architecture -> image size
    caches: dict[int, ImageCache]  # image size -> the images cached at that size


@flow(name="skinsense-pipeline", log_prints=True)
def skinsense_pipeline(config: PipelineConfig = PipelineConfig(),  # noqa: B008
                       refresh_data: bool = False,
                       triggered_by: dict | None = None) -> dict:
    """Fetch -> validate -> split -> oversample -> cache -> train/evaluate each architecture
    -> register the best -> promote if better -> deploy the app serving the champion.

    Args:
        config: every setting of the run (the Prefect UI renders it as a form).
        refresh_data: run the data stages again instead of reusing their cached results.
        triggered_by: the event that started the run (set by the deployment's triggers in
            prefect.yaml: name, id, time and payload); empty for schedules and manual runs.
    """
    home = Home.default().ensure().root
    if triggered_by:
        print(f"started by the event {triggered_by.get('event')} ({triggered_by.get('id')})")
    if config.train.fan_out:
        fanout.check_work_pool()
    prepared = _prepare_data(config, home, refresh_data)
    validated, split = prepared.validated, prepared.split

    test_key = f"{validated.fingerprint}:seed{config.data.split_seed}:{split.test_csv.parent.name}"
    parent_run_id = training.start_run(config, home, tags={
        "dataset_fingerprint": validated.fingerprint, "split_seed": str(config.data.split_seed),
        "prefect_flow_run_id": str(flow_run.get_id()),
        "mlflow.runName": flow_run.get_name() or "pipeline"}, split=split,
        oversampled=prepared.oversampled)
    candidates = []
    try:
        _train_candidates(config, home, prepared, parent_run_id, candidates)
        training.compare(candidates, parent_run_id, home)
        reports.report_metrics(candidates, home)
        champion_field = registry.champion_in_field(config, home, parent_run_id)
        reports.report_field(candidates, champion_field)
        best = training.select_best(candidates, config.eval.metric)
        reports.report_subgroups(best)
        decision = registry.register_and_promote(best, prepared.caches, config, home, test_key,
                                                 parent_run_id)
    except BaseException:
        training.finish_run(parent_run_id, home, candidates, failed=True)
        raise
    training.finish_run(parent_run_id, home, candidates)
    reports.report_promotion(decision)

    result = {"best": best.arch, "version": decision.version, "promoted": decision.promoted,
              "reason": decision.reason, "metrics": {c.arch: c.test_metrics for c in candidates},
              "champion_field": champion_field}
    if config.serve.deploy:
        champion = decision.version if decision.promoted else decision.champion_version
        deployment = registry.deploy(config.serve, home, champion)
        reports.report_app(deployment.url, deployment.version)
        result["app_url"] = deployment.url
    return result


def _prepare_data(config: PipelineConfig, home: Path, refresh_data: bool) -> _PreparedData:
    """Fetch -> validate -> split (+ extra sources) -> oversample -> one image cache per size."""

    def cached(data_task):
        return data.with_home_cache(data_task, home, refresh=refresh_data)

    fetched = cached(data.fetch)(config.data, home)
    validated = cached(data.validate)(fetched, config.data, home)
    split = cached(data.split)(validated, config.data, home)
    if config.data.extra_sources:  # confirmed cases etc.: training part only
        split = cached(feedback.add_extra_sources)(
            split, feedback.export_extra_sources(config.data, home), home)
    oversampled = cached(data.oversample)(split, config.data, home)
    reports.report_data(split, oversampled)
    reports.report_near_duplicates(split)
    sizes = data.image_sizes(config)
    caches = {size: cached(data.cache_images)(split, oversampled, size, config.data, home,
                                              validated)
              for size in sorted(set(sizes.values()))}
    return _PreparedData(validated, split, oversampled, sizes, caches)


def _train_candidates(config: PipelineConfig, home: Path, prepared: _PreparedData,
                      parent_run_id: str, candidates: list) -> None:
    """Train and evaluate every architecture, on the work pool or here.

    The evaluated candidates go into `candidates` as they come, so that a failure still
    finishes the parent run with the ones already evaluated.
    """
    sizes, caches, validated = prepared.sizes, prepared.caches, prepared.validated
    class_weights = prepared.oversampled.class_weights
    if config.train.fan_out:
        # One child run per architecture on the work pool; all are awaited, so one
        # failure leaves the others to finish and be kept.
        handoffs = {size: fanout.publish_data(cache, validated.fingerprint, home)
                    for size, cache in caches.items()}
        futures = [fanout.train_on_pool.submit(arch, handoffs[sizes[arch]], config,
                                               class_weights, parent_run_id)
                   for arch in config.train.archs]
        wait(futures)
        outcomes = [future.result() for future in futures]
        candidates.extend(fanout.receive_candidates(outcomes, home))
        fanout.check_children(outcomes)
        return
    args = {arch: (caches[sizes[arch]], arch, config, home, class_weights,
                   parent_run_id, validated.fingerprint) for arch in config.train.archs}
    if config.train.parallel_archs:
        futures = {arch: training.train.submit(*a) for arch, a in args.items()}
        trained = {arch: future.result() for arch, future in futures.items()}
    else:
        trained = {arch: training.train(*a) for arch, a in args.items()}
    for arch, result in trained.items():
        candidates.append(training.evaluate(result, caches[sizes[arch]], config.eval, home))


def run_pipeline(config: PipelineConfig, *, refresh_data: bool = False) -> dict:
    """Entry point for the CLI: run the flow in this process (on Prefect's temporary server
    unless PREFECT_API_URL names one, given the time its first start needs)."""
    with temporary_server_settings():
        return skinsense_pipeline(config=config, refresh_data=refresh_data)
