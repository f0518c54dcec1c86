"""Evaluation: metrics against hand-computed values, TTA, efficiency, figures, comparison."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from skinsense.data.records import CachedSplit
from skinsense.evaluation.compare import (
    compare_models,
    comparison_table,
    write_comparison,
)
from skinsense.evaluation.efficiency import measure_efficiency
from skinsense.evaluation.evaluate import evaluate_model_dir
from skinsense.evaluation.metrics import (
    HEADLINE_METRICS,
    classification_metrics,
    evaluation_report,
)
from skinsense.evaluation.plots import (
    plot_confusion_matrix,
    plot_model_comparison,
    plot_per_class_recall,
    plot_training_curves,
)
from skinsense.evaluation.predict import predict_logits, predict_probabilities
from skinsense.labels import CLASS_CODES, CODE_TO_INDEX
from skinsense.lifecycle.packaging import ModelCard, save_model_dir
from skinsense.models import build_model
from skinsense.trust.calibration import calibrated_probabilities

# The hand-made cases predict classes absent from y_true on purpose; scikit-learn says so.
pytestmark = pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")

AKIEC, BKL, MEL, NV = (CODE_TO_INDEX[c] for c in ("akiec", "bkl", "mel", "nv"))
SIZE = 32


def scores_for(y_pred: list[int], top: float = 0.4) -> np.ndarray:
    """Rows with `top` on the predicted class and the rest spread evenly (rows sum to 1)."""
    probs = np.full((len(y_pred), len(CLASS_CODES)), (1 - top) / (len(CLASS_CODES) - 1))
    probs[np.arange(len(y_pred)), y_pred] = top
    return probs.astype(np.float32)


# 3 of the 7 classes present. mel: 3 of 4 right (1 called nv); nv: 5 of 6 right (1 called mel);
# akiec: 1 of 2 right (1 called bkl, a class absent from y_true).
Y_TRUE = np.array([MEL] * 4 + [NV] * 6 + [AKIEC] * 2)
Y_PRED = [MEL, MEL, MEL, NV] + [NV] * 5 + [MEL] + [AKIEC, BKL]


def test_metrics_of_a_hand_made_case():
    metrics = classification_metrics(Y_TRUE, scores_for(Y_PRED))
    recall_mel, recall_nv, recall_akiec = 3 / 4, 5 / 6, 1 / 2
    balanced = (recall_mel + recall_nv + recall_akiec) / 3
    assert metrics["balanced_accuracy"] == pytest.approx(balanced)
    assert metrics["accuracy"] == pytest.approx(9 / 12)
    assert metrics["recall_mel"] == pytest.approx(recall_mel)
    assert metrics["recall_akiec"] == pytest.approx(recall_akiec)
    assert metrics["precision_akiec"] == pytest.approx(1.0)
    # mel: 3 of 4 melanomas found; of the 8 others, 1 (an nv) was called melanoma.
    assert metrics["mel_sensitivity"] == pytest.approx(3 / 4)
    assert metrics["mel_specificity"] == pytest.approx(7 / 8)
    # Macro F1 over the classes true or predicted: akiec 2/3, bkl 0, mel 3/4, nv 5/6.
    assert metrics["f1_nv"] == pytest.approx(5 / 6)
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 0 + 3 / 4 + 5 / 6) / 4)
    assert set(HEADLINE_METRICS) <= set(metrics)
    assert all(" " not in key and isinstance(v, float) for key, v in metrics.items())
    # Per-class keys only for classes in y_true; bkl was predicted but never true.
    assert "recall_bkl" not in metrics and "roc_auc_df" not in metrics


def test_confusion_matrix_counts_and_rows():
    report = evaluation_report(Y_TRUE, scores_for(Y_PRED))
    counts = np.array(report["confusion_matrix"])
    assert counts.sum() == len(Y_TRUE)
    assert counts[MEL, MEL] == 3 and counts[MEL, NV] == 1 and counts[AKIEC, BKL] == 1
    normalized = np.array(report["confusion_matrix_normalized"])
    assert normalized[MEL].sum() == pytest.approx(1.0)
    assert normalized[BKL].sum() == 0.0  # absent class: a zero row, not NaN
    assert report["per_class"]["mel"]["support"] == 4


def test_roc_auc_is_one_for_separable_scores_and_skips_absent_classes():
    y_true = np.array([MEL, MEL, NV, NV, NV, AKIEC])
    metrics = classification_metrics(y_true, scores_for(list(y_true)))
    assert metrics["macro_roc_auc"] == pytest.approx(1.0)
    assert {k for k in metrics if k.startswith("roc_auc_")} == {
        "roc_auc_mel", "roc_auc_nv", "roc_auc_akiec"}
    report = evaluation_report(y_true, scores_for(list(y_true)))
    assert math.isnan(report["per_class"]["df"]["roc_auc"])


def test_a_single_class_part_does_not_crash():
    y_true = np.array([MEL] * 5)
    metrics = classification_metrics(y_true, scores_for([MEL, MEL, NV, MEL, MEL]))
    assert math.isnan(metrics["macro_roc_auc"])      # no negatives: AUC undefined
    assert math.isnan(metrics["mel_specificity"])    # no non-melanoma images
    assert metrics["mel_sensitivity"] == pytest.approx(4 / 5)
    assert metrics["balanced_accuracy"] == pytest.approx(4 / 5)


def test_ece_is_zero_when_calibrated_and_grows_with_overconfidence():
    # Half of the predictions are right: a confidence of 0.5 is calibrated, 0.9 is not.
    y_true = np.array([MEL] * 5 + [NV] * 5)
    y_pred = [MEL] * 10
    calibrated = classification_metrics(y_true, scores_for(y_pred, top=0.5))["ece"]
    overconfident = classification_metrics(y_true, scores_for(y_pred, top=0.9))["ece"]
    assert calibrated == pytest.approx(0.0, abs=1e-6)
    assert overconfident == pytest.approx(0.9 - 0.5, abs=1e-6)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError):
        classification_metrics(np.array([0, 1]), np.zeros((3, len(CLASS_CODES))))
    with pytest.raises(ValueError):
        classification_metrics(np.array([0]), np.zeros((1, 3)))


# -- a tiny model folder and cached part ---------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(module_tmp):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model("resnet18", image_size=SIZE)
    return save_model_dir(model, ModelCard(arch="resnet18", image_size=SIZE),
                          module_tmp("model") / "model")


@pytest.fixture(scope="module")
def cached_part(module_tmp) -> CachedSplit:
    rng = np.random.default_rng(0)
    out = module_tmp("cache")
    labels = np.array([MEL, NV, NV, AKIEC, MEL, BKL])
    n = len(labels)
    np.save(out / "images.npy", rng.integers(0, 256, size=(n, SIZE, SIZE, 3), dtype=np.uint8))
    np.save(out / "labels.npy", labels)
    return CachedSplit(images_npy=out / "images.npy", labels_npy=out / "labels.npy",
                       size=SIZE, n=n)


@pytest.mark.parametrize("tta", [False, True])
def test_probabilities_shape_and_sum(model_dir, cached_part, tta):
    probs = predict_probabilities(model_dir, cached_part, batch_size=4, tta=tta)
    assert probs.shape == (cached_part.n, len(CLASS_CODES))
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_tta_is_the_mean_logit_over_identity_and_both_flips(model_dir, cached_part):
    images = np.load(cached_part.images_npy)

    def part_of(name: str, array: np.ndarray) -> CachedSplit:
        path = cached_part.images_npy.with_name(name)
        np.save(path, np.ascontiguousarray(array))
        return CachedSplit(**{**cached_part.model_dump(), "images_npy": path})

    views = [cached_part, part_of("hflip.npy", images[:, :, ::-1]),
             part_of("vflip.npy", images[:, ::-1])]
    plain, hflipped, vflipped = (predict_logits(model_dir, v) for v in views)
    tta = predict_logits(model_dir, cached_part, tta=True)
    # Logits, not probabilities, are averaged: temperature scaling then keeps the argmax.
    np.testing.assert_allclose(tta, (plain + hflipped + vflipped) / 3, atol=1e-5)
    assert not np.allclose(tta, plain, atol=1e-5)
    np.testing.assert_allclose(predict_probabilities(model_dir, cached_part, tta=True),
                               calibrated_probabilities(tta, 1.0), atol=1e-6)


def test_measure_efficiency(model_dir):
    result = measure_efficiency(model_dir, repeats=3, warmup=1)
    expected = {"parameters", "weights_mb", "cpu_latency_ms"}
    assert expected <= set(result)
    assert ("gpu_images_per_s" in result) == torch.cuda.is_available()
    assert all(value > 0 for value in result.values())
    assert 40 < result["weights_mb"] < 50  # resnet18 with a 7-class head: ~11.2 M fp32 params


def test_evaluate_model_dir_writes_everything(model_dir, cached_part, tmp_path):
    history = [{"epoch": 1, "train_loss": 1.9, "val_loss": 1.8, "val_balanced_accuracy": 0.2},
               {"epoch": 2, "train_loss": 1.5, "val_loss": 1.6, "val_balanced_accuracy": 0.3}]
    result = evaluate_model_dir(model_dir, cached_part, out_dir=tmp_path / "eval", batch_size=4,
                                tta=True, history=history)
    names = {p.name for p in result.artifacts}
    # No referral_roc.png: this card has no referral threshold (it was never calibrated).
    assert names == {"evaluation.json", "classification_report.txt", "test_probabilities.npy",
                     "confusion_matrix.png", "training_curves.png", "reliability_diagram.png"}
    assert all(p.is_file() and p.stat().st_size > 0 for p in result.artifacts)
    assert set(HEADLINE_METRICS) <= set(result.metrics) and result.n_images == cached_part.n

    def no_nan(token: str):
        raise AssertionError(f"{token} in evaluation.json")

    report = json.loads(result.report_json.read_text(), parse_constant=no_nan)
    assert report["tta"] is True and report["class_codes"] == list(CLASS_CODES)
    assert report["per_class"]["df"]["roc_auc"] is None  # absent class: null, not NaN
    assert np.array(report["confusion_matrix"]).sum() == cached_part.n
    assert "mel" in (tmp_path / "eval" / "classification_report.txt").read_text()
    # With tta the headline figures are the flips' average; what the app's rules promise
    # (calibration here) is measured on the plain pass the app makes.
    from skinsense.trust.calibration import negative_log_likelihood

    labels = np.load(cached_part.labels_npy)
    plain, flipped = (predict_logits(model_dir, cached_part, tta=t) for t in (False, True))
    assert result.metrics["nll"] == pytest.approx(negative_log_likelihood(plain, labels), rel=1e-5)
    assert result.metrics["accuracy"] == pytest.approx(float(
        (flipped.argmax(axis=1) == labels).mean()))


def test_compare_models_writes_tables_and_figures(model_dir, cached_part, tmp_path):
    result = evaluate_model_dir(model_dir, cached_part, out_dir=tmp_path / "eval")
    other = result.model_copy(update={"arch": "other", "efficiency": {"weights_mb": 1.0}})
    paths = compare_models([result, other], tmp_path / "comparison")
    assert [p.name for p in paths] == ["comparison.csv", "comparison.md", "model_comparison.png",
                                       "per_class_recall.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    assert set(pd.read_csv(paths[0])["arch"]) == {"resnet18", "other"}


def test_evaluate_without_history_draws_no_curves(model_dir, cached_part, tmp_path):
    result = evaluate_model_dir(model_dir, cached_part, out_dir=tmp_path / "eval")
    assert "training_curves.png" not in {p.name for p in result.artifacts}
    assert not (tmp_path / "eval" / "training_curves.png").exists()


# -- figures and the comparison table -----------------------------------------------------------

ROWS = [
    {"arch": "efficientnet_b0", "balanced_accuracy": 0.71, "macro_f1": 0.66, "weights_mb": 16.3,
     "cpu_latency_ms": 39.0},
    {"arch": "maxvit_t", "balanced_accuracy": 0.78, "macro_f1": 0.70, "weights_mb": 123.4,
     "cpu_latency_ms": 184.0, "ece": 0.05},
]


def is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_figure_writes_a_png(tmp_path):
    confusion = np.arange(49).reshape(7, 7)
    confusion[3] = 0  # an absent class
    paths = [
        plot_confusion_matrix(confusion, tmp_path / "cm.png"),
        plot_per_class_recall(
            {"efficientnet_b0": {"mel": 0.6, "nv": 0.9},
             "maxvit_t": {code: 0.5 for code in CLASS_CODES} | {"df": math.nan}},
            tmp_path / "recall.png"),
        plot_training_curves(
            [{"epoch": e, "train_loss": 2 / e, "val_loss": 2.2 / e, "val_balanced_accuracy": e / 5}
             for e in range(1, 4)], tmp_path / "curves.png"),
        plot_model_comparison(ROWS, tmp_path / "sub" / "comparison.png"),
    ]
    assert [p.name for p in paths] == ["cm.png", "recall.png", "curves.png", "comparison.png"]
    assert all(is_png(p) for p in paths)


def test_comparison_table_and_files(tmp_path):
    table = comparison_table(ROWS)
    assert list(table["arch"]) == ["maxvit_t", "efficientnet_b0"]  # best first
    assert list(table.columns) == ["arch", "balanced_accuracy", "macro_f1", "ece", "weights_mb",
                                   "cpu_latency_ms"]
    assert math.isnan(table.loc[1, "ece"])

    csv_path, md_path = write_comparison(ROWS, tmp_path / "out")
    pd.testing.assert_frame_equal(pd.read_csv(csv_path), table, check_dtype=False)
    lines = md_path.read_text().splitlines()
    assert lines[0] == ("| arch | balanced_accuracy | macro_f1 | ece | weights_mb | "
                        "cpu_latency_ms |")
    assert lines[1] == "| --- | --- | --- | --- | --- | --- |"
    assert lines[2] == "| maxvit_t | 0.7800 | 0.7000 | 0.0500 | 123.4 | 184.0 |"
    assert lines[3] == "| efficientnet_b0 | 0.7100 | 0.6600 |  | 16.3 | 39.0 |"


# -- calibration, referral and the subgroup audit -------------------------------------------------

def copy_with_card(model_dir, out, **card_fields):
    """A copy of a model folder whose card has `card_fields` set."""
    import shutil

    from skinsense.lifecycle.packaging import load_card, save_card

    shutil.copytree(model_dir, out)
    card = load_card(out)
    for key, value in card_fields.items():
        setattr(card, key, value)
    save_card(card, out)
    return out


@pytest.mark.slow
def test_evaluation_reports_calibration_referral_and_subgroups(model_dir, cached_part, tmp_path):
    calibrated = copy_with_card(model_dir, tmp_path / "calibrated", temperature=0.05,
                                referral_threshold=0.3, referral_sensitivity_target=0.95)
    manifest = pd.DataFrame({"lesion_id": ["L1", "L1", "L2", "L3", "L4", "L5"],
                             "sex": ["male", "male", "female", "female", None, "male"],
                             "age": [35, 35, 70, None, 50, 80],
                             "localization": ["back"] * 3 + ["face"] * 3,
                             "dx_type": ["histo"] * 6})
    result = evaluate_model_dir(calibrated, cached_part, out_dir=tmp_path / "eval",
                                manifest=manifest, bootstrap_resamples=100,
                                subgroup_min_images=2)
    plain = evaluate_model_dir(model_dir, cached_part, out_dir=tmp_path / "plain")
    metrics = result.metrics
    # Dividing logits by 0.05 sharpens every prediction: the calibration metrics move, the
    # metrics of the predicted class alone do not.
    from skinsense.evaluation.metrics import expected_calibration_error
    from skinsense.evaluation.predict import predict_logits
    from skinsense.trust.calibration import (
        calibrated_probabilities,
        negative_log_likelihood,
    )

    logits, y_true = predict_logits(model_dir, cached_part), np.load(cached_part.labels_npy)
    assert metrics["ece"] == pytest.approx(expected_calibration_error(
        y_true, calibrated_probabilities(logits, 0.05)))
    assert metrics["nll"] == pytest.approx(negative_log_likelihood(logits, y_true, 0.05))
    # An overconfident temperature on a random network: both got worse, measurably.
    assert metrics["ece"] > metrics["ece_uncalibrated"] + 0.01
    assert metrics["nll"] > metrics["nll_uncalibrated"] + 0.01
    assert metrics["ece_uncalibrated"] == pytest.approx(plain.metrics["ece"])
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "recall_mel", "f1_nv"):
        assert metrics[key] == plain.metrics[key], key
    assert {"referral_sensitivity", "referral_sensitivity_ci_low", "referral_specificity_ci_high",
            "referral_rate", "gap_balanced_accuracy_sex"} <= set(metrics)
    assert result.referral["resampled_by"] == "lesion" and result.referral["n_lesions"] == 5
    assert result.temperature == 0.05
    assert {p.name for p in result.artifacts} >= {"reliability_diagram.png", "referral_roc.png"}
    assert [p.name for p in result.subgroup_files] == ["subgroup_metrics.csv",
                                                       "subgroup_metrics.md"]
    report = json.loads(result.report_json.read_text())
    assert report["calibration"]["argmax_metrics_unchanged"] is True
    assert report["calibration"]["temperature"] == 0.05
    assert report["referral"]["threshold"] == 0.3
    # Probabilities on disk are the calibrated ones, as served.
    saved = np.load(tmp_path / "eval" / "test_probabilities.npy")
    np.testing.assert_allclose(saved, predict_probabilities(calibrated, cached_part), atol=1e-6)
    assert "referral" not in " ".join(plain.metrics)  # no threshold, no referral figures
    from skinsense.evaluation.compare import comparison_row

    assert comparison_row(result)["referral_specificity"] == metrics["referral_specificity"]

    from skinsense.reports import subgroups_markdown

    page = subgroups_markdown("resnet18", result)  # the Prefect artifact of the best model
    assert page.startswith("# Subgroup audit: resnet18") and "Temperature 0.050" in page
    assert "p(mel) + p(bcc) + p(akiec) >= 0.3000" in page and "| sex | male |" in page
    assert "not a clinical validation" in page
    bare = subgroups_markdown("resnet18", plain)
    assert "No referral rule" in bare and "No subgroup table" in bare


@pytest.mark.slow
def test_calibrating_a_trained_model(cached_sample, tmp_path):
    """On a trained model's real outputs: the fit lowers the validation NLL, the threshold meets
    its target on validation, and the test metrics of the argmax do not move."""
    from skinsense.config import TrainConfig
    from skinsense.data.cache import read_cached_manifest
    from skinsense.evaluation.fit import calibrate_model_dir
    from skinsense.lifecycle.packaging import load_card
    from skinsense.training.loop import fit

    cache, oversampled = cached_sample
    cfg = TrainConfig(archs=["resnet18"], epochs=2, batch_size=32, lr=2e-3, pretrained=False,
                      num_workers=0, seed=1, progress=False)
    trained = fit(cache, "resnet18", cfg, out_dir=tmp_path / "run",
                  class_weights=oversampled.class_weights).model_dir
    uncalibrated = copy_with_card(trained, tmp_path / "uncalibrated")

    calibration = calibrate_model_dir(trained, cache.val, referral_sensitivity=0.9)
    card = load_card(trained)
    assert card.temperature == calibration.temperature != 1.0
    assert calibration.nll < calibration.nll_uncalibrated
    assert card.referral_threshold == calibration.referral_threshold is not None
    assert calibration.referral_sensitivity >= 0.9 and card.referral_sensitivity_target == 0.9
    assert "not a clinical validation" in card.referral_rule

    manifest = read_cached_manifest(cache.test)
    after = evaluate_model_dir(trained, cache.test, out_dir=tmp_path / "after", manifest=manifest,
                               bootstrap_resamples=100)
    before = evaluate_model_dir(uncalibrated, cache.test, out_dir=tmp_path / "before")
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert after.metrics[key] == before.metrics[key], key
    assert after.metrics["ece_uncalibrated"] == pytest.approx(before.metrics["ece"])
    assert after.metrics["nll_uncalibrated"] == pytest.approx(before.metrics["nll"])
    # The temperature did its job where it was fitted: the validation ECE went down by a
    # wide margin (the model is overconfident after two epochs).
    assert calibration.ece < calibration.ece_uncalibrated - 0.05
    # Whether it also helped on the untouched test part (37 images here: on this sample it
    # does not) is recorded as measured, and decides whether the app says "calibrated".
    from skinsense.evaluation.evaluate import calibration_outcome

    outcome = calibration_outcome(card.temperature, calibration.n_images, after.metrics)
    assert outcome["helped"] is (after.metrics["nll"] < after.metrics["nll_uncalibrated"]
                                 and after.metrics["ece"] <= after.metrics["ece_uncalibrated"])
    assert (f"test ECE {after.metrics['ece_uncalibrated']:.3f} -> {after.metrics['ece']:.3f}"
            in outcome["summary"])
    card.calibration = outcome
    assert card.calibrated is outcome["helped"]
    # The referral figures are the rule applied to the served probabilities.
    from skinsense.evaluation.predict import predict_logits
    from skinsense.trust.calibration import calibrated_probabilities
    from skinsense.trust.referral import is_malignant, referral_scores

    y_test = np.load(cache.test.labels_npy)
    scores = referral_scores(calibrated_probabilities(predict_logits(trained, cache.test),
                                                      card.temperature))
    malignant = is_malignant(y_test)
    assert after.metrics["referral_sensitivity"] == pytest.approx(
        np.mean(scores[malignant] >= card.referral_threshold))

