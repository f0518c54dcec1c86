"""Extra data sources added to the training part only (`data.extra_sources`), e.g. the
confirmed cases of the `feedback` source (`skinsense.monitoring.feedback.export_source`).

The HAM10000 split is made first and is unchanged by them: validation and test stay what
every earlier model was chosen and measured on. An extra image is refused, with the reason
written to the manifest `extra_sources.json`, when its lesion is in the validation or test
part (the model would be measured on a lesion it trained on) or its bytes equal a validation
or test image's.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
from pydantic import BaseModel

from skinsense.data.metadata import class_counts, load_metadata, write_csv_atomic
from skinsense.data.records import IMAGE_PATH_COLUMN, SOURCE_IMAGE_COLUMN, SplitData

MANIFEST_NAME = "extra_sources.json"
# The `feedback` source's image ids start with this (never a HAM10000 id: ISIC_...).
FEEDBACK_ID_PREFIX = "FB_"


class ExtraSource(BaseModel):
    """A HAM10000-format source: metadata CSV and a flat folder of `IMAGE_ID.jpg`."""

    name: str
    metadata_csv: Path
    images_dir: Path
    fingerprint: str


def _sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def add_to_training(split: SplitData, sources: list[ExtraSource], out_dir: Path) -> SplitData:
    """The split with the sources' images appended to its training part.

    Args:
        split: the HAM10000 split (its val and test parts are kept as they are).
        sources: the extra sources, each with its fingerprint.
        out_dir: folder of the new `train.csv` and of `extra_sources.json` (accepted image
            ids and refusals with their reasons, per source).

    Returns:
        The split with the new training manifest; `extra_sources` names each source's
        fingerprint.
    """
    train = pd.read_csv(split.train_csv, dtype={"lesion_id": str, "image_id": str})
    held_out = pd.concat([pd.read_csv(split.val_csv, dtype=str).assign(_part="validation"),
                          pd.read_csv(split.test_csv, dtype=str).assign(_part="test")])
    part_of_lesion = dict(zip(held_out["lesion_id"], held_out["_part"], strict=False))
    held_out_hashes = ({_sha256(p): (i, part) for i, p, part in zip(
        held_out["image_id"], held_out[IMAGE_PATH_COLUMN], held_out["_part"], strict=True)}
        if IMAGE_PATH_COLUMN in held_out else {})
    known_ids = set(train["image_id"])
    added, report = [], {}
    for source in sources:
        rows = load_metadata(source.metadata_csv)
        accepted, refused = [], []
        for row in rows.to_dict("records"):
            path = source.images_dir / f"{row['image_id']}.jpg"
            reason = None
            if not path.is_file():
                reason = f"image file {path} is missing"
            elif row["lesion_id"] in part_of_lesion:
                reason = (f"lesion {row['lesion_id']} is in the HAM10000 "
                          f"{part_of_lesion[row['lesion_id']]} part")
            elif (digest := _sha256(path)) in held_out_hashes:
                same, part = held_out_hashes[digest]
                reason = f"the same image as {same} of the HAM10000 {part} part"
            elif row["image_id"] in known_ids:
                reason = f"image {row['image_id']} is already in the training part"
            if reason:
                refused.append({"image_id": row["image_id"], "reason": reason})
                continue
            known_ids.add(row["image_id"])
            accepted.append(row["image_id"])
            added.append({**row, IMAGE_PATH_COLUMN: str(path.resolve())})
        report[source.name] = {"fingerprint": source.fingerprint, "added": accepted,
                               "refused": refused}
    out_dir.mkdir(parents=True, exist_ok=True)
    extended = pd.concat([train, pd.DataFrame(added, columns=train.columns)],
                         ignore_index=True) if added else train
    train_csv = (out_dir / "train.csv").resolve()
    write_csv_atomic(extended, train_csv)
    (out_dir / MANIFEST_NAME).write_text(json.dumps(report, indent=2))
    counts = {**split.class_counts, "train": class_counts(extended["dx"])}
    return split.model_copy(update={
        "train_csv": train_csv, "class_counts": counts,
        "extra_sources": {s.name: s.fingerprint for s in sources}})


def feedback_ids_in(manifest_csv: Path | None) -> list[str]:
    """The confirmed cases' image ids in a training manifest (sorted; [] without one): what
    a model card records as `trained_feedback_ids`."""
    if manifest_csv is None or not Path(manifest_csv).is_file():
        return []
    manifest = pd.read_csv(manifest_csv, dtype=str)
    ids = manifest["image_id"]
    if SOURCE_IMAGE_COLUMN in manifest:  # an oversampled copy stands for its original
        source = manifest[SOURCE_IMAGE_COLUMN].fillna("")
        ids = source.where(source != "", ids)
    return sorted({i for i in ids if i.startswith(FEEDBACK_ID_PREFIX)})
