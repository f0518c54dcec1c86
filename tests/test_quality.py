"""The image-quality checks never refuse the real samples, and refuse spoiled copies of them."""

from __future__ import annotations

import pytest
from PIL import Image, ImageEnhance, ImageFilter

from skinsense.trust.quality import (
    MAX_MEAN_LUMA,
    MEASURE_SIDE,
    MIN_LAPLACIAN_VARIANCE,
    MIN_MEAN_LUMA,
    MIN_SHORT_SIDE,
    check_quality,
    measure,
)
from skinsense.serving.app import example_images
from skinsense.serving.predictor import open_image

EXAMPLES = example_images()


def upright(path) -> Image.Image:
    return open_image(path.read_bytes())


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_no_real_sample_is_refused_and_each_has_a_margin(path):
    # Decoded as the app decodes it for the checks (JPEG draft at MEASURE_SIDE).
    image = open_image(path.read_bytes(), draft_size=MEASURE_SIDE)
    assert check_quality(image) == []
    m = measure(image)
    # The thresholds sit well away from every real image, not just under it.
    assert m.mean_luma > 2 * MIN_MEAN_LUMA and m.mean_luma < MAX_MEAN_LUMA - 40
    assert m.laplacian_variance > 4 * MIN_LAPLACIAN_VARIANCE
    assert min(m.width, m.height) >= 3 * MIN_SHORT_SIDE


SPOILED = {
    "dark": lambda im: ImageEnhance.Brightness(im).enhance(0.12),
    "bright": lambda im: ImageEnhance.Brightness(im).enhance(4.0),
    "blurry": lambda im: im.filter(ImageFilter.GaussianBlur(3)),
    "small": lambda im: im.resize((120, 90)),
}
MESSAGES = {"dark": "too dark", "bright": "too bright", "blurry": "too blurry",
            "small": "too small"}


@pytest.mark.parametrize("check", list(SPOILED))
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_spoiled_copies_are_refused_with_a_clear_message(path, check):
    issues = check_quality(SPOILED[check](upright(path)))
    assert check in [issue.check for issue in issues]
    issue = next(i for i in issues if i.check == check)
    assert MESSAGES[check] in issue.message
    # The message says what to do, not only what is wrong.
    assert any(word in issue.message for word in ("upload", "take", "avoid", "hold"))


def test_a_lightly_blurred_or_resized_real_image_still_passes():
    # What an ordinary phone or browser does to an image must not trip the checks.
    image = upright(EXAMPLES[0])
    assert check_quality(image.filter(ImageFilter.GaussianBlur(1))) == []
    assert check_quality(image.resize((1200, 900), Image.Resampling.BICUBIC)) == []
    assert check_quality(image.resize((300, 225))) == []


def test_measurements_do_not_depend_much_on_the_image_size():
    image = upright(EXAMPLES[1])
    small, large = measure(image), measure(image.resize((1800, 1350), Image.Resampling.LANCZOS))
    assert large.mean_luma == pytest.approx(small.mean_luma, rel=0.02)
    assert large.laplacian_variance == pytest.approx(small.laplacian_variance, rel=0.35)
    assert (large.width, large.height) == (1800, 1350)


def test_a_black_frame_fails_dark_and_blurry_together():
    issues = check_quality(Image.new("RGB", (640, 480)))
    assert [i.check for i in issues] == ["dark", "blurry"]
