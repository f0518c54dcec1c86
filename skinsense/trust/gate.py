"""The out-of-domain gate: does an image look like the dermatoscopic images the model knows?

A classifier answers every input, a photo of a cat included, often with high confidence.
The gate measures how far an image's penultimate features (the input of the classifier head,
see `skinsense.models.LogitsAndFeatures`) lie from those of the training images, by the
Mahalanobis distance to the nearest class mean with one covariance shared by all classes
(Lee et al. 2018, "A Simple Unified Framework for Detecting Out-of-Distribution Samples";
on skin lesions it separates ISIC from clinical photos far better than the maximum softmax
probability: AUROC about 0.96 against 0.63, Anthony and Kamnitsas 2024):

- fitted on the training part: the class means, and the covariance of the features around
  their class mean, shrunk by Ledoit-Wolf (scikit-learn's `LedoitWolf`): with 1,280-1,536
  feature dimensions and a few thousand images the plain sample covariance is singular or
  close to it, and its inverse would amplify noise;
- the score of an image is its smallest distance to a class mean (larger: stranger);
- the threshold is the `percentile`-th percentile of the validation part's scores (95: about
  5% of real in-domain images are turned away, the price of catching the rest).

`fit_gate` and `choose_threshold` are plain numpy in, numpy out. `save_gate` writes the means
and the precision matrix (the inverse of the shrunk covariance) to `ood_gate.safetensors` in
the model folder, with the SHA-256 of the weights they were computed from; the threshold and
the percentile go into the model card (`ood_threshold`, `ood_percentile`). Nothing is
pickled. This module imports neither prefect, mlflow nor gradio.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from skinsense.labels import CLASS_CODES

GATE_FILE = "ood_gate.safetensors"
# Why a model folder without the gate file has no gate (versions from before the gate).
ABSENT = (f"the model has no out-of-domain gate ({GATE_FILE} is missing: it was evaluated "
          f"before SkinSense had one)")


class GateError(ValueError):
    """The gate cannot be fitted or used as asked; the message says why."""


@dataclass(frozen=True)
class OodGate:
    """Class means and the shared precision matrix of a model's penultimate features.

    Attributes:
        class_means: (K, D) mean feature vector of each class seen in training.
        precision: (D, D) inverse of the Ledoit-Wolf-shrunk within-class covariance.
        class_indices: (K,) the `CLASS_CODES` index of each row of `class_means`.
        weights_sha256: SHA-256 of the weights the features came from ('' if unknown).
        shrinkage: Ledoit-Wolf's shrinkage coefficient (0: sample covariance, 1: scaled
            identity), for the record.
        n_images: training images the statistics were fitted on.
    """

    class_means: np.ndarray
    precision: np.ndarray
    class_indices: np.ndarray
    weights_sha256: str = ""
    shrinkage: float = float("nan")
    n_images: int = 0

    def __post_init__(self) -> None:
        k, d = self.class_means.shape
        if self.precision.shape != (d, d) or self.class_indices.shape != (k,):
            raise GateError(f"inconsistent gate: means {self.class_means.shape}, precision "
                            f"{self.precision.shape}, classes {self.class_indices.shape}")
        # P = L L^T, so (x - m)^T P (x - m) = |(x - m) L|^2: one matrix product per batch
        # instead of one quadratic form per class. float64: distances of 1,000-dimensional
        # vectors lose digits quickly in float32.
        lower = np.linalg.cholesky(self.precision.astype(np.float64))
        object.__setattr__(self, "_lower", lower)
        object.__setattr__(self, "_means_projected", self.class_means.astype(np.float64) @ lower)

    @property
    def feature_dim(self) -> int:
        """D, the length of the feature vectors the gate takes."""
        return int(self.class_means.shape[1])

    def distances(self, features: np.ndarray) -> np.ndarray:
        """(N, K) Mahalanobis distance of each feature vector to each class mean."""
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise GateError(f"features must be (N, {self.feature_dim}), got {features.shape}")
        projected = features @ self._lower
        means = self._means_projected
        squared = ((projected ** 2).sum(axis=1, keepdims=True) - 2 * projected @ means.T
                   + (means ** 2).sum(axis=1))
        return np.sqrt(np.maximum(squared, 0.0))

    def scores(self, features: np.ndarray) -> np.ndarray:
        """(N,) the gate score of each image: its smallest Mahalanobis distance to a class
        mean. Larger is further from the training images."""
        return self.distances(features).min(axis=1)


def fit_gate(features: np.ndarray, labels: np.ndarray, *, weights_sha256: str = "") -> OodGate:
    """Class means and the Ledoit-Wolf shared precision of training features.

    Args:
        features: (N, D) penultimate features of the training images.
        labels: (N,) their class indices (`CLASS_CODES` order).
        weights_sha256: the weights the features came from (`skinsense.export.weights_sha256`),
            recorded so that a gate never outlives them.

    Raises:
        GateError: fewer than two images, shapes that disagree, or non-finite features.
    """
    from sklearn.covariance import LedoitWolf

    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    if features.ndim != 2 or labels.shape != (len(features),):
        raise GateError(f"need (N, D) features and (N,) labels, got {features.shape} and "
                        f"{labels.shape}")
    if len(features) < 2:
        raise GateError(f"the out-of-domain gate needs at least 2 training images, got "
                        f"{len(features)}")
    if not np.isfinite(features).all():
        raise GateError("the features contain NaN or infinity; the model is broken (diverged "
                        "training?) and no out-of-domain gate can be fitted")
    classes = np.unique(labels)
    means = np.stack([features[labels == k].mean(axis=0) for k in classes])
    # One covariance for all classes, of the features around their own class mean.
    centred = features - means[np.searchsorted(classes, labels)]
    estimator = LedoitWolf(assume_centered=True).fit(centred)
    return OodGate(class_means=means, precision=estimator.precision_, class_indices=classes,
                   weights_sha256=weights_sha256, shrinkage=float(estimator.shrinkage_),
                   n_images=len(features))


def choose_threshold(scores: np.ndarray, percentile: float) -> float:
    """The `percentile`-th percentile of held-out in-domain scores (numpy's linear rule).

    Raises:
        GateError: no scores, non-finite scores, or a percentile outside (0, 100].
    """
    scores = np.asarray(scores, dtype=np.float64)
    if not 0 < percentile <= 100:
        raise GateError(f"the gate percentile must be in (0, 100], got {percentile}")
    if len(scores) == 0 or not np.isfinite(scores).all():
        raise GateError("the validation part gave no usable gate scores (empty or not finite)")
    return float(np.percentile(scores, percentile))


def save_gate(gate: OodGate, model_dir: Path) -> Path:
    """Write `ood_gate.safetensors` into a model folder (atomically); returns its path."""
    path = Path(model_dir) / GATE_FILE
    tmp = path.with_name(f".{GATE_FILE}.tmp")
    # float32 on disk halves the file (efficientnet_b3: 9 MB instead of 19); the distances
    # are computed in float64 after loading.
    save_file({"class_means": np.ascontiguousarray(gate.class_means, dtype=np.float32),
               "precision": np.ascontiguousarray(gate.precision, dtype=np.float32),
               "class_indices": np.ascontiguousarray(gate.class_indices, dtype=np.int64)},
              str(tmp), metadata={
                  "weights_sha256": gate.weights_sha256, "shrinkage": repr(gate.shrinkage),
                  "n_images": str(gate.n_images),
                  "classes": json.dumps([CLASS_CODES[int(k)] for k in gate.class_indices]),
                  "score": "smallest Mahalanobis distance to a class mean (skinsense.trust.gate)"})
    tmp.replace(path)
    return path


def load_gate(model_dir: Path, *, weights_sha256: str | None = None) -> tuple[OodGate | None, str]:
    """The gate of a model folder, or None and why not.

    Args:
        model_dir: a model folder.
        weights_sha256: the folder's current weights; a gate fitted on other weights is
            refused (a retraining into the same folder would otherwise keep a stale gate).

    Returns:
        (gate, '') or (None, reason): `ABSENT` when the folder has no gate file (a model
        from before the gate existed); the reason in words when the file is stale.
    """
    path = Path(model_dir) / GATE_FILE
    if not path.is_file():
        return None, ABSENT
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
        recorded = metadata.get("weights_sha256", "")
        if weights_sha256 is not None and recorded != weights_sha256:
            return None, (f"{GATE_FILE} was fitted on other weights than the current ones; "
                          f"evaluate the model again to refit it")
        return OodGate(class_means=tensors["class_means"], precision=tensors["precision"],
                       class_indices=tensors["class_indices"], weights_sha256=recorded,
                       shrinkage=float(metadata.get("shrinkage", "nan")),
                       n_images=int(metadata.get("n_images", "0"))), ""
    except Exception as exc:  # noqa: BLE001 - any damage: safetensors, keys, shapes
        # A damaged gate file must not stop the model from serving: it serves without the
        # gate, and the app and /health say so.
        return None, (f"{GATE_FILE} could not be read ({type(exc).__name__}: {exc}); "
                      f"evaluate the model again to refit it")
