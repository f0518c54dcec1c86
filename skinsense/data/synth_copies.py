"""Near-duplicates planted in the synthetic HAM10000: altered copies of some of its photos
filed under new image and lesion ids, as a photograph filed twice would be, and the list
of them that the near-duplicate check (`skinsense.data.duplicates`) is tested against.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, replace

import numpy as np
import pandas as pd
from PIL import Image

from skinsense.data.synth_painter import ImageJob

# Which planted near-duplicate copies which image, and how (see `near_duplicate_copy`).
PLANTED_NEAR_DUPLICATES_CSV = "planted_near_duplicates.csv"
# How far a planted copy may stray from its source: the bounds the near-duplicate check
# (`skinsense.data.duplicates`) is held to.
COPY_BOUNDS = {
    # Mirrored or turned by quarter turns (dermatoscopic photos are often filed mirrored);
    # each copy takes one of these at random, the first (none) with probability 1/2.
    "transpose": ("none", "none", "none", "none", "none", "none", "mirror_left_right",
                  "mirror_top_bottom", "turn_90", "turn_180", "turn_270", "transpose"),
    "angle": (0.5, 5.0),          # then rotated by this many degrees, either way
    "scale": (0.6, 1.5),          # resized to this factor of the source's size
    "crop": (0.01, 0.03),         # this share of each side's length cut off, split at random
    "gain": 0.08,                 # each colour channel times 1 +- this (a colour shift)
    "offset": 8.0,                # plus up to this many grey levels, all channels
    "quality": (60, 92),          # re-encoded at this JPEG quality
}
_TRANSPOSE = {
    "mirror_left_right": Image.Transpose.FLIP_LEFT_RIGHT,
    "mirror_top_bottom": Image.Transpose.FLIP_TOP_BOTTOM,
    "turn_90": Image.Transpose.ROTATE_90, "turn_180": Image.Transpose.ROTATE_180,
    "turn_270": Image.Transpose.ROTATE_270, "transpose": Image.Transpose.TRANSPOSE,
}


@dataclass(frozen=True)
class Alterations:
    """How one planted copy differs from its source (drawn within `COPY_BOUNDS`)."""

    transpose: str                     # a key of _TRANSPOSE, or "none"
    angle: float                       # degrees, counter-clockwise
    crop: tuple[float, float]          # share of the width and height cut off
    crop_start: tuple[float, float]    # which part of that comes off the left and top
    gain: tuple[float, float, float]   # per colour channel
    offset: float
    scale: float
    quality: int


def draw_alterations(rng: np.random.Generator) -> Alterations:
    """One copy's alterations, each a random amount within `COPY_BOUNDS`."""
    bounds = COPY_BOUNDS
    transpose = str(bounds["transpose"][int(rng.integers(len(bounds["transpose"])))])
    angle = float(rng.uniform(*bounds["angle"]) * rng.choice([-1, 1]))
    crop = rng.uniform(*bounds["crop"], size=2)
    start = rng.uniform(0, 1, 2)
    gain = rng.uniform(1 - bounds["gain"], 1 + bounds["gain"], 3)
    offset = float(rng.uniform(-bounds["offset"], bounds["offset"]))
    scale = float(rng.uniform(*bounds["scale"]))
    quality = int(rng.integers(bounds["quality"][0], bounds["quality"][1] + 1))
    return Alterations(transpose, angle, (float(crop[0]), float(crop[1])),
                       (float(start[0]), float(start[1])), tuple(float(g) for g in gain),
                       offset, scale, quality)


def plant_near_duplicates(
    metadata: pd.DataFrame, jobs: list[ImageJob], count: int, *, seed: int
) -> tuple[pd.DataFrame, dict]:
    """Metadata with `count` copies added under new ids, and what each copy draws.

    Returns:
        (metadata, {copy image_id: (source job, copy lesion_id, source lesion_id, key)}).
    """
    rng = np.random.default_rng([seed, 8])
    sources = np.sort(rng.choice(len(metadata), size=count, replace=False))
    last_image = int(metadata["image_id"].str[5:].astype(int).max())
    last_lesion = int(metadata["lesion_id"].str[4:].astype(int).max())
    rows, copies = [], {}
    for k, row_index in enumerate(sources):
        source = metadata.iloc[int(row_index)]
        image_id, lesion_id = f"ISIC_{last_image + 1 + k:07d}", f"HAM_{last_lesion + 1 + k:07d}"
        rows.append({**source.to_dict(), "image_id": image_id, "lesion_id": lesion_id})
        copies[image_id] = (jobs[int(row_index)], lesion_id, source["lesion_id"], k)
    planted = pd.concat([metadata, pd.DataFrame(rows, columns=metadata.columns)],
                        ignore_index=True)
    return (planted.sort_values(["lesion_id", "image_id"], kind="stable")
            .reset_index(drop=True), copies)


def with_copies(image_ids: list[str], jobs: list[ImageJob], copies: dict) -> list[ImageJob]:
    """`jobs` (one per id of `image_ids`) where each planted copy draws its source's photo,
    under its own name, to alter it (`near_duplicate_copy`)."""
    return [replace(copies[image_id][0], name=f"{image_id}.jpg", copy_key=copies[image_id][3])
            if image_id in copies else job
            for image_id, job in zip(image_ids, jobs, strict=True)]


def planted_table(copies: dict) -> pd.DataFrame:
    """The list written to `PLANTED_NEAR_DUPLICATES_CSV`: each copy's ids, its source's, and
    how it was altered (`Alterations`)."""
    rows = []
    for image_id, (source, lesion, source_lesion, key) in sorted(copies.items()):
        alterations = asdict(alterations_of(source.seed, key))
        for name in ("crop", "crop_start", "gain"):
            alterations[name] = " ".join(f"{x:.4f}" for x in alterations[name])
        rows.append({"image_id": image_id, "lesion_id": lesion,
                     "source_image_id": source.name[:-4], "source_lesion_id": source_lesion,
                     **alterations})
    return pd.DataFrame(rows)


def alterations_of(seed: int, key: int) -> Alterations:
    """The alterations of the planted copy numbered `key` of the sample drawn with `seed`."""
    return draw_alterations(np.random.default_rng([seed, 6, key]))


def near_duplicate_copy(image: Image.Image, rng: np.random.Generator) -> bytes:
    """A near-duplicate of a photo as JPEG bytes, altered as `draw_alterations(rng)` says."""
    return altered_copy(image, draw_alterations(rng))


def altered_copy(image: Image.Image, alterations: Alterations) -> bytes:
    """The photo mirrored or turned, rotated, cropped, colour-shifted, resized and re-encoded
    as `alterations` says, as JPEG bytes.

    The rotation's corners are filled with black, as an image editor leaves them.
    """
    a = alterations
    image = image.convert("RGB")
    if a.transpose != "none":
        image = image.transpose(_TRANSPOSE[a.transpose])
    width, height = image.size
    image = image.rotate(a.angle, resample=Image.Resampling.BILINEAR)
    left, top = np.multiply(a.crop_start, a.crop) * (width, height)
    box = (round(left), round(top), round(left + width * (1 - a.crop[0])),
           round(top + height * (1 - a.crop[1])))
    image = image.crop(box)
    pixels = np.asarray(image, np.float32) * np.asarray(a.gain, np.float32) + a.offset
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    image = image.resize((max(16, round(image.width * a.scale)),
                          max(16, round(image.height * a.scale))), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=a.quality)
    return buffer.getvalue()
