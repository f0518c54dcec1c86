"""The synthetic HAM10000 generator: format, proportions, lesions, determinism, look."""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from skinsense.data import synth, synth_painter
from skinsense.data.records import METADATA_COLUMNS
from skinsense.labels import CLASS_CODES

FIXTURE_CSV = Path(__file__).parent / "fixtures" / "HAM10000_metadata.csv"
SMALL = {"n_images": 40, "seed": 3, "image_size": (64, 48), "isic_test_images": 7}


@pytest.fixture(scope="module")
def small_sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth.make_synthetic_ham10000(tmp_path_factory.mktemp("synth"), workers=1, **SMALL)


def _zip_names(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as archive:
        return [n for n in archive.namelist() if not n.endswith("/")]


def test_dataverse_file_names_and_real_columns(small_sample: Path) -> None:
    names = {p.name for p in small_sample.iterdir()}
    assert names == {
        "HAM10000_metadata.csv", "HAM10000_images_part_1.zip", "HAM10000_images_part_2.zip",
        "ISIC2018_Task3_Test_Images.zip", "ISIC2018_Task3_Test_GroundTruth.csv",
    }
    real_columns = pd.read_csv(FIXTURE_CSV, nrows=1).columns.tolist()
    meta = pd.read_csv(small_sample / "HAM10000_metadata.csv")
    assert meta.columns.tolist() == real_columns == list(METADATA_COLUMNS)
    assert len(meta) == 40
    assert meta["lesion_id"].str.fullmatch(r"HAM_\d{7}").all()
    assert meta["image_id"].str.fullmatch(r"ISIC_\d{7}").all()
    assert meta["image_id"].is_unique


def test_metadata_values_are_plausible(small_sample: Path) -> None:
    real = pd.read_csv(FIXTURE_CSV)
    meta = pd.read_csv(small_sample / "HAM10000_metadata.csv")
    for column in ("dx", "dx_type", "sex", "localization", "dataset"):
        assert set(meta[column]) <= set(real[column]), column
    assert meta["age"].dropna().between(0, 85).all()
    assert (meta["age"].dropna() % 5 == 0).all()
    # One lesion, one patient: its images share every metadata field but the image id.
    per_lesion = meta.drop(columns="image_id").fillna(-1).groupby("lesion_id").nunique()
    assert (per_lesion == 1).all().all()


def test_every_class_present_with_two_lesions_even_when_small(small_sample: Path) -> None:
    meta = pd.read_csv(small_sample / "HAM10000_metadata.csv")
    lesions_per_class = meta.groupby("dx")["lesion_id"].nunique()
    assert set(lesions_per_class.index) == set(CLASS_CODES)
    assert (lesions_per_class >= 2).all()
    # The smallest allowed sample: exactly 2 images (and 2 lesions) per class.
    tiny = synth.make_synthetic_metadata(14, seed=1)
    assert (tiny.groupby("dx")["lesion_id"].nunique() == 2).all()


def test_full_size_metadata_matches_real_proportions_and_lesion_groups() -> None:
    meta = synth.make_synthetic_metadata(10015, seed=0)
    real = pd.read_csv(FIXTURE_CSV)
    assert meta["dx"].value_counts().to_dict() == real["dx"].value_counts().to_dict()
    images_per_lesion = meta.groupby("lesion_id").size()
    assert 1.28 < len(meta) / len(images_per_lesion) < 1.40   # real: 10,015 / 7,470 = 1.34
    assert images_per_lesion.max() <= 6
    assert set(range(2, 5)) <= set(images_per_lesion)          # lesions with 2, 3, 4 images
    assert (images_per_lesion >= 2).sum() > 1500               # real: 1,956 such lesions


def test_zips_hold_every_image_split_about_in_half(small_sample: Path) -> None:
    meta = pd.read_csv(small_sample / "HAM10000_metadata.csv")
    part_1 = _zip_names(small_sample / "HAM10000_images_part_1.zip")
    part_2 = _zip_names(small_sample / "HAM10000_images_part_2.zip")
    assert sorted(part_1 + part_2) == sorted(f"{i}.jpg" for i in meta["image_id"])
    assert abs(len(part_1) - len(part_2)) <= 2
    with zipfile.ZipFile(small_sample / "HAM10000_images_part_1.zip") as archive:
        image = Image.open(io.BytesIO(archive.read(part_1[0])))
        assert image.format == "JPEG" and image.mode == "RGB"
        assert image.size == (64, 48)


def test_isic_test_set_in_metadata_format(small_sample: Path) -> None:
    truth = pd.read_csv(small_sample / "ISIC2018_Task3_Test_GroundTruth.csv")
    meta = pd.read_csv(small_sample / "HAM10000_metadata.csv")
    assert truth.columns.tolist() == list(METADATA_COLUMNS)
    assert len(truth) == 7 and set(truth["dx"]) == set(CLASS_CODES)
    assert not set(truth["lesion_id"]) & set(meta["lesion_id"])
    assert not set(truth["image_id"]) & set(meta["image_id"])
    names = _zip_names(small_sample / "ISIC2018_Task3_Test_Images.zip")
    assert sorted(names) == sorted(f"ISIC2018_Task3_Test_Images/{i}.jpg"
                                   for i in truth["image_id"])


def test_default_jpegs_are_600x450(tmp_path: Path) -> None:
    out = synth.make_synthetic_ham10000(tmp_path, n_images=14, workers=1)
    with zipfile.ZipFile(out / "HAM10000_images_part_2.zip") as archive:
        name = archive.namelist()[0]
        image = Image.open(io.BytesIO(archive.read(name)))
        assert image.size == (600, 450)
        # About quality 90: the luminance table's first entries are small.
        assert image.quantization[0][0] <= 4


def test_same_seed_gives_same_bytes_whatever_the_workers(
    small_sample: Path, tmp_path: Path
) -> None:
    again = synth.make_synthetic_ham10000(tmp_path / "again", workers=2, **SMALL)
    for path in small_sample.iterdir():
        assert (again / path.name).read_bytes() == path.read_bytes(), path.name
    other = synth.make_synthetic_ham10000(tmp_path / "other", workers=1,
                                          **{**SMALL, "seed": 4, "isic_test_images": 0})
    assert (other / "HAM10000_metadata.csv").read_bytes() != (
        small_sample / "HAM10000_metadata.csv").read_bytes()


def test_a_small_cnn_learns_the_class_at_32px() -> None:
    """A three-layer CNN trained briefly on 32x32 images, tested on unseen lesions."""
    images, labels, lesions = [], [], []
    for label, code in enumerate(CLASS_CODES):
        for lesion in range(12):
            for photo in range(2):
                job = synth_painter.ImageJob("x.jpg", code, lesion_key=label * 100 + lesion,
                                      image_key=label * 1000 + lesion * 10 + photo, seed=0,
                                      width=64, height=48)
                thumb = synth_painter.render_image(job).resize((32, 32), Image.BILINEAR)
                images.append(np.asarray(thumb))
                labels.append(label)
                lesions.append(lesion)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    y, lesion_ids = torch.tensor(labels), torch.tensor(lesions)
    train, test = lesion_ids < 8, lesion_ids >= 8
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny tensors: threads only add overhead on 2 cores
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            net = torch.nn.Sequential(
                torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(),
                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 7),
            )
            optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
            for _ in range(120):
                loss = torch.nn.functional.cross_entropy(net(x[train]), y[train])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            with torch.no_grad():
                accuracy = (net(x[test]).argmax(1) == y[test]).float().mean().item()
    finally:
        torch.set_num_threads(threads)
    # Chance is 1/7; about 0.8 when this was written (60 steps, before each lesion had its
    # own uneven skin, which the net takes more steps to learn to ignore).
    assert accuracy > 0.4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_images": 13}, "at least 2 per class"),
        ({"n_images": 0}, "at least 2 per class"),
        ({"n_images": 20.5}, "integer"),
        ({"image_size": (8, 8)}, "16..4096"),
        ({"image_size": (600,)}, "width, height"),
        ({"image_size": (600.0, 450)}, "two integers"),
        ({"workers": 0}, "workers"),
        ({"isic_test_images": 3}, "one per class"),
        ({"isic_test_images": -1}, "isic_test_images"),
    ],
)
def test_invalid_arguments_raise_clear_errors(
    tmp_path: Path, kwargs: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        synth.make_synthetic_ham10000(tmp_path, **{"n_images": 14, **kwargs})
    assert not any(tmp_path.iterdir())   # nothing written before the arguments are checked
