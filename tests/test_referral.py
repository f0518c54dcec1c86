"""The referral rule: its score, the threshold chosen on validation, and the decision from a card."""

from __future__ import annotations

import math

import numpy as np
import pytest

from skinsense.evaluation.metrics import referral_metrics, referral_report
from skinsense.labels import CLASS_CODES, CODE_TO_INDEX
from skinsense.lifecycle.packaging import ModelCard
from skinsense.trust.referral import (
    REFERRAL_CODES,
    choose_referral_threshold,
    describe_rule,
    is_malignant,
    referral_decision,
    referral_scores,
)

AKIEC, BCC, MEL, NV, BKL = (CODE_TO_INDEX[c] for c in ("akiec", "bcc", "mel", "nv", "bkl"))


def probabilities_with_score(scores: list[float]) -> np.ndarray:
    """Rows whose mel + bcc + akiec sum to `scores` (split unevenly), the rest on nv and bkl."""
    rows = np.zeros((len(scores), len(CLASS_CODES)))
    for i, s in enumerate(scores):
        rows[i, [MEL, BCC, AKIEC]] = [0.5 * s, 0.3 * s, 0.2 * s]
        rows[i, [NV, BKL]] = [0.6 * (1 - s), 0.4 * (1 - s)]
    return rows


def test_the_malignant_classes_are_mel_bcc_akiec():
    assert set(REFERRAL_CODES) == {"mel", "bcc", "akiec"}
    np.testing.assert_array_equal(is_malignant(np.arange(7)),
                                  [c in {"mel", "bcc", "akiec"} for c in CLASS_CODES])
    np.testing.assert_allclose(referral_scores(probabilities_with_score([0.0, 0.25, 1.0])),
                               [0.0, 0.25, 1.0])


# Five malignant images scored 0.9, 0.8, 0.7, 0.6, 0.2 and three benign ones.
Y_VAL = np.array([MEL, BCC, AKIEC, MEL, MEL, NV, NV, BKL])
SCORES = np.array([0.9, 0.8, 0.7, 0.6, 0.2, 0.65, 0.1, 0.3])


@pytest.mark.parametrize("target,threshold", [
    (0.2, 0.9),    # 1 of 5: the top score already refers one
    (0.8, 0.6),    # 4 of 5
    (0.95, 0.2),   # 4.75 -> all 5: the lowest malignant score
    (1.0, 0.2),
])
def test_a_hand_made_example_has_a_known_threshold(target, threshold):
    assert choose_referral_threshold(Y_VAL, SCORES, target) == pytest.approx(threshold)


def test_the_threshold_meets_the_target_and_is_the_highest_that_does():
    rng = np.random.default_rng(0)
    y_val = rng.integers(0, 7, 800)
    scores = np.clip(rng.normal(0.3, 0.2, 800) + 0.3 * is_malignant(y_val), 0, 1)
    malignant = is_malignant(y_val)
    for target in (0.8, 0.9, 0.95, 0.99):
        threshold = choose_referral_threshold(y_val, scores, target)
        assert (scores[malignant] >= threshold).mean() >= target
        # The next malignant score above it already misses the target.
        higher = scores[malignant][scores[malignant] > threshold].min()
        assert (scores[malignant] >= higher).mean() < target


def test_no_malignant_image_means_no_threshold_and_says_why():
    with pytest.raises(ValueError, match="no mel, bcc or akiec"):
        choose_referral_threshold(np.array([NV, BKL]), np.array([0.1, 0.2]), 0.95)
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        choose_referral_threshold(Y_VAL, SCORES, 0.0)


def test_the_decision_follows_the_card():
    card = ModelCard(arch="resnet18", image_size=32, referral_threshold=0.3,
                     referral_sensitivity_target=0.95)
    as_dict = dict(zip(CLASS_CODES, probabilities_with_score([0.35])[0], strict=True))
    decision = referral_decision(as_dict, card)
    assert decision.refer is True and decision.score == pytest.approx(0.35)
    assert decision.threshold == 0.3 and decision.sensitivity_target == 0.95
    assert referral_decision(probabilities_with_score([0.29])[0], card).refer is False
    # A card from before calibration has no rule: a score, but no decision.
    old = referral_decision(as_dict, ModelCard(arch="resnet18", image_size=32))
    assert old.refer is None and old.score == pytest.approx(0.35)


def test_the_test_report_counts_and_intervals():
    y_test = np.array([MEL, MEL, BCC, AKIEC, NV, NV, NV, BKL])
    scores = [0.9, 0.5, 0.1, 0.6, 0.7, 0.2, 0.1, 0.05]
    lesions = np.array(["L1", "L1", "L2", "L3", "L4", "L5", "L6", "L7"])
    report = referral_report(y_test, probabilities_with_score(scores), 0.4, lesion_ids=lesions,
                             n_resamples=500, seed=0)
    # Malignant: 0.9, 0.5, 0.6 referred, 0.1 missed; benign: 0.7 referred, 3 passed.
    assert report["sensitivity"] == pytest.approx(3 / 4)
    assert report["specificity"] == pytest.approx(3 / 4)
    assert report["referral_rate"] == pytest.approx(4 / 8)
    assert report["n_malignant"] == 4 and report["n_benign"] == 4 and report["n_lesions"] == 7
    assert report["resampled_by"] == "lesion"
    # The intervals are the lesion bootstrap's percentiles at the same seed, resampled
    # here the slow way (draw lesions as LesionBootstrap draws them, take their images), on
    # a part big enough for them to lie strictly inside [0, 1].
    rng = np.random.default_rng(5)
    many_y = rng.choice([MEL, BCC, AKIEC, NV, NV, BKL], size=90)
    many_lesions = np.array([f"L{i}" for i in rng.integers(0, 60, size=90)])
    many_scores = np.where(is_malignant(many_y), rng.uniform(0.2, 1, 90), rng.uniform(0, 0.6, 90))
    big = referral_report(many_y, probabilities_with_score(many_scores), 0.4,
                          lesion_ids=many_lesions, n_resamples=300, seed=3)
    unique_lesions = np.unique(many_lesions)
    draws = np.random.default_rng(3).integers(0, len(unique_lesions),
                                              size=(300, len(unique_lesions)))
    malignant, referred = is_malignant(many_y), many_scores >= 0.4
    for name, positives, hits in (("sensitivity", malignant, referred),
                                  ("specificity", ~malignant, ~referred)):
        values = []
        for draw in draws:
            images = np.concatenate([np.flatnonzero(many_lesions == unique_lesions[k])
                                     for k in draw])
            values.append((hits & positives)[images].sum() / positives[images].sum())
        low, high = np.percentile(values, [2.5, 97.5])
        assert big[f"{name}_ci_low"] == pytest.approx(low, abs=1e-12)
        assert big[f"{name}_ci_high"] == pytest.approx(high, abs=1e-12)
        assert 0 < low < big[name] < high < 1
    metrics = referral_metrics(report)
    assert set(metrics) == {"referral_sensitivity", "referral_sensitivity_ci_low",
                            "referral_sensitivity_ci_high", "referral_specificity",
                            "referral_specificity_ci_low", "referral_specificity_ci_high",
                            "referral_rate", "referral_roc_auc"}
    only_benign = referral_report(np.array([NV, NV]), probabilities_with_score([0.1, 0.5]), 0.4)
    assert math.isnan(only_benign["sensitivity"]) and math.isnan(only_benign["roc_auc"])
    assert only_benign["specificity"] == 0.5 and only_benign["resampled_by"] == "image"


def test_the_rule_in_words_says_what_it_is_not():
    text = describe_rule(0.1234, 0.95, {"sensitivity": 0.93, "sensitivity_ci_low": 0.88,
                                        "sensitivity_ci_high": 0.97, "specificity": 0.6,
                                        "specificity_ci_low": 0.55, "specificity_ci_high": 0.65})
    assert "0.1234" in text and "95%" in text and "93.0% (95% CI 88.0%-97.0%)" in text
    assert "not a clinical validation" in text
    assert "No referral rule" in describe_rule(None, 0.95)
