"""Prefect tasks of the extra data sources (`data.extra_sources`): the `feedback` source of
confirmed diagnoses, added to the training part only."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task

from skinsense.config import DataConfig
from skinsense.data.extra_sources import ExtraSource, add_to_training
from skinsense.data.records import SplitData
from skinsense.monitoring.feedback import SOURCE_NAME, export_source
from tasks.data import DATA_CACHE


# Not cached: the confirmed cases grow between runs, and the fingerprint this returns is
# what the next (cached) task is keyed on.
@task(name="export-extra-sources")
def export_extra_sources(cfg: DataConfig, home: Path) -> list[ExtraSource]:
    sources = []
    for name in cfg.extra_sources:
        if name == SOURCE_NAME:
            source = export_source(Path(home))
            print(f"source 'feedback': {source.n_images} confirmed cases, fingerprint "
                  f"{source.fingerprint[:16]}")
            sources.append(ExtraSource(name=name, metadata_csv=source.metadata_csv,
                                       images_dir=source.images_dir,
                                       fingerprint=source.fingerprint))
    return sources


@task(name="add-extra-sources", cache_policy=DATA_CACHE)
def add_extra_sources(split: SplitData, sources: list[ExtraSource], home: Path) -> SplitData:
    key = "-".join(f"{s.name}{s.fingerprint[:12]}" for s in sources)
    extended = add_to_training(split, sources, split.train_csv.parent / f"extra-{key}")
    report = json.loads((extended.train_csv.parent / "extra_sources.json").read_text())
    for name, outcome in report.items():
        print(f"source {name!r}: {len(outcome['added'])} images added to the training part, "
              f"{len(outcome['refused'])} refused")
        for refusal in outcome["refused"]:
            print(f"refused {refusal['image_id']}: {refusal['reason']}")
    return extended
