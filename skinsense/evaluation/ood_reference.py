"""Real images that are not dermatoscopic: what the out-of-domain gate is scored against.

The evaluation measures the gate (`ood_auroc`, `ood_fpr_at_95_tpr`) with the test part as
in-domain images against this set, the kind of picture people upload to a skin-lesion app
by mistake or on purpose: photos of people, faces, a cat, objects, a rocket, text and
documents, textures, a retina (another medical image that, like a dermatoscope image, is a
lit disc on black), an immunohistochemistry slide (skin biopsies are stained like this),
a telescope image. They are scikit-image's sample images (`skimage.data`), all bundled
with the package, so nothing is downloaded; plus two made here: a screenshot of a web
page (text and a picture, what a new user uploaded in the issue that asked for the gate)
and a chart.

The images are returned upright and RGB (grey ones converted, transparency composited on
white, as the app does with an upload).
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

# skimage.data functions whose images ship inside the scikit-image wheel (its data
# folder; no pooch download). `tests/test_gate.py` loads them all without a network.
SKIMAGE_IMAGES: tuple[str, ...] = (
    "astronaut", "camera", "cat", "coffee", "rocket", "text", "retina",
    "immunohistochemistry", "hubble_deep_field", "coins", "moon", "page", "brick", "grass",
    "gravel", "horse", "clock", "cell", "colorwheel", "logo", "microaneurysms",
)
# A few faces of skimage's Labeled Faces in the Wild subset (25x25 grey crops).
LFW_FACES = (0, 50, 100, 150)


def _to_rgb(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8:  # boolean masks and float images in 0..1
        array = (np.clip(array.astype(np.float64), 0, 1) * 255).round().astype(np.uint8)
    image = Image.fromarray(array)
    if image.mode in ("RGBA", "LA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def web_page_screenshot(picture: Image.Image, *, size: tuple[int, int] = (800, 600)) -> Image.Image:
    """A drawn screenshot of a web page: a title bar, lines of text and a picture."""
    width, height = size
    page = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(page)
    draw.rectangle((0, 0, width, 56), fill=(36, 62, 110))
    draw.text((24, 18), "Skin check: what that spot means  |  Health  |  News", fill="white")
    x, y = 24, 80
    paragraph = ("Most moles are harmless, but a new or changing spot deserves a look. "
                 "Dermatologists use the ABCDE rule: asymmetry, border, colour, diameter and "
                 "evolution. Photograph the spot every month in the same light, and show the "
                 "photos to your doctor. Sun protection matters at every age: shade, clothing "
                 "and sunscreen. A spot that bleeds, itches or grows should be seen soon.")
    for line, text in enumerate(textwrap.wrap(paragraph, 52)):
        draw.text((x, y + 20 * line), text, fill=(30, 30, 30))
    thumb = picture.copy()
    thumb.thumbnail((width // 2 - 40, height - 120))
    page.paste(thumb, (width // 2 + 16, 80))
    draw.rectangle((24, height - 60, 200, height - 24), fill=(220, 60, 60))
    draw.text((40, height - 50), "Book a skin check", fill="white")
    return page


def bar_chart(*, size: tuple[int, int] = (640, 480)) -> Image.Image:
    """A drawn bar chart on white, like a slide or a report figure."""
    width, height = size
    chart = Image.new("RGB", size, (250, 250, 250))
    draw = ImageDraw.Draw(chart)
    draw.line((60, 40, 60, height - 60), fill="black", width=2)
    draw.line((60, height - 60, width - 30, height - 60), fill="black", width=2)
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
    for i, value in enumerate((0.8, 0.55, 0.35, 0.65, 0.2)):
        left = 90 + i * 105
        top = height - 60 - int(value * (height - 120))
        draw.rectangle((left, top, left + 70, height - 61), fill=colours[i])
        draw.text((left + 20, height - 50), f"Q{i + 1}", fill="black")
    draw.text((width // 2 - 60, 12), "Visits per quarter", fill="black")
    return chart


def non_dermatoscopic_images() -> list[tuple[str, Image.Image]]:
    """(name, RGB image) for every image of the reference set, in a stable order."""
    import skimage.data

    images = []
    for name in SKIMAGE_IMAGES:
        loader: Callable[[], np.ndarray] = getattr(skimage.data, name)
        images.append((name, _to_rgb(loader())))
    images.append(("motorcycle", _to_rgb(skimage.data.stereo_motorcycle()[0])))
    faces = skimage.data.lfw_subset()
    images += [(f"lfw_face_{i}", _to_rgb(faces[i])) for i in LFW_FACES]
    cat = dict(images)["cat"]
    images += [("web_page_screenshot", web_page_screenshot(cat)), ("bar_chart", bar_chart())]
    return images
