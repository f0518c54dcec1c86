"""A real out-of-domain gate for the tiny test models, fitted on the real example images.

The app tests serve random-weight 32 px models (training one takes minutes). Their gate is
fitted the way the evaluation fits one (`skinsense.trust.gate`: class means and a shared
Ledoit-Wolf precision, threshold at a percentile of held-out scores), on flipped, rotated
and cropped views of the eight real HAM10000 examples, each labelled with its real class:
so the real examples are in domain for these models, and photos of other things are not.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from skinsense.labels import CODE_TO_INDEX
from skinsense.lifecycle.packaging import load_card, save_card
from skinsense.serving.app import EXAMPLES_DIR, example_images
from skinsense.trust.gate import choose_threshold, fit_gate, save_gate


def example_labels() -> dict[str, str]:
    """image file stem -> dx of the bundled examples."""
    with open(EXAMPLES_DIR / "labels.csv") as f:
        return {row["image_id"]: row["dx"] for row in csv.DictReader(f)}


def views(image: Image.Image) -> list[Image.Image]:
    """Fifteen views a dermatoscope could have taken (a lesion has no up): flips, turns, crops."""
    w, h = image.size
    turned = [image.transpose(t) for t in (Image.Transpose.FLIP_LEFT_RIGHT,
                                           Image.Transpose.FLIP_TOP_BOTTOM,
                                           Image.Transpose.ROTATE_90,
                                           Image.Transpose.ROTATE_180,
                                           Image.Transpose.ROTATE_270,
                                           Image.Transpose.TRANSPOSE)]
    crops = [image.crop(box) for box in ((0, 0, w * 4 // 5, h * 4 // 5),
                                         (w // 5, h // 5, w, h),
                                         (w // 10, 0, w, h * 9 // 10),
                                         (0, h // 10, w * 9 // 10, h))]
    return [image, *turned, *crops, *(c.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                                      for c in crops)]


def fit_example_gate(model_dir: Path, *, percentile: float = 95.0) -> float:
    """Fit and save a gate for `model_dir` on views of the real examples; returns its threshold.

    Eleven views of each example fit the statistics, the other four set the threshold.
    """
    from skinsense.lifecycle.export import weights_sha256
    from skinsense.serving.predictor import Predictor

    predictor = Predictor.from_model_dir(model_dir, backend="torch")
    labels = example_labels()
    train, train_labels, held_out = [], [], []
    for path in example_images():
        all_views = views(Image.open(path).convert("RGB"))
        train += all_views[:11]
        train_labels += [CODE_TO_INDEX[labels[path.stem]]] * 11
        held_out += all_views[11:]
    _, train_features = predictor.outputs(train)
    _, held_out_features = predictor.outputs(held_out)
    gate = fit_gate(train_features, np.array(train_labels),
                    weights_sha256=weights_sha256(model_dir))
    threshold = choose_threshold(gate.scores(held_out_features), percentile)
    save_gate(gate, model_dir)
    card = load_card(model_dir)
    card.ood_threshold, card.ood_percentile = threshold, percentile
    card.ood_gate = {"fitted_on": "views of the eight real example images (tests)"}
    save_card(card, model_dir)
    return threshold
