"""Near-duplicate images across lesion_ids, grouped before the split.

HAM10000 is split by `lesion_id`, but audits of ISIC archives (Abhishek et al., Scientific
Data 2025) found the same photograph under different lesion ids: re-encoded, resized,
slightly cropped or re-coloured copies. A pair on both sides of the split inflates every
test figure. This module finds such pairs and turns them into split groups:

1. A signature per image, taken from the decode the validate stage already does (a JPEG
   draft at about 1/8 scale): 64-bit perceptual hashes (`imagehash.phash`) of the central
   part of the frame (`central_fraction`, where a small rotation's black corners and a
   crop's lost rim do not reach) and of its 7 mirror images and quarter turns (`dihedral`;
   dermatoscopic photos are often filed mirrored), and a 16x16 colour thumbnail of it.
2. Candidates: every pair of images of different lesions whose hashes differ in at most
   `max_hamming` bits under some variant of the second image. The search is exhaustive but
   bounded and vectorised (XOR and popcount over blocks of rows, then an exact coarse bound
   on the thumbnails that no variant changes), a few seconds for the 50 million pairs of
   10,015 images.
3. A second opinion confirms a candidate: the cosine of the two thumbnails under that
   variant, each colour channel standardised (so a colour shift or brightness change
   cancels), at least `min_similarity`; a pair just short of it is compared again with the
   second thumbnail turned by 2.5 and 5 degrees either way. This removes hash collisions
   between lesions that merely look alike at 8x8 DCT coefficients. One photograph filed
   twice keeps its patient's sex, body site and (within a few years) age; a pair whose
   known sex, site or age disagree needs the stricter
   `min_similarity_other_patient` (a near-exact copy is still found, a look-alike of
   another patient is not).
4. The lesions linked by confirmed pairs form connected components (`scipy.sparse.csgraph`);
   each component is one split group, named after its smallest lesion_id.

The settings are part of the data fingerprint: other settings, other groups, another split.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from skinsense.data.records import (
    IMAGE_PATH_COLUMN,
    SPLIT_GROUP_COLUMN,
    NearDuplicates,
    write_csv_atomic,
)

if TYPE_CHECKING:  # decoding workers import this module; pandas would add 0.25 s to each
    import pandas as pd

    from skinsense.config import NearDuplicateConfig

log = logging.getLogger(__name__)

# Bump when signatures are computed differently (it is part of the data fingerprint).
SIGNATURE_VERSION = 2
THUMB_SIDE = 16
# Every mirror image and quarter turn of a picture (`dihedral`).
N_VARIANTS = 8
# The side of the grey square pHash looks at (imagehash's 8 x its highfreq_factor 4).
_HASH_INPUT = 32
PAIRS_CSV = "near_duplicate_pairs.csv"
ISIC_PAIRS_CSV = "isic_test_near_duplicates.csv"
SIGNATURES_NPZ = "near_duplicate_signatures.npz"
PREVIEW_PNG = "near_duplicate_pairs.png"
PAIR_COLUMNS = ("image_id_a", "lesion_id_a", "dx_a", "image_id_b", "lesion_id_b", "dx_b",
                "hamming", "similarity")
# Rows of hashes compared with all others at once: 512 x 10,015 x 8 bytes = 41 MB.
_BLOCK_ROWS = 512
_COARSE_SIDE = 4
# Years two records of one photograph's patient may differ by (a follow-up visit's photo
# filed as a new lesion is taken a year or two later).
AGE_TOLERANCE = 5.0


def draft_request(width: int, height: int) -> tuple[int, int]:
    """The size the validate stage asks the JPEG decoder for (`Image.draft`).

    1/8 scale (the cheapest DCT scaling) for a 600x450 photo, never below about 64x48, so
    that small images still give a thumbnail with some detail.
    """
    return max(1, width // 8, min(width, 64)), max(1, height // 8, min(height, 48))


def dihedral(array: np.ndarray, k: int) -> np.ndarray:
    """Variant `k` (0..7) of a square picture under the dihedral group: `k & 4` transposes
    it, then it is turned by `k & 3` quarter turns (every mirror image and quarter turn)."""
    return _dihedral(array, k, lambda a: np.swapaxes(a, 0, 1), lambda a: a[::-1])


def _dihedral(array, k, swap, flip):
    # A quarter turn is a transposition then a flip of the first axis (np.rot90).
    if k & 4:
        array = swap(array)
    for _ in range(k & 3):
        array = flip(swap(array))
    return array


def _dihedral_dct(coefficients: np.ndarray, k: int) -> np.ndarray:
    """`dihedral` on the 2D DCT-II coefficients of a picture (axes 1 and 2): a transposition
    swaps them, a flip of an axis multiplies coefficient u of it by (-1)^u."""
    signs = np.where(np.arange(coefficients.shape[1]) % 2, -1, 1).astype(coefficients.dtype)
    return _dihedral(coefficients, k, lambda c: np.swapaxes(c, 1, 2),
                     lambda c: c * signs[None, :, None, None])


def signature(image: Image.Image, central_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The perceptual hashes and the colour thumbnail of one decoded image.

    Args:
        image: The decoded image (any size; a JPEG draft is enough).
        central_fraction: Share of each side, centred, that both look at.

    Returns:
        (`(8,)` uint64: the 64-bit pHash of each `dihedral` variant of the centre, squashed
        to a square; `(16, 16, 3)` uint8 thumbnail of the same, variant 0).
    """
    import imagehash  # only the validate stage's workers need it

    rgb = image.convert("RGB")
    width, height = rgb.size
    margin = (1 - central_fraction) / 2
    box = (round(width * margin), round(height * margin),
           max(round(width * margin) + 1, round(width * (1 - margin))),
           max(round(height * margin) + 1, round(height * (1 - margin))))
    centre = rgb.crop(box)
    # The square grey picture pHash takes (imagehash resizes to 32x32 with LANCZOS), so that
    # each variant is that picture mirrored or turned, and hashed by the library.
    grey = np.asarray(centre.convert("L").resize((_HASH_INPUT, _HASH_INPUT),
                                                 Image.Resampling.LANCZOS))
    hashes = np.empty(N_VARIANTS, np.uint64)
    for k in range(N_VARIANTS):
        variant = Image.fromarray(np.ascontiguousarray(dihedral(grey, k)))
        bits = imagehash.phash(variant).hash.reshape(-1)
        hashes[k] = np.packbits(bits).view(">u8")[0]
    thumb = np.asarray(centre.resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BILINEAR,
                                     reducing_gap=None), dtype=np.uint8)
    return hashes, thumb


def similarity_vectors(thumbs: np.ndarray) -> np.ndarray:
    """Unit vectors whose dot product is the second opinion's similarity.

    Each colour channel of a thumbnail is standardised on its own (a gain or offset per
    channel, i.e. a colour shift or a brightness change, cancels), then the whole is
    flattened and scaled to unit length.
    """
    x = thumbs.reshape(len(thumbs), -1, 3).astype(np.float32)
    x = (x - x.mean(axis=1, keepdims=True)) / (x.std(axis=1, keepdims=True) + 1.0)
    flat = x.reshape(len(thumbs), -1)
    return flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-6)


def find_pairs(
    hashes: np.ndarray,
    vectors: np.ndarray,
    groups: np.ndarray,
    *,
    max_hamming: int,
    min_similarity: float,
    other: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    patients: tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
    min_similarity_other_patient: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Confirmed near-duplicate pairs within one set of images, or between two.

    A pair is confirmed under one `dihedral` variant of its second image (the same picture
    mirrored or turned): the hashes under that variant differ in at most `max_hamming` bits
    and the thumbnails under it are at least the needed similarity. The best variant counts.

    Args:
        hashes: `(N, 8)` uint64 perceptual hashes of each image's variants (`signature`).
        vectors: `(N, D)` unit vectors (`similarity_vectors`) of the thumbnails, variant 0.
        groups: `(N,)` integer codes; images with the same code (one lesion) are never
            paired within one set.
        max_hamming: Largest hash distance of a candidate.
        min_similarity: Smallest vector cosine that confirms a candidate.
        other: `(hashes, vectors, groups)` of a second set to pair the first with (every
            pair then has one image of each set; codes are compared across the sets).
        patients: For each set, `(codes, ages)`: `(N, K)` integer codes of patient metadata
            (sex, body site), -1 where unknown, and `(N,)` ages, NaN where unknown. A pair
            whose known codes disagree, or whose ages are more than `AGE_TOLERANCE` years
            apart, needs `min_similarity_other_patient` instead of `min_similarity`.
        min_similarity_other_patient: See `patients`.

    Returns:
        (i, j, hamming, similarity) arrays, i indexing the first set and j the second (or
        the first, with i < j), sorted by (i, j); hamming and similarity of the best variant.
    """
    within = other is None
    hashes_b, vectors_b, groups_b = (hashes, vectors, groups) if within else other
    hashes, hashes_b = (np.asarray(h, np.uint64).reshape(-1, N_VARIANTS)
                        for h in (hashes, hashes_b))
    # Cheap, exact bounds before the full similarity: for unit vectors, cosine >= s means
    # |a - b|^2 <= 2 (1 - s); an orthonormal projection (the lowest DCT coefficients) never
    # lengthens a - b, nor does the variant-invariant summary of it (`_invariant`), so no
    # pair that would be confirmed is left out.
    coarse, coarse_b = coarse_projection(vectors), coarse_projection(vectors_b)
    summary, summary_b = _invariant(coarse), _invariant(coarse_b)
    # (N, 48) of the first set, variant 0; (N, 8, 48) of every variant of the second
    coarse_b = np.stack([_dihedral_dct(coarse_b, k).reshape(len(coarse_b), -1)
                         for k in range(N_VARIANTS)], axis=1)
    coarse = coarse.reshape(len(coarse), -1)
    norms_b = (summary_b * summary_b).sum(axis=1)
    # (the bound lets through the pairs `_confirm` compares again under small rotations)
    radius = 2 * (1 - (min_similarity - _ROTATION_BAND)) + 1e-4   # slack for float32 rounding
    found = []
    columns = np.arange(len(hashes_b))
    for start in range(0, len(hashes), _BLOCK_ROWS):
        rows = slice(start, start + _BLOCK_ROWS)
        distance = np.bitwise_count(hashes[rows, 0, None] ^ hashes_b[None, :, 0])
        for k in range(1, N_VARIANTS):
            np.minimum(distance, np.bitwise_count(hashes[rows, 0, None] ^ hashes_b[None, :, k]),
                       out=distance)
        candidate = (distance <= max_hamming) & (groups[rows, None] != groups_b[None, :])
        if within:
            candidate &= columns[None, :] > np.arange(start, start + len(distance))[:, None]
        block = summary[rows]
        apart = (block * block).sum(axis=1)[:, None] + norms_b[None, :] - 2 * block @ summary_b.T
        candidate &= apart <= radius
        i, j = np.nonzero(candidate)
        if len(i):
            found.append(_confirm(i + start, j, hashes, hashes_b, coarse, coarse_b, vectors,
                                  vectors_b, max_hamming=max_hamming, radius=radius,
                                  min_similarity=min_similarity))
    i, j, distance, similarity = (np.concatenate(parts) for parts in zip(*found, strict=True)) \
        if found else (np.zeros(0, np.int64),) * 3 + (np.zeros(0, np.float32),)
    keep = similarity >= _needed(i, j, patients, min_similarity, min_similarity_other_patient)
    return i[keep], j[keep], distance[keep], similarity[keep]


def _needed(i, j, patients, min_similarity: float, other_patient: float) -> np.ndarray:
    """The similarity each pair (i, j) needs: `other_patient` where the known patient
    metadata disagree (see `find_pairs`), `min_similarity` elsewhere."""
    needed = np.full(len(i), min_similarity, np.float32)
    if patients is not None and len(i):
        (codes_a, ages_a), (codes_b, ages_b) = patients
        a, b = codes_a[i], codes_b[j]
        differ = ((a != b) & (a >= 0) & (b >= 0)).any(axis=1)
        with np.errstate(invalid="ignore"):
            differ |= np.abs(ages_a[i] - ages_b[j]) > AGE_TOLERANCE   # NaN: unknown
        needed[differ] = max(min_similarity, other_patient)
    return needed


def _confirm(i, j, hashes, hashes_b, coarse, coarse_b, vectors, vectors_b, *,
             max_hamming: int, radius: float, min_similarity: float):
    """For candidate pairs (i, j): (i, j, hamming, similarity) under the variant of j with
    the best similarity among those within `max_hamming` bits and the coarse bound
    (similarity -1 where none is). A pair just short of `min_similarity` is compared once
    more with its variant turned by a few degrees either way (`_ROTATIONS`)."""
    best = np.full(len(i), -1.0, np.float32)
    best_distance = np.zeros(len(i), np.int64)
    best_variant = np.zeros(len(i), np.int64)
    for k in range(N_VARIANTS):
        distance = np.bitwise_count(hashes[i, 0] ^ hashes_b[j, k]).astype(np.int64)
        check = np.nonzero(distance <= max_hamming)[0]
        gap = ((coarse[i[check]] - coarse_b[j[check], k]) ** 2).sum(axis=1)
        check = check[gap <= radius]
        if not len(check):
            continue
        similarity = np.einsum("nd,nd->n", vectors[i[check]],
                               vectors_b[j[check]][:, _variant_order(k)])
        better = similarity > best[check]
        best[check[better]] = similarity[better]
        best_distance[check[better]] = distance[check[better]]
        best_variant[check[better]] = k
    near = np.nonzero((best >= min_similarity - _ROTATION_BAND) & (best < min_similarity))[0]
    for k in np.unique(best_variant[near]):
        pairs = near[best_variant[near] == k]
        b = vectors_b[j[pairs]][:, _variant_order(int(k))]
        for angle in _ROTATIONS:
            for aspect in _ASPECTS:
                turned = _rotated(b, angle, aspect)
                similarity = np.einsum("nd,nd->n", vectors[i[pairs]], turned)
                best[pairs] = np.maximum(best[pairs], similarity - _ROTATION_PENALTY)
    return i, j, best_distance, best


# A copy rotated by up to 5 degrees loses up to about 0.04 of thumbnail similarity; a pair
# that close to the bound is also compared with its second image turned by these angles.
_ROTATION_BAND = 0.04
_ROTATIONS = (-5.0, -2.5, 2.5, 5.0)
# A turned comparison is 8 more chances for two look-alike lesions to pass: it counts with
# this much taken off (a copy turned back scores well above the bound; measured 2026-12-04).
_ROTATION_PENALTY = 0.005
# The thumbnail squashes the frame to a square, so a photo's turn is a turn of a stretched
# picture: width/height of a landscape HAM10000 photo (600x450) and of a portrait one.
_ASPECTS = (4 / 3, 3 / 4)


def _rotated(vectors: np.ndarray, angle: float, aspect: float) -> np.ndarray:
    """Unit similarity vectors of the thumbnails of photos of `aspect` (width/height) turned
    by `angle` degrees about their centre (bilinear, edges clamped), re-centred per channel
    and scaled to unit length."""
    index, weight = _rotation_taps(angle, aspect)
    images = vectors.reshape(len(vectors), THUMB_SIDE * THUMB_SIDE, 3)
    turned = np.einsum("npkc,pk->npc", images[:, index, :], weight)
    turned -= turned.mean(axis=1, keepdims=True)
    flat = turned.reshape(len(vectors), -1)
    return flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-6)


@functools.cache
def _rotation_taps(angle: float, aspect: float) -> tuple[np.ndarray, np.ndarray]:
    """For each thumbnail pixel, the 4 source pixels and bilinear weights of a turn of the
    photo (of width/height `aspect`) that the thumbnail squashes to a square."""
    centre = (THUMB_SIDE - 1) / 2
    y, x = np.mgrid[0:THUMB_SIDE, 0:THUMB_SIDE].astype(np.float64) - centre
    t = np.deg2rad(angle)
    x = x * aspect   # to the photo's proportions, turn, and back
    sx = np.clip((np.cos(t) * x - np.sin(t) * y) / aspect + centre, 0, THUMB_SIDE - 1)
    sy = np.clip(np.sin(t) * x + np.cos(t) * y + centre, 0, THUMB_SIDE - 1)
    x0 = np.minimum(np.floor(sx).astype(int), THUMB_SIDE - 2)
    y0 = np.minimum(np.floor(sy).astype(int), THUMB_SIDE - 2)
    fx, fy = sx - x0, sy - y0
    index = np.stack([y0 * THUMB_SIDE + x0, y0 * THUMB_SIDE + x0 + 1,
                      (y0 + 1) * THUMB_SIDE + x0, (y0 + 1) * THUMB_SIDE + x0 + 1], axis=-1)
    weight = np.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], axis=-1)
    return index.reshape(-1, 4), weight.reshape(-1, 4).astype(np.float32)


@functools.cache
def _variant_order(k: int) -> np.ndarray:
    """Indices that turn a flattened `(16, 16, 3)` thumbnail into its variant `k`."""
    order = np.arange(THUMB_SIDE * THUMB_SIDE * 3).reshape(THUMB_SIDE, THUMB_SIDE, 3)
    return np.ascontiguousarray(dihedral(order, k)).reshape(-1)


def coarse_projection(vectors: np.ndarray) -> np.ndarray:
    """The lowest 4x4 2D DCT coefficients of each colour channel of the thumbnails,
    `(N, 4, 4, 3)`: an orthonormal projection of `similarity_vectors` (48 of 768
    dimensions, most of the energy of a smooth photo)."""
    from scipy.fft import dctn

    images = vectors.reshape(len(vectors), THUMB_SIDE, THUMB_SIDE, 3)
    low = dctn(images, axes=(1, 2), norm="ortho")[:, :_COARSE_SIDE, :_COARSE_SIDE, :]
    return np.ascontiguousarray(low, dtype=np.float32)


def _invariant(coarse: np.ndarray) -> np.ndarray:
    """A summary of `(N, 4, 4, 3)` coefficients that no `dihedral` variant changes (flips
    only change signs, a transposition swaps u and v): the absolute values, each pair
    (u, v), (v, u) sorted. Both steps are 1-Lipschitz, so the distance of two summaries
    is never more than that of the coefficients under any variant: an exact bound."""
    size = coarse.shape[1]
    upper = np.triu_indices(size, 1)
    magnitude = np.abs(coarse)
    first = magnitude[:, upper[0], upper[1]]
    second = magnitude[:, upper[1], upper[0]]
    diagonal = magnitude[:, np.arange(size), np.arange(size)]
    summary = np.concatenate([np.maximum(first, second), np.minimum(first, second), diagonal],
                             axis=1)
    return np.ascontiguousarray(summary.reshape(len(coarse), -1), dtype=np.float32)


def lesion_groups(lesion_ids: Sequence[str], pairs: pd.DataFrame) -> dict[str, str]:
    """Each lesion's split group: the smallest lesion_id of its connected component.

    Args:
        lesion_ids: Every lesion of the data (repeats are fine).
        pairs: Confirmed pairs with `lesion_id_a` and `lesion_id_b`.

    Returns:
        lesion_id -> group name, for every lesion given.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    names = np.unique(np.asarray(list(lesion_ids), dtype=object).astype(str))
    if not len(pairs):
        return {name: name for name in names}
    index = {name: k for k, name in enumerate(names)}
    a = np.fromiter((index[x] for x in pairs["lesion_id_a"]), np.int64, len(pairs))
    b = np.fromiter((index[x] for x in pairs["lesion_id_b"]), np.int64, len(pairs))
    graph = coo_matrix((np.ones(len(a)), (a, b)), shape=(len(names), len(names)))
    _, component = connected_components(graph, directed=False)
    # names are sorted, so the first member met of each component is its smallest id.
    first: dict[int, str] = {}
    for name, label in zip(names, component, strict=True):
        first.setdefault(int(label), name)
    return {name: first[int(label)] for name, label in zip(names, component, strict=True)}


def settings_of(cfg: NearDuplicateConfig) -> dict:
    """The settings that decide the groups, as recorded and fingerprinted."""
    return {"signature_version": SIGNATURE_VERSION,
            "hash": f"imagehash.phash 64-bit, best of {N_VARIANTS} mirror/turn variants",
            "thumbnail": f"{THUMB_SIDE}x{THUMB_SIDE} RGB, channels standardised",
            **cfg.model_dump(mode="json")}


def fingerprint_suffix(cfg: NearDuplicateConfig) -> str:
    """The text the data fingerprint is chained with (settings in a stable order)."""
    return "near-duplicates:" + json.dumps(settings_of(cfg), sort_keys=True)


def check_near_duplicates(
    manifest: pd.DataFrame,
    hashes: np.ndarray,
    thumbs: np.ndarray,
    cfg: NearDuplicateConfig,
    out_dir: Path,
    *,
    isic: tuple[pd.DataFrame, np.ndarray, np.ndarray] | None = None,
) -> tuple[pd.DataFrame, NearDuplicates]:
    """Find near-duplicates across lesions, group the lesions, write the report files.

    Args:
        manifest: The validated rows (lesion_id, image_id, dx, image_path), row i having
            signature i.
        hashes: `(N, 8)` uint64 hashes of each image's variants (`signature`).
        thumbs: `(N, 16, 16, 3)` uint8 thumbnails.
        cfg: The check's settings.
        out_dir: Folder for the pairs CSV, the signatures and the preview PNG.
        isic: The ISIC 2018 test set's manifest, hashes and thumbnails, to pair with
            HAM10000 (never grouped: it is a test set of its own).

    Returns:
        The manifest with `split_group` added, and the record of what was found.
    """
    import pandas as pd

    out_dir = Path(out_dir)
    lesion_codes, _ = pd.factorize(manifest["lesion_id"], sort=True)
    vectors = similarity_vectors(thumbs)
    patient = _patient_codes(manifest), _ages(manifest)
    i, j, distance, similarity = find_pairs(
        hashes, vectors, lesion_codes, max_hamming=cfg.max_hamming,
        min_similarity=cfg.min_similarity, patients=(patient, patient),
        min_similarity_other_patient=cfg.min_similarity_other_patient)
    pairs = _pairs_frame(manifest, manifest, i, j, distance, similarity)
    groups = lesion_groups(manifest["lesion_id"], pairs)
    manifest = manifest.copy()
    manifest[SPLIT_GROUP_COLUMN] = manifest["lesion_id"].map(groups)
    group_sizes = pd.Series(groups).value_counts()
    merged = group_sizes[group_sizes > 1]

    pairs_csv = out_dir / PAIRS_CSV
    _write_csv(pairs, pairs_csv)
    signatures_npz = out_dir / SIGNATURES_NPZ
    np.savez(signatures_npz, image_id=manifest["image_id"].to_numpy(dtype=str),
             hashes=hashes, thumbs=thumbs)
    record = NearDuplicates(
        settings=settings_of(cfg), pairs_csv=pairs_csv.resolve(), n_pairs=len(pairs),
        n_lesions_merged=int(merged.sum()), n_groups=len(merged),
        signatures_npz=signatures_npz.resolve())
    if len(pairs):
        record.preview_png = save_preview(pairs, _paths_by_id(manifest),
                                          out_dir / PREVIEW_PNG).resolve()
    if isic is not None:
        isic_manifest, isic_hashes, isic_thumbs = isic
        # Codes of the test set never equal a HAM10000 lesion's code, so every pair counts.
        ti, hi, d, s = find_pairs(
            isic_hashes, similarity_vectors(isic_thumbs),
            np.full(len(isic_hashes), -1, np.int64), max_hamming=cfg.max_hamming,
            min_similarity=cfg.min_similarity, other=(hashes, vectors, lesion_codes))
        isic_pairs = _pairs_frame(isic_manifest, manifest, ti, hi, d, s)
        isic_csv = out_dir / ISIC_PAIRS_CSV
        _write_csv(isic_pairs, isic_csv)
        record.isic_test_pairs_csv = isic_csv.resolve()
        record.n_isic_test_pairs = len(isic_pairs)
        record.n_isic_test_images = int(isic_pairs["image_id_a"].nunique())
    log.info("near-duplicates: %d pair(s) across lesions, %d lesion(s) merged into %d "
             "group(s)", record.n_pairs, record.n_lesions_merged, record.n_groups)
    return manifest, record


def isic_test_near_train(record: NearDuplicates, train_image_ids: Sequence[str]) -> int:
    """How many ISIC 2018 test images nearly duplicate an image of the training part."""
    import pandas as pd

    if record.isic_test_pairs_csv is None:
        return 0
    pairs = pd.read_csv(record.isic_test_pairs_csv, dtype=str)
    return int(pairs.loc[pairs["image_id_b"].isin(set(train_image_ids)), "image_id_a"]
               .nunique())


def describe(record: NearDuplicates | None) -> str:
    """One line for a terminal or a log: the counts and where the pairs are."""
    if record is None:
        return "near-duplicates across lesions: not checked (near_duplicates.enabled=false)"
    text = (f"near-duplicates across lesions: {record.n_pairs} pair(s), "
            f"{record.n_lesions_merged} lesion(s) merged into {record.n_groups} group(s) "
            f"(pairs: {record.pairs_csv})")
    if record.isic_test_pairs_csv is not None:
        text += (f"; ISIC 2018 test images nearly duplicating a HAM10000 image: "
                 f"{record.n_isic_test_images}")
        if record.n_isic_test_near_train is not None:
            text += f" ({record.n_isic_test_near_train} of them a training image)"
    return text


def markdown(record: NearDuplicates | None, *, max_png_bytes: int = 400_000) -> str:
    """The Prefect artifact: the counts, and the preview PNG inline (a data URI)."""
    import base64

    lines = ["# Near-duplicate images across lesion_ids", "", describe(record)]
    if record is None:
        return "\n".join(lines)
    lines += ["", f"- pairs: **{record.n_pairs}** (CSV: `{record.pairs_csv}`)",
              f"- lesions merged: **{record.n_lesions_merged}** into {record.n_groups} "
              "split group(s); no group is in two parts of the split",
              f"- settings (part of the data fingerprint): `{record.settings}`"]
    if record.isic_test_pairs_csv is not None:
        lines.append(f"- ISIC 2018 test images nearly duplicating a HAM10000 image: "
                     f"**{record.n_isic_test_images}** (`{record.isic_test_pairs_csv}`)")
    png = record.preview_png
    if png is not None and png.is_file() and png.stat().st_size <= max_png_bytes:
        data = base64.b64encode(png.read_bytes()).decode()
        lines += ["", f"![a few pairs side by side](data:image/png;base64,{data})"]
    elif png is not None:
        lines += ["", f"A few pairs side by side: `{png}`"]
    return "\n".join(lines)


def save_preview(pairs: pd.DataFrame, paths: dict[str, str], out_png: Path,
                 *, max_pairs: int = 4) -> Path:
    """A PNG of the first few pairs side by side, with their ids and distances."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = pairs.head(max_pairs)
    fig, axes = plt.subplots(len(shown), 2, figsize=(6, 2.4 * len(shown)), squeeze=False)
    for row, pair in zip(axes, shown.itertuples(index=False), strict=True):
        for ax, image_id, lesion_id in ((row[0], pair.image_id_a, pair.lesion_id_a),
                                        (row[1], pair.image_id_b, pair.lesion_id_b)):
            with Image.open(paths[image_id]) as image:
                image.draft("RGB", (200, 150))
                ax.imshow(image.convert("RGB"))
            ax.set_title(f"{image_id} ({lesion_id})", fontsize=8)
            ax.axis("off")
        row[0].text(1.0, 0.5, f"d={pair.hamming}\nsim={pair.similarity:.3f}", fontsize=7,
                    ha="center", va="center", transform=row[0].transAxes,
                    bbox={"facecolor": "white", "alpha": 0.8})
    fig.suptitle(f"near-duplicates across lesions: {len(pairs)} pair(s)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    return out_png


def _pairs_frame(left: pd.DataFrame, right: pd.DataFrame, i: np.ndarray, j: np.ndarray,
                 distance: np.ndarray, similarity: np.ndarray) -> pd.DataFrame:
    import pandas as pd

    a, b = left.iloc[i], right.iloc[j]
    frame = pd.DataFrame({
        "image_id_a": a["image_id"].to_numpy(), "lesion_id_a": a["lesion_id"].to_numpy(),
        "dx_a": a["dx"].to_numpy(), "image_id_b": b["image_id"].to_numpy(),
        "lesion_id_b": b["lesion_id"].to_numpy(), "dx_b": b["dx"].to_numpy(),
        "hamming": distance.astype(int), "similarity": np.round(similarity, 4)},
        columns=list(PAIR_COLUMNS))
    return frame.sort_values(["image_id_a", "image_id_b"], kind="stable").reset_index(drop=True)


# Metadata of the patient that one photograph keeps wherever it is filed (age, which moves
# between the visits of a follow-up, is compared within AGE_TOLERANCE).
PATIENT_COLUMNS = ("sex", "localization")
_UNKNOWN = {"", "unknown", "nan"}


def _patient_codes(manifest: pd.DataFrame) -> np.ndarray:
    """(N, 2) codes of sex and body site, -1 where unknown or absent."""
    import pandas as pd

    codes = []
    for column in PATIENT_COLUMNS:
        if column not in manifest.columns:
            codes.append(np.full(len(manifest), -1, np.int64))
            continue
        values = manifest[column].astype(str).str.strip().str.lower()
        code, _ = pd.factorize(values.where(~values.isin(_UNKNOWN)), sort=True)
        codes.append(code.astype(np.int64))
    return np.stack(codes, axis=1)


def _ages(manifest: pd.DataFrame) -> np.ndarray:
    import pandas as pd

    if "age" not in manifest.columns:
        return np.full(len(manifest), np.nan)
    return pd.to_numeric(manifest["age"], errors="coerce").to_numpy(dtype=float)


def _paths_by_id(manifest: pd.DataFrame) -> dict[str, str]:
    return dict(zip(manifest["image_id"], manifest[IMAGE_PATH_COLUMN], strict=True))


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    write_csv_atomic(frame, path)
