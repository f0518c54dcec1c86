"""The predictor: a model folder turned into `image -> seven class probabilities` on the CPU.

Preprocessing is the evaluation preset applied to an image decoded and resized exactly like
the image cache does (`skinsense.data.cache.load_square`: JPEG draft decoding, then `resize_square`), so served predictions match
what the model was evaluated on.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from skinsense.data.cache import resize_square
from skinsense.labels import CLASS_CODES
from skinsense.packaging import ModelCard, load_model_dir
from skinsense.presets import make_preset

# Pillow's own bomb guard trips at ~179 Mpx; a dermatoscope image is < 50 Mpx, so refuse early.
MAX_PIXELS = 40_000_000
MIN_SIDE = 16
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class ImageRejected(ValueError):
    """The input cannot be classified; the message says why, in words for the user."""


def open_image(data: bytes | str | Path | Image.Image | np.ndarray, *,
               draft_size: int | None = None) -> Image.Image:
    """Open and sanity-check an image from bytes, a path, a PIL image or an HxWxC array.

    Applies the EXIF orientation (phones and some dermatoscopes store rotated pixels), and
    refuses what is not an image, truncated, too large (decompression bombs) or too small.
    `draft_size` lets a JPEG decode at a reduced scale, exactly as the image cache does.
    """
    if isinstance(data, np.ndarray):
        image = Image.fromarray(data)
    elif isinstance(data, Image.Image):
        image = data
    else:
        source = io.BytesIO(data) if isinstance(data, bytes) else str(data)
        try:
            image = Image.open(source)
            if image.width * image.height > MAX_PIXELS:
                raise Image.DecompressionBombError("too many pixels")
            if draft_size:
                image.draft("RGB", (draft_size, draft_size))
            image.load()
        except Image.DecompressionBombError as exc:
            raise ImageRejected(
                f"the image is too large to classify (more than {MAX_PIXELS:,} pixels)") from exc
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise ImageRejected(
                f"the file is not a readable image ({exc}); upload a JPEG or PNG photo") from exc
    if image.width * image.height > MAX_PIXELS:
        raise ImageRejected(f"the image is too large to classify (more than {MAX_PIXELS:,} pixels)")
    if min(image.size) < MIN_SIDE:
        raise ImageRejected(
            f"the image is {image.width}x{image.height} pixels; at least {MIN_SIDE}x{MIN_SIDE} "
            f"is needed to see a lesion")
    image = ImageOps.exif_transpose(image)
    if image.mode != "RGB":
        # RGBA/LA/P with transparency: composite on white rather than on black garbage.
        if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGB", rgba.size, (255, 255, 255))
            background.paste(rgba, mask=rgba.getchannel("A"))
            image = background
        else:
            image = image.convert("RGB")
    return image


@dataclass
class Predictor:
    """A loaded model and the preprocessing it was evaluated with."""

    model: torch.nn.Module
    card: ModelCard
    source: str = ""

    def __post_init__(self) -> None:
        self._preset = make_preset("eval", mean=self.card.mean, std=self.card.std)
        self._lock = threading.Lock()  # torch on 2 cores gains nothing from parallel forwards

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> Predictor:
        model, card = load_model_dir(Path(model_dir))
        return cls(model=model, card=card, source=str(model_dir))

    def preprocess(self, images: list) -> torch.Tensor:
        size = self.card.image_size
        arrays = [np.asarray(resize_square(open_image(im, draft_size=size), size)) for im in images]
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        return self._preset(batch)

    @torch.inference_mode()
    def predict_proba(self, images: list) -> np.ndarray:
        """Probabilities (N, 7) in CLASS_CODES order."""
        batch = self.preprocess(images)
        with self._lock:
            logits = self.model(batch)
        return torch.softmax(logits.float(), dim=1).numpy()

    def classify(self, image) -> dict[str, float]:
        """One image -> {class code: probability}."""
        return dict(zip(CLASS_CODES, map(float, self.predict_proba([image])[0]), strict=True))
