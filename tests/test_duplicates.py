"""The near-duplicate check across lesion_ids (issue 22): planted copies are found, distinct
lesions are not matched, and no near-duplicate pair straddles two parts of the split."""

from __future__ import annotations

import io
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from skinsense.config import DataConfig, NearDuplicateConfig
from skinsense.data import duplicates
from skinsense.data.metadata import validate
from skinsense.data.records import SPLIT_GROUP_COLUMN, FetchedData
from skinsense.data.split import run_split, split_by_lesion
from skinsense.data.synth import (
    PLANTED_NEAR_DUPLICATES_CSV,
    make_synthetic_ham10000,
    near_duplicate_copy,
)

FIXTURES = Path(__file__).parent / "fixtures"
REAL = FIXTURES / "real_samples"
N_IMAGES, N_PLANTED = 1000, 100


def _extract(sample: Path) -> FetchedData:
    images = sample / "images"
    images.mkdir(exist_ok=True)
    for archive in sample.glob("HAM10000_images_part_*.zip"):
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(images)
    return FetchedData(source=str(sample), metadata_csv=sample / "HAM10000_metadata.csv",
                       images_dir=images)


def _pair_set(frame: pd.DataFrame, a: str, b: str) -> set[frozenset]:
    return {frozenset(p) for p in zip(frame[a], frame[b], strict=True)}


@pytest.fixture(scope="module")
def planted(module_tmp):
    """1,000 synthetic images of the real size plus 100 planted near-duplicates, validated."""
    out = module_tmp("planted")
    make_synthetic_ham10000(out, n_images=N_IMAGES, seed=11, near_duplicates=N_PLANTED,
                            workers=2)
    validated = validate(_extract(out), out_dir=out / "validated", max_bad_fraction=0,
                         workers=2, near_duplicates=NearDuplicateConfig())
    truth = pd.read_csv(out / PLANTED_NEAR_DUPLICATES_CSV, dtype=str)
    pairs = pd.read_csv(validated.near_duplicates.pairs_csv, dtype={"image_id_a": str,
                                                                   "image_id_b": str})
    return validated, truth, pairs


@pytest.mark.slow
def test_every_planted_near_duplicate_is_found(planted):
    validated, truth, pairs = planted
    assert len(truth) == N_PLANTED
    missed = (_pair_set(truth, "image_id", "source_image_id")
              - _pair_set(pairs, "image_id_a", "image_id_b"))
    assert not missed, f"planted pairs not found: {sorted(map(sorted, missed))[:5]}"
    assert validated.near_duplicates.n_lesions_merged >= N_PLANTED
    assert validated.near_duplicates.preview_png.stat().st_size > 0
    # Both image ids, both lesion ids and the distance are recorded.
    assert set(duplicates.PAIR_COLUMNS) <= set(pairs.columns)
    assert (pairs["lesion_id_a"] != pairs["lesion_id_b"]).all()
    assert pairs["hamming"].le(NearDuplicateConfig().max_hamming).all()
    # Among them, mirrored or turned copies and copies rotated by nearly 5 degrees.
    mirrored = truth[truth["transpose"] != "none"]
    assert len(mirrored) >= 30 and set(mirrored["transpose"]) >= {
        "mirror_left_right", "mirror_top_bottom", "turn_90", "turn_180", "turn_270"}
    assert (truth["angle"].astype(float).abs() >= 4.5).sum() >= 5


@pytest.mark.slow
def test_distinct_synthetic_lesions_are_almost_never_matched(planted):
    validated, truth, pairs = planted
    copies = set(truth["image_id"])
    # Pairs between the original images only: every such pair is a false match.
    originals = pairs[~pairs["image_id_a"].isin(copies) & ~pairs["image_id_b"].isin(copies)]
    manifest = pd.read_csv(validated.manifest_csv, dtype=str)
    kept = manifest[~manifest["image_id"].isin(copies)]
    n = len(kept)
    same_lesion = int((kept.groupby("lesion_id").size() * (kept.groupby("lesion_id").size() - 1)
                       // 2).sum())
    distinct_pairs = n * (n - 1) // 2 - same_lesion
    # At most 1 in 100,000 (about 5 pairs among 1,000 images, the figure).
    assert len(originals) <= round(1e-5 * distinct_pairs), originals


@pytest.mark.slow
def test_no_planted_pair_straddles_two_parts_and_the_split_is_deterministic(planted, tmp_path):
    validated, truth, pairs = planted
    cfg = DataConfig(source="unused")
    split = run_split(validated, cfg, tmp_path / "a")
    again = run_split(validated, cfg, tmp_path / "b")
    part_of = {}
    for name in ("train", "val", "test"):
        rows = pd.read_csv(getattr(split, f"{name}_csv"), dtype=str)
        assert rows.equals(pd.read_csv(getattr(again, f"{name}_csv"), dtype=str))
        part_of.update(dict.fromkeys(rows["image_id"], name))
        # Every split group lies in one part.
        for other in ("train", "val", "test"):
            if other != name:
                others = pd.read_csv(getattr(split, f"{other}_csv"), dtype=str)
                assert not set(rows[SPLIT_GROUP_COLUMN]) & set(others[SPLIT_GROUP_COLUMN])
    for a, b in zip(truth["image_id"], truth["source_image_id"], strict=True):
        assert part_of[a] == part_of[b], (a, b)
    for a, b in zip(pairs["image_id_a"], pairs["image_id_b"], strict=True):
        assert part_of[a] == part_of[b], (a, b)
    # Still stratified: class shares of the test part stray from the whole about as much as
    # in a split of plain lesions (a class of 57 images puts about 8 in a 15% part).
    manifest = pd.read_csv(validated.manifest_csv, dtype=str)
    whole = manifest["dx"].value_counts(normalize=True)

    def straying(test: pd.DataFrame) -> float:
        shares = test["dx"].value_counts(normalize=True).reindex(whole.index, fill_value=0)
        return float((shares - whole).abs().max())

    by_lesion = split_by_lesion(manifest.drop(columns=SPLIT_GROUP_COLUMN))[2]
    assert straying(pd.read_csv(split.test_csv, dtype=str)) <= straying(by_lesion) + 0.015
    assert split.near_duplicates.n_pairs == len(pairs)


def _real_folder(tmp_path: Path, copies: dict[str, bytes]) -> FetchedData:
    """The eight real images plus `copies` (new image id -> JPEG bytes of a copy of the image
    named by the id's prefix), each copy under a new lesion id with its source's metadata."""
    labels = pd.read_csv(REAL / "labels.csv", dtype=str)
    metadata = pd.read_csv(FIXTURES / "HAM10000_metadata.csv", dtype=str)
    rows = metadata[metadata["image_id"].isin(labels["image_id"])].copy()
    images = tmp_path / "images"
    images.mkdir(parents=True)
    for image_id in rows["image_id"]:
        shutil.copy(REAL / f"{image_id}.jpg", images / f"{image_id}.jpg")
    extra = []
    for k, (new_id, data) in enumerate(sorted(copies.items())):
        source = rows[rows["image_id"] == new_id.split("-")[0]].iloc[0]
        (images / f"{new_id}.jpg").write_bytes(data)
        extra.append({**source.to_dict(), "image_id": new_id, "lesion_id": f"HAM_COPY{k:03d}"})
    table = pd.concat([rows, pd.DataFrame(extra, columns=rows.columns)], ignore_index=True)
    table.to_csv(tmp_path / "HAM10000_metadata.csv", index=False)
    return FetchedData(source="real", metadata_csv=tmp_path / "HAM10000_metadata.csv",
                       images_dir=images)


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def test_real_images_alone_give_no_pair_and_their_copies_are_found(tmp_path):
    plain = validate(_real_folder(tmp_path / "plain", {}), out_dir=tmp_path / "v0",
                     max_bad_fraction=0, workers=1, near_duplicates=NearDuplicateConfig())
    assert plain.near_duplicates.n_pairs == 0
    assert plain.near_duplicates.n_lesions_merged == 0

    rng = np.random.default_rng(0)
    copies = {}
    for path in sorted(REAL.glob("*.jpg")):
        image = Image.open(path).convert("RGB")
        w, h = image.size
        copies[f"{path.stem}-reencoded"] = _jpeg(image, 55)
        copies[f"{path.stem}-cropped"] = _jpeg(image.crop((9, 7, w - 9, h - 7)), 90)  # 3%
        copies[f"{path.stem}-altered"] = near_duplicate_copy(image, rng)
        # Mirrored, turned and rotated by 5 degrees (black corners, as an editor leaves them).
        copies[f"{path.stem}-mirrored"] = _jpeg(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), 85)
        copies[f"{path.stem}-flipped"] = _jpeg(image.transpose(Image.Transpose.FLIP_TOP_BOTTOM), 85)
        copies[f"{path.stem}-turned"] = _jpeg(image.transpose(Image.Transpose.ROTATE_90), 85)
        copies[f"{path.stem}-rotated"] = _jpeg(image.rotate(5, Image.Resampling.BILINEAR), 85)
    found = validate(_real_folder(tmp_path / "copies", copies), out_dir=tmp_path / "v1",
                     max_bad_fraction=0, workers=1, near_duplicates=NearDuplicateConfig())
    pairs = pd.read_csv(found.near_duplicates.pairs_csv, dtype=str)
    expected = {frozenset((name, name.split("-")[0])) for name in copies}
    found_pairs = _pair_set(pairs, "image_id_a", "image_id_b")
    assert expected <= found_pairs, sorted(map(sorted, expected - found_pairs))
    # The only other pairs are copies of one image with each other; never two real lesions.
    for pair in found_pairs - expected:
        assert len({name.split("-")[0] for name in pair}) == 1, pair
    manifest = pd.read_csv(found.manifest_csv, dtype=str)
    assert (manifest.groupby(SPLIT_GROUP_COLUMN)["image_id"].size() == 1 + 7).all()
    assert found.near_duplicates.n_groups == 8
    # The settings are part of the fingerprint.
    assert found.fingerprint != validate(
        _real_folder(tmp_path / "again", copies), out_dir=tmp_path / "v2", max_bad_fraction=0,
        workers=1, near_duplicates=NearDuplicateConfig(max_hamming=10)).fingerprint


def test_isic_test_images_that_nearly_duplicate_ham10000_are_reported_and_kept_out(tmp_path):
    fetched = _real_folder(tmp_path / "ham", {})
    test_dir = tmp_path / "isic"
    test_dir.mkdir()
    rows = []
    for k, path in enumerate(sorted(REAL.glob("*.jpg"))[:2]):
        image = Image.open(path).convert("RGB")
        (test_dir / f"ISIC_99{k:05d}.jpg").write_bytes(_jpeg(image.resize((450, 338)), 70))
        rows.append({"lesion_id": f"HAM_TEST{k}", "image_id": f"ISIC_99{k:05d}", "dx": "nv",
                     "dx_type": "histo", "age": "", "sex": "", "localization": "",
                     "dataset": "isic2018"})
    pd.DataFrame(rows).to_csv(tmp_path / "truth.csv", index=False)
    fetched = fetched.model_copy(update={"isic_test_metadata_csv": tmp_path / "truth.csv",
                                         "isic_test_images_dir": test_dir})
    validated = validate(fetched, out_dir=tmp_path / "v", max_bad_fraction=0, workers=1,
                         near_duplicates=NearDuplicateConfig())
    assert validated.near_duplicates.n_isic_test_images == 2
    isic_pairs = pd.read_csv(validated.near_duplicates.isic_test_pairs_csv, dtype=str)
    sources = {p.stem for p in sorted(REAL.glob("*.jpg"))[:2]}
    assert set(isic_pairs["image_id_b"]) == sources
    # With the ISIC test set as the test part, their HAM10000 lesions leave train and val.
    split = run_split(validated, DataConfig(source="x", isic_test_as_test=True,
                                            val_fraction=0.3), tmp_path / "split")
    kept = set(pd.read_csv(split.train_csv, dtype=str)["image_id"]) | set(
        pd.read_csv(split.val_csv, dtype=str)["image_id"])
    assert not kept & sources
    assert split.near_duplicates.n_isic_test_near_train == 0


def test_lesion_groups_are_connected_components_named_by_their_smallest_lesion():
    pairs = pd.DataFrame({"lesion_id_a": ["HAM_3", "HAM_2", "HAM_8"],
                          "lesion_id_b": ["HAM_2", "HAM_5", "HAM_9"]})
    groups = duplicates.lesion_groups(["HAM_5", "HAM_3", "HAM_2", "HAM_1", "HAM_9", "HAM_8"],
                                      pairs)
    assert groups == {"HAM_1": "HAM_1", "HAM_2": "HAM_2", "HAM_3": "HAM_2", "HAM_5": "HAM_2",
                      "HAM_8": "HAM_8", "HAM_9": "HAM_8"}


def test_the_hamming_bound_and_the_second_opinion_both_hold():
    rng = np.random.default_rng(0)
    # Each image's 8 variant hashes; the other variants are random, far from any other.
    hashes = rng.integers(0, 2**63, (6, duplicates.N_VARIANTS), dtype=np.uint64)
    hashes[1, 0] = hashes[0, 0] ^ np.uint64(0b111)     # 3 bits from image 0
    hashes[2, 0] = hashes[0, 0] ^ np.uint64(0b11111)   # 5 bits from image 0
    vectors = duplicates.similarity_vectors(rng.integers(0, 255, (6, 16, 16, 3), np.uint8))
    vectors[1] = vectors[0]
    vectors[2] = vectors[0]
    i, j, d, s = duplicates.find_pairs(hashes, vectors, np.arange(6), max_hamming=4,
                                       min_similarity=0.99)
    assert list(zip(i, j, d)) == [(0, 1, 3), (1, 2, 2)]   # (0, 2) is 5 bits apart
    vectors[1] = vectors[3]                            # close hash, different picture
    i, _, _, _ = duplicates.find_pairs(hashes, vectors, np.arange(6), max_hamming=8,
                                       min_similarity=0.99)
    assert list(i) == [0]                              # only (0, 2) is left
    # Images of one lesion are never paired with each other.
    i, _, _, _ = duplicates.find_pairs(hashes, vectors, np.array([0, 1, 0, 2, 3, 4]),
                                       max_hamming=8, min_similarity=0.99)
    assert len(i) == 0


@pytest.mark.parametrize("k", range(1, 8))
def test_a_mirrored_or_turned_picture_is_matched_under_its_variant_only(k):
    rng = np.random.default_rng(k)
    thumbs = rng.integers(0, 255, (2, 16, 16, 3), np.uint8)
    thumbs[1] = duplicates.dihedral(thumbs[0], k)     # image 1 is image 0 mirrored/turned
    hashes = rng.integers(0, 2**63, (2, duplicates.N_VARIANTS), dtype=np.uint64)
    # Image 1's variant inverse to k looks like image 0 again: its hash is image 0's.
    inverse = next(m for m in range(8)
                   if np.array_equal(duplicates.dihedral(thumbs[1], m), thumbs[0]))
    hashes[1, inverse] = hashes[0, 0] ^ np.uint64(0b11)
    vectors = duplicates.similarity_vectors(thumbs)
    i, j, d, s = duplicates.find_pairs(hashes, vectors, np.arange(2), max_hamming=4,
                                       min_similarity=0.99)
    assert list(zip(i, j, d)) == [(0, 1, 2)] and s[0] == pytest.approx(1, abs=1e-5)
    # The same pictures with the hash on another variant: no variant both hashes and looks
    # alike, so no pair.
    hashes[1] = rng.integers(0, 2**63, duplicates.N_VARIANTS, dtype=np.uint64)
    hashes[1, (inverse + 1) % 8] = hashes[0, 0]
    assert len(duplicates.find_pairs(hashes, vectors, np.arange(2), max_hamming=4,
                                     min_similarity=0.99)[0]) == 0


@pytest.mark.parametrize("method", list(Image.Transpose))
def test_signature_variants_are_the_hashes_of_the_mirrored_and_turned_photo(method):
    """The 8 hashes of a photo include (within a bit or two of resampling) imagehash's pHash
    of the photo mirrored or turned by PIL, and the thumbnail matches under that variant."""
    image = Image.open(min(REAL.glob("*.jpg"))).convert("RGB")
    hashes, thumb = duplicates.signature(image, 0.9)
    turned_hashes, turned_thumb = duplicates.signature(image.transpose(method), 0.9)
    distances = [int(np.bitwise_count(turned_hashes[0] ^ h)) for h in hashes]
    k = int(np.argmin(distances))
    assert distances[k] <= 2
    vectors = duplicates.similarity_vectors(np.stack([duplicates.dihedral(thumb, k),
                                                      turned_thumb]))
    assert float(vectors[0] @ vectors[1]) > 0.99


@pytest.mark.slow
def test_the_readme_demo_sample_has_no_near_duplicate(tmp_path):
    """`./run synth --images 1000 --seed 0` (the README demo's sample): no planted copy, and
    no two of its distinct lesions matched, so the demo's output shows a count of 0."""
    out = make_synthetic_ham10000(tmp_path, n_images=1000, seed=0, workers=2)
    validated = validate(_extract(out), out_dir=tmp_path / "validated", max_bad_fraction=0,
                         workers=2, near_duplicates=NearDuplicateConfig())
    assert validated.near_duplicates.n_pairs == 0
    assert validated.near_duplicates.n_lesions_merged == 0
