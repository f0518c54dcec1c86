"""Temperature scaling: logits -> calibrated class probabilities, and fitting the temperature.

A network trained with cross-entropy is usually over-confident: among images it calls
"90% melanoma", fewer than 90% are. Temperature scaling (Guo et al. 2017, "On Calibration of
Modern Neural Networks") divides the logits by one positive number T before the softmax,
chosen to minimize the negative log-likelihood on held-out data (SkinSense uses the
validation part). T > 1 softens over-confident predictions, T < 1 sharpens timid ones.
Dividing by a positive number keeps every row's order of logits, so the predicted class,
and every metric of the predicted class alone (accuracy, balanced accuracy, macro F1),
stays exactly as it was.

`calibrated_probabilities` is the one function every predictor path (PyTorch, ONNX Runtime,
the MLflow pyfunc, the app, evaluation) uses to turn logits into probabilities, with the
temperature of the model card. It runs in numpy (scipy's softmax) so that the ONNX Runtime
path never wakes torch's thread pool. This module imports neither prefect, mlflow nor gradio.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

# The search range of the fit. A trained network's temperature lies within about 0.5-5; a
# fit at either end means the logits carry almost no information (or NaNs upstream).
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0


def _as_logits(logits: Any) -> np.ndarray:
    if hasattr(logits, "detach"):  # a torch tensor, on any device and in any dtype
        logits = logits.detach().float().cpu().numpy()
    array = np.asarray(logits, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] < 2:
        raise ValueError(f"logits must be (N, classes) with at least 2 classes, got {array.shape}")
    return array


def check_temperature(temperature: float) -> float:
    """The temperature as a float, or a ValueError saying why it cannot be used."""
    temperature = float(temperature)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"the temperature must be a positive finite number, got {temperature}; "
                         "the model card's 'temperature' is broken (1.0 means uncalibrated)")
    return temperature


def calibrated_probabilities(logits: Any, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities `softmax(logits / temperature)`.

    Args:
        logits: (N, K) network outputs, a numpy array or a torch tensor (any device, any
            float dtype).
        temperature: the model card's `temperature` (1.0: the plain softmax).

    Returns:
        float32 (N, K), rows summing to 1, in the logits' class order.

    Raises:
        ValueError: the logits are not (N, K) or the temperature is not positive and finite.
    """
    temperature = check_temperature(temperature)
    # float64 for the arithmetic: large logits over a small temperature must not overflow.
    return softmax(_as_logits(logits) / temperature, axis=1).astype(np.float32)


def negative_log_likelihood(logits: Any, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood (cross-entropy, natural log) of the labels.

    Computed from the logits with a log-softmax, so a confident wrong answer costs its real
    (large) amount instead of the clipped value a log of rounded probabilities would give.

    Args:
        logits: (N, K) network outputs.
        labels: (N,) class indices.
        temperature: divide the logits by this first.
    """
    scaled = _as_logits(logits) / check_temperature(temperature)
    labels = _as_labels(labels, scaled)
    return float(-log_softmax(scaled, axis=1)[np.arange(len(labels)), labels].mean())


def _as_labels(labels: np.ndarray, logits: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels).astype(np.int64)
    if labels.shape != (len(logits),) or len(labels) == 0:
        raise ValueError(f"need one label per row of logits, and at least one: {labels.shape} "
                         f"labels for {len(logits)} rows")
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(f"labels must lie in 0..{logits.shape[1] - 1}, got "
                         f"{labels.min()}..{labels.max()}")
    return labels


def fit_temperature(logits: Any, labels: np.ndarray) -> float:
    """The temperature that minimizes the negative log-likelihood of `labels`.

    The likelihood of temperature scaling is log-concave in 1/T, so the loss has one
    minimum; it is found by bounded Brent search over log T (deterministic, no learning rate).

    Args:
        logits: (N, K) held-out logits (the validation part, never the test part).
        labels: (N,) their class indices.

    Returns:
        T within `MIN_TEMPERATURE`..`MAX_TEMPERATURE`.

    Raises:
        ValueError: no rows, labels out of range, or logits that are not all finite (a
            diverged or broken model; there is nothing to calibrate).
    """
    logits = _as_logits(logits)
    labels = _as_labels(labels, logits)
    if not np.isfinite(logits).all():
        raise ValueError("the logits contain NaN or infinity; the model is broken (diverged "
                         "training?) and cannot be calibrated")
    rows = np.arange(len(labels))

    def loss(log_t: float) -> float:
        return float(-log_softmax(logits / math.exp(log_t), axis=1)[rows, labels].mean())

    result = minimize_scalar(loss, bounds=(math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)),
                             method="bounded", options={"xatol": 1e-6})
    return float(math.exp(result.x))


def reliability_bins(probabilities: np.ndarray, labels: np.ndarray,
                     n_bins: int = 15) -> dict[str, np.ndarray]:
    """Top-1 confidence against accuracy in equal-width bins (what a reliability diagram draws).

    The bins are those of the expected calibration error (torchmetrics' binning: (0, 1] cut
    into `n_bins` equal parts), so the diagram and the reported ECE describe the same thing.

    Returns:
        `edges` (n_bins + 1,), and per bin `confidence` (mean top-1 probability), `accuracy`
        (share of correct top-1 predictions) and `count`; empty bins hold NaN and 0.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Bin i holds confidences in (edges[i], edges[i+1]]; a confidence of exactly 0 cannot occur.
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, weights=confidence, minlength=n_bins) / count
        accuracy = np.bincount(index, weights=correct, minlength=n_bins) / count
    return {"edges": edges, "confidence": mean_confidence, "accuracy": accuracy, "count": count}
