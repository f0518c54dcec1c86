"""Image-quality checks that run before the model: too small, too dark, too bright, too blurry.

A model asked about a black frame, a blown-out flash photo or a shaken picture still
answers; these checks refuse such images first, each with a message that says what is wrong
and what to do. Every measurement is taken on the image as the user sees it (EXIF orientation
applied), in grey levels (ITU-R 601 luma, 0-255), scaled so that its shorter side is
`MEASURE_SIDE` px: blur and brightness then mean the same for a 600x450 dermatoscope export
and a 4000x3000 phone photo.

How each threshold was chosen (measured on the real HAM10000 images in
`skinsense/serving/examples/`, all 600x450; `tests/test_quality.py` checks that none of them
is refused, and that darkened, brightened, blurred and shrunk copies of them are):

- mean luma of the real images: 119-177. Too dark below `MIN_MEAN_LUMA` = 40 (a third of
  the darkest real image; a dermatoscope lights the skin evenly, so a mean of 40 is a lens
  cap or an unlit room). Too bright above `MAX_MEAN_LUMA` = 235 (the brightest real image is
  177; 235 is nearly white paper, a flash reflection over the whole frame).
- variance of the Laplacian (scipy's 5-point Laplacian of the grey image, in float): the
  real images give 19-78. Dermatoscopic images are smooth by nature (skin under a contact
  lens, no background edges), far smoother than the 100+ that photography guides use as a
  blur threshold, so that threshold would refuse most real lesions. Too blurry below
  `MIN_LAPLACIAN_VARIANCE` = 4, under a quarter of the least sharp real image: a Gaussian
  blur of radius 2 px on the 600x450 image brings every real sample under it (1.0-3.6), a
  blur of radius 1 px none of them (6.7-21).
- shorter side: HAM10000 images are 450 px high and the models take 224-300 px. Too small
  below `MIN_SHORT_SIDE` = 150 px: such an image is enlarged 1.5-2x before the model sees
  it, so it is mostly interpolation (and usually a thumbnail, not an original).

This module needs only numpy, scipy and Pillow (no prefect, mlflow or gradio).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image
from scipy.ndimage import laplace

# The scale of every measurement: the shorter side in px (the JPEG decoder's draft mode
# reaches it cheaply from large photos; HAM10000's 600x450 images are measured at 400x300).
MEASURE_SIDE = 300
MIN_MEAN_LUMA = 40.0
MAX_MEAN_LUMA = 235.0
MIN_LAPLACIAN_VARIANCE = 4.0
MIN_SHORT_SIDE = 150

Check = Literal["small", "dark", "bright", "blurry"]


@dataclass(frozen=True)
class QualityMeasures:
    """What the checks measure on one image."""

    width: int
    height: int
    mean_luma: float            # 0-255
    laplacian_variance: float   # grey levels squared, at MEASURE_SIDE


@dataclass(frozen=True)
class QualityIssue:
    """One failed check: which, the measured value, the threshold and a message for the user."""

    check: Check
    value: float
    threshold: float
    message: str


def measure(image: Image.Image) -> QualityMeasures:
    """Size, mean brightness and sharpness of an (upright) image.

    Args:
        image: a decoded PIL image in any mode (it is converted to grey levels here).
    """
    width, height = image.size
    # Float before resizing: rounding the resized image to whole grey levels would add its
    # own noise (a Laplacian variance of about 1.7) and hide how smooth a blurred image is.
    grey = image.convert("L").convert("F")
    scale = MEASURE_SIDE / min(width, height)
    if scale != 1:
        grey = grey.resize((max(1, round(width * scale)), max(1, round(height * scale))),
                           Image.Resampling.BILINEAR, reducing_gap=2.0)
    luma = np.asarray(grey, dtype=np.float64)
    return QualityMeasures(width=width, height=height, mean_luma=float(luma.mean()),
                           laplacian_variance=float(laplace(luma, mode="reflect").var()))


def check_quality(image: Image.Image) -> list[QualityIssue]:
    """The checks an image fails, in the order a user should fix them (empty: it passes).

    Args:
        image: the decoded upload, EXIF orientation applied (`serving.predictor.open_image`).
    """
    m = measure(image)
    issues = []
    short = min(m.width, m.height)
    if short < MIN_SHORT_SIDE:
        issues.append(QualityIssue(
            "small", short, MIN_SHORT_SIDE,
            f"the image is too small ({m.width}x{m.height} pixels): at least {MIN_SHORT_SIDE} "
            f"pixels on the shorter side are needed; upload the original photo, not a "
            f"thumbnail or a crop"))
    if m.mean_luma < MIN_MEAN_LUMA:
        issues.append(QualityIssue(
            "dark", m.mean_luma, MIN_MEAN_LUMA,
            f"the image is too dark (mean brightness {m.mean_luma:.0f} of 255, at least "
            f"{MIN_MEAN_LUMA:.0f} needed); take it again with the dermatoscope's light on"))
    elif m.mean_luma > MAX_MEAN_LUMA:
        issues.append(QualityIssue(
            "bright", m.mean_luma, MAX_MEAN_LUMA,
            f"the image is too bright (mean brightness {m.mean_luma:.0f} of 255, at most "
            f"{MAX_MEAN_LUMA:.0f}); it is overexposed: avoid flash and direct light"))
    if m.laplacian_variance < MIN_LAPLACIAN_VARIANCE:
        issues.append(QualityIssue(
            "blurry", m.laplacian_variance, MIN_LAPLACIAN_VARIANCE,
            f"the image is too blurry (sharpness {m.laplacian_variance:.1f}, at least "
            f"{MIN_LAPLACIAN_VARIANCE:.0f} needed); hold the camera still and focus on the "
            f"lesion"))
    return issues
