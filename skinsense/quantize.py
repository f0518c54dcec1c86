"""int8 ONNX export of a model folder, and the parity rule that decides whether it is served.

`export_int8` writes `model.int8.onnx` beside `model.onnx`: ONNX Runtime's static
quantization (`quantize_static`, QDQ format, per-channel int8 weights, uint8 activations)
after `quant_pre_process` (shape inference and graph clean-up), calibrated on a few hundred
images of the *validation* part (never the test part). The graph keeps both outputs of the
fp32 export, `logits` and `features`, so the out-of-domain gate costs no second pass; the
head (global pooling to both outputs) stays in float (`head_nodes` says why).

`compare_int8` measures the int8 model beside the fp32 export on the test part and on the
non-dermatoscopic reference photos (`skinsense.evaluation.ood_reference`): balanced accuracy, ECE after
the card's temperature, the referral rule's sensitivity and specificity, the gate's verdict
agreement, and the CPU latency of both at batch 1. `parity_verdict` is the rule; its result
goes into the model card (`ModelCard.int8`), and `serving_precision` reads it back for the
predictor and the pyfunc. int8 is served only when, on the test part:

- its balanced accuracy is at most 0.5 points below fp32's (`MAX_BALANCED_ACCURACY_DROP`);
- its referral sensitivity is not lower than fp32's;
- the gate's verdicts agree with fp32's on at least 99% of the test images and 99% of the
  reference photos (`MIN_GATE_AGREEMENT`);
- its referral specificity is at most a point lower, and its top class is fp32's on at
  least 95% of the test images (`MAX_SPECIFICITY_DROP`, `MIN_TOP_CLASS_AGREEMENT`: a model
  that refers everyone, or a weak one whose balanced accuracy comes out equal with every
  answer changed, passes the first three);
- and it is faster: at least `min_speedup` times fp32's latency (EfficientNets, all
  depthwise convolutions and squeeze-excitation, gain nothing on some CPUs; bench/RESULTS.md).

Otherwise fp32 is served and the card, `/health` and the app's footer say why. An operator
can force either with `ServeConfig.precision`.

Exporter: the int8 model is quantized from the same torch.export-based (dynamo) export as
`model.onnx`. With torch 2.14.1 and onnxruntime 1.32 that graph quantizes completely (every
Conv becomes a QLinearConv, the SiLU and squeeze-excitation products QLinearSigmoid and
QLinearMul, the head a QGemm, no Conv left in float), so the TorchScript exporter, which
some reports recommend because of wrong conv-bias shapes in older dynamo exports, is not
needed; `tests/test_quantize.py` checks the fused graph for every production architecture.
"""

from __future__ import annotations

import logging
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel

from skinsense.data.records import CachedSplit
from skinsense.lifecycle.export import (
    FEATURES_NAME,
    INPUT_NAME,
    ONNX_FILE,
    OUTPUT_NAME,
    WEIGHTS_SHA256_KEY,
    cpu_threads,
    export_onnx,
    onnx_session,
    weights_sha256,
)
from skinsense.lifecycle.packaging import ModelCard, load_card

if TYPE_CHECKING:
    import torch

    from skinsense.trust.gate import OodGate

log = logging.getLogger(__name__)

INT8_FILE = "model.int8.onnx"
PRECISION_KEY = "skinsense.precision"
CALIBRATION_KEY = "skinsense.calibration"
Precision = Literal["auto", "int8", "fp32"]
# The parity rule (issue 23): half a point of balanced accuracy is below what two training
# seeds of the same model differ by; a lower referral sensitivity would miss cancers the
# fp32 model catches; a gate that flips more than 1 verdict in 100 is a different gate.
MAX_BALANCED_ACCURACY_DROP = 0.005
MIN_GATE_AGREEMENT = 0.99
# Two guards beyond those three. A model that refers everyone has a perfect sensitivity, and
# a weak model's balanced accuracy can come out equal with every answer changed (a test with
# the classifier turned around showed both): the specificity may drop by at most a point,
# and the top class must be the same on at least 95% of the test images.
MAX_SPECIFICITY_DROP = 0.01
MIN_TOP_CLASS_AGREEMENT = 0.95
# int8 that is not clearly faster only adds a second model to trust.
DEFAULT_MIN_SPEEDUP = 1.1


class QuantizationError(RuntimeError):
    """The int8 export cannot be made or checked; the message says why and what to do."""


def normalized(images: np.ndarray, card: ModelCard) -> np.ndarray:
    """uint8 (N, H, W, 3) images -> the model's float32 (N, 3, H, W) input.

    The evaluation preset's arithmetic in numpy (pixel minus 255 x mean, over 255 x std),
    the same float32 values the predictor feeds ONNX Runtime.
    """
    mean = (np.asarray(card.mean, dtype=np.float32) * np.float32(255.0)).reshape(1, 3, 1, 1)
    std = (np.asarray(card.std, dtype=np.float32) * np.float32(255.0)).reshape(1, 3, 1, 1)
    x = np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2)).astype(np.float32)
    x -= mean
    x /= std
    return x


def calibration_rows(n_available: int, n_images: int, seed: int) -> np.ndarray:
    """A seeded random choice of `n_images` rows (all when there are fewer), in order."""
    if n_available <= n_images:
        return np.arange(n_available)
    return np.sort(np.random.default_rng(seed).choice(n_available, n_images, replace=False))


def _calibration_reader(images: np.ndarray, rows: np.ndarray, card: ModelCard, batch_size: int):
    from onnxruntime.quantization import CalibrationDataReader

    class CachedPartReader(CalibrationDataReader):
        """Batches of the chosen validation images, normalized as served."""

        def __init__(self) -> None:
            self._starts = iter(range(0, len(rows), batch_size))

        def get_next(self) -> dict[str, np.ndarray] | None:
            start = next(self._starts, None)
            if start is None:
                return None
            return {INPUT_NAME: normalized(images[rows[start:start + batch_size]], card)}

    return CachedPartReader()


# Where the head begins: the global pooling that turns the last feature map into a vector.
_POOLING = {"GlobalAveragePool", "ReduceMean", "AveragePool", "GlobalMaxPool"}
_HEAD_LIMIT = 40  # nodes; a head that long is not a head (then only the outputs' producers)


def head_nodes(model) -> list[str]:
    """Names of the nodes from the global pooling to the outputs (`logits`, `features`).

    They are left in float: quantizing the pooled vector rounds every feature to one of 256
    levels of a single scale, and the out-of-domain gate's Mahalanobis distances (with a
    precision matrix over 1,280-1,536 dimensions) turn that rounding into flipped verdicts
    (95% agreement on a demo model, bench/RESULTS.md). The pooling averages the last int8
    feature map in float, which gives back most of the resolution; the head's few
    multiply-adds cost nothing.
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    chosen: dict[str, Any] = {}
    pending = [producers[o] for o in (OUTPUT_NAME, FEATURES_NAME) if o in producers]
    while pending:
        node = pending.pop()
        if node.name in chosen or node.op_type == "Conv":
            continue
        chosen[node.name] = node
        if len(chosen) > _HEAD_LIMIT:
            return [producers[o].name for o in (OUTPUT_NAME, FEATURES_NAME) if o in producers]
        if node.op_type not in _POOLING:
            pending += [producers[i] for i in node.input if i in producers]
    return list(chosen)


def export_int8(model_dir: Path, calibration: CachedSplit, *, n_images: int = 300,
                batch_size: int = 16, seed: int = 0, model: torch.nn.Module | None = None,
                card: ModelCard | None = None) -> Path:
    """Quantize a model folder's network to int8 and write `model.int8.onnx` (and the fp32
    `model.onnx` it was quantized from) into the folder.

    Args:
        model_dir: a model folder (weights.safetensors + model_card.json).
        calibration: the cached validation part at the model's size (never the test part:
            the int8 model is then judged on the test part).
        n_images: how many validation images set the activation ranges (a seeded random
            choice; ONNX Runtime's MinMax calibration).
        batch_size: images per calibration batch.
        seed: seed of the choice.
        model, card: the folder's network (on the CPU) and card, when the caller has them
            loaded already (the evaluate stage); None reads them from the folder.

    Returns:
        The path of `model.int8.onnx` (input `image`, outputs `logits` and `features`, as the
        fp32 export; metadata: the weights' SHA-256, `skinsense.precision` int8, and how it
        was calibrated).

    Raises:
        QuantizationError: the part is empty or at another size, or the quantized graph lost
            an output. No partial file is left behind.
    """
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model_dir = Path(model_dir)
    card = card if card is not None else load_card(model_dir)
    if calibration.size != card.image_size:
        raise QuantizationError(
            f"the calibration part holds {calibration.size} px images but {model_dir} takes "
            f"{card.image_size} px; pass the validation cache at {card.image_size} px")
    images = np.load(calibration.images_npy, mmap_mode="r")
    if len(images) == 0:
        raise QuantizationError(f"the calibration part {calibration.images_npy} holds no image")
    rows = calibration_rows(len(images), n_images, seed)
    fp32 = export_onnx(model_dir, model=model, card=card if model is not None else None)
    out_path = model_dir / INT8_FILE
    with tempfile.TemporaryDirectory(prefix="skinsense-int8-") as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(fp32), str(prepared))
        quantize_static(str(prepared), str(quantized),
                        _calibration_reader(images, rows, card, batch_size),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=head_nodes(onnx.load(str(prepared))))
        model = onnx.load(str(quantized))
        outputs = [o.name for o in model.graph.output]
        if outputs != [OUTPUT_NAME, FEATURES_NAME]:
            raise QuantizationError(f"the quantized graph outputs {outputs}, not "
                                    f"{[OUTPUT_NAME, FEATURES_NAME]}")
        del model.metadata_props[:]
        for key, value in {WEIGHTS_SHA256_KEY: weights_sha256(model_dir),
                           "skinsense.arch": card.arch, PRECISION_KEY: "int8",
                           "skinsense.output": f"{OUTPUT_NAME},{FEATURES_NAME}",
                           CALIBRATION_KEY: f"validation part, {len(rows)} images, seed {seed}, "
                                            f"MinMax"}.items():
            model.metadata_props.add(key=key, value=value)
        tmp_out = out_path.with_name(f".{out_path.name}.tmp")
        try:
            onnx.save(model, str(tmp_out))
            onnx.checker.check_model(str(tmp_out))
            tmp_out.replace(out_path)
        finally:
            tmp_out.unlink(missing_ok=True)
    return out_path


# -- the comparison on the test part -------------------------------------------------------------

class PrecisionFigures(BaseModel):
    """One precision's figures on the test part (None: not defined there)."""

    balanced_accuracy: float
    ece: float
    referral_sensitivity: float | None = None
    referral_specificity: float | None = None
    latency_ms: float | None = None   # batch 1 on this machine's CPU, ONNX Runtime


class Int8Report(BaseModel):
    """int8 beside fp32, and the verdict of the parity rule (what `ModelCard.int8` holds)."""

    fp32: PrecisionFigures
    int8: PrecisionFigures
    n_test: int
    n_reference: int
    # Share of images on which the gate's in/out verdict is the same (None: no gate).
    gate_agreement_test: float | None
    gate_agreement_reference: float | None
    top_class_agreement: float
    speedup: float | None
    threads: int
    calibration: str
    serve: bool
    reason: str
    rule: str = ""

    def metrics(self) -> dict[str, float]:
        """Flat MLflow metrics (`int8_*`)."""
        values: dict[str, Any] = {
            "int8_balanced_accuracy": self.int8.balanced_accuracy,
            "int8_balanced_accuracy_delta": self.int8.balanced_accuracy
            - self.fp32.balanced_accuracy,
            "int8_ece": self.int8.ece,
            "int8_referral_sensitivity": self.int8.referral_sensitivity,
            "int8_referral_specificity": self.int8.referral_specificity,
            "int8_gate_agreement_test": self.gate_agreement_test,
            "int8_gate_agreement_reference": self.gate_agreement_reference,
            "int8_top_class_agreement": self.top_class_agreement,
            "int8_latency_ms": self.int8.latency_ms, "fp32_onnx_latency_ms": self.fp32.latency_ms,
            "int8_speedup": self.speedup, "int8_served": float(self.serve)}
        return {k: float(v) for k, v in values.items() if v is not None and math.isfinite(v)}


RULE = (f"int8 is served only when its test balanced accuracy is at most "
        f"{MAX_BALANCED_ACCURACY_DROP * 100:g} points below fp32's, its referral sensitivity "
        f"is not lower, its referral specificity at most {MAX_SPECIFICITY_DROP * 100:g} "
        f"point lower, its top class is fp32's on at least {MIN_TOP_CLASS_AGREEMENT:.0%} of "
        f"the test images and the out-of-domain gate agrees with fp32's verdict on at least "
        f"{MIN_GATE_AGREEMENT:.0%} of the test images and of the reference photos")


def parity_verdict(fp32: PrecisionFigures, int8: PrecisionFigures, *,
                   gate_agreement_test: float | None, gate_agreement_reference: float | None,
                   speedup: float | None, min_speedup: float = DEFAULT_MIN_SPEEDUP,
                   top_class_agreement: float | None = None) -> tuple[bool, str]:
    """The parity rule: whether int8 may be served, and why (or why not) in words.

    Args:
        fp32, int8: both precisions' figures on the test part.
        gate_agreement_test, gate_agreement_reference: shares of same gate verdicts (None:
            the model has no gate, so there is nothing to disagree on).
        speedup: fp32 latency / int8 latency (None: not measured, not a condition).
        min_speedup: the smallest speed-up worth serving a second model for.
        top_class_agreement: share of test images with the same top class (None: not a
            condition).

    Returns:
        (serve int8, the reason: every failed condition, or the figures that passed).
    """
    failed: list[str] = []
    drop = fp32.balanced_accuracy - int8.balanced_accuracy
    if not drop <= MAX_BALANCED_ACCURACY_DROP + 1e-12:  # NaN fails too
        failed.append(f"balanced accuracy {int8.balanced_accuracy:.4f} is {drop * 100:.2f} "
                      f"points below fp32's {fp32.balanced_accuracy:.4f} (at most "
                      f"{MAX_BALANCED_ACCURACY_DROP * 100:g} allowed)")
    if fp32.referral_sensitivity is not None and not (
            int8.referral_sensitivity is not None
            and int8.referral_sensitivity >= fp32.referral_sensitivity - 1e-12):
        got = ("undefined" if int8.referral_sensitivity is None
               else f"{int8.referral_sensitivity:.4f}")
        failed.append(f"referral sensitivity {got} is below fp32's "
                      f"{fp32.referral_sensitivity:.4f}")
    if fp32.referral_specificity is not None and not (
            int8.referral_specificity is not None
            and int8.referral_specificity >= fp32.referral_specificity - MAX_SPECIFICITY_DROP
            - 1e-12):
        got = ("undefined" if int8.referral_specificity is None
               else f"{int8.referral_specificity:.4f}")
        failed.append(f"referral specificity {got} is more than "
                      f"{MAX_SPECIFICITY_DROP * 100:g} point below fp32's "
                      f"{fp32.referral_specificity:.4f}")
    if top_class_agreement is not None and not top_class_agreement >= MIN_TOP_CLASS_AGREEMENT:
        failed.append(f"the top class is fp32's on only {top_class_agreement:.1%} of the test "
                      f"images (at least {MIN_TOP_CLASS_AGREEMENT:.0%} needed)")
    for where, agreement in (("test images", gate_agreement_test),
                             ("reference photos", gate_agreement_reference)):
        if agreement is not None and not agreement >= MIN_GATE_AGREEMENT:
            failed.append(f"the gate's verdicts agree with fp32's on only {agreement:.1%} of "
                          f"the {where} (at least {MIN_GATE_AGREEMENT:.0%} needed)")
    if speedup is not None and not speedup >= min_speedup:
        failed.append(f"int8 is not faster on this CPU ({speedup:.2f}x fp32's speed, at least "
                      f"{min_speedup:g}x needed)")
    if failed:
        return False, "int8 refused: " + "; ".join(failed)
    gate = ("no gate" if gate_agreement_test is None else
            f"gate verdicts agree on {gate_agreement_test:.1%} of test images and "
            f"{(gate_agreement_reference or 0):.1%} of reference photos")
    referral = ("" if int8.referral_sensitivity is None else
                f", referral sensitivity {int8.referral_sensitivity:.4f} (fp32 "
                f"{fp32.referral_sensitivity:.4f})")
    speed = "" if speedup is None else f", {speedup:.2f}x fp32's speed"
    return True, (f"int8 agrees with fp32: balanced accuracy {int8.balanced_accuracy:.4f} "
                  f"(fp32 {fp32.balanced_accuracy:.4f}){referral}, {gate}{speed}")


def _session_outputs(session, images: np.ndarray, card: ModelCard, batch_size: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    logits, features = [], []
    for start in range(0, len(images), batch_size):
        out = session.run([OUTPUT_NAME, FEATURES_NAME],
                          {INPUT_NAME: normalized(images[start:start + batch_size], card)})
        logits.append(out[0])
        features.append(out[1])
    return np.concatenate(logits), np.concatenate(features)


def _figures(y_true: np.ndarray, logits: np.ndarray, card: ModelCard) -> PrecisionFigures:
    from sklearn.metrics import balanced_accuracy_score

    from skinsense.evaluation.metrics import expected_calibration_error
    from skinsense.trust.calibration import calibrated_probabilities
    from skinsense.trust.referral import is_malignant, referral_scores

    probabilities = calibrated_probabilities(logits, card.temperature)
    figures = {"balanced_accuracy": float(balanced_accuracy_score(
                   y_true, probabilities.argmax(axis=1))),
               "ece": expected_calibration_error(y_true, probabilities)}
    if card.referral_threshold is not None:
        malignant = is_malignant(y_true)
        referred = referral_scores(probabilities) >= card.referral_threshold
        if malignant.any():
            figures["referral_sensitivity"] = float(referred[malignant].mean())
        if (~malignant).any():
            figures["referral_specificity"] = float((~referred[~malignant]).mean())
    return PrecisionFigures(**figures)


def latency_ms(sessions: dict[str, Any], image: np.ndarray, *, repeats: int = 15,
               warmup: int = 3) -> dict[str, float]:
    """Median batch-1 latency of each session, the sessions interleaved in every round so
    that both see the same machine load."""
    feed = {INPUT_NAME: image}
    for _ in range(warmup):
        for session in sessions.values():
            session.run(None, feed)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(repeats):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feed)
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def reference_pixels(size: int) -> np.ndarray:
    """The reference photos squashed to the model's input as the cache and the app do."""
    from skinsense.data.cache import resize_square
    from skinsense.evaluation.ood_reference import non_dermatoscopic_images

    return np.stack([np.asarray(resize_square(image, size))
                     for _, image in non_dermatoscopic_images()])


def _gate_agreement(gate, threshold: float, a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((gate.scores(a) <= threshold) == (gate.scores(b) <= threshold)))


def compare_int8(model_dir: Path, test: CachedSplit, *, batch_size: int = 32,
                 min_speedup: float = DEFAULT_MIN_SPEEDUP, timing_repeats: int = 15,
                 threads: int | None = None, card: ModelCard | None = None,
                 gate: OodGate | None = None) -> Int8Report:
    """Measure `model.int8.onnx` beside `model.onnx` on the test part and the reference photos.

    Both run in ONNX Runtime on the CPU, so the comparison is the one serving faces. The
    card's temperature, referral threshold and gate (all fitted on fp32 validation outputs)
    apply to both.

    Args:
        model_dir: a model folder holding both exports (see `export_int8`).
        test: the cached test part at the model's size.
        batch_size: images per run.
        min_speedup: see `parity_verdict`.
        timing_repeats: timed batch-1 runs of each precision (the median is kept).
        threads: ONNX Runtime threads (default: every core this process may use).
        card, gate: the card and the fitted gate when the caller holds them in memory (the
            evaluate stage, before it writes them); None reads them from the folder.

    Returns:
        The report, with the verdict of `parity_verdict`.

    Raises:
        QuantizationError: an export is missing or was made from other weights.
    """
    from skinsense.trust.gate import load_gate

    model_dir = Path(model_dir)
    card = card if card is not None else load_card(model_dir)
    sha = weights_sha256(model_dir)
    threads = threads or cpu_threads()
    sessions = {}
    for name, file in (("fp32", ONNX_FILE), ("int8", INT8_FILE)):
        if not (model_dir / file).is_file():
            raise QuantizationError(f"{model_dir} holds no {file}; run export_int8 first")
        sessions[name] = onnx_session(model_dir / file, threads=threads)
        if sessions[name].get_modelmeta().custom_metadata_map.get(WEIGHTS_SHA256_KEY) != sha:
            raise QuantizationError(f"{model_dir / file} was not exported from the current "
                                    f"weights; run export_int8 again")
    images = np.load(test.images_npy, mmap_mode="r")
    y_true = np.load(test.labels_npy)
    if len(y_true) == 0:
        raise QuantizationError(f"the test part {test.images_npy} holds no image")
    reference = reference_pixels(card.image_size)
    outputs = {name: (_session_outputs(s, images, card, batch_size),
                      _session_outputs(s, reference, card, batch_size))
               for name, s in sessions.items()}
    (fp32_logits, fp32_features), (_, fp32_ref_features) = outputs["fp32"]
    (int8_logits, int8_features), (_, int8_ref_features) = outputs["int8"]
    fp32, int8 = _figures(y_true, fp32_logits, card), _figures(y_true, int8_logits, card)
    if gate is None:
        gate, _ = load_gate(model_dir, weights_sha256=sha)
    agreement_test = agreement_reference = None
    if gate is not None and card.ood_threshold is not None:
        agreement_test = _gate_agreement(gate, card.ood_threshold, fp32_features, int8_features)
        agreement_reference = _gate_agreement(gate, card.ood_threshold, fp32_ref_features,
                                              int8_ref_features)
    speed = latency_ms(sessions, normalized(images[:1], card), repeats=timing_repeats)
    fp32.latency_ms, int8.latency_ms = speed["fp32"], speed["int8"]
    speedup = speed["fp32"] / speed["int8"]
    top_class_agreement = float(np.mean(fp32_logits.argmax(1) == int8_logits.argmax(1)))
    serve, reason = parity_verdict(fp32, int8, gate_agreement_test=agreement_test,
                                   gate_agreement_reference=agreement_reference,
                                   speedup=speedup, min_speedup=min_speedup,
                                   top_class_agreement=top_class_agreement)
    meta = sessions["int8"].get_modelmeta().custom_metadata_map
    return Int8Report(
        fp32=fp32, int8=int8, n_test=len(y_true), n_reference=len(reference),
        gate_agreement_test=agreement_test, gate_agreement_reference=agreement_reference,
        top_class_agreement=top_class_agreement,
        speedup=speedup, threads=threads, calibration=meta.get(CALIBRATION_KEY, ""),
        serve=serve, reason=reason,
        rule=RULE + (f", and it is at least {min_speedup:g}x as fast" if min_speedup else ""))


# -- which precision to serve ---------------------------------------------------------------

def serving_precision(card: ModelCard, requested: Precision = "auto") -> tuple[str, str]:
    """The precision the card's evaluation allows, and why, before any file is opened.

    Args:
        card: the model card (its `int8` record comes from `compare_int8`).
        requested: `ServeConfig.precision`: 'auto' follows the card; 'int8' or 'fp32' force
            one.

    Returns:
        ('int8' or 'fp32', the reason in words).
    """
    if requested == "fp32":
        return "fp32", "fp32 forced by serve.precision"
    verdict = card.int8
    if requested == "int8":
        judged = (f" (evaluation said: {verdict.get('reason')})" if verdict else
                  " (never compared with fp32)")
        return "int8", "int8 forced by serve.precision" + judged
    if not verdict:
        return "fp32", (f"no int8 comparison in the model card: {INT8_FILE} is made and "
                        f"checked at evaluation")
    if not verdict.get("serve"):
        return "fp32", str(verdict.get("reason") or "int8 refused at evaluation")
    return "int8", str(verdict.get("reason", ""))
