"""ONNX Runtime and PyTorch give the out-of-domain gate the same scores and verdicts, for
every architecture the registry offers.

Each model has random weights with batch-norm statistics from one batch of real example
views (`random_models`), an ONNX export, and a gate fitted as `example_gate` fits one
(views of the real examples). Both predictors score the same images: held-out views of the
examples, where the scores must agree to a relative 1e-4, and the non-dermatoscopic
reference photos, where the verdicts must agree. (A random network blows photos far from
its batch-norm statistics up, a white web page to features in the thousands, until the two
backends' features themselves differ in the second digit; there the gate must add nothing
to that disagreement.) squeezenet1_0 and squeezenet1_1 have no Linear head, so SkinSense
cannot build them (`skinsense.models.head_name` says so) and they have no gate to check. The production architectures (efficientnet_b0,
efficientnet_b3, maxvit_t) and the smallest member of every other torchvision family run
in the default suite; the remaining architectures are bigger versions of those families
and run with SKINSENSE_PARITY_ALL_ARCHS=1 (about an hour on 2 cores; vit_h_14 and
regnet_y_128gf exceed the 2 GB a self-contained ONNX file can hold and are skipped there
with that reason).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from random_models import calibrated_model, small_size

from skinsense.models import available_archs

PRODUCTION = ("efficientnet_b0", "efficientnet_b3", "maxvit_t")
# The smallest member of each torchvision family (module) besides the production ones,
# efficientnet_v2 apart from the EfficientNets (another block design), and the demo nets.
FAMILIES = ("alexnet", "convnext_tiny", "densenet121", "efficientnet_v2_s", "googlenet",
            "inception_v3", "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small",
            "regnet_x_400mf", "regnet_y_400mf", "resnet18", "shufflenet_v2_x0_5",
            "shufflenet_v2_x1_0", "swin_t", "swin_v2_t", "vgg11", "vit_b_32")
NO_LINEAR_HEAD = ("squeezenet1_0", "squeezenet1_1")
ALL_ARCHS = os.environ.get("SKINSENSE_PARITY_ALL_ARCHS") == "1"
# More than 2 GB of float32 weights: no self-contained ONNX file (protobuf's limit).
TOO_BIG_FOR_ONNX = ("vit_h_14", "regnet_y_128gf")


def _marks(arch: str) -> list:
    if arch in NO_LINEAR_HEAD:
        return [pytest.mark.skip(reason=f"{arch} has no Linear head: SkinSense cannot build "
                                        f"it, so it has no gate")]
    if arch in PRODUCTION or arch in FAMILIES:
        return [pytest.mark.slow]
    if arch in TOO_BIG_FOR_ONNX:
        return [pytest.mark.skip(reason=f"{arch} has more than 2 GB of weights: SkinSense's "
                                        f"self-contained ONNX export cannot hold it")]
    return [pytest.mark.slow, pytest.mark.skipif(
        not ALL_ARCHS, reason="a bigger member of a family checked by default; set "
                              "SKINSENSE_PARITY_ALL_ARCHS=1 to check it too")]


def test_the_default_set_covers_every_family_and_the_production_archs():
    import torchvision

    family = {a: torchvision.models.get_model_builder(a).__module__ for a in available_archs()}
    assert set(PRODUCTION) | set(FAMILIES) <= set(available_archs())
    assert {family[a] for a in (*PRODUCTION, *FAMILIES, *NO_LINEAR_HEAD)} == set(family.values())
    from skinsense.models import build_model

    with pytest.raises(ValueError, match="no Linear classifier head"):
        build_model(NO_LINEAR_HEAD[0], image_size=64)


@pytest.mark.parametrize("arch", [pytest.param(a, marks=_marks(a)) for a in available_archs()])
def test_onnx_and_pytorch_give_the_gate_the_same_scores(arch, tmp_path):
    from example_gate import example_labels, views

    from skinsense.data.cache import resize_square
    from skinsense.evaluation.ood_reference import non_dermatoscopic_images
    from skinsense.labels import CODE_TO_INDEX
    from skinsense.lifecycle.export import export_onnx
    from skinsense.lifecycle.packaging import (
        ModelCard,
        load_card,
        save_card,
        save_model_dir,
    )
    from skinsense.presets import make_preset
    from skinsense.serving.app import example_images
    from skinsense.serving.predictor import Predictor
    from skinsense.trust.gate import choose_threshold, fit_gate

    size = small_size(arch)
    labels = example_labels()
    train, train_labels, held_out = [], [], []
    for path in example_images():
        all_views = views(Image.open(path).convert("RGB"))
        train += all_views[:11]
        train_labels += [CODE_TO_INDEX[labels[path.stem]]] * 11
        held_out += all_views[11:]
    card = ModelCard(arch=arch, image_size=size)
    # Batch-norm statistics from one batch: four views of each example, as the model sees them.
    pixels = np.stack([np.asarray(resize_square(view, size)) for view in train[::3]])
    batch = make_preset("eval", mean=card.mean, std=card.std)(
        torch.from_numpy(pixels).permute(0, 3, 1, 2))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = calibrated_model(arch, size, batch)
    model_dir = save_model_dir(model, card, tmp_path / arch)
    del model
    export_onnx(model_dir)
    eager = Predictor.from_model_dir(model_dir, backend="torch")
    _, train_features = eager.outputs(train)
    gate = fit_gate(train_features, np.array(train_labels))
    # The features vary: the gate can judge, and the comparison below means something.
    assert gate.unusable_reason == "", gate.unusable_reason
    probe = held_out + [image for _, image in non_dermatoscopic_images()]
    _, eager_features = eager.outputs(probe)
    eager_scores = gate.scores(eager_features)
    threshold = choose_threshold(eager_scores[:len(held_out)], 95)
    card = load_card(model_dir)
    card.ood_threshold, card.ood_percentile = threshold, 95.0
    save_card(card, model_dir)

    onnx = Predictor.from_model_dir(model_dir, backend="onnxruntime")
    _, onnx_features = onnx.outputs(probe)
    onnx_scores = gate.scores(onnx_features)
    n = len(held_out)
    np.testing.assert_allclose(onnx_scores[:n], eager_scores[:n], rtol=1e-4)
    # The photos: the gate adds nothing to the backends' own disagreement on the features.
    feature_error = (np.sqrt(np.mean(np.square(onnx_features - eager_features), axis=1))
                     / np.sqrt(np.mean(np.square(eager_features), axis=1)))
    score_error = np.abs(onnx_scores - eager_scores) / eager_scores
    assert (score_error <= np.maximum(1e-4, 10 * feature_error)).all(), (
        score_error, feature_error)
    # The verdicts the two served predictors give (the gate as loaded from the folder).
    served = {p.backend: [v.in_domain for v in p.gate_verdicts(f, len(probe), enabled=True)]
              for p, f in ((Predictor(eager.model, card, gate=gate), eager_features),
                           (Predictor(None, card, session=onnx.session, gate=gate),
                            onnx_features))}
    assert served["torch"] == served["onnxruntime"]
    assert served["torch"] == list(eager_scores <= threshold)
