"""Confirmed diagnoses: who may write them, clear errors for wrong input, the `feedback`
data source and its place in the training part only."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa

from skinsense.data.extra_sources import ExtraSource, add_to_training
from skinsense.data.split import write_split
from skinsense.monitoring.database import Feedback, engine_for
from skinsense.monitoring.feedback import (
    FeedbackError,
    FeedbackRefused,
    add_feedback,
    check_login,
    export_source,
)
from skinsense.serving.app import example_images
from skinsense.serving.prediction_log import PredictionLog

REAL = example_images()


@pytest.fixture
def answered(home):
    """A prediction log in SKINSENSE_HOME with the first three examples answered."""
    plog = PredictionLog(None, home.root)
    for path in REAL[:3]:
        plog.record(endpoint="assess", image=str(path), latency_ms=1.0, top_class="nv")
    return home.root


def feedback_rows() -> int:
    with engine_for().connect() as connection:
        return connection.execute(sa.select(sa.func.count()).select_from(Feedback)).scalar()


def test_logins_beyond_loopback():
    env = {"SKINSENSE_FEEDBACK_AUTH": "derm:s3cret-pass,nurse:other-pass",
           "PREFECT_SERVER_API_AUTH_STRING": "admin:stack-pass"}
    assert check_login(None, None, required=False, environ={}) == "local"
    assert check_login("derm", "s3cret-pass", required=True, environ=env) == "derm"
    assert check_login("admin", "stack-pass", required=True, environ=env) == "admin"
    for user, password in (("derm", "wrong"), ("stranger", "s3cret-pass"), ("", ""),
                           (None, None)):
        with pytest.raises(FeedbackRefused, match="wrong user name or password"):
            check_login(user, password, required=True, environ=env)
    with pytest.raises(FeedbackRefused, match="none is configured"):
        check_login("derm", "s3cret-pass", required=True, environ={})


def test_wrong_fields_and_unanswered_images_get_clear_errors(answered, tmp_path):
    with pytest.raises(FeedbackError, match="not one of the seven HAM10000 classes"):
        add_feedback(REAL[0], dx="melanoma", dx_type="histo", entered_by="t", home=answered)
    with pytest.raises(FeedbackError, match="dx_type 'biopsy'"):
        add_feedback(REAL[0], dx="mel", dx_type="biopsy", entered_by="t", home=answered)
    with pytest.raises(FeedbackError, match="never answered by the app"):
        add_feedback(REAL[5], dx="mel", dx_type="histo", entered_by="t", home=answered)
    assert feedback_rows() == 0
    record = add_feedback(REAL[0], dx="mel", dx_type="histo", age=60, sex="male",
                          localization="back", entered_by="t", home=answered)
    assert Path(record.image_path).read_bytes() == REAL[0].read_bytes()
    with pytest.raises(FeedbackError, match="already has a confirmed diagnosis"):
        add_feedback(REAL[0], dx="nv", dx_type="histo", entered_by="t", home=answered)
    assert feedback_rows() == 1


def test_the_cli_adds_feedback_and_explains_mistakes(answered, capsys):
    from skinsense.cli import main

    assert main(["feedback", "add", str(REAL[1]), "--dx", "xyz", "--dx-type", "histo"]) == 1
    assert "not one of the seven HAM10000 classes" in capsys.readouterr().err
    assert main(["feedback", "add", str(REAL[6]), "--dx", "bcc", "--dx-type", "histo"]) == 1
    assert "never answered" in capsys.readouterr().err
    assert main(["feedback", "add", str(REAL[1]), "--dx", "bcc", "--dx-type", "consensus",
                 "--site", "face"]) == 0
    assert "confirmed bcc (consensus)" in capsys.readouterr().out
    assert main(["feedback", "list"]) == 0
    assert "bcc" in capsys.readouterr().out


def test_feedback_joins_the_training_part_only_and_test_lesions_are_refused(answered,
                                                                            tmp_path):
    """The `feedback` source has its own fingerprint, which changes with a new case; its
    images go to the training part, except one whose lesion is in the test part and one that
    is a test image itself."""
    from skinsense.data.metadata import load_metadata

    meta = load_metadata("/work/shared/data/HAM10000_metadata.csv" if Path(
        "/work/shared/data/HAM10000_metadata.csv").exists() else None)
    meta = meta.groupby("dx").head(40).reset_index(drop=True)
    meta["image_path"] = [str(REAL[i % 3 + 3]) for i in range(len(meta))]
    # Make row 0's image byte-identical to an example image that becomes feedback.
    split = write_split(meta, tmp_path / "split", seed=0)
    test = pd.read_csv(split.test_csv)
    test_lesion = test["lesion_id"].iloc[0]
    test.loc[test.index[1], "image_path"] = str(REAL[2])
    test.to_csv(split.test_csv, index=False)

    add_feedback(REAL[0], dx="mel", dx_type="histo", entered_by="t", home=answered)
    first = export_source(answered)
    add_feedback(REAL[1], dx=test.loc[test.index[0], "dx"], dx_type="histo", entered_by="t",
                 home=answered, lesion_id=test_lesion)
    add_feedback(REAL[2], dx="nv", dx_type="follow_up", entered_by="t", home=answered)
    source = export_source(answered)
    assert source.fingerprint != first.fingerprint and source.n_images == 3
    assert load_metadata(source.metadata_csv)["dataset"].eq("feedback").all()

    before = {part: pd.read_csv(getattr(split, f"{part}_csv")) for part in ("val", "test")}
    extra = ExtraSource(name="feedback", metadata_csv=source.metadata_csv,
                        images_dir=source.images_dir, fingerprint=source.fingerprint)
    extended = add_to_training(split, [extra], tmp_path / "extra")
    train = pd.read_csv(extended.train_csv)
    report = json.loads((tmp_path / "extra" / "extra_sources.json").read_text())["feedback"]
    added = train[train["dataset"] == "feedback"]
    assert len(added) == 1 and added["dx"].tolist() == ["mel"]
    assert report["added"] == added["image_id"].tolist()
    reasons = sorted(r["reason"] for r in report["refused"])
    assert reasons[0].startswith(f"lesion {test_lesion} is in the HAM10000 test part")
    assert "the same image as" in reasons[1] and "test part" in reasons[1]
    assert extended.extra_sources == {"feedback": source.fingerprint}
    assert extended.class_counts["train"]["mel"] == split.class_counts["train"]["mel"] + 1
    for part, frame in before.items():
        assert getattr(extended, f"{part}_csv") == getattr(split, f"{part}_csv")
        pd.testing.assert_frame_equal(pd.read_csv(getattr(extended, f"{part}_csv")), frame)


@pytest.fixture
def exposed_app(home, tmp_path_factory, monkeypatch):
    """The app configured as listening beyond loopback (serve.host 0.0.0.0), served here on
    127.0.0.1 only, with one feedback login."""
    import uvicorn
    from test_app import exported_template, free_tcp_port

    from skinsense.config import ServeConfig
    from skinsense.serving.app import create_server

    monkeypatch.setenv("SKINSENSE_FEEDBACK_AUTH", "derm:correct-horse-battery")
    monkeypatch.delenv("PREFECT_SERVER_API_AUTH_STRING", raising=False)
    monkeypatch.delenv("PREFECT_API_AUTH_STRING", raising=False)
    model_dir = shutil.copytree(exported_template(tmp_path_factory), home.root / "model")
    server = create_server(str(model_dir), ServeConfig(host="0.0.0.0", reload_interval_s=0,
                                                       keep_images=True))
    port = free_tcp_port()
    uv = uvicorn.Server(uvicorn.Config(server, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not uv.started:
        assert time.monotonic() < deadline, "the app did not start"
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    uv.should_exit = True
    thread.join(timeout=20)


@pytest.mark.slow
def test_strangers_cannot_write_feedback_through_the_app(exposed_app):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(exposed_app, verbose=False)
    image = handle_file(str(REAL[0]))
    client.predict(image, api_name="/assess")  # reading stays open

    def send(user: str, password: str, dx: str = "mel", path: Path = REAL[0]):
        return client.predict(handle_file(str(path)), dx, "histo", None, None, None, user,
                              password, api_name="/feedback")

    for user, password in (("", ""), ("derm", "guess"), ("mallory", "correct-horse-battery")):
        with pytest.raises(AppError, match="wrong user name or password"):
            send(user, password)
    assert feedback_rows() == 0
    with pytest.raises(AppError, match="never answered"):
        send("derm", "correct-horse-battery", path=REAL[4])
    # The dropdown itself refuses a value outside its choices, and says which are allowed.
    with pytest.raises(AppError, match="not in the list of choices.*mel"):
        send("derm", "correct-horse-battery", dx="cancer")
    assert feedback_rows() == 0
    assert "Saved: Melanoma" in send("derm", "correct-horse-battery")
    assert feedback_rows() == 1


@pytest.mark.parametrize("arch,size", [("efficientnet_b0", 64), ("efficientnet_b3", 64),
                                       ("maxvit_t", 224)])
def test_field_metrics_leave_out_trained_cases_and_give_lesion_intervals(answered, tmp_path,
                                                                         arch, size):
    import torch

    from skinsense.data.extra_sources import feedback_ids_in
    from skinsense.lifecycle.packaging import ModelCard, load_card, save_card, save_model_dir
    from skinsense.models import build_model
    from skinsense.monitoring.database import utc_now
    from skinsense.monitoring.field import field_figures

    with torch.random.fork_rng():
        model = build_model(arch, image_size=size)
    model_dir = save_model_dir(model.eval(), ModelCard(arch=arch, image_size=size,
                                                       referral_threshold=0.3,
                                                       referral_sensitivity_target=0.95),
                               tmp_path / "model")
    assert field_figures(model_dir, None, home=answered, min_cases=1, n_resamples=100,
                         seed=0) == {}  # no confirmed case yet
    for path, dx in zip(REAL[:3], ("mel", "nv", "bcc"), strict=True):
        add_feedback(path, dx=dx, dx_type="histo", entered_by="t", home=answered)
    source = export_source(answered)
    trained = tmp_path / "train.csv"
    first = pd.read_csv(source.metadata_csv)["image_id"].iloc[0]
    # An oversampled training part: a copy of a confirmed case stands for its original.
    pd.DataFrame({"image_id": ["ISIC_0024306", first, f"{first}_aug0"],
                  "source_image_id": ["", "", first]}).to_csv(trained, index=False)
    assert feedback_ids_in(trained) == [first]  # HAM10000's images are not confirmed cases
    assert field_figures(model_dir, feedback_ids_in(trained), home=answered, min_cases=3,
                         n_resamples=100, seed=0) == {"field_n": 2.0}  # the trained case is out
    figures = field_figures(model_dir, [first], home=answered, min_cases=2, n_resamples=200,
                            seed=0)
    assert figures["field_n"] == 2.0
    for name in ("accuracy", "balanced_accuracy"):
        value = figures[f"field_{name}"]
        assert 0 <= figures[f"field_{name}_ci_low"] <= value <= figures[f"field_{name}_ci_high"] <= 1
    # A registered model (the champion) is judged by its card: the ids it records, or, for a
    # card from before they were recorded, only what was confirmed after it was trained.
    card = load_card(model_dir)
    card.trained_feedback_ids = [first]
    save_card(card, model_dir)
    assert field_figures(model_dir, None, home=answered, min_cases=9, n_resamples=100,
                         seed=0) == {"field_n": 2.0}
    card.trained_feedback_ids = None  # trained before the three cases were confirmed
    save_card(card, model_dir)
    assert field_figures(model_dir, None, home=answered, min_cases=9, n_resamples=100,
                         seed=0) == {"field_n": 3.0}
    card.trained_at = utc_now().isoformat()  # trained after them: it may have seen them all
    save_card(card, model_dir)
    assert field_figures(model_dir, None, home=answered, min_cases=9, n_resamples=100,
                         seed=0) == {"field_n": 0.0}


def test_the_log_goes_where_the_stack_says(home, monkeypatch):
    """`stack up` records the log's database in the home (0600) and every process of that
    home uses it: beside MLflow's on Postgres, or the environment variable's; `stack up` on
    SQLite removes it."""
    from skinsense.monitoring.database import DATABASE_URL_ENV, STACK_URL_FILE
    from skinsense.monitoring.database import default_database_url as url
    from skinsense.stack.control import _prepare_log_database
    from skinsense.stack.services import log_database_url

    monkeypatch.delenv(DATABASE_URL_ENV, raising=False)
    assert url() == f"sqlite:///{home.root / 'monitoring' / 'monitoring.db'}"
    assert log_database_url("postgresql://team:pw@db.example:5432/mlflow") == \
        "postgresql://team:pw@db.example:5432/skinsense"
    recorded = home.root / STACK_URL_FILE
    recorded.parent.mkdir(parents=True)
    recorded.write_text("postgresql://team:pw@db.example:5432/skinsense\n")
    assert url() == "postgresql://team:pw@db.example:5432/skinsense"
    monkeypatch.setenv(DATABASE_URL_ENV, "sqlite:////elsewhere/log.db")
    assert url() == "sqlite:////elsewhere/log.db"
    mlflow = f"sqlite:///{home.mlflow / 'mlflow.db'}"
    assert log_database_url(mlflow) == "sqlite:////elsewhere/log.db"
    _prepare_log_database(home, {"log": log_database_url(mlflow), "mlflow": mlflow})
    monkeypatch.delenv(DATABASE_URL_ENV)  # a shell without the variable finds it too
    assert url() == "sqlite:////elsewhere/log.db"
    assert log_database_url(mlflow) is None
    _prepare_log_database(home, {"log": None, "mlflow": mlflow})
    assert not recorded.exists()
    assert url() == f"sqlite:///{home.root / 'monitoring' / 'monitoring.db'}"


def test_the_cli_says_which_database_it_cannot_reach(home, monkeypatch, capsys):
    from skinsense.cli import main
    from skinsense.monitoring.database import DATABASE_URL_ENV, STACK_URL_FILE

    monkeypatch.delenv(DATABASE_URL_ENV, raising=False)
    recorded = home.root / STACK_URL_FILE
    recorded.parent.mkdir(parents=True)
    recorded.write_text("postgresql://team:secret-pw@127.0.0.1:1/skinsense\n")
    assert main(["feedback", "add", str(REAL[0]), "--dx", "mel", "--dx-type", "histo"]) == 1
    error = capsys.readouterr().err
    assert "postgresql://team:***@127.0.0.1:1/skinsense" in error and "secret-pw" not in error
    assert str(recorded) in error and "cannot be used" in error
    assert not (home.root / "feedback").exists()  # nothing written
