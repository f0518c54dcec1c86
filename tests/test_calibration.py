"""Temperature scaling: the fit recovers a known temperature, and calibration keeps the argmax."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import multiclass_calibration_error

from skinsense.evaluation.metrics import expected_calibration_error
from skinsense.trust.calibration import (
    MAX_TEMPERATURE,
    calibrated_probabilities,
    fit_temperature,
    negative_log_likelihood,
    reliability_bins,
)


def calibrated_sample(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels drawn from softmax(logits): calibrated at temperature 1 by design."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 1.5, size=(n, 7))
    logits[np.arange(n), rng.integers(0, 7, n)] += 2.0  # a favourite class per image
    p = calibrated_probabilities(logits).astype(np.float64)
    labels = (p.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    return logits, labels


@pytest.mark.parametrize("true_temperature", [0.5, 2.0, 3.0])
def test_the_fit_recovers_the_temperature_and_lowers_ece(true_temperature):
    logits, labels = calibrated_sample(20_000, seed=1)
    # Logits scaled by T: over-confident for T > 1, timid for T < 1; dividing by T undoes it.
    distorted = logits * true_temperature
    fitted = fit_temperature(distorted, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.05)
    before = expected_calibration_error(labels, calibrated_probabilities(distorted))
    after = expected_calibration_error(labels, calibrated_probabilities(distorted, fitted))
    assert after < before / 2 and after < 0.02
    assert (negative_log_likelihood(distorted, labels, fitted)
            < negative_log_likelihood(distorted, labels))


def test_calibration_keeps_every_argmax_and_accepts_numpy_or_torch():
    logits, _ = calibrated_sample(500, seed=2)
    tensor = torch.from_numpy(logits.astype(np.float32))
    for temperature in (0.1, 0.7, 1.0, 4.0, 19.0):
        probabilities = calibrated_probabilities(tensor, temperature)
        assert probabilities.dtype == np.float32 and probabilities.shape == (500, 7)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)
        np.testing.assert_array_equal(probabilities.argmax(axis=1), logits.argmax(axis=1))
        expected = torch.softmax(tensor.double() / temperature, dim=1).numpy()
        np.testing.assert_allclose(probabilities, expected, atol=1e-6)
    # Large logits over a small temperature must not overflow into NaN.
    assert np.isfinite(calibrated_probabilities(np.array([[1e4, -1e4, 0.0]]), 0.05)).all()


def test_negative_log_likelihood_is_cross_entropy():
    logits, labels = calibrated_sample(300, seed=3)
    expected = torch.nn.functional.cross_entropy(torch.from_numpy(logits / 2.5),
                                                 torch.from_numpy(labels))
    assert negative_log_likelihood(logits, labels, 2.5) == pytest.approx(float(expected),
                                                                         rel=1e-9)


def test_reliability_bins_describe_the_same_ece_as_torchmetrics():
    logits, labels = calibrated_sample(2_000, seed=4)
    probabilities = calibrated_probabilities(logits * 2.0)
    bins = reliability_bins(probabilities, labels, n_bins=15)
    assert bins["count"].sum() == 2_000 and len(bins["edges"]) == 16
    filled = bins["count"] > 0
    ece = np.sum(bins["count"][filled] / 2_000
                 * np.abs(bins["accuracy"][filled] - bins["confidence"][filled]))
    expected = multiclass_calibration_error(torch.from_numpy(probabilities),
                                            torch.from_numpy(labels), num_classes=7, n_bins=15)
    assert ece == pytest.approx(float(expected), abs=1e-5)
    assert np.isnan(bins["accuracy"][~filled]).all()


def test_uninformative_logits_fit_the_largest_temperature():
    # Logits unrelated to the labels: the best calibrated answer is the class frequencies,
    # which the fit approaches by flattening the logits as far as it may.
    rng = np.random.default_rng(5)
    fitted = fit_temperature(rng.normal(size=(1_000, 7)), rng.integers(0, 7, 1_000))
    assert fitted > MAX_TEMPERATURE / 2


@pytest.mark.parametrize("logits,labels,message", [
    (np.full((2, 7), np.nan), np.array([0, 1]), "NaN or infinity"),
    (np.zeros((0, 7)), np.zeros(0), "at least one"),
    (np.zeros((2, 7)), np.array([0, 7]), "labels must lie"),
    (np.zeros(7), np.array([0]), "must be \\(N, classes\\)"),
])
def test_bad_inputs_are_refused_with_a_reason(logits, labels, message):
    with pytest.raises(ValueError, match=message):
        fit_temperature(logits, labels)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), float("nan")])
def test_a_broken_temperature_is_refused(temperature):
    with pytest.raises(ValueError, match="positive finite"):
        calibrated_probabilities(np.zeros((1, 7)), temperature)
