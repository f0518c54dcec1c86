"""The metadata table of the synthetic HAM10000: the real columns, class proportions,
lesion groups and value distributions, drawn without any image.

`make_synthetic_metadata` is what `skinsense.data.synth` draws one photo for per row; it is
also useful alone (the split and oversampling tests need only the table).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from skinsense.data.records import METADATA_COLUMNS
from skinsense.labels import CLASS_CODES

# Real HAM10000 image counts per class (sum 10,015), in CLASS_CODES order.
HAM10000_CLASS_COUNTS: dict[str, int] = {
    "akiec": 327, "bcc": 514, "bkl": 1099, "df": 115, "mel": 1113, "nv": 6705, "vasc": 142,
}
# Real ISIC 2018 Task 3 test set counts (sum 1,511).
ISIC_TEST_CLASS_COUNTS: dict[str, int] = {
    "akiec": 43, "bcc": 93, "bkl": 217, "df": 44, "mel": 171, "nv": 908, "vasc": 35,
}
# Real number of lesions with 1..6 images (7,470 lesions, 1.34 images per lesion).
_IMAGES_PER_LESION = np.array([5514, 1423, 490, 34, 5, 4], dtype=float)
_IMAGES_PER_LESION /= _IMAGES_PER_LESION.sum()

# First image/lesion numbers as in the real data (ISIC_0024306..ISIC_0034320; the official
# test set starts at ISIC_0034524).
FIRST_IMAGE_NUMBER = 24306
FIRST_TEST_IMAGE_NUMBER = 34524

# Metadata value distributions measured on the real metadata, per class where it differs.
_DX_TYPE = {
    "akiec": {"histo": 1.0},
    "bcc": {"histo": 1.0},
    "bkl": {"histo": 766, "consensus": 264, "confocal": 69},
    "df": {"histo": 55, "consensus": 60},
    "mel": {"histo": 1.0},
    "nv": {"follow_up": 3704, "histo": 2498, "consensus": 503},
    "vasc": {"histo": 67, "consensus": 75},
}
_DATASET = {
    "akiec": {"rosendahl": 295, "vidir_modern": 32},
    "bcc": {"rosendahl": 296, "vidir_modern": 211, "vidir_molemax": 2, "vienna_dias": 5},
    "bkl": {"rosendahl": 490, "vidir_modern": 475, "vidir_molemax": 124, "vienna_dias": 10},
    "df": {"rosendahl": 30, "vidir_modern": 51, "vidir_molemax": 30, "vienna_dias": 4},
    "mel": {"rosendahl": 342, "vidir_modern": 680, "vidir_molemax": 24, "vienna_dias": 67},
    "nv": {"rosendahl": 803, "vidir_modern": 1832, "vidir_molemax": 3720, "vienna_dias": 350},
    "vasc": {"rosendahl": 3, "vidir_modern": 82, "vidir_molemax": 54, "vienna_dias": 3},
}
_MEAN_AGE = {"akiec": 66.5, "bcc": 66.8, "bkl": 64.3, "df": 53.0, "mel": 60.7, "nv": 46.5,
             "vasc": 51.4}
_SEX = {"male": 5406, "female": 4552, "unknown": 57}
_LOCALIZATION = {
    "back": 2192, "lower extremity": 2077, "trunk": 1404, "upper extremity": 1118,
    "abdomen": 1022, "face": 745, "chest": 407, "foot": 319, "unknown": 234, "neck": 168,
    "scalp": 128, "hand": 90, "ear": 56, "genital": 48, "acral": 7,
}
_AGE_MISSING_FRACTION = 57 / 10015


def make_synthetic_metadata(
    n_images: int,
    *,
    seed: int = 0,
    class_counts: dict[str, int] | None = None,
    first_image_number: int = FIRST_IMAGE_NUMBER,
    first_lesion_number: int = 0,
) -> pd.DataFrame:
    """Draw HAM10000-style metadata: real columns, class proportions and lesion groups.

    Args:
        n_images: Number of rows (images); at least 2 per class.
        seed: Seed of the draw.
        class_counts: Class proportions to follow (default: the real HAM10000 counts).
        first_image_number: Number of the first `ISIC_%07d` image id.
        first_lesion_number: Smallest `HAM_%07d` lesion number.

    Returns:
        A DataFrame with `METADATA_COLUMNS`, rows grouped by lesion.
    """
    rng = np.random.default_rng([seed, 7])
    counts = _allocate_class_counts(n_images, class_counts or HAM10000_CLASS_COUNTS)
    lesion_dx: list[str] = []
    lesion_sizes: list[int] = []
    for code in CLASS_CODES:
        sizes = _lesion_sizes(counts[code], rng)
        lesion_dx += [code] * len(sizes)
        lesion_sizes += sizes
    n_lesions = len(lesion_sizes)
    # Real lesion numbers have gaps (7,470 used of 0..7628).
    lesion_numbers = first_lesion_number + np.sort(
        rng.choice(int(n_lesions * 1.02) + 1, size=n_lesions, replace=False)
    )
    lesion_order = rng.permutation(n_lesions)  # classes interleaved in the id order
    lesion_ids = {i: f"HAM_{lesion_numbers[k]:07d}" for k, i in enumerate(lesion_order)}
    # Image numbers are contiguous but not grouped by lesion, as in the real data.
    image_numbers = first_image_number + rng.permutation(n_images)

    rows = []
    k = 0
    for i in range(n_lesions):
        code = lesion_dx[i]
        # Every image of a lesion shares the lesion's metadata (one patient, one diagnosis).
        dx_type = _pick(rng, _DX_TYPE[code])
        age = float(np.clip(5 * round(rng.normal(_MEAN_AGE[code], 15) / 5), 0, 85))
        if rng.random() < _AGE_MISSING_FRACTION:
            age = float("nan")
        sex = _pick(rng, _SEX)
        localization = _pick(rng, _LOCALIZATION)
        dataset = _pick(rng, _DATASET[code])
        for _ in range(lesion_sizes[i]):
            rows.append((lesion_ids[i], f"ISIC_{image_numbers[k]:07d}", code, dx_type, age,
                         sex, localization, dataset))
            k += 1
    frame = pd.DataFrame(rows, columns=list(METADATA_COLUMNS))
    return frame.sort_values(["lesion_id", "image_id"], kind="stable").reset_index(drop=True)


def _allocate_class_counts(n: int, proportions: dict[str, int]) -> dict[str, int]:
    """Split n images over the classes in the given proportions, at least 2 per class."""
    total = sum(proportions.values())
    exact = {c: n * proportions[c] / total for c in CLASS_CODES}
    counts = {c: max(2, math.floor(exact[c])) for c in CLASS_CODES}
    # Largest remainders first, then take back from the largest classes if the minimum
    # of 2 overshot.
    by_remainder = sorted(CLASS_CODES, key=lambda c: (-(exact[c] - math.floor(exact[c])), c))
    i = 0
    while sum(counts.values()) < n:
        counts[by_remainder[i % len(by_remainder)]] += 1
        i += 1
    while sum(counts.values()) > n:
        largest = max(CLASS_CODES, key=lambda c: counts[c])
        counts[largest] -= 1
    return counts


def _lesion_sizes(n_images: int, rng: np.random.Generator) -> list[int]:
    """Images per lesion for one class: the real 1..6 distribution, at least 2 lesions."""
    sizes: list[int] = []
    remaining = n_images
    while remaining > 0:
        size = min(int(rng.choice(6, p=_IMAGES_PER_LESION)) + 1, remaining)
        sizes.append(size)
        remaining -= size
    if len(sizes) == 1 and n_images >= 2:
        sizes = [n_images - n_images // 2, n_images // 2]
    return sizes


def _pick(rng: np.random.Generator, weights: dict[str, float]) -> str:
    keys = list(weights)
    p = np.array([weights[k] for k in keys], dtype=float)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]
