"""Grad-CAM: the registry's target layers, and the heat of a trained model where its class
signal is."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from skinsense.labels import CODE_TO_INDEX
from skinsense.lifecycle.packaging import ModelCard, save_model_dir
from skinsense.models import (
    NoExplanationError,
    build_model,
    cam_target_layer,
    cam_target_layer_path,
)
from skinsense.presets import make_preset

MEL, NV = CODE_TO_INDEX["mel"], CODE_TO_INDEX["nv"]
SIZE, UPLOAD = 64, 256


@pytest.mark.parametrize("arch,path,kind", [
    ("efficientnet_b0", "features[-1]", "Conv2dNormActivation"),
    ("efficientnet_b3", "features[-1]", "Conv2dNormActivation"),
    ("maxvit_t", "blocks[-1]", "MaxVitBlock"),
    ("resnet18", "layer4", "Sequential"),
    ("resnet50", "layer4", "Sequential"),
    ("shufflenet_v2_x1_0", "conv5", "Sequential"),
])
def test_the_registry_names_each_architectures_target_layer(arch, path, kind):
    assert cam_target_layer_path(arch) == path
    with torch.random.fork_rng():
        model = build_model(arch, image_size=224 if arch == "maxvit_t" else 64)
    layer = cam_target_layer(model, arch)
    assert type(layer).__name__ == kind
    expected = {"features[-1]": lambda m: m.features[-1], "blocks[-1]": lambda m: m.blocks[-1],
                "layer4": lambda m: m.layer4, "conv5": lambda m: m.conv5}[path](model)
    assert layer is expected


@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "vit_b_16", "densenet121"])
def test_other_architectures_get_no_explanation(arch):
    with pytest.raises(NoExplanationError, match=f"no explanation for this architecture.*{arch}"):
        cam_target_layer_path(arch)


def toy_image(rng: np.random.Generator, *, centre: tuple[int, int] | None,
              size: int = UPLOAD) -> Image.Image:
    """Skin-toned noise; a dark disc (the class signal) at `centre` when given."""
    base = np.array([200, 160, 140], dtype=np.float64)
    pixels = np.clip(base + rng.normal(0, 18, size=(size, size, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    if centre is not None:
        r = size * 3 // 32
        x, y = centre
        ImageDraw.Draw(image).ellipse((x - r, y - r, x + r, y + r), fill=(60, 35, 30))
    return image


@pytest.fixture(scope="module")
def disc_model(module_tmp):
    """resnet18 at 64 px trained to call a dark disc anywhere 'mel' and plain skin 'nv'."""
    rng = np.random.default_rng(0)
    images, labels = [], []
    for i in range(192):
        has_disc = i % 2 == 0
        margin = UPLOAD // 8
        centre = tuple(rng.integers(margin, UPLOAD - margin, size=2)) if has_disc else None
        images.append(np.asarray(toy_image(rng, centre=centre).resize((SIZE, SIZE),
                                                                         Image.BILINEAR)))
        labels.append(MEL if has_disc else NV)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    y = torch.tensor(labels)
    card = ModelCard(arch="resnet18", image_size=SIZE)
    preset = make_preset("eval", mean=card.mean, std=card.std)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model("resnet18", image_size=SIZE)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model.train()
        for _ in range(60):
            batch = torch.randint(0, len(x), (32,))
            loss = torch.nn.functional.cross_entropy(model(preset(x[batch])), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.inference_mode():
        accuracy = (model(preset(x)).argmax(1) == y).float().mean().item()
    assert accuracy > 0.95, f"the toy model did not learn the disc ({accuracy:.2f})"
    return save_model_dir(model, card, module_tmp("disc") / "model")


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


QUADRANTS = {"top-left": (slice(0, UPLOAD // 2), slice(0, UPLOAD // 2)),
             "bottom-right": (slice(UPLOAD // 2, None), slice(UPLOAD // 2, None))}


@pytest.mark.slow
@pytest.mark.parametrize("where,centre", [("top-left", (64, 64)), ("bottom-right", (190, 180))])
def test_the_heat_peaks_where_the_class_signal_is(disc_model, where, centre):
    from skinsense.serving.explain import explain_image
    from skinsense.serving.predictor import Predictor

    predictor = Predictor.from_model_dir(disc_model)
    image = toy_image(np.random.default_rng(7), centre=centre)
    explanation = explain_image(predictor, png(image))
    assert explanation.class_code == "mel"
    heat = explanation.heatmap
    assert heat.shape == (UPLOAD, UPLOAD) and explanation.overlay.size == (UPLOAD, UPLOAD)
    peak_row, peak_col = np.unravel_index(np.argmax(heat), heat.shape)
    rows, cols = QUADRANTS[where]
    assert rows.start <= peak_row < (rows.stop or UPLOAD), (where, peak_row, peak_col)
    assert cols.start <= peak_col < (cols.stop or UPLOAD), (where, peak_row, peak_col)
    # The disc's quadrant holds more heat than the opposite one.
    other = QUADRANTS["bottom-right" if where == "top-left" else "top-left"]
    assert heat[rows, cols].mean() > 2 * heat[other].mean()


@pytest.mark.slow
def test_the_overlay_keeps_a_non_square_uploads_size(disc_model):
    from skinsense.serving.explain import explain_image
    from skinsense.serving.predictor import Predictor

    wide = toy_image(np.random.default_rng(8), centre=(60, 60), size=UPLOAD).resize((400, 220))
    explanation = explain_image(Predictor.from_model_dir(disc_model), png(wide))
    assert explanation.overlay.size == (400, 220) and explanation.heatmap.shape == (220, 400)
