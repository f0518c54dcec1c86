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

Distances are exact whatever the features' scale and offset: each image's difference to a
class mean is taken first and projected afterwards (in float64), never expanded as
|x|^2 - 2 x.m + |m|^2, which loses every digit when the features are far from the origin
compared with their spread (issue 19: squared distances came out as multiples of 256).

A gate can only judge when the features vary. `OodGate.relative_spread` is the smallest
standard deviation of the shrunk covariance (the square root of its smallest eigenvalue)
over the features' RMS magnitude. Float32 features carry about 7 digits, and ONNX Runtime,
PyTorch, a CPU and a GPU compute them to within a few roundings of each other (measured
about 1e-6 of their magnitude); below `MIN_RELATIVE_SPREAD` (1e-3, 10^4 roundings) the
distances along some direction measure those roundings rather than the image, and the
fitted gate is `unusable_reason`'s to report (the evaluation records it in the card as
`ood_gate.status: "unusable"`, and the app then serves without the gate and says so).

`fit_gate` and `choose_threshold` are plain numpy in, numpy out. `save_gate` writes the means
and the precision matrix (the inverse of the shrunk covariance) to `ood_gate.safetensors` in
the model folder, in float64 (the distances the threshold was chosen on are the ones served),
with the SHA-256 of the weights they were computed from; the threshold and the percentile go
into the model card (`ood_threshold`, `ood_percentile`). Nothing is pickled. This module
imports neither prefect, mlflow nor gradio.
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


# Smallest relative spread of the features a gate can judge on (see the module docstring).
MIN_RELATIVE_SPREAD = 1e-3
# Rows of features whose distances are computed at once: (rows x classes x D) float64.
_CHUNK_ROWS = 256


class GateError(ValueError):
    """The gate cannot be fitted or used as asked; the message says why."""


class GateDamagedError(GateError):
    """The gate file is there but cannot be used (unreadable, or fitted on other weights).

    Not the same as no gate: a model folder with a damaged gate is broken, and serving it
    without saying so would pass its images unchecked as if it were an older model.
    """


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
        relative_spread: the smallest standard deviation of the shrunk covariance over the
            features' RMS magnitude (NaN when unknown: a gate file from before it was kept).
    """

    class_means: np.ndarray
    precision: np.ndarray
    class_indices: np.ndarray
    weights_sha256: str = ""
    shrinkage: float = float("nan")
    n_images: int = 0
    relative_spread: float = float("nan")

    def __post_init__(self) -> None:
        k, d = self.class_means.shape
        if self.precision.shape != (d, d) or self.class_indices.shape != (k,):
            raise GateError(f"inconsistent gate: means {self.class_means.shape}, precision "
                            f"{self.precision.shape}, classes {self.class_indices.shape}")
        # P = L L^T, so (x - m)^T P (x - m) = |(x - m) L|^2. float64: distances of
        # 1,000-dimensional vectors lose digits quickly in float32.
        try:
            lower = np.linalg.cholesky(self.precision.astype(np.float64))
        except np.linalg.LinAlgError as exc:
            raise GateError("the gate's precision matrix is not positive definite (the "
                            "features barely vary); no distances can be computed") from exc
        object.__setattr__(self, "_lower", lower)
        object.__setattr__(self, "_means", self.class_means.astype(np.float64))

    @property
    def feature_dim(self) -> int:
        """D, the length of the feature vectors the gate takes."""
        return int(self.class_means.shape[1])

    def distances(self, features: np.ndarray) -> np.ndarray:
        """(N, K) Mahalanobis distance of each feature vector to each class mean."""
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise GateError(f"features must be (N, {self.feature_dim}), got {features.shape}")
        # The difference to each mean first, then the projection: the subtraction is one
        # rounding of the result, so the relative error stays near float64's whatever the
        # features' offset and scale.
        out = np.empty((len(features), len(self._means)))
        for start in range(0, len(features), _CHUNK_ROWS):
            rows = features[start:start + _CHUNK_ROWS]
            differences = rows[:, None, :] - self._means[None, :, :]
            out[start:start + len(rows)] = np.linalg.norm(differences @ self._lower, axis=2)
        return out

    def scores(self, features: np.ndarray) -> np.ndarray:
        """(N,) the gate score of each image: its smallest Mahalanobis distance to a class
        mean. Larger is further from the training images."""
        return self.distances(features).min(axis=1)

    @property
    def unusable_reason(self) -> str:
        """Why the features are too uniform for this gate to judge ('' when they are not)."""
        if not self.relative_spread < MIN_RELATIVE_SPREAD:  # NaN (unknown) passes
            return ""
        return (f"the model's features barely vary: their smallest standard deviation is "
                f"{self.relative_spread:.2g} of their magnitude, under the "
                f"{MIN_RELATIVE_SPREAD:g} a gate needs, so its distances would measure float32 "
                f"rounding, not the image")


def fit_gate(features: np.ndarray, labels: np.ndarray, *, weights_sha256: str = "") -> OodGate:
    """Class means and the Ledoit-Wolf shared precision of training features.

    Args:
        features: (N, D) penultimate features of the training images.
        labels: (N,) their class indices (`CLASS_CODES` order).
        weights_sha256: the weights the features came from (`skinsense.lifecycle.export.weights_sha256`),
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
                   n_images=len(features),
                   relative_spread=relative_spread(estimator.covariance_, features))


def relative_spread(covariance: np.ndarray, features: np.ndarray) -> float:
    """The smallest standard deviation of `covariance` over the RMS magnitude of `features`
    (0 when the features are all zero): how far the gate's least varying direction is above
    the features' float32 resolution (see the module docstring)."""
    smallest = float(np.linalg.eigvalsh(np.asarray(covariance, dtype=np.float64))[0])
    magnitude = float(np.sqrt(np.mean(np.square(features))))
    if magnitude == 0.0:
        return 0.0
    return float(np.sqrt(max(smallest, 0.0)) / magnitude)


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
    # float64 on disk (efficientnet_b3: 19 MB beside 49 MB of weights): in float32 the
    # means of features that vary little compared with their magnitude lose the digits the
    # distances are made of, and the served scores would differ from those the threshold
    # was chosen on.
    save_file({"class_means": np.ascontiguousarray(gate.class_means, dtype=np.float64),
               "precision": np.ascontiguousarray(gate.precision, dtype=np.float64),
               "class_indices": np.ascontiguousarray(gate.class_indices, dtype=np.int64)},
              str(tmp), metadata={
                  "weights_sha256": gate.weights_sha256, "shrinkage": repr(gate.shrinkage),
                  "n_images": str(gate.n_images), "relative_spread": repr(gate.relative_spread),
                  "classes": json.dumps([CLASS_CODES[int(k)] for k in gate.class_indices]),
                  "score": "smallest Mahalanobis distance to a class mean (skinsense.trust.gate)"})
    tmp.replace(path)
    return path


def load_gate(model_dir: Path, *, weights_sha256: str | None = None) -> tuple[OodGate | None, str]:
    """The gate of a model folder, or None when it has none.

    Args:
        model_dir: a model folder.
        weights_sha256: the folder's current weights; a gate fitted on other weights is
            refused (a retraining into the same folder would otherwise keep a stale gate).

    Returns:
        (gate, '') or (None, `ABSENT`) when the folder has no gate file (a model from before
        the gate existed).

    Raises:
        GateDamagedError: the file is there but unreadable, or stale; the message says which
            and what to do. The caller decides what a damaged gate means (the app: keep the
            served version at a reload, say so on the page at a cold start).
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
        gate = OodGate(class_means=tensors["class_means"], precision=tensors["precision"],
                       class_indices=tensors["class_indices"], weights_sha256=recorded,
                       shrinkage=float(metadata.get("shrinkage", "nan")),
                       n_images=int(metadata.get("n_images", "0")),
                       relative_spread=float(metadata.get("relative_spread", "nan")))
    except Exception as exc:  # noqa: BLE001 - any damage: safetensors, keys, shapes
        raise GateDamagedError(f"{GATE_FILE} could not be read ({type(exc).__name__}: {exc}); "
                               f"evaluate the model again to refit it") from exc
    if weights_sha256 is not None and recorded != weights_sha256:
        raise GateDamagedError(f"{GATE_FILE} was fitted on other weights than the current "
                               f"ones; evaluate the model again to refit it")
    return gate, ""
