"""Prefect artifacts of a pipeline run: what an operator sees in the Prefect UI."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)

from skinsense import reports, stages
from skinsense.data import duplicates
from skinsense.data.records import OversampledData, SplitData
from skinsense.lifecycle.registry import PromotionDecision
from skinsense.paths import Home


@task(name="report-data")
def report_data(split: SplitData, oversampled: OversampledData) -> None:
    create_table_artifact(reports.data_summary_rows(split, oversampled),
                          key="skinsense-data-summary",
                          description="Images per class and split, before and after oversampling")


@task(name="report-near-duplicates")
def report_near_duplicates(split: SplitData) -> None:
    create_markdown_artifact(duplicates.markdown(split.near_duplicates),
                             key="skinsense-near-duplicates",
                             description="Near-duplicate images across lesion_ids, grouped "
                                         "before the split")


@task(name="report-metrics")
def report_metrics(candidates: list[stages.Candidate], home: Path) -> None:
    rows = stages.candidate_rows(candidates, Home(home))
    create_markdown_artifact(reports.metrics_markdown(rows), key="skinsense-metrics",
                             description="Test metrics per architecture")


@task(name="report-field")
def report_field(candidates: list[stages.Candidate], champion: dict) -> None:
    rows = stages.field_rows(candidates, champion)
    if rows:
        create_markdown_artifact(reports.field_markdown(rows), key="skinsense-field",
                                 description="Champion and candidates on confirmed diagnoses")


@task(name="report-subgroups")
def report_subgroups(best: stages.Candidate) -> None:
    create_markdown_artifact(reports.subgroups_markdown(best.arch, best.evaluation),
                             key="skinsense-subgroups",
                             description="Subgroup audit of the best architecture (test part)")


@task(name="report-promotion")
def report_promotion(decision: PromotionDecision) -> None:
    create_markdown_artifact(reports.promotion_markdown(decision.model_dump()),
                             key="skinsense-promotion", description="Champion/challenger decision")


@task(name="report-app")
def report_app(url: str, version: str | None) -> None:
    create_link_artifact(url, link_text=f"SkinSense app (model version {version})",
                         key="skinsense-app", description="The app serving the champion")
