"""One entry point per pipeline stage, usable without Prefect.

Each function takes configs and small records, does its stage with the library modules, and
returns a small record (paths, ids, metrics). The Prefect tasks in `tasks/` are thin wrappers
around these; the CLI calls them too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path

from pydantic import BaseModel

from skinsense.config import DataConfig, EvalConfig, PipelineConfig, ServeConfig
from skinsense.data.records import (
    FetchedData,
    ImageCache,
    OversampledData,
    SplitData,
    ValidatedData,
)
from skinsense.evaluation.evaluate import EvalResult
from skinsense.lifecycle.handoff import ArchRequest, ArchResult, DataHandoff
from skinsense.models import check_image_size, default_image_size
from skinsense.paths import Home

log = logging.getLogger(__name__)


class TrainedArch(BaseModel):
    """A trained architecture: its MLflow child run, model folder and per-epoch history."""

    arch: str
    run_id: str
    model_dir: Path
    history: list[dict[str, float]]


class Candidate(BaseModel):
    """A trained and evaluated architecture."""

    arch: str
    model_dir: Path
    run_id: str
    image_size: int
    test_metrics: dict[str, float]
    evaluation: EvalResult


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def fetch_data(cfg: DataConfig, home: Home, *, progress: bool = True) -> FetchedData:
    """Download HAM10000 or read it from a local copy (see `skinsense.data.sources`)."""
    from skinsense.data.sources import fetch

    return fetch(cfg, home.ensure(), progress=progress)


def validate_data(fetched: FetchedData, cfg: DataConfig, home: Home) -> ValidatedData:
    """Check metadata and every image; bad images are reported and left out. The same decode
    finds near-duplicate images across lesions (their lesions become one split group)."""
    from skinsense.data.metadata import validate

    key = _digest(fetched.model_dump(mode="json"), cfg.near_duplicates.model_dump(mode="json"))
    return validate(fetched, out_dir=home.datasets / f"validated-{key[:12]}",
                    max_bad_fraction=cfg.max_bad_fraction, workers=cfg.cache_workers,
                    near_duplicates=cfg.near_duplicates)


def split_data(validated: ValidatedData, cfg: DataConfig, home: Home) -> SplitData:
    """Lesion-level, dx-stratified train/val/test split."""
    from skinsense.data.split import run_split

    key = _digest(validated.fingerprint, cfg.split_seed, cfg.val_fraction, cfg.test_fraction,
                  cfg.train_fraction, cfg.isic_test_as_test)
    return run_split(validated, cfg, home.datasets / validated.fingerprint[:16] / f"split-{key[:12]}")


def oversample_data(split: SplitData, cfg: DataConfig, home: Home) -> OversampledData:
    """Oversample the minority classes of the training part (never val or test)."""
    from skinsense.data.oversample import run_oversample

    key = _digest(split.train_csv, cfg.oversample, cfg.oversample_target,
                  cfg.max_copies_per_image, cfg.color_jitter, cfg.class_weights)
    return run_oversample(split, cfg, split.train_csv.parent / f"oversampled-{key[:12]}")


def image_sizes(cfg: PipelineConfig) -> dict[str, int]:
    """The input size of each requested architecture (checked against what it accepts)."""
    sizes = {}
    for arch in cfg.train.archs:
        size = cfg.train.image_size or default_image_size(arch)
        check_image_size(arch, size)
        sizes[arch] = size
    return sizes


def cache_images(split: SplitData, oversampled: OversampledData, size: int, cfg: DataConfig,
                 home: Home, *, validated: ValidatedData | None = None) -> ImageCache:
    """Decode every image of the three parts (and the ISIC 2018 test set) once, at `size` px."""
    import pandas as pd

    from skinsense.data.cache import build_image_cache, build_split_cache

    # The key covers the data and exactly which images are in each part.
    key = _digest(split.fingerprint, str(oversampled.train_csv), str(split.val_csv),
                  str(split.test_csv))
    cache = build_image_cache(oversampled.train_csv, split.val_csv, split.test_csv, size=size,
                              fingerprint=key, cache_root=home.cache, workers=cfg.cache_workers)
    isic_manifest = validated.isic_test_manifest_csv if validated else None
    if isic_manifest is not None and not cfg.isic_test_as_test:
        cache.isic_test = build_split_cache(
            pd.read_csv(isic_manifest), size=size, out_dir=cache.test.images_npy.parent,
            name="isic2018_test", workers=cfg.cache_workers,
        ).model_copy(update={"manifest_csv": isic_manifest})
    return cache


def start_pipeline_run(cfg: PipelineConfig, home: Home, *, tags: dict[str, str],
                       split: SplitData, oversampled: OversampledData) -> str:
    """Create the MLflow parent run of a pipeline run, with its data as dataset inputs."""
    from skinsense.lifecycle import tracking

    tracking.configure(home)
    experiment_id = tracking.ensure_experiment(cfg.experiment, home)
    run_id = tracking.start_parent_run(experiment_id, config=cfg.model_dump(mode="json"),
                                       tags=tags)
    for context, manifest in (("train", oversampled.train_csv), ("validation", split.val_csv),
                              ("test", split.test_csv)):
        tracking.log_dataset(run_id, manifest, name=f"HAM10000-{context}",
                             digest=split.fingerprint, context=context)
    found = split.near_duplicates
    if found is not None:
        tracking.log_metrics(run_id, {"near_duplicate_pairs": found.n_pairs,
                                      "near_duplicate_lesions_merged": found.n_lesions_merged,
                                      "isic_test_near_duplicates": found.n_isic_test_images})
        for path in (found.pairs_csv, found.preview_png, found.isic_test_pairs_csv):
            if path is not None and Path(path).is_file():
                tracking.log_artifact(run_id, Path(path), "near_duplicates")
    return run_id


def train_architecture(cache: ImageCache, arch: str, cfg: PipelineConfig, home: Home, *,
                       class_weights: list[float] | None, parent_run_id: str,
                       fingerprint: str) -> TrainedArch:
    """Fine-tune one architecture in a nested MLflow run."""
    from skinsense.lifecycle import tracking
    from skinsense.training.launcher import train_in_subprocess

    tracking.configure(home)
    run_id = tracking.start_child_run(
        parent_run_id, name=arch, config={"arch": arch, "image_size": cache.size,
                                          **cfg.train.model_dump(mode="json")},
        tags={"dataset_fingerprint": fingerprint, "split_seed": str(cfg.data.split_seed)})
    out_dir = home.runs / _digest(cache.key, arch, cfg.train.run_key())[:16]
    try:
        # A child process per architecture: the flow process is never re-executed, GPU memory
        # is freed between architectures, and a crash stays in the child.
        with tracking.system_metrics(run_id):
            result = train_in_subprocess(
                cache, arch, cfg.train, out_dir=out_dir, class_weights=class_weights,
                card_extra={"dataset_fingerprint": fingerprint,
                            "split_seed": cfg.data.split_seed,
                            "config": cfg.model_dump(mode="json")},
                mlflow_run_id=run_id,
                env={"MLFLOW_TRACKING_URI": tracking.tracking_uri(home),
                     "SKINSENSE_HOME": str(home.root)})
    except BaseException:
        tracking.end_run(run_id, "FAILED")
        raise
    # Epochs of an earlier interrupted or identical run belong in this run too.
    logged = tracking.logged_steps(run_id, "train_loss")
    for entry in result.history:
        if int(entry["epoch"]) not in logged:
            metrics = {k: v for k, v in entry.items() if k != "epoch"}
            tracking.log_metrics(run_id, metrics, step=int(entry["epoch"]))
    tracking.log_metrics(run_id, {"best_epoch": result.best_epoch,
                                  "best_val_balanced_accuracy": result.best_val_balanced_accuracy})
    return TrainedArch(arch=arch, run_id=run_id, model_dir=result.model_dir,
                       history=result.history)


def evaluate_architecture(trained: TrainedArch, cache: ImageCache, cfg: EvalConfig,
                          home: Home) -> Candidate:
    """Calibrate on the validation part and fit the out-of-domain gate (training statistics,
    validation threshold), evaluate on the held-out test part, audit subgroups; log metrics,
    plots and reports to the arch's run and the figures to its model card.

    The model is loaded once and its card written once (`skinsense.evaluation.architecture`);
    the field figures and the int8 verdict join the card before it is written."""
    from skinsense.data.extra_sources import feedback_ids_in
    from skinsense.evaluation.architecture import evaluate_architecture as evaluate
    from skinsense.lifecycle import tracking
    from skinsense.monitoring.field import field_figures

    tracking.configure(home)
    run_id = trained.run_id
    evaluation = evaluate(trained.model_dir, cache, cfg, history=trained.history)
    loaded, result, card = evaluation.loaded, evaluation.test, evaluation.loaded.card
    tracking.log_metrics(run_id, evaluation.calibration.metrics())
    # The confirmed diagnoses this model never trained on (docs/OPERATIONS.md), predicted
    # as the app does: the network on the CPU, the fitted card.
    field = field_figures(loaded.model_dir, feedback_ids_in(cache.train.manifest_csv),
                          home=home.root, min_cases=cfg.field_min_cases,
                          n_resamples=cfg.bootstrap_resamples, seed=cfg.bootstrap_seed,
                          predictor=lambda: _served_predictor(loaded))
    card.metrics |= field
    tracking.log_metrics(run_id, field)
    int8 = evaluate_int8(evaluation, cache, cfg) if cfg.int8 else None
    evaluation.write()
    if int8 is not None:
        tracking.log_metrics(run_id, int8.metrics(), prefix="test_")
    tracking.log_metrics(run_id, result.metrics, prefix="test_")
    tracking.log_metrics(run_id, result.efficiency)
    for artifact in result.artifacts:
        tracking.log_artifact(run_id, artifact, "evaluation")
    for artifact in result.subgroup_files:
        tracking.log_artifact(run_id, artifact, "subgroups")
    if evaluation.isic is not None:
        tracking.log_metrics(run_id, evaluation.isic.metrics, prefix="isic2018_test_")
        for artifact in evaluation.isic.artifacts:
            tracking.log_artifact(run_id, artifact, "evaluation-isic2018")
    tracking.end_run(run_id)
    return Candidate(arch=card.arch, model_dir=loaded.model_dir, run_id=run_id,
                     image_size=card.image_size, test_metrics=result.metrics, evaluation=result)


def _served_predictor(loaded):
    """The loaded network predicting as the app does: on the CPU, with the fitted card."""
    from skinsense.serving.predictor import Predictor

    return Predictor(model=loaded.to_cpu(), card=loaded.card, source=str(loaded.model_dir))


def evaluate_int8(evaluation, cache: ImageCache, cfg: EvalConfig):
    """Quantize the evaluated model to int8 on validation images, compare it with fp32 on
    the test part, and put the verdict into its card in memory (`skinsense.quantize`); the
    caller writes the card. `evaluation` is a
    `skinsense.evaluation.architecture.ArchitectureEvaluation`: the model already loaded,
    its card and gate fitted."""
    from skinsense import quantize

    loaded, gate_fit = evaluation.loaded, evaluation.gate_fit
    model_dir, card = loaded.model_dir, loaded.card
    try:
        quantize.export_int8(model_dir, cache.val, n_images=cfg.int8_calibration_images,
                             model=loaded.to_cpu(), card=card)
        report = quantize.compare_int8(
            model_dir, cache.test, batch_size=cfg.batch_size, min_speedup=cfg.int8_min_speedup,
            card=card, gate=gate_fit.gate if gate_fit is not None else None)
        verdict = report.model_dump(mode="json")
    except Exception as exc:  # noqa: BLE001 - fp32 is still served; the evaluation stands
        log.exception("%s: no int8 model", model_dir)
        (model_dir / quantize.INT8_FILE).unlink(missing_ok=True)
        report, verdict = None, {"serve": False, "reason": f"int8 export failed: {exc}"}
    card.int8 = verdict
    return report


def compare_candidates(candidates: list[Candidate], parent_run_id: str, home: Home) -> list[Path]:
    """The cross-architecture comparison (table and plots), logged on the parent run."""
    from skinsense.evaluation.compare import compare_models
    from skinsense.lifecycle import tracking

    tracking.configure(home)
    out_dir = home.runs / "comparisons" / parent_run_id
    paths = compare_models([c.evaluation for c in candidates], out_dir)
    for path in paths:
        tracking.log_artifact(parent_run_id, path, "comparison")
    return paths


def candidate_rows(candidates: list[Candidate], home: Home) -> list[dict]:
    """Per architecture: its test metrics, its gate in words and a link to its MLflow run."""
    from skinsense.evaluation.compare import gate_summary_text
    from skinsense.lifecycle import tracking

    tracking.configure(home)
    return [{"arch": c.arch, "run_link": tracking.run_url(c.run_id), "metrics": c.test_metrics,
             "gate": gate_summary_text(c.evaluation)} for c in candidates]


def field_rows(candidates: list[Candidate], champion: dict) -> list[dict]:
    """The `field_*` figures of the champion (`champion_in_field`) and of each candidate
    (from its card), one row each; [] when nobody has any."""
    from skinsense.lifecycle.packaging import load_card

    rows = ([{"model": f"champion (version {champion['champion_version']})",
              **{k: v for k, v in champion.items() if k.startswith("field_")}}]
            if champion else [])
    for c in candidates:
        figures = {k: v for k, v in load_card(c.model_dir).metrics.items()
                   if k.startswith("field_")}
        if figures:
            rows.append({"model": f"candidate {c.arch}", **figures})
    return rows


def select_best(candidates: list[Candidate], metric: str) -> Candidate:
    """The candidate with the highest test `metric` (first listed wins ties)."""
    if not candidates:
        raise ValueError("no trained candidates to choose from")
    return max(candidates, key=lambda c: c.test_metrics[metric])


def champion_in_field(cfg: PipelineConfig, home: Home, *, parent_run_id: str) -> dict:
    """The current champion on the confirmed diagnoses it never trained on, beside the
    candidates' `field_*` figures: logged on the parent run as `champion.field_*`.

    Returns:
        {} without a champion, else `champion_version` and its `field_*` figures (only
        `field_n` with fewer than `eval.field_min_cases` cases; {} without any case).
    """
    from skinsense.lifecycle import registry, tracking
    from skinsense.monitoring.field import field_figures
    from skinsense.monitoring.monitor import new_confirmed_since

    tracking.configure(home)
    version = registry.current_champion(cfg.serve.model_name)
    if version is None:
        return {}
    try:
        if not new_confirmed_since(None):  # no case: no need to download the champion
            return {}
        with tempfile.TemporaryDirectory(prefix="skinsense-champion-") as tmp:
            model_dir = registry.download_model_dir(cfg.serve.model_name, version, Path(tmp))
            figures = field_figures(model_dir, None, home=home.root,
                                    min_cases=cfg.eval.field_min_cases,
                                    n_resamples=cfg.eval.bootstrap_resamples,
                                    seed=cfg.eval.bootstrap_seed)
    except Exception:  # noqa: BLE001 - a figure for the report must not stop the run
        log.exception("no field_* figures for champion version %s", version)
        return {}
    if not figures:
        return {}
    tracking.log_metrics(parent_run_id, figures, prefix="champion.")
    tracking.log_params(parent_run_id, {"champion_in_field": version})
    return {"champion_version": version, **figures}


def register_and_promote(best: Candidate, caches: dict[int, ImageCache], cfg: PipelineConfig,
                         home: Home, *, test_key: str, parent_run_id: str):
    """Register the best candidate as `challenger`; promote it to `champion` if better."""
    from skinsense.evaluation.evaluate import evaluate_model_dir
    from skinsense.lifecycle import registry, tracking
    from skinsense.lifecycle.packaging import load_card

    tracking.configure(home)
    metric = cfg.eval.metric
    version = registry.register_candidate(
        best.model_dir, run_id=best.run_id, model_name=cfg.serve.model_name, metric=metric,
        score=best.test_metrics[metric], tags={"test_key": test_key, "run_id": best.run_id})

    def score_champion(model_dir: Path) -> float:
        size = load_card(model_dir).image_size
        if size not in caches:
            raise ValueError(f"the champion takes {size} px inputs; no test cache at that size")
        result = evaluate_model_dir(model_dir, caches[size].test, tta=cfg.eval.tta,
                                    out_dir=home.runs / "champion-reevaluation")
        return result.metrics[metric]

    decision = registry.promote_if_better(
        cfg.serve.model_name, version, metric=metric, challenger_score=best.test_metrics[metric],
        min_delta=cfg.eval.min_delta, test_key=test_key, score_champion=score_champion)
    tracking.log_params(parent_run_id, {"promotion": {"version": version,
                                                      "promoted": decision.promoted,
                                                      "reason": decision.reason}})
    return decision


def finish_pipeline_run(parent_run_id: str, home: Home, candidates: list[Candidate],
                        *, failed: bool = False) -> None:
    """Log each candidate's test metrics on the parent run and close it."""
    from skinsense.lifecycle import tracking

    tracking.configure(home)
    for c in candidates:
        tracking.log_metrics(parent_run_id, c.test_metrics, prefix=f"{c.arch}.test_")
    tracking.end_run(parent_run_id, "FAILED" if failed else "FINISHED")


def deploy_champion(cfg: ServeConfig, home: Home, *, expected_version: str | None):
    """Start (or restart) the app serving the champion and prove it answers."""
    from skinsense.lifecycle import tracking
    from skinsense.serving.deploy import deploy_app

    uri = tracking.configure(home)
    return deploy_app(f"models:/{cfg.model_name}@champion", expected_version=expected_version,
                      app_dir=home.app, host=cfg.host, port=cfg.port,
                      env={"MLFLOW_TRACKING_URI": uri, "SKINSENSE_HOME": str(home.root)},
                      startup_timeout_s=cfg.startup_timeout_s, serve_config=cfg)


# -- fan-out over the work pool (train.fan_out) --------------------------------------------------


class ChildOutcome(BaseModel):
    """How one architecture's child flow run ended, as the pipeline saw it."""

    arch: str
    flow_run_id: str
    flow_run_name: str
    state: str                       # the final state's name: Completed, Failed, Crashed...
    message: str | None = None
    worker: str | None = None        # the Prefect worker that ran it, when known
    result: ArchResult | None = None  # only when Completed and its result could be read

    @property
    def ok(self) -> bool:
        return self.result is not None


class FanOutError(RuntimeError):
    """At least one architecture's child run did not complete; the message names each."""


def publish_data(cache: ImageCache, fingerprint: str, home: Home) -> DataHandoff:
    """The image cache, recorded for child runs on other workers (see `skinsense.lifecycle.handoff`)."""
    from skinsense.lifecycle.handoff import publish_cache

    return publish_cache(cache, fingerprint, home)


def job_variables_for(cfg: PipelineConfig, arch: str) -> dict:
    """The work-pool job variables of `arch`'s child run: '*' entries, then the arch's own
    (an `env` in both is merged)."""
    common, own = cfg.train.job_variables.get("*", {}), cfg.train.job_variables.get(arch, {})
    merged = {**common, **own}
    if isinstance(common.get("env"), dict) and isinstance(own.get("env"), dict):
        merged["env"] = {**common["env"], **own["env"]}
    return merged


def receive_data(request: ArchRequest, home: Home) -> ImageCache:
    """In a child run: the parent's image cache under this worker's home, verified against
    the data fingerprint and checksums the parent recorded."""
    from skinsense.lifecycle.handoff import receive_cache

    return receive_cache(request.data, home)


def publish_candidate(candidate: Candidate, home: Home) -> ArchResult:
    """In a child run: log the model folder to MLflow and return what the parent needs."""
    from skinsense.lifecycle import tracking
    from skinsense.lifecycle.handoff import publish_candidate as publish

    tracking.configure(home)
    return publish(candidate.arch, candidate.run_id, candidate.image_size,
                   candidate.test_metrics, candidate.evaluation, candidate.model_dir, home)


def receive_candidates(outcomes: list[ChildOutcome], home: Home) -> list[Candidate]:
    """The candidates of the child runs that completed, with their model folders here.

    Raises:
        FanOutError: a completed child's model could not be received here; the message also
            names every child run that did not complete, so that neither hides the other.
    """
    from skinsense.lifecycle import tracking
    from skinsense.lifecycle.handoff import rebase_evaluation, receive_model_dir

    tracking.configure(home)
    candidates, unreceived = [], []
    for outcome in outcomes:
        if outcome.result is None:
            continue
        result = outcome.result
        try:
            model_dir = receive_model_dir(result, home)
        except Exception as exc:  # noqa: BLE001 - reported with the children's failures
            unreceived.append(f"- {result.arch}: its child run completed, but its model "
                              f"({result.model_uri}) could not be received here: {exc}")
            continue
        candidates.append(Candidate(arch=result.arch, model_dir=model_dir, run_id=result.run_id,
                                    image_size=result.image_size,
                                    test_metrics=result.test_metrics,
                                    evaluation=rebase_evaluation(result, home, model_dir)))
    if unreceived:
        raise FanOutError(_fan_out_failures(outcomes, unreceived))
    return candidates


def check_children(outcomes: list[ChildOutcome]) -> None:
    """Raise `FanOutError` naming every child run that did not complete, and why."""
    if any(not o.ok for o in outcomes):
        raise FanOutError(_fan_out_failures(outcomes, []))


def _fan_out_failures(outcomes: list[ChildOutcome], unreceived: list[str]) -> str:
    failed = [o for o in outcomes if not o.ok]
    lines = [f"- {o.arch}: child run '{o.flow_run_name}' ({o.flow_run_id}) ended {o.state}"
             + (f" on {o.worker}" if o.worker else "") + f": {o.message or 'no message'}"
             for o in failed] + unreceived
    kept = [f"{o.arch} (MLflow run {o.result.run_id}, trained on {o.result.worker})"
            for o in outcomes if o.result is not None]
    return (
        f"{len(lines)} of {len(outcomes)} architecture(s) failed to train on the work pool:\n"
        + "\n".join(lines)
        + ("\nThe trainings that finished are kept in MLflow: " + ", ".join(kept)
           + ". A new pipeline run reuses their finished trainings." if kept else ""))
