"""ONNX export computes what PyTorch computes, and the predictor serves it with ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest
import random_models
import torch
from safetensors.torch import load_file, save_file

from skinsense.lifecycle.export import (
    ONNX_FILE,
    OnnxMismatchError,
    check_onnx_agrees,
    export_onnx,
)
from skinsense.lifecycle.packaging import WEIGHTS_FILE, ModelCard, save_model_dir
from skinsense.models import build_model, head_name
from skinsense.serving.app import EXAMPLES_DIR
from skinsense.serving.predictor import Predictor

SIZE = 64


def calibrated_model(arch: str) -> torch.nn.Module:
    """A random-weight model whose output depends on its input (`random_models`)."""
    return random_models.calibrated_model(arch, SIZE)


@pytest.fixture(scope="module", params=["resnet18", "efficientnet_b0"])
def exported(request, module_tmp):
    """(arch, model folder with model.onnx)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = calibrated_model(request.param)
    model_dir = save_model_dir(model, ModelCard(arch=request.param, image_size=SIZE),
                               module_tmp(request.param))
    export_onnx(model_dir)
    return request.param, model_dir


def test_onnx_agrees_with_pytorch(exported):
    _, model_dir = exported
    assert check_onnx_agrees(model_dir, atol=1e-4, n=4, seed=0) < 1e-4


def test_export_is_one_self_contained_file(exported):
    import onnx

    _, model_dir = exported
    assert sorted(p.name for p in model_dir.iterdir()) == [ONNX_FILE, "model_card.json",
                                                           WEIGHTS_FILE]
    model = onnx.load(str(model_dir / ONNX_FILE))
    onnx.checker.check_model(model, full_check=True)
    (image,), (logits, features) = model.graph.input, model.graph.output
    assert (image.name, logits.name, features.name) == ("image", "logits", "features")
    assert image.type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    assert [d.dim_value for d in image.type.tensor_type.shape.dim[1:]] == [3, SIZE, SIZE]
    # The features are the classifier head's input: (batch, D) with D its in_features.
    head = build_model(exported[0], image_size=SIZE).get_submodule(head_name(
        build_model(exported[0], image_size=SIZE)))
    assert features.type.tensor_type.shape.dim[1].dim_value == head.in_features


def test_the_features_output_is_what_the_head_reads(exported):
    """ONNX features agree with PyTorch's head input, and the head applied to them gives
    the logits: one forward pass serves both the classifier and the out-of-domain gate."""
    from skinsense.lifecycle.export import onnx_session
    from skinsense.lifecycle.packaging import load_model_dir

    _, model_dir = exported
    model, _ = load_model_dir(model_dir)
    session = onnx_session(model_dir / ONNX_FILE)
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    logits, features = session.run(["logits", "features"], {"image": x.numpy()})
    captured = {}

    def keep_input(module, args, output) -> None:  # returns None: the output stays as it is
        captured["input"] = args[0]

    hook = model.get_submodule(head_name(model)).register_forward_hook(keep_input)
    with torch.inference_mode():
        expected_logits = model(x).numpy()
    hook.remove()
    np.testing.assert_allclose(features, captured["input"].numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(logits, expected_logits, atol=1e-4)
    assert features.std(axis=0).max() > 1e-3  # depends on the input


def test_predictor_uses_onnxruntime_and_matches_torch(exported):
    _, model_dir = exported
    onnx_predictor = Predictor.from_model_dir(model_dir)
    torch_predictor = Predictor.from_model_dir(model_dir, backend="torch")
    assert onnx_predictor.backend == "onnxruntime" and onnx_predictor.model is None
    assert torch_predictor.backend == "torch"
    images = [p.read_bytes() for p in sorted(EXAMPLES_DIR.glob("*.jpg"))[:3]]
    from_onnx = onnx_predictor.predict_proba(images)
    from_torch = torch_predictor.predict_proba(images)
    assert from_onnx.shape == (3, 7)
    np.testing.assert_allclose(from_onnx, from_torch, rtol=0, atol=1e-4)
    # The check would pass trivially if the model ignored its input.
    assert np.abs(from_torch[0] - from_torch[1]).max() > 1e-3
    # The ONNX path normalizes in numpy (no torch thread pool): the very same input values.
    np.testing.assert_array_equal(onnx_predictor._normalized_array(images),
                                  torch_predictor.preprocess(images).numpy())


def test_folder_without_onnx_is_served_by_torch(tmp_path):
    with torch.random.fork_rng():
        model_dir = save_model_dir(build_model("resnet18", image_size=32),
                                   ModelCard(arch="resnet18", image_size=32), tmp_path / "m")
    predictor = Predictor.from_model_dir(model_dir)
    assert predictor.backend == "torch"
    with pytest.raises(FileNotFoundError, match="no model.onnx"):
        Predictor.from_model_dir(model_dir, backend="onnxruntime")


def test_stale_onnx_is_not_served_and_fails_the_check(exported, tmp_path):
    arch, model_dir = exported
    stale = tmp_path / "stale"
    stale.mkdir()
    for name in (ONNX_FILE, "model_card.json"):
        (stale / name).write_bytes((model_dir / name).read_bytes())
    # New weights in the folder, as when training writes into it again after an export.
    state = {k: (v * 1.5 if v.is_floating_point() else v)
             for k, v in load_file(str(model_dir / WEIGHTS_FILE)).items()}
    save_file(state, str(stale / WEIGHTS_FILE))
    assert Predictor.from_model_dir(stale).backend == "torch"
    with pytest.raises(OnnxMismatchError, match="differ"):
        check_onnx_agrees(stale)


@pytest.mark.slow
def test_every_predictor_path_applies_the_cards_temperature(exported, tmp_path):
    """PyTorch, ONNX Runtime and the MLflow pyfunc give the same calibrated probabilities."""
    import shutil

    import pandas as pd

    from skinsense.labels import CLASS_CODES
    from skinsense.lifecycle.packaging import load_card, save_card
    from skinsense.serving.pyfunc import MODEL_DIR_ARTIFACT, SkinSensePyfunc
    from skinsense.trust.calibration import calibrated_probabilities

    _, exported_dir = exported
    model_dir = tmp_path / "calibrated"
    shutil.copytree(exported_dir, model_dir)
    card = load_card(model_dir)
    card.temperature = 2.5
    save_card(card, model_dir)  # the ONNX export stays valid: it computes logits only

    onnx_predictor = Predictor.from_model_dir(model_dir)
    torch_predictor = Predictor.from_model_dir(model_dir, backend="torch")
    assert onnx_predictor.backend == "onnxruntime"
    pyfunc = SkinSensePyfunc()
    pyfunc.load_context(type("Context", (), {"artifacts": {MODEL_DIR_ARTIFACT: str(model_dir)}}))
    images = [p.read_bytes() for p in sorted(EXAMPLES_DIR.glob("*.jpg"))[:3]]

    logits = torch_predictor.logits(images)
    expected = calibrated_probabilities(logits, 2.5)
    np.testing.assert_allclose(torch_predictor.predict_proba(images), expected, atol=1e-6)
    np.testing.assert_allclose(onnx_predictor.predict_proba(images), expected, atol=1e-4)
    served = pyfunc.predict(None, pd.DataFrame({"image": images}))[list(CLASS_CODES)]
    np.testing.assert_allclose(served.to_numpy(dtype=np.float64), expected, atol=1e-4)
    # Really scaled: the plain softmax differs, the predicted class does not.
    plain = calibrated_probabilities(logits, 1.0)
    assert np.abs(plain - expected).max() > 1e-3
    np.testing.assert_array_equal(plain.argmax(axis=1),
                                  served.to_numpy(dtype=np.float64).argmax(axis=1))
    classified = torch_predictor.classify(images[0])
    assert classified["mel"] == pytest.approx(float(expected[0, 4]), abs=1e-6)


def test_served_sessions_do_not_busy_wait_between_runs(exported):
    """ONNX Runtime's threads would otherwise spin after each run on the cores that the app's
    event loop and JPEG decode need (skinsense.lifecycle.export.onnx_session); asking for it works."""
    from skinsense.lifecycle.export import onnx_session
    from skinsense.serving.runtime import OnnxRunner

    _, model_dir = exported
    key = "session.intra_op.allow_spinning"
    runner = OnnxRunner(model_dir / ONNX_FILE, threads=2, concurrency=2)
    for session in (runner.wide, runner.narrow):
        assert session.get_session_options().get_session_config_entry(key) == "0"
    spinning = onnx_session(model_dir / ONNX_FILE, spinning=True)
    assert spinning.get_session_options().get_session_config_entry(key) == "1"
