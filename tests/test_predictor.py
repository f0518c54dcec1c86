"""The predictor classifies real images and refuses bad input with a clear message."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from skinsense.lifecycle.packaging import ModelCard, save_model_dir
from skinsense.models import build_model
from skinsense.serving.app import EXAMPLES_DIR
from skinsense.serving.explain import explain_image
from skinsense.serving.predictor import ImageRejected, Predictor


@pytest.fixture(scope="module")
def predictor(module_tmp):
    from random_models import calibrated_model

    # Batch-norm statistics from one batch: its answers depend on the image (a freshly
    # initialised network gives nearly the same probabilities for every input).
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = calibrated_model("resnet18", 64)
    model_dir = save_model_dir(model, ModelCard(arch="resnet18", image_size=64),
                               module_tmp("model"))
    return Predictor.from_model_dir(model_dir)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def real_sample() -> Image.Image:
    return Image.open(sorted(EXAMPLES_DIR.glob("*.jpg"))[0])


def test_real_image_gives_seven_probabilities(predictor):
    probabilities = predictor.classify(sorted(EXAMPLES_DIR.glob("*.jpg"))[0])
    assert list(probabilities) == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("fmt,mode,lossless", [("PNG", "RGBA", True), ("WEBP", "RGB", False),
                                               ("PNG", "L", True), ("JPEG", "L", False)])
def test_other_formats_and_modes_are_classified(predictor, fmt, mode, lossless):
    """Each file gets the probabilities of the RGB picture it holds: an opaque RGBA image
    those of the RGB one, a grey image those of its grey pixels in RGB (a lossy format
    within its compression's reach)."""
    def probabilities(data: bytes) -> np.ndarray:
        return np.array(list(predictor.classify(data).values()))

    image = real_sample()
    expected = probabilities(encode(image.convert(mode).convert("RGB"), "PNG"))
    got = probabilities(encode(image.convert(mode), fmt))
    np.testing.assert_allclose(got, expected, atol=1e-6 if lossless else 0.01)
    # The comparison means something: another image's probabilities differ by more.
    other = probabilities(encode(Image.open(sorted(EXAMPLES_DIR.glob("*.jpg"))[1]), "PNG"))
    assert np.abs(other - expected).max() > 0.03


def test_exif_rotation_is_applied(predictor):
    image = real_sample()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    rotated_file = encode(image, "JPEG", quality=95, exif=exif)
    upright = encode(image.transpose(Image.Transpose.ROTATE_270), "JPEG", quality=95)
    a, b = predictor.preprocess([rotated_file]), predictor.preprocess([upright])
    assert float((a - b).abs().mean()) < 0.05


@pytest.mark.parametrize("data,message", [
    (b"this is not an image", "not a readable image"),
    (encode(Image.new("RGB", (1, 1)), "PNG"), "at least"),
])
def test_bad_input_is_refused_with_a_clear_message(predictor, data, message):
    with pytest.raises(ImageRejected, match=message):
        predictor.classify(data)


def test_truncated_jpeg_is_refused(predictor):
    data = encode(real_sample(), "JPEG")
    with pytest.raises(ImageRejected, match="not a readable image"):
        predictor.classify(data[: len(data) // 2])


def test_decompression_bomb_is_refused_before_decoding(predictor):
    bomb = encode(Image.new("L", (20000, 20000)), "PNG", optimize=True)
    with pytest.raises(ImageRejected, match="too large"):
        predictor.classify(bomb)


def test_served_preprocessing_matches_the_cache(predictor, tmp_path):
    import pandas as pd

    from skinsense.data.cache import build_split_cache

    path = sorted(EXAMPLES_DIR.glob("*.jpg"))[0]
    manifest = pd.DataFrame({"image_path": [str(path)], "dx": ["nv"]})
    cached = build_split_cache(manifest, size=64, out_dir=tmp_path, name="one", workers=1)
    from_cache = np.load(cached.images_npy)[0]
    served = predictor.preprocess([path])
    expected = predictor._preset(torch.from_numpy(from_cache[None]).permute(0, 3, 1, 2))
    assert float((served - expected).abs().max()) < 1e-5


# -- assess: quality checks, the out-of-domain gate, the referral rule ---------------------


def test_without_a_gate_the_gate_is_reported_absent_not_in_domain(predictor):
    from skinsense.trust.gate import ABSENT

    assessment = predictor.assess(sorted(EXAMPLES_DIR.glob("*.jpg"))[0])
    assert assessment.gate.status == "absent" and assessment.gate.in_domain is None
    assert assessment.gate.note == ABSENT and assessment.answered
    assert sum(assessment.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert predictor.gate_summary() == {"status": "absent", "threshold": None,
                                        "percentile": None, "note": ABSENT}
    assert predictor.gate_summary(enabled=False)["status"] == "off"


def test_a_quality_failure_stops_before_the_model(predictor):
    dark = encode(Image.new("RGB", (640, 480), (12, 10, 9)), "JPEG")
    assessment = predictor.assess(dark)
    assert [i.check for i in assessment.quality_issues] == ["dark", "blurry"]
    assert assessment.probabilities is None and assessment.referral is None
    assert not assessment.answered and assessment.top_class is None
    # With the gate off (ServeConfig.gate), the same image is classified as before.
    unchecked = predictor.assess(dark, gate=False)
    assert unchecked.answered and unchecked.gate.status == "off"


def test_assess_many_runs_the_model_once_for_the_images_that_pass(predictor, monkeypatch):
    calls = []
    real_outputs = predictor.outputs
    monkeypatch.setattr(predictor, "outputs", lambda images: calls.append(len(images))
                        or real_outputs(images))
    good = sorted(EXAMPLES_DIR.glob("*.jpg"))[:2]
    small = encode(real_sample().resize((100, 75)), "PNG")
    results = predictor.assess_many([good[0], small, good[1]])
    assert calls == [2]
    assert [r.answered for r in results] == [True, False, True]
    assert results[1].quality_issues[0].check == "small"
    np.testing.assert_allclose(list(results[0].probabilities.values()),
                               predictor.predict_proba([good[0]])[0], atol=1e-6)


@pytest.fixture(scope="module")
def gated(module_tmp):
    """A 32 px model folder with a gate fitted on views of the real examples, and its ONNX."""
    from example_gate import fit_example_gate

    from skinsense.lifecycle.export import export_onnx

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model("resnet18", image_size=32)
    model_dir = save_model_dir(model, ModelCard(arch="resnet18", image_size=32),
                               module_tmp("gated") / "model")
    export_onnx(model_dir)
    fit_example_gate(model_dir)
    return model_dir


def test_the_gate_runs_on_both_backends_from_the_same_forward_pass(gated):
    path = sorted(EXAMPLES_DIR.glob("*.jpg"))[3]
    onnx, eager = (Predictor.from_model_dir(gated, backend=b) for b in ("onnxruntime", "torch"))
    a, b = onnx.assess(path), eager.assess(path)
    assert a.gate.status == b.gate.status == "on" and a.gate.in_domain and b.gate.in_domain
    assert a.gate.score == pytest.approx(b.gate.score, rel=1e-4)


def test_a_stale_gate_is_not_used(gated, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from skinsense.lifecycle.packaging import WEIGHTS_FILE

    stale = tmp_path / "stale"
    shutil.copytree(gated, stale)
    state = {k: v * 1.01 if v.is_floating_point() else v
             for k, v in load_file(str(stale / WEIGHTS_FILE)).items()}
    save_file(state, str(stale / WEIGHTS_FILE))  # retrained into the same folder
    predictor = Predictor.from_model_dir(stale)
    assert predictor.gate is None and "other weights" in predictor.gate_note
    assert predictor.backend == "torch"  # the ONNX export is stale too


def test_an_onnx_export_from_before_the_gate_still_serves(gated, tmp_path):
    """A registered version from before the gate has a logits-only model.onnx and no gate
    file: ONNX Runtime serves it, with the gate absent. With a gate file beside such an
    export, PyTorch serves instead (it computes the features the gate needs)."""
    import shutil

    import onnx

    from skinsense.lifecycle.export import ONNX_FILE
    from skinsense.trust.gate import GATE_FILE

    old = tmp_path / "old"
    shutil.copytree(gated, old)
    graph = onnx.load(str(old / ONNX_FILE))
    del graph.graph.output[1]  # features
    onnx.save(graph, str(old / ONNX_FILE))
    with_gate = Predictor.from_model_dir(old)
    assert with_gate.backend == "torch" and with_gate.gate is not None
    (old / GATE_FILE).unlink()
    without = Predictor.from_model_dir(old)
    assert without.backend == "onnxruntime" and without.gate is None
    assessment = without.assess(sorted(EXAMPLES_DIR.glob("*.jpg"))[0])
    assert assessment.gate.status == "absent" and assessment.answered


def test_explain_gives_an_overlay_of_the_uploads_size(gated):
    path = sorted(EXAMPLES_DIR.glob("*.jpg"))[0]
    predictor = Predictor.from_model_dir(gated)
    explanation = explain_image(predictor, path.read_bytes())
    assert explanation.overlay.size == (600, 450) and explanation.overlay.mode == "RGB"
    assert explanation.heatmap.shape == (450, 600)
    assert 0 <= explanation.heatmap.min() and explanation.heatmap.max() <= 1
    assert explanation.class_code == predictor.assess(path).top_class
    assert explanation.gate.in_domain is True and explanation.target_layer == "layer4"
    # The PyTorch copy is loaded once per predictor and goes away with it.
    import gc

    from skinsense.serving import explain

    key = id(predictor)
    loaded = explain._EXPLAINERS[key]
    assert explain_image(predictor, path.read_bytes()).class_code == explanation.class_code
    assert explain._EXPLAINERS[key] is loaded
    del predictor
    gc.collect()
    assert key not in explain._EXPLAINERS


def test_explain_names_architectures_it_cannot_explain(tmp_path):
    from skinsense.models import NoExplanationError

    with torch.random.fork_rng():
        model_dir = save_model_dir(build_model("mobilenet_v3_small", image_size=64),
                                   ModelCard(arch="mobilenet_v3_small", image_size=64),
                                   tmp_path / "m")
    with pytest.raises(NoExplanationError, match="no explanation for this architecture"):
        explain_image(Predictor.from_model_dir(model_dir), real_sample())
