"""int8 serving: the export, the parity rule that decides whether it is served, and the
runtime that serves concurrent requests without a lock."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from skinsense import quantize
from skinsense.lifecycle.packaging import ModelCard
from skinsense.quantize import (
    INT8_FILE,
    MAX_BALANCED_ACCURACY_DROP,
    PrecisionFigures,
    parity_verdict,
    serving_precision,
)

EXAMPLES = sorted((Path(__file__).parents[1] / "skinsense" / "serving" / "examples").glob("*.jpg"))


def figures(balanced_accuracy: float, sensitivity: float | None = 0.95) -> PrecisionFigures:
    return PrecisionFigures(balanced_accuracy=balanced_accuracy, ece=0.05,
                            referral_sensitivity=sensitivity, referral_specificity=0.5)


# -- the rule ---------------------------------------------------------------------------------

def test_int8_within_half_a_point_with_the_same_sensitivity_and_gate_is_served():
    serve, reason = parity_verdict(figures(0.700), figures(0.700 - MAX_BALANCED_ACCURACY_DROP),
                                   gate_agreement_test=0.99, gate_agreement_reference=1.0,
                                   speedup=1.5, top_class_agreement=0.97)
    assert serve, reason
    assert reason.startswith("int8 agrees with fp32") and "1.50x" in reason


def test_a_model_whose_answers_changed_is_refused_whatever_its_scores():
    serve, reason = parity_verdict(figures(0.7), figures(0.7), gate_agreement_test=1.0,
                                   gate_agreement_reference=1.0, speedup=2.0,
                                   top_class_agreement=0.9)
    assert not serve and "top class is fp32's on only 90.0%" in reason


@pytest.mark.parametrize("int8, gate_test, gate_reference, speedup, why", [
    (figures(0.694), 1.0, 1.0, 2.0, "0.60 points below"),
    (figures(0.700, sensitivity=0.94), 1.0, 1.0, 2.0, "referral sensitivity"),
    (figures(0.700, sensitivity=None), 1.0, 1.0, 2.0, "referral sensitivity"),
    (figures(0.710), 0.989, 1.0, 2.0, "98.9% of the test images"),
    (figures(0.710), 1.0, 0.96, 2.0, "96.0% of the reference photos"),
    (figures(0.710), 1.0, 1.0, 1.05, "not faster"),
    (figures(float("nan")), 1.0, 1.0, 2.0, "balanced accuracy"),
    (figures(0.700).model_copy(update={"referral_specificity": 0.48}), 1.0, 1.0, 2.0,
     "referral specificity 0.4800"),
])
def test_int8_that_loses_accuracy_sensitivity_gate_or_speed_is_refused(int8, gate_test,
                                                                       gate_reference, speedup,
                                                                       why):
    serve, reason = parity_verdict(figures(0.700), int8, gate_agreement_test=gate_test,
                                   gate_agreement_reference=gate_reference, speedup=speedup)
    assert not serve
    assert reason.startswith("int8 refused: ") and why in reason, reason


def test_a_model_without_gate_or_referral_rule_is_judged_on_what_it_has():
    serve, reason = parity_verdict(figures(0.7, None), figures(0.7, None),
                                   gate_agreement_test=None, gate_agreement_reference=None,
                                   speedup=None)
    assert serve and "no gate" in reason


def test_the_served_precision_follows_the_card_unless_forced():
    card = ModelCard(arch="efficientnet_b0", image_size=224)
    assert serving_precision(card)[0] == "fp32"
    assert "no int8 comparison" in serving_precision(card)[1]
    card.int8 = {"serve": False, "reason": "int8 refused: balanced accuracy ..."}
    assert serving_precision(card) == ("fp32", "int8 refused: balanced accuracy ...")
    assert serving_precision(card, "int8")[0] == "int8"
    assert "forced" in serving_precision(card, "int8")[1]
    card.int8 = {"serve": True, "reason": "int8 agrees with fp32: ..."}
    assert serving_precision(card) == ("int8", "int8 agrees with fp32: ...")
    assert serving_precision(card, "fp32") == ("fp32", "fp32 forced by serve.precision")


# -- the export on the production architectures --------------------------------------------

def random_part(tmp_path: Path, name: str, size: int, n: int, seed: int):
    from skinsense.data.records import CachedSplit

    rng = np.random.default_rng(seed)
    images, labels = tmp_path / f"{name}_images.npy", tmp_path / f"{name}_labels.npy"
    np.save(images, rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8))
    np.save(labels, rng.integers(0, 7, n))
    return CachedSplit(images_npy=images, labels_npy=labels, size=size, n=n)


def fused_op_types(onnx_path: Path) -> Counter:
    """The operators ONNX Runtime actually runs after its graph optimizations."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    optimized = onnx_path.with_name("optimized.onnx")
    options.optimized_model_filepath = str(optimized)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.log_severity_level = 3
    ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    ops = Counter(node.op_type for node in onnx.load(str(optimized)).graph.node)
    optimized.unlink()
    return ops


@pytest.mark.slow
@pytest.mark.parametrize("arch, size", [("efficientnet_b0", 32), ("efficientnet_b3", 32),
                                        ("maxvit_t", 224)])
def test_int8_export_of_the_production_architectures(arch, size, tmp_path):
    """Calibrated on the validation part only, both outputs kept, every Conv runs in int8."""
    import torch

    from skinsense.lifecycle.export import (
        WEIGHTS_SHA256_KEY,
        onnx_session,
        weights_sha256,
    )
    from skinsense.lifecycle.packaging import save_model_dir
    from skinsense.models import build_model

    torch.manual_seed(0)
    model_dir = save_model_dir(build_model(arch, image_size=size),
                               ModelCard(arch=arch, image_size=size), tmp_path / "model")
    val = random_part(tmp_path, "val", size, 12, seed=1)
    path = quantize.export_int8(model_dir, val, n_images=8, batch_size=4)
    assert path == model_dir / INT8_FILE and (model_dir / "model.onnx").is_file()
    session = onnx_session(path)
    assert [o.name for o in session.get_outputs()] == ["logits", "features"]
    meta = session.get_modelmeta().custom_metadata_map
    assert meta[WEIGHTS_SHA256_KEY] == weights_sha256(model_dir)
    assert meta["skinsense.precision"] == "int8"
    assert meta["skinsense.calibration"].startswith("validation part, 8 images")
    # The head stays in float: the features the gate scores are not rounded to 8 bits.
    import onnx

    graph = onnx.load(str(path)).graph
    producers = {out: node.op_type for node in graph.node for out in node.output}
    assert producers["features"] != "DequantizeLinear" and producers["logits"] == "Gemm"
    ops = fused_op_types(path)
    assert ops["QLinearConv"] > 0 and ops["Conv"] == 0, ops   # no Conv left in float
    x = quantize.normalized(np.load(val.images_npy)[:2], ModelCard(arch=arch, image_size=size))
    logits, features = session.run(None, {"image": x})
    assert logits.shape == (2, 7) and features.shape[0] == 2
    assert np.isfinite(logits).all() and np.isfinite(features).all()


def test_the_calibration_part_must_match_the_model(tmp_path):
    from skinsense.lifecycle.packaging import save_model_dir
    from skinsense.models import build_model

    model_dir = save_model_dir(build_model("efficientnet_b0", image_size=32),
                               ModelCard(arch="efficientnet_b0", image_size=32),
                               tmp_path / "model")
    with pytest.raises(quantize.QuantizationError, match="takes 32 px"):
        quantize.export_int8(model_dir, random_part(tmp_path, "val", 64, 4, seed=0))
    assert not (model_dir / INT8_FILE).exists()


def test_calibration_rows_are_a_seeded_subset():
    rows = quantize.calibration_rows(1000, 300, seed=0)
    assert len(rows) == 300 == len(set(rows)) and list(rows) == sorted(rows)
    assert (rows == quantize.calibration_rows(1000, 300, seed=0)).all()
    assert list(quantize.calibration_rows(5, 300, seed=0)) == [0, 1, 2, 3, 4]


# -- a trained production model: the comparison, a forced bad int8, and serving ----------------

@pytest.fixture(scope="module")
def trained_int8(cached_sample, module_tmp):
    """efficientnet_b0 trained briefly at 32 px, calibrated with its gate, quantized on the
    validation part and compared with fp32 on the test part (speed no condition here: timings
    never decide a test)."""
    from skinsense.config import TrainConfig
    from skinsense.evaluation.fit import calibrate_model_dir
    from skinsense.training.loop import fit

    cache, oversampled = cached_sample
    out = module_tmp("int8-model")
    cfg = TrainConfig(archs=["efficientnet_b0"], epochs=3, batch_size=32, lr=3e-3,
                      pretrained=False, num_workers=0, seed=1, progress=False)
    model_dir = fit(cache, "efficientnet_b0", cfg, out_dir=out / "run",
                    class_weights=oversampled.class_weights).model_dir
    calibrate_model_dir(model_dir, cache.val, referral_sensitivity=0.9, train_split=cache.train,
                        gate_percentile=95)
    quantize.export_int8(model_dir, cache.val, n_images=64)
    report = quantize.compare_int8(model_dir, cache.test, min_speedup=0, timing_repeats=3)
    return model_dir, cache, report


def write_verdict(model_dir: Path, report) -> None:
    from skinsense.lifecycle.packaging import load_card, save_card

    card = load_card(model_dir)
    card.int8 = report.model_dump(mode="json")
    save_card(card, model_dir)


@pytest.mark.slow
def test_the_comparison_measures_int8_on_the_test_part(trained_int8):
    from sklearn.metrics import balanced_accuracy_score

    from skinsense.lifecycle.export import onnx_session
    from skinsense.lifecycle.packaging import load_card
    from skinsense.serving.predictor import Predictor

    model_dir, cache, report = trained_int8
    card = load_card(model_dir)
    assert report.n_test == cache.test.n and report.n_reference >= 25
    assert report.calibration.startswith(f"validation part, {min(64, cache.val.n)} images")
    # The int8 figure is what the int8 file computes on the test part.
    images, labels = np.load(cache.test.images_npy), np.load(cache.test.labels_npy)
    logits = onnx_session(model_dir / INT8_FILE).run(["logits"], {
        "image": quantize.normalized(images, card)})[0]
    assert report.int8.balanced_accuracy == pytest.approx(
        balanced_accuracy_score(labels, logits.argmax(1)))
    assert report.gate_agreement_test is not None and report.gate_agreement_reference is not None
    assert report.int8.referral_sensitivity is not None
    # The verdict is the rule applied to the figures, and the predictor follows it.
    assert (report.serve, report.reason) == parity_verdict(
        report.fp32, report.int8, gate_agreement_test=report.gate_agreement_test,
        gate_agreement_reference=report.gate_agreement_reference, speedup=report.speedup,
        min_speedup=0, top_class_agreement=report.top_class_agreement)
    write_verdict(model_dir, report)
    predictor = Predictor.from_model_dir(model_dir)
    assert predictor.precision == ("int8" if report.serve else "fp32")
    assert predictor.precision_note == report.reason


def negate_the_head(int8_path: Path, out_path: Path) -> None:
    """A bad int8 model: the classifier's weight and bias scales negated, so its logits are
    turned around (the best class becomes the worst) and the gate's features are untouched."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(int8_path))
    producers = {out: node for node in model.graph.node for out in node.output}
    initializers = {i.name: i for i in model.graph.initializer}
    gemm = next(node for node in model.graph.node if node.op_type == "Gemm")
    for name in gemm.input[1:3]:
        # A float head (what the export keeps) has its weights as initializers; a quantized
        # one dequantizes them, and negating the scale negates the weights.
        tensor = initializers[name] if name in initializers else initializers[
            producers[name].input[1]]
        tensor.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(tensor), tensor.name))
    onnx.save(model, str(out_path))


@pytest.mark.slow
def test_a_bad_int8_model_is_refused_and_fp32_served_with_the_reason(trained_int8, tmp_path):
    import shutil

    from skinsense.config import ServeConfig
    from skinsense.serving.app import health_state
    from skinsense.serving.loading import LoadedModel
    from skinsense.serving.page import footer_text
    from skinsense.serving.predictor import Predictor
    from skinsense.serving.pyfunc import MODEL_DIR_ARTIFACT, SkinSensePyfunc

    source, cache, good = trained_int8
    model_dir = Path(shutil.copytree(source, tmp_path / "model"))
    negate_the_head(source / INT8_FILE, model_dir / INT8_FILE)
    report = quantize.compare_int8(model_dir, cache.test, min_speedup=0, timing_repeats=3)
    assert not report.serve
    # Every answer turned around: the top class differs everywhere, and whatever the
    # aggregate scores do, the rule sees it.
    assert report.top_class_agreement < quantize.MIN_TOP_CLASS_AGREEMENT
    assert "top class is fp32's on only" in report.reason
    assert report.gate_agreement_test == 1.0  # the features were not touched
    write_verdict(model_dir, report)

    predictor = Predictor.from_model_dir(model_dir)
    assert (predictor.precision, predictor.precision_note) == ("fp32", report.reason)
    loaded = LoadedModel(predictor, model_uri=str(model_dir))
    state = health_state(type("Holder", (), {"current": loaded, "last_check_at": None,
                                             "last_reload_at": None, "reload_error": None})(),
                         ServeConfig())
    assert state["precision"] == "fp32" and state["precision_note"] == report.reason
    assert f"fp32 ({report.reason})" in footer_text(loaded)
    # An operator may still force int8 (and the note says what the evaluation found).
    forced = Predictor.from_model_dir(model_dir, precision="int8")
    assert forced.precision == "int8" and report.reason in forced.precision_note
    # The pyfunc follows the same rule, and takes the same override.
    context = type("Context", (), {"artifacts": {MODEL_DIR_ARTIFACT: str(model_dir)},
                                   "model_config": {}})()
    pyfunc = SkinSensePyfunc()
    pyfunc.load_context(context)
    assert pyfunc.predictor.precision == "fp32"
    context.model_config = {"precision": "int8"}
    pyfunc.load_context(context)
    assert pyfunc.predictor.precision == "int8"
    context.model_config = {"precision": "fast"}
    with pytest.raises(ValueError, match="'auto', 'int8' or 'fp32'"):
        pyfunc.load_context(context)


@pytest.mark.slow
def test_forcing_int8_without_a_usable_export_says_why(trained_int8, tmp_path):
    import shutil

    from skinsense.serving.predictor import Predictor

    source, _, good = trained_int8
    model_dir = Path(shutil.copytree(source, tmp_path / "model"))
    (model_dir / INT8_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="no model.int8.onnx"):
        Predictor.from_model_dir(model_dir, precision="int8")
    # auto, with a card that allowed int8 but no file: fp32, and the note says so.
    card_good = good.model_copy(update={"serve": True})
    write_verdict(model_dir, card_good)
    predictor = Predictor.from_model_dir(model_dir)
    assert predictor.precision == "fp32" and "no model.int8.onnx" in predictor.precision_note


# -- the runtime --------------------------------------------------------------------------------

@pytest.mark.slow
def test_concurrent_requests_run_without_a_lock_and_agree_with_one_alone(trained_int8,
                                                                         monkeypatch):
    from skinsense.serving import runtime
    from skinsense.serving.predictor import Predictor

    model_dir, _, _ = trained_int8
    monkeypatch.setattr(runtime, "cpu_threads", lambda: 4)
    predictor = Predictor.from_model_dir(model_dir, precision="int8")
    runner = predictor.session
    assert runner.describe() == {"threads": 4, "concurrent_threads": 1, "concurrency": 4}
    assert runner.narrow is not runner.wide
    images = [EXAMPLES[0].read_bytes(), EXAMPLES[1].read_bytes()]
    alone = [predictor.assess(image).probabilities for image in images]
    # The first request stops inside its run; the second must still be answered meanwhile
    # (by the narrow session), which no lock around the session would allow.
    entered, release = threading.Event(), threading.Event()
    wide_run = runner.wide.run

    def held_run(*args):
        entered.set()
        assert release.wait(60)
        return wide_run(*args)

    monkeypatch.setattr(runner.wide, "run", held_run)
    results: dict[int, dict] = {}

    def work(i: int) -> None:
        results[i] = predictor.assess(images[i]).probabilities

    first = threading.Thread(target=work, args=(0,))
    first.start()
    assert entered.wait(60)
    second = threading.Thread(target=work, args=(1,))
    second.start()
    second.join(timeout=60)
    finished_while_held = not second.is_alive()
    release.set()
    first.join(timeout=60)
    second.join(timeout=60)
    assert finished_while_held
    for i in (0, 1):
        assert results[i] == pytest.approx(alone[i], abs=1e-6)


def test_threads_and_concurrency_come_from_the_cores_unless_set(monkeypatch):
    from skinsense.serving import runtime

    monkeypatch.setattr(runtime, "cpu_threads", lambda: 6)
    assert runtime.serving_threads() == 6 and runtime.serving_concurrency() == 6
    assert runtime.serving_threads(2) == 2 and runtime.serving_concurrency(3) == 3
