"""Champion/challenger registration in the MLflow model registry.

Every run's best candidate is registered and gets the alias `challenger`. It becomes
`champion` only when it beats the current champion on the same test part (the champion is
evaluated again when it was tested on another split or data), so the registry only ever
promotes a better model. Operators can also promote a version by hand (`promote`) and undo a
promotion (`rollback`); every promotion records the champion it replaced as the tag
`previous_champion`, which is what a rollback returns to. The `champion` alias is always moved
last, so any failure leaves it where it was.

A registered version's model folder holds `weights.safetensors`, `model_card.json`,
`ood_gate.safetensors` (the out-of-domain gate, when evaluation fitted one), `model.onnx`
(logits and features, exported and checked against PyTorch at registration) and
`model.int8.onnx` (quantized and compared with fp32 by the evaluation, `skinsense.quantize`;
tags `int8_served` and `int8_reason` repeat the card's verdict): nothing in it
unpickles code when loaded. The version's tags repeat what the card says about calibration, the
referral rule and the subgroup audit (`card_tags`), so `show` can print them without
downloading anything.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from pydantic import BaseModel

from skinsense.lifecycle.export import check_onnx_agrees, export_onnx
from skinsense.lifecycle.packaging import ModelCard, load_card
from skinsense.serving.pyfunc import MODEL_DIR_ARTIFACT

log = logging.getLogger(__name__)

# Models from code: MLflow stores this file, not a cloudpickle of an object, so loading a
# registered model never unpickles code.
PYFUNC_CODE = Path(__file__).parents[1] / "serving" / "pyfunc_model.py"

CHAMPION, CHALLENGER = "champion", "challenger"
# Version tags written by promotions and rollbacks.
DECISION_TAG, PREVIOUS_TAG, PROMOTED_AT_TAG = "promotion_decision", "previous_champion", "promoted_at"
ROLLBACK_TAG = "rollback"
# Largest ONNX-vs-PyTorch logit difference accepted at registration (fp32 on the CPU).
ONNX_ATOL = 1e-4


class RegistryError(ValueError):
    """A registry operation cannot be done as asked; the message says why."""


class ChampionChange(BaseModel):
    """A manual promotion or a rollback of the `champion` alias."""

    model_name: str
    version: str
    previous_champion: str | None
    reason: str


class PromotionDecision(BaseModel):
    """What happened to a challenger, with both scores."""

    model_name: str
    version: str
    metric: str
    challenger_score: float
    champion_version: str | None
    champion_score: float | None
    promoted: bool
    reason: str


def register_candidate(model_dir: Path, *, run_id: str, model_name: str,
                       metric: str, score: float, tags: dict[str, str]) -> str:
    """Export ONNX into the model folder, log it as a pyfunc model in `run_id`, register it.

    The new version gets the alias `challenger`. The folder is logged with its safetensors
    weights, card and a `model.onnx` that was checked to agree with PyTorch (`ONNX_ATOL`).

    Returns:
        The new model version.

    Raises:
        skinsense.lifecycle.export.OnnxMismatchError: the ONNX export does not agree with PyTorch.
    """
    card = load_card(model_dir)
    export_onnx(model_dir)
    onnx_diff = check_onnx_agrees(model_dir, atol=ONNX_ATOL)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_CODE),
            artifacts={MODEL_DIR_ARTIFACT: str(model_dir)},
            registered_model_name=model_name,
            metadata={"model_card": card.model_dump(mode="json")},
            signature=_signature(),
            pip_requirements=_pip_requirements(),
        )
    version = str(info.registered_model_version)
    client = MlflowClient()
    for key, value in {**card_tags(card), **tags, "arch": card.arch,
                       f"test_{metric}": repr(float(score)),
                       "dataset_fingerprint": card.dataset_fingerprint,
                       "onnx_max_abs_diff": f"{onnx_diff:.3g}", **int8_tags(card)}.items():
        client.set_model_version_tag(model_name, version, key, str(value))
    client.set_registered_model_alias(model_name, CHALLENGER, version)
    return version


def int8_tags(card: ModelCard) -> dict[str, str]:
    """Whether the version's `model.int8.onnx` is served, and why (`skinsense.quantize`)."""
    if not card.int8:
        return {"int8_served": "false", "int8_reason": "no int8 comparison in the model card"}
    tags = {"int8_served": str(bool(card.int8.get("serve"))).lower(),
            "int8_reason": str(card.int8.get("reason", ""))[:5000]}
    if card.int8.get("speedup") is not None:
        tags["int8_speedup"] = f"{float(card.int8['speedup']):.3g}"
    return tags


# Test metrics of the card that go on a version as tags, beside the promotion metric.
CARD_METRIC_TAGS = ("test_ece", "test_ece_uncalibrated", "test_nll", "test_nll_uncalibrated",
                    "test_referral_sensitivity", "test_referral_specificity",
                    "test_referral_rate", "test_referral_roc_auc", "test_ood_auroc",
                    "test_ood_fpr_at_95_tpr", "test_ood_rate", "test_ood_auroc_max_softmax")


def card_tags(card: ModelCard) -> dict[str, str]:
    """Calibration, referral and subgroup figures of a model card, as version tags.

    `temperature`, `calibration` (what the temperature did on the test part, in words, and
    `calibration_helped`), `referral_threshold`, `referral_sensitivity_target`,
    `ood_threshold`, `ood_percentile`, `ood_gate_status` and `ood_gate_reason` (when the
    model has a gate; the status 'unusable' means it is served without it), the card's
    `CARD_METRIC_TAGS` and
    `test_gap_*` metrics (numbers, as text), and
    `test_referral_sensitivity_ci` / `test_referral_specificity_ci` ("[low, high]").
    Undefined (NaN) figures are left out.
    """
    tags = {"temperature": repr(float(card.temperature))}
    if card.calibration.get("summary"):
        tags["calibration"] = card.calibration["summary"]
        tags["calibration_helped"] = str(bool(card.calibration.get("helped"))).lower()
    if card.referral_threshold is not None:
        tags["referral_threshold"] = repr(float(card.referral_threshold))
        tags["referral_sensitivity_target"] = repr(float(card.referral_sensitivity_target or 0))
    if card.ood_threshold is not None:
        tags["ood_threshold"] = repr(float(card.ood_threshold))
        tags["ood_percentile"] = repr(float(card.ood_percentile or 0))
        if card.ood_gate.get("status"):
            tags["ood_gate_status"] = str(card.ood_gate["status"])
            # MLflow keeps tag values up to 5,000 characters.
            tags["ood_gate_reason"] = str(card.ood_gate.get("reason") or "")[:1000]
    for key, value in card.metrics.items():
        if (key in CARD_METRIC_TAGS or key.startswith("test_gap_")) and math.isfinite(value):
            tags[key] = repr(float(value))
    for name in ("sensitivity", "specificity"):
        low = card.test_referral.get(f"{name}_ci_low")
        high = card.test_referral.get(f"{name}_ci_high")
        if low is not None and high is not None:
            tags[f"test_referral_{name}_ci"] = f"[{low:.4f}, {high:.4f}]"
    return tags


# What MLflow answers for a model or alias that does not exist. Anything else (a refused
# login, a server error) must not pass for "no champion yet", or a new version could be
# promoted over a champion that was merely unreadable.
_MISSING = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}


def _is_missing(exc: MlflowException) -> bool:
    return exc.error_code in _MISSING


def current_champion(model_name: str) -> str | None:
    """The champion's version, or None when there is none yet.

    Raises:
        MlflowException: the registry could not be read (login refused, server error).
    """
    try:
        return str(MlflowClient().get_model_version_by_alias(model_name, CHAMPION).version)
    except MlflowException as exc:
        if _is_missing(exc):
            return None
        raise


def download_model_dir(model_name: str, version: str, dst: Path) -> Path:
    """The model folder (weights + card) of a registered version, downloaded into `dst`."""
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{model_name}/{version}", dst_path=str(dst))
    return Path(local) / "artifacts" / Path(_artifact_name(Path(local)))


def _artifact_name(model_root: Path) -> str:
    children = [p for p in (model_root / "artifacts").iterdir() if (p / "model_card.json").exists()]
    if len(children) != 1:
        raise FileNotFoundError(f"{model_root} holds no SkinSense model folder")
    return children[0].name


def promote_if_better(
    model_name: str,
    version: str,
    *,
    metric: str,
    challenger_score: float,
    min_delta: float,
    test_key: str,
    score_champion: Callable[[Path], float],
) -> PromotionDecision:
    """Make `version` the champion if it beats the current one by more than `min_delta`.

    Args:
        model_name: registered model name.
        version: the challenger's version.
        metric: name of the compared metric (higher is better).
        challenger_score: the challenger's score on this run's test part.
        min_delta: required margin; 0 means strictly better.
        test_key: identifies this run's test part (data fingerprint and split seed); a champion
            tagged with another key is scored again with `score_champion`.
        score_champion: evaluates a model folder on this run's test part.
    """
    client = MlflowClient()
    champion = current_champion(model_name)
    champion_score: float | None = None
    if champion is None:
        promoted, reason = True, "no champion yet: the first model is promoted"
    else:
        champion_mv = client.get_model_version(model_name, champion)
        if champion_mv.tags.get("test_key") == test_key and f"test_{metric}" in champion_mv.tags:
            champion_score = float(champion_mv.tags[f"test_{metric}"])
        else:
            with tempfile.TemporaryDirectory(prefix="skinsense-champion-") as tmp:
                champion_score = score_champion(download_model_dir(model_name, champion, Path(tmp)))
        promoted = challenger_score > champion_score + min_delta
        reason = (f"{metric} {challenger_score:.4f} vs champion v{champion} {champion_score:.4f} "
                  f"(min_delta {min_delta}): " + ("promoted" if promoted else "kept the champion"))
    decision = PromotionDecision(
        model_name=model_name, version=version, metric=metric, challenger_score=challenger_score,
        champion_version=champion, champion_score=champion_score, promoted=promoted, reason=reason)
    client.set_model_version_tag(model_name, version, DECISION_TAG, reason)
    if champion_score is not None:
        client.set_model_version_tag(model_name, version, "champion_score", repr(float(champion_score)))
    if promoted:
        _move_champion(client, model_name, version, previous=champion)
    return decision


def show(model_name: str) -> list[dict[str, Any]]:
    """Every version of `model_name`, oldest first, with what an operator needs to judge it.

    Returns:
        One dict per version: version, aliases, arch, metrics (the `test_*` tags, e.g.
        {'test_balanced_accuracy': '0.61', 'test_referral_sensitivity': '0.95',
        'test_referral_sensitivity_ci': '[0.91, 0.98]', 'test_gap_balanced_accuracy_sex':
        '0.03'}), temperature, referral_threshold, referral_sensitivity_target (None for a
        version registered before calibration), calibration and calibration_helped (what the
        temperature did on the test part; None before they were recorded), ood_threshold,
        ood_percentile, ood_gate_status, ood_gate_reason (None for a version without the
        out-of-domain gate), dataset_fingerprint, promotion_decision,
        previous_champion, promoted_at, rollback, run_id, created (ISO time).

    Raises:
        RegistryError: there is no registered model of that name.
    """
    client = MlflowClient()
    try:
        aliases_of: dict[str, list[str]] = {}
        for alias, version in client.get_registered_model(model_name).aliases.items():
            aliases_of.setdefault(str(version), []).append(alias)
    except MlflowException as exc:
        if not _is_missing(exc):
            raise
        raise RegistryError(f"no registered model named {model_name!r}") from exc
    rows = []
    for mv in _versions(client, model_name):
        tags = mv.tags
        rows.append({
            "version": str(mv.version),
            "aliases": sorted(aliases_of.get(str(mv.version), [])),
            "arch": tags.get("arch"),
            "metrics": {k: v for k, v in sorted(tags.items())
                        if k.startswith("test_") and k != "test_key"},
            "temperature": tags.get("temperature"),
            "referral_threshold": tags.get("referral_threshold"),
            "referral_sensitivity_target": tags.get("referral_sensitivity_target"),
            "ood_threshold": tags.get("ood_threshold"),
            "ood_percentile": tags.get("ood_percentile"),
            "ood_gate_status": tags.get("ood_gate_status"),
            "ood_gate_reason": tags.get("ood_gate_reason"),
            "calibration": tags.get("calibration"),
            "calibration_helped": tags.get("calibration_helped"),
            "dataset_fingerprint": tags.get("dataset_fingerprint"),
            "promotion_decision": tags.get(DECISION_TAG),
            "previous_champion": tags.get(PREVIOUS_TAG),
            "promoted_at": tags.get(PROMOTED_AT_TAG),
            "rollback": tags.get(ROLLBACK_TAG),
            "run_id": mv.run_id,
            "created": _iso(mv.creation_timestamp),
        })
    return rows


def promote(model_name: str, version: str, reason: str) -> ChampionChange:
    """Make `version` the champion by hand, recording why and which champion it replaces.

    Raises:
        RegistryError: the version does not exist (the message lists those that do) or is
            already the champion.
    """
    client = MlflowClient()
    version = _existing_version(client, model_name, str(version))
    champion = current_champion(model_name)
    if champion == version:
        raise RegistryError(f"{model_name} v{version} is already the champion")
    reason = reason.strip() or "no reason given"
    client.set_model_version_tag(model_name, version, DECISION_TAG, f"manual: {reason}")
    _move_champion(client, model_name, version, previous=champion)
    return ChampionChange(model_name=model_name, version=version, previous_champion=champion,
                          reason=f"manual: {reason}")


def rollback(model_name: str) -> ChampionChange:
    """Move `champion` back to the champion the current one replaced.

    That is the current champion's `previous_champion` tag or, for a champion promoted
    before that tag existed, the newest older version that was promoted. The target keeps
    its own `previous_champion`, so rolling back again walks further back in history.

    Raises:
        RegistryError: there is no champion, or no earlier champion to return to.
    """
    client = MlflowClient()
    champion = current_champion(model_name)
    if champion is None:
        raise RegistryError(f"{model_name} has no champion to roll back")
    champion_mv = client.get_model_version(model_name, champion)
    target = champion_mv.tags.get(PREVIOUS_TAG) or _previous_promoted(client, model_name, champion)
    if not target:
        raise RegistryError(f"{model_name} v{champion} is the first champion: there is no "
                            f"earlier champion to roll back to (promote a version instead)")
    try:
        client.get_model_version(model_name, target)
    except MlflowException as exc:
        raise RegistryError(f"{model_name} v{champion} replaced v{target}, which no longer "
                            f"exists; promote a version instead") from exc
    when = _now()
    client.set_model_version_tag(model_name, champion, ROLLBACK_TAG,
                                 f"demoted at {when}: rolled back to v{target}")
    client.set_model_version_tag(model_name, target, ROLLBACK_TAG,
                                 f"champion again at {when}: rolled back from v{champion}")
    client.set_registered_model_alias(model_name, CHAMPION, target)
    return ChampionChange(model_name=model_name, version=target, previous_champion=champion,
                          reason=f"rollback from v{champion}")


def _move_champion(client: MlflowClient, model_name: str, version: str, *,
                   previous: str | None) -> None:
    """Tag `version` with the champion it replaces, then move the alias (last)."""
    if previous is not None:
        client.set_model_version_tag(model_name, version, PREVIOUS_TAG, previous)
    elif PREVIOUS_TAG in client.get_model_version(model_name, version).tags:
        # A stale tag from an earlier promotion would send a rollback somewhere wrong.
        client.delete_model_version_tag(model_name, version, PREVIOUS_TAG)
    client.set_model_version_tag(model_name, version, PROMOTED_AT_TAG, _now())
    client.set_registered_model_alias(model_name, CHAMPION, version)


def _versions(client: MlflowClient, model_name: str) -> list:
    versions = client.search_model_versions(f"name = '{model_name}'")
    return sorted(versions, key=lambda mv: int(mv.version))


def _existing_version(client: MlflowClient, model_name: str, version: str) -> str:
    known = [str(mv.version) for mv in _versions(client, model_name)]
    if not known:
        raise RegistryError(f"no registered model named {model_name!r} (or it has no versions)")
    if version.removeprefix("v") not in known:
        raise RegistryError(f"{model_name} has no version {version}; versions: {', '.join(known)}")
    return version.removeprefix("v")


def _previous_promoted(client: MlflowClient, model_name: str, champion: str) -> str | None:
    earlier = [mv for mv in _versions(client, model_name) if int(mv.version) < int(champion)]
    for mv in reversed(earlier):
        decision = mv.tags.get(DECISION_TAG, "")
        # promote_if_better's reasons end in "promoted" (or say "is promoted" for the first).
        if PROMOTED_AT_TAG in mv.tags or decision.startswith("manual:") or "promoted" in decision:
            return str(mv.version)
    return None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    from skinsense.labels import CLASS_CODES

    # The gate's verdicts may be missing (a model without a gate, an image refused for its
    # quality), so they are optional columns.
    return ModelSignature(inputs=Schema([ColSpec("binary", "image")]),
                          outputs=Schema([*(ColSpec("double", code) for code in CLASS_CODES),
                                          ColSpec("boolean", "in_domain", required=False),
                                          ColSpec("double", "ood_score", required=False),
                                          ColSpec("boolean", "referral", required=False),
                                          ColSpec("string", "quality_issue")]))


def _pip_requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in
            ("torch", "torchvision", "pillow", "numpy", "scipy", "pandas", "safetensors",
             "mlflow", "onnxruntime")]


def _iso(timestamp_ms: int | None) -> str | None:
    if timestamp_ms is None:
        return None
    return datetime.fromtimestamp(timestamp_ms / 1000, timezone.utc).isoformat(timespec="seconds")
