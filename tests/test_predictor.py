"""The predictor classifies real images and refuses bad input with a clear message."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from skinsense.models import build_model
from skinsense.packaging import ModelCard, save_model_dir
from skinsense.serving.app import EXAMPLES_DIR
from skinsense.serving.predictor import ImageRejected, Predictor


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    model_dir = save_model_dir(build_model("resnet18", image_size=64),
                               ModelCard(arch="resnet18", image_size=64),
                               tmp_path_factory.mktemp("model"))
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


@pytest.mark.parametrize("fmt,mode", [("PNG", "RGBA"), ("WEBP", "RGB"), ("PNG", "L"),
                                      ("JPEG", "L")])
def test_other_formats_and_modes_are_classified(predictor, fmt, mode):
    data = encode(real_sample().convert(mode), fmt)
    assert sum(predictor.classify(data).values()) == pytest.approx(1.0, abs=1e-5)


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
