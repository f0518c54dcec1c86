"""Champion/challenger promotion against a local SQLite MLflow store."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from skinsense.lifecycle import registry, tracking
from skinsense.lifecycle.export import ONNX_FILE, weights_sha256
from skinsense.lifecycle.packaging import ModelCard, save_model_dir
from skinsense.models import build_model

_EXPORTS: dict[str, bytes] = {}


@pytest.fixture(autouse=True)
def reuse_onnx_exports(monkeypatch):
    """Export each distinct set of weights once: an export takes seconds on 2 cores.

    The candidates below share seeded weights, so every registration still holds the real
    export of exactly its weights (and `check_onnx_agrees` still runs on it).
    """
    real_export = registry.export_onnx

    def export_once(model_dir: Path, out_path: Path | None = None) -> Path:
        key = weights_sha256(model_dir)
        if key not in _EXPORTS:
            _EXPORTS[key] = real_export(model_dir).read_bytes()
        out = out_path or model_dir / ONNX_FILE
        out.write_bytes(_EXPORTS[key])
        return out

    monkeypatch.setattr(registry, "export_onnx", export_once)


@pytest.fixture
def store(home):
    tracking.configure(home)
    return tracking.ensure_experiment("skinsense-test", home)


def candidate(tmp_path: Path, name: str, experiment_id: str) -> tuple[Path, str]:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model("resnet18", image_size=32)
    model_dir = save_model_dir(model, ModelCard(arch="resnet18", image_size=32), tmp_path / name)
    run_id = MlflowClient().create_run(experiment_id).info.run_id
    return model_dir, run_id


def register(tmp_path, experiment_id, name, score, test_key="k1", rescore=None):
    model_dir, run_id = candidate(tmp_path, name, experiment_id)
    version = registry.register_candidate(model_dir, run_id=run_id, model_name="skin",
                                          metric="balanced_accuracy", score=score,
                                          tags={"test_key": test_key})
    return registry.promote_if_better(
        "skin", version, metric="balanced_accuracy", challenger_score=score, min_delta=0.0,
        test_key=test_key, score_champion=rescore or (lambda _: pytest.fail("no re-scoring")))


@pytest.mark.slow
def test_better_worse_better_gives_the_right_champion(tmp_path, store):
    first = register(tmp_path, store, "a", 0.50)
    assert first.promoted and registry.current_champion("skin") == first.version
    worse = register(tmp_path, store, "b", 0.40)
    assert not worse.promoted and registry.current_champion("skin") == first.version
    assert worse.champion_score == pytest.approx(0.50)
    equal = register(tmp_path, store, "c", 0.50)
    assert not equal.promoted  # min_delta 0 means strictly better
    better = register(tmp_path, store, "d", 0.60)
    assert better.promoted and registry.current_champion("skin") == better.version
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("skin", "challenger").version) == better.version
    assert "promoted" in client.get_model_version("skin", better.version).tags["promotion_decision"]


def test_champion_from_another_split_is_scored_again(tmp_path, store):
    register(tmp_path, store, "a", 0.90, test_key="old-split")
    scored = []
    decision = register(tmp_path, store, "b", 0.55, test_key="new-split",
                        rescore=lambda d: scored.append((d / "model_card.json").exists()) or 0.50)
    assert scored == [True]
    assert decision.promoted and decision.champion_score == pytest.approx(0.50)


def test_failure_while_registering_leaves_the_champion(tmp_path, store, monkeypatch):
    first = register(tmp_path, store, "a", 0.5)

    def broken(*args, **kwargs):
        raise RuntimeError("artifact store unavailable")

    monkeypatch.setattr(mlflow.pyfunc, "log_model", broken)
    with pytest.raises(RuntimeError, match="artifact store"):
        register(tmp_path, store, "b", 0.99)
    assert registry.current_champion("skin") == first.version


def test_pyfunc_model_returns_probabilities(tmp_path, store):
    import pandas as pd

    from skinsense.labels import CLASS_CODES
    from skinsense.serving.app import EXAMPLES_DIR
    from skinsense.serving.pyfunc import OUTPUT_COLUMNS

    register(tmp_path, store, "a", 0.5)  # a version without a gate, as before issue 13
    model = mlflow.pyfunc.load_model("models:/skin@champion")
    images = [p.read_bytes() for p in sorted(EXAMPLES_DIR.glob("*.jpg"))[:2]]
    frame = model.predict(pd.DataFrame({"image": images}))
    assert list(frame.columns) == list(OUTPUT_COLUMNS)
    assert frame[list(CLASS_CODES)].sum(axis=1).round(5).tolist() == [1.0, 1.0]
    # No gate: its verdict is unknown (None), not "in domain"; no referral rule either.
    assert frame["in_domain"].tolist() == [None, None] and frame["ood_score"].isna().all()
    assert frame["referral"].tolist() == [None, None]
    assert frame["quality_issue"].tolist() == ["", ""]


@pytest.mark.slow
def test_a_version_registered_before_the_regrouping_still_loads_and_serves(
        tmp_path, store, monkeypatch):
    """Issue 20 moved modules into packages (trust/, lifecycle/, stack/). A registered version
    keeps its own copy of the pyfunc code and names modules only in text: each module it
    names must still import, and the version must still predict."""
    import importlib
    import re

    import pandas as pd

    from skinsense.labels import CLASS_CODES
    from skinsense.serving.app import EXAMPLES_DIR

    old_code = Path(__file__).parent / "fixtures" / "pyfunc_model_before_issue_20.py"
    monkeypatch.setattr(registry, "PYFUNC_CODE", old_code)
    decision = register(tmp_path, store, "old", 0.5)
    local = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/skin/{decision.version}", dst_path=str(tmp_path / "dl")))
    texts = [p.read_text() for p in local.rglob("*")
             if p.is_file() and p.suffix in {"", ".py", ".json", ".yaml", ".txt"}]
    assert any(old_code.read_text() == text for text in texts)  # the old code was stored
    named = {m for text in texts for m in re.findall(r"\bskinsense(?:\.[a-z_]+)+", text)}
    assert "skinsense.serving.pyfunc" in named
    for module in sorted(named):
        importlib.import_module(module)
    model = mlflow.pyfunc.load_model(f"models:/skin/{decision.version}")
    images = [p.read_bytes() for p in sorted(EXAMPLES_DIR.glob("*.jpg"))[:2]]
    frame = model.predict(pd.DataFrame({"image": images}))
    assert frame[list(CLASS_CODES)].sum(axis=1).round(5).tolist() == [1.0, 1.0]


def gated_version(tmp_path, experiment_id) -> str:
    """A registered version with the gate fitted on the real examples and a referral rule."""
    from example_gate import fit_example_gate

    from skinsense.lifecycle.packaging import load_card, save_card

    model_dir, run_id = candidate(tmp_path, "gated", experiment_id)
    card = load_card(model_dir)
    card.referral_threshold, card.referral_sensitivity_target = 0.4, 0.95
    save_card(card, model_dir)
    fit_example_gate(model_dir)
    return registry.register_candidate(model_dir, run_id=run_id, model_name="skin",
                                       metric="balanced_accuracy", score=0.5, tags={})


def gate_inputs(tmp_path) -> list[bytes]:
    """A real example, a photo of a cat and a black frame, as JPEG bytes."""
    import io

    from PIL import Image

    from skinsense.evaluation.ood_reference import non_dermatoscopic_images
    from skinsense.serving.app import EXAMPLES_DIR

    def jpeg(image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG")
        return buffer.getvalue()

    return [sorted(EXAMPLES_DIR.glob("*.jpg"))[0].read_bytes(),
            jpeg(dict(non_dermatoscopic_images())["cat"]), jpeg(Image.new("RGB", (640, 480)))]


def check_gate_rows(rows: list[dict]) -> None:
    """The three `gate_inputs` answered: in domain, refused by the gate, refused for quality."""
    real, cat, black = rows
    assert real["in_domain"] is True and real["ood_score"] >= 0 and real["quality_issue"] == ""
    assert real["referral"] is (real["akiec"] + real["bcc"] + real["mel"] >= 0.4)
    assert cat["in_domain"] is False and cat["ood_score"] > real["ood_score"]
    assert cat["referral"] is None  # no "see a dermatologist" about a cat
    assert abs(sum(cat[c] for c in ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")) - 1) < 1e-4
    assert "too dark" in black["quality_issue"] and black["in_domain"] is None


def test_pyfunc_gains_the_gate_columns(tmp_path, store):
    import pandas as pd

    version = gated_version(tmp_path, store)
    model = mlflow.pyfunc.load_model(f"models:/skin/{version}")
    frame = model.predict(pd.DataFrame({"image": gate_inputs(tmp_path)}))
    check_gate_rows(frame.to_dict(orient="records"))
    assert frame.loc[2, ["akiec", "nv"]].isna().all()  # the model did not run on it
    outputs = {c.name for c in model.metadata.get_output_schema().inputs}
    assert {"in_domain", "ood_score", "referral", "quality_issue"} <= outputs


@pytest.mark.slow
@pytest.mark.e2e
def test_mlflow_models_serve_answers_with_the_gate_columns(tmp_path, store, free_port):
    """`mlflow models serve` (the scoring server MLflow users deploy) returns the columns."""
    import base64
    import contextlib
    import json
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    version = gated_version(tmp_path, store)
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(mlflow_cli), "models", "serve", "-m", f"models:/skin/{version}",
             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(free_port),
             "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            # The scoring server runs `uvicorn` from PATH: this environment's, as an
            # activated virtual environment would give it.
            env={**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(),
                 "PATH": f"{mlflow_cli.parent}{os.pathsep}{os.environ.get('PATH', '')}"})
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [
        [base64.b64encode(data).decode()] for data in gate_inputs(tmp_path)]}}).encode()
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{free_port}/invocations", data=body,
                    headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=60) as response:
                    answer = json.loads(response.read())
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow models serve did not answer:\n"
                                f"{log_path.read_text()[-3000:]}")
                time.sleep(1)
    finally:
        with contextlib.suppress(ProcessLookupError):  # it may have exited on its own
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    check_gate_rows(answer["predictions"])


def test_registered_version_holds_onnx_and_safetensors_and_no_pickle(tmp_path, store):
    decision = register(tmp_path, store, "a", 0.5)
    local = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/skin/{decision.version}", dst_path=str(tmp_path / "dl")))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    model_dir = registry.download_model_dir("skin", decision.version, tmp_path / "dl2")
    assert {"weights.safetensors", "model_card.json", "model.onnx"} <= {
        p.name for p in model_dir.iterdir()}
    assert not [f for f in files if f.endswith((".pkl", ".pt", ".pth", ".pickle"))], files
    tags = MlflowClient().get_model_version("skin", decision.version).tags
    assert float(tags["onnx_max_abs_diff"]) < 1e-4
    served = mlflow.pyfunc.load_model("models:/skin@champion").unwrap_python_model()
    assert served.predictor.backend == "onnxruntime"


def test_show_lists_versions_with_aliases_and_tags(tmp_path, store):
    first = register(tmp_path, store, "a", 0.5)
    second = register(tmp_path, store, "b", 0.4)
    rows = registry.show("skin")
    assert [r["version"] for r in rows] == [first.version, second.version]
    assert rows[0]["aliases"] == ["champion"] and rows[1]["aliases"] == ["challenger"]
    assert rows[0]["arch"] == "resnet18"
    assert float(rows[0]["metrics"]["test_balanced_accuracy"]) == pytest.approx(0.5)
    assert "test_key" not in rows[0]["metrics"]
    assert "kept the champion" in rows[1]["promotion_decision"]
    with pytest.raises(registry.RegistryError, match="no registered model"):
        registry.show("nope")


def test_promote_if_better_records_the_previous_champion(tmp_path, store):
    first = register(tmp_path, store, "a", 0.5)
    better = register(tmp_path, store, "b", 0.6)
    tags = MlflowClient().get_model_version("skin", better.version).tags
    assert tags["previous_champion"] == first.version
    assert "previous_champion" not in MlflowClient().get_model_version("skin", first.version).tags


def test_manual_promote_moves_champion_and_records_the_reason(tmp_path, store):
    first = register(tmp_path, store, "a", 0.5)
    worse = register(tmp_path, store, "b", 0.4)
    change = registry.promote("skin", worse.version, "better on the new clinic's images")
    assert registry.current_champion("skin") == worse.version == change.version
    tags = MlflowClient().get_model_version("skin", worse.version).tags
    assert tags["promotion_decision"] == "manual: better on the new clinic's images"
    assert tags["previous_champion"] == first.version == change.previous_champion
    with pytest.raises(registry.RegistryError, match="already the champion"):
        registry.promote("skin", worse.version, "again")


def test_promote_unknown_version_lists_versions_and_keeps_champion(tmp_path, store):
    first = register(tmp_path, store, "a", 0.5)
    with pytest.raises(registry.RegistryError, match=rf"no version 42; versions: {first.version}"):
        registry.promote("skin", "42", "typo")
    assert registry.current_champion("skin") == first.version


def test_rollback_returns_to_the_previous_champion(tmp_path, store):
    first = register(tmp_path, store, "a", 0.5)
    second = register(tmp_path, store, "b", 0.6)
    third = register(tmp_path, store, "c", 0.4)
    registry.promote("skin", third.version, "manual check")
    assert registry.rollback("skin").version == second.version
    assert registry.current_champion("skin") == second.version
    # Rolling back again walks further back through the recorded history.
    assert registry.rollback("skin").version == first.version
    with pytest.raises(registry.RegistryError, match="no earlier champion"):
        registry.rollback("skin")
    assert registry.current_champion("skin") == first.version


def test_rollback_without_a_previous_champion_is_a_clear_error(tmp_path, store):
    with pytest.raises(registry.RegistryError, match="no champion"):
        registry.rollback("skin")
    first = register(tmp_path, store, "a", 0.5)
    with pytest.raises(registry.RegistryError, match="no earlier champion"):
        registry.rollback("skin")
    assert registry.current_champion("skin") == first.version


def test_rollback_falls_back_to_the_previous_promoted_version(tmp_path, store):
    first = register(tmp_path, store, "a", 0.5)
    second = register(tmp_path, store, "b", 0.6)
    # A champion promoted before `previous_champion` was recorded.
    MlflowClient().delete_model_version_tag("skin", second.version, "previous_champion")
    assert registry.rollback("skin").version == first.version


def test_failed_alias_move_leaves_the_champion(tmp_path, store, monkeypatch):
    first = register(tmp_path, store, "a", 0.5)
    second = register(tmp_path, store, "b", 0.4)

    def broken(self, *args, **kwargs):
        raise RuntimeError("registry unavailable")

    monkeypatch.setattr(MlflowClient, "set_model_version_tag", broken)
    with pytest.raises(RuntimeError, match="registry unavailable"):
        registry.promote("skin", second.version, "try")
    assert registry.current_champion("skin") == first.version


def test_cli_registry_show_promote_rollback(tmp_path, store, capsys):
    from skinsense.cli import main

    first = register(tmp_path, store, "a", 0.5)
    worse = register(tmp_path, store, "b", 0.4)
    assert main(["registry", "show", "--name", "skin"]) == 0
    out = capsys.readouterr().out
    assert "champion" in out and "challenger" in out and "resnet18" in out
    assert main(["registry", "promote", "9", "--name", "skin"]) == 1
    assert f"versions: {first.version}, {worse.version}" in capsys.readouterr().err
    assert main(["registry", "promote", worse.version, "--name", "skin",
                 "--reason", "reviewed"]) == 0
    assert registry.current_champion("skin") == worse.version
    assert main(["registry", "rollback", "--name", "skin"]) == 0
    assert registry.current_champion("skin") == first.version
    assert main(["registry", "rollback", "--name", "skin"]) == 1
    assert "no earlier champion" in capsys.readouterr().err


@pytest.mark.slow
def test_calibration_referral_and_gaps_go_on_the_version_and_registry_show(
        tmp_path, store, capsys, monkeypatch):
    from skinsense.cli import main
    from skinsense.lifecycle.packaging import load_card, save_card

    model_dir, run_id = candidate(tmp_path, "calibrated", store)
    card = load_card(model_dir)
    card.temperature, card.referral_threshold, card.referral_sensitivity_target = 1.7, 0.21, 0.95
    card.metrics = {"test_ece": 0.04, "test_ece_uncalibrated": 0.12, "test_nll": 0.6,
                    "test_nll_uncalibrated": 0.9, "test_referral_sensitivity": 0.93,
                    "test_referral_specificity": 0.55, "test_gap_balanced_accuracy_sex": 0.03,
                    "test_referral_roc_auc": float("nan"), "test_ood_auroc": 0.97,
                    "test_ood_fpr_at_95_tpr": 0.1, "test_ood_rate": 0.06}
    card.ood_threshold, card.ood_percentile = 31.5, 95.0
    card.test_referral = {"sensitivity": 0.93, "sensitivity_ci_low": 0.88,
                          "sensitivity_ci_high": 0.97, "specificity": 0.55,
                          "specificity_ci_low": None, "specificity_ci_high": None}
    save_card(card, model_dir)
    version = registry.register_candidate(model_dir, run_id=run_id, model_name="skin",
                                          metric="balanced_accuracy", score=0.7, tags={})
    tags = MlflowClient().get_model_version("skin", version).tags
    assert float(tags["temperature"]) == 1.7 and float(tags["referral_threshold"]) == 0.21
    assert float(tags["test_ece"]) == 0.04 and float(tags["test_nll_uncalibrated"]) == 0.9
    assert tags["test_referral_sensitivity_ci"] == "[0.8800, 0.9700]"
    assert "test_referral_specificity_ci" not in tags  # no interval: no tag
    assert "test_referral_roc_auc" not in tags          # NaN: undefined, not a number
    assert float(tags["test_gap_balanced_accuracy_sex"]) == 0.03
    assert float(tags["ood_threshold"]) == 31.5 and float(tags["test_ood_auroc"]) == 0.97

    row = registry.show("skin")[-1]
    assert row["temperature"] == tags["temperature"] and row["referral_sensitivity_target"]
    monkeypatch.setenv("COLUMNS", "400")  # one line per version, so words are not folded
    assert main(["registry", "show", "--name", "skin"]) == 0
    out = capsys.readouterr().out
    assert "T=1.7000 ECE 0.1200->0.0400 NLL 0.9000->0.6000" in out
    assert "score>=0.2100" in out and "sensitivity 0.9300 [0.8800, 0.9700]" in out
    assert "balanced_accuracy_sex=0.0300" in out
    assert "score<=31.5000 (95th pct. of val.) AUROC 0.9700 FPR@95%TPR 0.1000" in out
    assert "ood_auroc" not in out.split("calibration, referral")[0]  # not in the first table


@pytest.mark.slow
def test_registry_show_says_what_a_useless_temperature_did_and_that_a_gate_is_unusable(
        tmp_path, store, capsys, monkeypatch):
    """The README demo's champion: T = 1.03 made the test ECE and NLL worse; and a gate the
    evaluation found unusable. `registry show` says what was fitted and what it did, and
    that the model is served without its gate; neither is called calibrated or on."""
    from skinsense.cli import main
    from skinsense.evaluation.evaluate import calibration_outcome
    from skinsense.lifecycle.packaging import load_card, save_card

    model_dir, run_id = candidate(tmp_path, "useless", store)
    card = load_card(model_dir)
    card.temperature = 1.03
    card.metrics = {"test_ece": 0.112, "test_ece_uncalibrated": 0.096, "test_nll": 0.742,
                    "test_nll_uncalibrated": 0.739, "test_ood_auroc": 0.506,
                    "test_ood_rate": 0.33}
    card.calibration = calibration_outcome(1.03, 150, {
        "ece": 0.112, "ece_uncalibrated": 0.096, "nll": 0.742, "nll_uncalibrated": 0.739})
    assert card.calibration["helped"] is False and not card.calibrated
    card.ood_threshold, card.ood_percentile = 39.19, 95.0
    reason = "it refuses 33% of the test part's images, over 2 times its nominal 5%"
    card.ood_gate = {"status": "unusable", "reason": reason}
    save_card(card, model_dir)
    version = registry.register_candidate(model_dir, run_id=run_id, model_name="skin",
                                          metric="balanced_accuracy", score=0.7, tags={})
    tags = MlflowClient().get_model_version("skin", version).tags
    assert tags["calibration_helped"] == "false" and tags["ood_gate_status"] == "unusable"
    row = registry.show("skin")[-1]
    assert row["ood_gate_reason"] == reason and row["calibration_helped"] == "false"
    monkeypatch.setenv("COLUMNS", "400")
    assert main(["registry", "show", "--name", "skin"]) == 0
    out = capsys.readouterr().out
    assert ("temperature 1.03 fitted on validation (150 images); test ECE 0.096 -> 0.112, "
            "NLL 0.739 -> 0.742: did not help, not called calibrated") in out
    assert f"UNUSABLE, served without it: {reason}" in out
    assert "T=1.0300" not in out and "score<=39.19" not in out


def test_an_unreadable_registry_is_not_taken_for_no_champion(store, monkeypatch):
    """A refused login or a server error must not look like "no champion yet" (a new
    version would then be promoted over a champion that was only unreadable)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import UNAUTHENTICATED

    assert registry.current_champion("skin") is None  # truly none: no such model

    def refused(self, *args, **kwargs):
        raise MlflowException("You are not authenticated.", error_code=UNAUTHENTICATED)

    monkeypatch.setattr(MlflowClient, "get_model_version_by_alias", refused)
    monkeypatch.setattr(MlflowClient, "get_registered_model", refused)
    with pytest.raises(MlflowException, match="not authenticated"):
        registry.current_champion("skin")
    with pytest.raises(MlflowException, match="not authenticated"):
        registry.show("skin")
