"""Stage entry points without Prefect: the ISIC 2018 test set gets the same report."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from skinsense import stages
from skinsense.config import DataConfig, EvalConfig, PipelineConfig
from skinsense.lifecycle import tracking
from skinsense.lifecycle.packaging import ModelCard, load_card, save_model_dir
from skinsense.models import build_model

pytestmark = pytest.mark.slow


def test_isic2018_test_set_is_evaluated_beside_the_test_part(tmp_path, home, monkeypatch):
    """The whole evaluate stage (calibration, gate, test part, ISIC 2018, int8) from one read
    of the weights and the card, which is written once (on efficientnet_b0, with the passes
    over each part: tests/test_gate.py)."""
    from load_spy import LoadSpy

    from skinsense.data.synth import make_synthetic_ham10000

    source = make_synthetic_ham10000(tmp_path / "synth", n_images=120, seed=5,
                                     image_size=(80, 60), isic_test_images=21)
    cfg = DataConfig(source=str(source), include_isic_test=True, cache_workers=1)
    validated = stages.validate_data(stages.fetch_data(cfg, home, progress=False), cfg, home)
    split = stages.split_data(validated, cfg, home)
    oversampled = stages.oversample_data(split, cfg, home)
    cache = stages.cache_images(split, oversampled, 32, cfg, home, validated=validated)
    assert cache.isic_test is not None and cache.isic_test.n == 21

    parent = stages.start_pipeline_run(PipelineConfig(), home, tags={}, split=split,
                                       oversampled=oversampled)
    run_id = tracking.start_child_run(parent, name="resnet18", config={}, tags={})
    model_dir = save_model_dir(build_model("resnet18", image_size=32),
                               ModelCard(arch="resnet18", image_size=32), tmp_path / "m" / "model")
    trained = stages.TrainedArch(arch="resnet18", run_id=run_id, model_dir=model_dir, history=[])
    spy = LoadSpy(monkeypatch)
    candidate = stages.evaluate_architecture(
        trained, cache, EvalConfig(measure_efficiency=False, bootstrap_resamples=100,
                                   subgroup_min_images=3), home)
    # One way through the evaluation: the weights and the card are read once, the card is
    # written once, at the end (the ONNX exports and the int8 comparison reuse the loaded
    # network and the card in memory).
    assert spy.weights == [str(model_dir / "weights.safetensors")]
    assert (spy.card_reads, spy.card_writes) == (1, 1)
    metrics = MlflowClient().get_run(run_id).data.metrics
    assert "isic2018_test_balanced_accuracy" in metrics and "test_balanced_accuracy" in metrics
    assert candidate.test_metrics["balanced_accuracy"] == pytest.approx(
        metrics["test_balanced_accuracy"])
    # The same calibration and referral figures on both test sets, with the temperature and
    # threshold fitted on the validation part.
    for prefix in ("test_", "isic2018_test_"):
        assert {f"{prefix}{name}" for name in (
            "ece", "ece_uncalibrated", "nll", "nll_uncalibrated", "referral_sensitivity",
            "referral_sensitivity_ci_low", "referral_specificity_ci_high", "ood_auroc",
            "ood_fpr_at_95_tpr", "ood_rate")} <= set(metrics)
    assert {"temperature", "referral_threshold", "val_nll", "val_referral_sensitivity"} <= set(
        metrics)
    assert not any(key.startswith("isic2018_test_gap_") for key in metrics)  # no patient data
    card = load_card(model_dir)
    assert card.temperature == pytest.approx(metrics["temperature"])
    assert card.referral_threshold == pytest.approx(metrics["referral_threshold"])
    # The out-of-domain gate is fitted by the evaluate stage alone (a child flow that runs
    # train + evaluate for one architecture gets it too).
    assert (model_dir / "ood_gate.safetensors").is_file()
    assert card.ood_threshold == pytest.approx(metrics["ood_threshold"])
    assert card.ood_gate["test"]["ood_auroc"] == pytest.approx(metrics["test_ood_auroc"])
    assert card.test_referral["sensitivity"] == pytest.approx(metrics["test_referral_sensitivity"])
    assert card.subgroups["min_images"] == 3 and "not a clinical validation" in card.referral_rule
    artifacts = {a.path for a in MlflowClient().list_artifacts(run_id, "subgroups")}
    assert artifacts == {"subgroups/subgroup_metrics.csv", "subgroups/subgroup_metrics.md"}
    isic = {a.path for a in MlflowClient().list_artifacts(run_id, "evaluation-isic2018")}
    assert "evaluation-isic2018/reliability_diagram.png" in isic
    # The int8 export is made and judged by the evaluate stage, its verdict in the card.
    assert (model_dir / "model.int8.onnx").is_file() and (model_dir / "model.onnx").is_file()
    assert card.int8["calibration"].startswith(f"validation part, {cache.val.n} images")
    assert card.int8["n_test"] == cache.test.n and isinstance(card.int8["serve"], bool)
    assert card.int8["int8"]["balanced_accuracy"] == pytest.approx(
        metrics["test_int8_balanced_accuracy"])
    assert metrics["test_int8_served"] == float(card.int8["serve"])


def test_a_manifest_is_logged_as_a_local_dataset_without_a_guess(tmp_path, home):
    import warnings

    import pandas as pd
    from mlflow import MlflowClient

    tracking.configure(home)
    run_id = MlflowClient().create_run(tracking.ensure_experiment("datasets", home)).info.run_id
    manifest = tmp_path / "train.csv"
    pd.DataFrame({"image_id": ["a", "b"], "dx": ["nv", "mel"]}).to_csv(manifest, index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # MLflow warns when it has to guess the source's type
        tracking.log_dataset(run_id, manifest, name="train", digest="f" * 40, context="training")
    (logged,) = MlflowClient().get_run(run_id).inputs.dataset_inputs
    assert logged.dataset.source_type == "local"
    assert str(manifest) in logged.dataset.source
    assert logged.dataset.digest == "f" * 36


def test_select_best_takes_the_highest_score_and_the_first_listed_on_a_tie(tmp_path):
    """The fan-out test's "the parent registered the best" check says nothing when both
    children score the same; here the choice is checked with hand-made candidates."""
    from skinsense.evaluation.evaluate import EvalResult

    def candidate(arch: str, score: float, other: float) -> stages.Candidate:
        metrics = {"balanced_accuracy": score, "macro_f1": other}
        evaluation = EvalResult(arch=arch, model_dir=tmp_path / arch, metrics=metrics,
                                report_json=tmp_path / arch / "evaluation.json", n_images=10)
        return stages.Candidate(arch=arch, model_dir=tmp_path / arch, run_id=f"run-{arch}",
                                image_size=32, test_metrics=metrics, evaluation=evaluation)

    a, b, c = candidate("a", 0.61, 0.9), candidate("b", 0.72, 0.1), candidate("c", 0.72, 0.5)
    assert stages.select_best([a, b, c], "balanced_accuracy") is b   # tie: first listed
    assert stages.select_best([a, c, b], "balanced_accuracy") is c
    assert stages.select_best([a, b, c], "macro_f1") is a             # the metric asked for
    assert stages.select_best([a], "balanced_accuracy") is a
    with pytest.raises(ValueError, match="no trained candidates"):
        stages.select_best([], "balanced_accuracy")
