"""Prefect tasks of registration, promotion and deployment."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from skinsense import stages
from skinsense.config import PipelineConfig, ServeConfig
from skinsense.data.records import ImageCache
from skinsense.lifecycle.registry import PromotionDecision
from skinsense.paths import Home
from skinsense.serving.deploy import Deployment


@task(name="champion-in-field")
def champion_in_field(cfg: PipelineConfig, home: Path, parent_run_id: str) -> dict:
    return stages.champion_in_field(cfg, Home(home), parent_run_id=parent_run_id)


@task(name="register-and-promote")
def register_and_promote(best: stages.Candidate, caches: dict[int, ImageCache],
                         cfg: PipelineConfig, home: Path, test_key: str,
                         parent_run_id: str) -> PromotionDecision:
    return stages.register_and_promote(best, caches, cfg, Home(home), test_key=test_key,
                                       parent_run_id=parent_run_id)


@task(name="deploy-app")
def deploy(cfg: ServeConfig, home: Path, expected_version: str | None) -> Deployment:
    return stages.deploy_champion(cfg, Home(home), expected_version=expected_version)
