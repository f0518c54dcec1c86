"""One architecture's whole evaluation, one way: the model folder and its card are read
once, each part goes through the network once, and everything else is derived from those
arrays; the folder's files (gate, monitoring reference, card) are written once, at the end.

    load (weights + card) -> validation outputs -> temperature, referral threshold
    -> training outputs (original images) -> gate, its threshold from the validation outputs
    -> test outputs (and the reference photos, the ISIC 2018 test set) -> metrics, referral,
    subgroups, the gate's verdict -> the card in memory -> `ArchitectureEvaluation.write`

The evaluate stage (`skinsense.stages.evaluate_architecture`) adds what needs the finished
model in memory (the field figures, the int8 verdict) to the same card before writing it,
and logs the figures to MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from skinsense.config import EvalConfig
from skinsense.data.records import CachedSplit, ImageCache
from skinsense.evaluation.evaluate import (
    EvalResult,
    calibration_outcome,
    evaluate_outputs,
    monitoring_reference,
)
from skinsense.evaluation.fit import Calibration, GateFit, fit_on_validation
from skinsense.evaluation.predict import (
    LoadedModel,
    SplitOutputs,
    reference_outputs,
    split_outputs,
)
from skinsense.lifecycle.packaging import save_card
from skinsense.trust.gate import save_gate
from skinsense.trust.referral import describe_rule

ISIC_OUT = "evaluation-isic2018"


@dataclass
class ArchitectureEvaluation:
    """What one architecture's evaluation found; its card is complete in memory."""

    loaded: LoadedModel                 # the model and its card (updated, not yet written)
    calibration: Calibration            # fitted on the validation part
    gate_fit: GateFit | None
    test: EvalResult                    # the test part
    isic: EvalResult | None             # the ISIC 2018 test set, when it was cached
    test_outputs: SplitOutputs

    @property
    def model_dir(self) -> Path:
        return self.loaded.model_dir

    def write(self) -> Path:
        """Write the folder's gate, monitoring reference and card (once each)."""
        from skinsense.monitoring.reference import save_reference

        gate = self.gate_fit.gate if self.gate_fit is not None else None
        if gate is not None:
            save_gate(gate, self.model_dir)
        # What monitoring compares the served traffic with (stored with the model): the
        # HAM10000 test part as served.
        save_reference(self.model_dir, monitoring_reference(self.loaded.card, self.test_outputs,
                                                            gate))
        return save_card(self.loaded.card, self.model_dir)


def _manifest(split: CachedSplit):
    from skinsense.data.cache import read_cached_manifest

    return read_cached_manifest(split)


def record_test_figures(evaluation: ArchitectureEvaluation, cfg: EvalConfig) -> None:
    """The test part's figures into the card in memory: `test_*` metrics and efficiency,
    the referral rule as measured, the subgroup gaps, what calibration did, the gate's
    held-out verdict."""
    card, result = evaluation.loaded.card, evaluation.test
    card.metrics |= {f"test_{k}": v for k, v in result.metrics.items()} | result.efficiency
    card.test_referral = result.referral
    card.referral_rule = describe_rule(card.referral_threshold,
                                       card.referral_sensitivity_target, result.referral)
    card.subgroups = {"gaps": result.subgroup_gaps, "min_images": cfg.subgroup_min_images,
                      "resampled_by": "lesion", "bootstrap_resamples": cfg.bootstrap_resamples,
                      "bootstrap_seed": cfg.bootstrap_seed,
                      "table": "subgroups/subgroup_metrics.csv (MLflow run artifact)"}
    card.calibration = calibration_outcome(card.temperature, evaluation.calibration.n_images,
                                           result.metrics)
    if result.ood:
        # The held-out verdict (`judge_gate`) replaces the fit's: it includes the fit's reason.
        card.ood_gate = card.ood_gate | {"test": result.ood, "status": result.gate_status,
                                         "reason": result.gate_reason,
                                         "warning": result.gate_warning}


def evaluate_architecture(model_dir: Path, cache: ImageCache, cfg: EvalConfig, *,
                          history: list[dict[str, float]] | None = None
                          ) -> ArchitectureEvaluation:
    """Calibrate on the validation part, fit the gate (training statistics, validation
    threshold), evaluate on the test part (and the ISIC 2018 test set, when cached) and
    record it all in the card in memory; nothing is written into the folder until
    `ArchitectureEvaluation.write` (the evaluation's own files go beside it, into
    `evaluation/` and `evaluation-isic2018/`).

    Args:
        model_dir: a trained model folder (see `skinsense.lifecycle.packaging`).
        cache: the cached parts at the model's input size.
        cfg: the evaluation settings.
        history: per-epoch dicts of the training, for its curves.

    Raises:
        ValueError: the validation part is empty, or a part is at another size.
    """
    loaded = LoadedModel.load(model_dir)
    batch = {"batch_size": cfg.batch_size}
    # The temperature, the referral threshold and the gate's threshold come from the
    # validation part (the gate's statistics from the training part); the test part stays
    # untouched until the figures below are measured on it.
    val = split_outputs(loaded, cache.val, **batch)
    calibration, gate_fit = fit_on_validation(
        loaded, val, referral_sensitivity=cfg.referral_sensitivity, train_split=cache.train,
        gate_percentile=cfg.ood_percentile, **batch)
    gate = gate_fit.gate if gate_fit is not None else None
    photos = (reference_outputs(loaded, **batch)
              if gate is not None and loaded.card.ood_threshold is not None else None)
    test = split_outputs(loaded, cache.test, tta=cfg.tta, **batch)
    isic = (split_outputs(loaded, cache.isic_test, tta=cfg.tta, **batch)
            if cache.isic_test is not None else None)
    measured = {}
    if cfg.measure_efficiency:
        from skinsense.evaluation.efficiency import measure_efficiency

        measured = measure_efficiency(loaded)  # after the passes: it moves the network
    intervals = {"bootstrap_resamples": cfg.bootstrap_resamples,
                 "bootstrap_seed": cfg.bootstrap_seed}
    common = {"model_dir": loaded.model_dir, "gate": gate, "reference": photos, "tta": cfg.tta,
              **intervals}
    result = evaluate_outputs(loaded.card, test, out_dir=loaded.model_dir.parent / "evaluation",
                              history=history, efficiency=measured,
                              manifest=_manifest(cache.test),
                              subgroup_min_images=cfg.subgroup_min_images, **common)
    isic_result = None
    if isic is not None:
        # The same report on the official challenge test set, comparable with its
        # leaderboard, with the temperature and threshold chosen on HAM10000's validation
        # part. Its metadata has no patient attributes, so no subgroup audit.
        isic_result = evaluate_outputs(loaded.card, isic,
                                       out_dir=loaded.model_dir.parent / ISIC_OUT,
                                       manifest=_manifest(cache.isic_test), subgroups=False,
                                       **common)
    evaluation = ArchitectureEvaluation(loaded=loaded, calibration=calibration,
                                        gate_fit=gate_fit, test=result, isic=isic_result,
                                        test_outputs=test)
    record_test_figures(evaluation, cfg)
    return evaluation
