"""The app through real servers: classification, bad input, the out-of-domain gate, Grad-CAM,
/health, /reload, hot reload, load.

One app process serves `models:/skin@champion` from a temporary SQLite MLflow store for the
whole module and checks the alias every half second; tests move the alias and watch it. Its
model is a tiny random-weight network with a real gate fitted on views of the real example
images (`example_gate.py`), so the examples are in domain and other photos are not.
The helpers here (`app_store`, `register_version`, `running_app`) are shared with
test_deploy.py and test_app_browser.py.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from skinsense.lifecycle import registry, tracking
from skinsense.lifecycle.export import ONNX_FILE
from skinsense.lifecycle.packaging import WEIGHTS_FILE, ModelCard, save_model_dir
from skinsense.models import build_model
from skinsense.paths import Home
from skinsense.serving.app import SERVE_CONFIG_ENV, example_images
from skinsense.serving.deploy import health, stop_app  # noqa: F401 (re-exported for others)

MODEL_NAME = "skin"
CHAMPION_URI = f"models:/{MODEL_NAME}@champion"


# -- helpers shared with test_deploy.py and test_app_browser.py --------------------------


@dataclass
class Store:
    """A temporary SKINSENSE_HOME with its SQLite MLflow store, configured in this process."""

    home: Home
    uri: str
    experiment_id: str

    @property
    def env(self) -> dict[str, str]:
        """What an app subprocess needs to find the same store."""
        return {"MLFLOW_TRACKING_URI": self.uri, "SKINSENSE_HOME": str(self.home.root)}


@contextmanager
def app_store(root: Path) -> Iterator[Store]:
    """Point this process's MLflow at a fresh store under `root`; restore it afterwards."""
    previous = mlflow.get_tracking_uri()
    patch = pytest.MonkeyPatch()
    home = Home(root).ensure()
    uri = f"sqlite:///{home.mlflow / 'mlflow.db'}"
    patch.setenv("SKINSENSE_HOME", str(root))
    patch.setenv("MLFLOW_TRACKING_URI", uri)
    try:
        tracking.configure(home)
        yield Store(home, uri, tracking.ensure_experiment("skinsense-app-test", home))
    finally:
        patch.undo()
        mlflow.set_tracking_uri(previous)
        mlflow.set_registry_uri(previous)


# The template's referral rule: refer when p(mel) + p(bcc) + p(akiec) >= this. A random
# network gives each class about 1/7, so the score is near 3/7 and both banners can occur.
REFERRAL_THRESHOLD = 0.4


def save_tiny_model(out_dir: Path, *, score: float = 0.5) -> Path:
    """A 32 px resnet18 model folder (weights and card, no ONNX export, no gate)."""
    with torch.random.fork_rng():
        model = build_model("resnet18", image_size=32)
    return save_model_dir(model, ModelCard(arch="resnet18", image_size=32,
                                           metrics={"test_balanced_accuracy": score},
                                           referral_threshold=REFERRAL_THRESHOLD,
                                           referral_sensitivity_target=0.95), out_dir)


_TEMPLATE: list[Path] = []


def exported_template(tmp_path_factory) -> Path:
    """One tiny model folder with its ONNX export and out-of-domain gate, made once per test
    session.

    Exporting to ONNX takes 6-15 s on 2 cores; every registered test version copies this
    folder instead (identical weights are fine: what the tests follow is the version).
    """
    if not _TEMPLATE:
        from example_gate import fit_example_gate

        from skinsense.lifecycle.export import export_onnx

        model_dir = save_tiny_model(tmp_path_factory.mktemp("template") / "model")
        export_onnx(model_dir)
        fit_example_gate(model_dir)
        _TEMPLATE.append(model_dir)
    return _TEMPLATE[0]


def register_version(store: Store, template: Path, *, broken: bool = False,
                     champion: bool = True, damaged_gate: bool = False) -> str:
    """Register a copy of `template` (and make it the champion); returns its version.

    `broken` registers a folder whose weights and ONNX file are corrupt, as a damaged
    artifact store would hand out: it registers fine and fails when the app loads it.
    `damaged_gate` truncates only its out-of-domain gate file.
    """
    client = MlflowClient()
    run_id = client.create_run(store.experiment_id).info.run_id
    model_dir = store.home.root / "models" / run_id
    shutil.copytree(template, model_dir)
    if broken:
        for name in (WEIGHTS_FILE, ONNX_FILE):
            (model_dir / name).write_bytes(b"corrupt" * 100)
    if damaged_gate:
        truncate_gate(model_dir)
    with pytest.MonkeyPatch.context() as patch:
        # The template is exported and checked already; raising=False keeps these tests
        # working (only slower) should the registry rename its helpers.
        patch.setattr(registry, "export_onnx", lambda d, *a, **k: Path(d) / ONNX_FILE,
                      raising=False)
        patch.setattr(registry, "check_onnx_agrees", lambda *a, **k: 0.0, raising=False)
        version = registry.register_candidate(model_dir, run_id=run_id, model_name=MODEL_NAME,
                                              metric="balanced_accuracy", score=0.5, tags={})
    client.set_terminated(run_id)
    if champion:
        client.set_registered_model_alias(MODEL_NAME, registry.CHAMPION, version)
    return version


def truncate_gate(model_dir: Path) -> None:
    """Cut the folder's ood_gate.safetensors short, as an interrupted copy would."""
    from skinsense.trust.gate import GATE_FILE

    gate = model_dir / GATE_FILE
    gate.write_bytes(gate.read_bytes()[:200])


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(model_uri: str, log_path: Path, *, env: dict[str, str] | None = None,
                serve_config: dict | None = None, timeout_s: float = 120.0) -> Iterator[str]:
    """`skinsense serve` in its own session on a free port; yields its URL, then stops it."""
    port = free_tcp_port()
    url = f"http://127.0.0.1:{port}"
    child_env = {**os.environ, **(env or {}), SERVE_CONFIG_ENV: json.dumps(serve_config or {})}
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "skinsense.cli", "serve", "--model-uri", model_uri,
             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, env=child_env)
    try:
        deadline = time.monotonic() + timeout_s
        while health(url) is None:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the app did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_for(condition, timeout_s: float = 60.0, what: str = "condition"):
    """Poll `condition()` until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")


def classify(client, path: Path | str) -> tuple[dict, str]:
    from gradio_client import handle_file

    return client.predict(handle_file(str(path)), api_name="/classify")


def assess(client, path: Path | str) -> dict:
    from gradio_client import handle_file

    return client.predict(handle_file(str(path)), api_name="/assess")


def non_dermatoscopic_photo(out: Path, name: str = "cat") -> Path:
    """A real photo that is not a dermatoscopic image (scikit-image's), as a JPEG file."""
    from skinsense.evaluation.ood_reference import non_dermatoscopic_images

    path = out / f"{name}.jpg"
    dict(non_dermatoscopic_images())[name].save(path, quality=92)
    return path


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(module_tmp) -> Iterator[Store]:
    with app_store(module_tmp("app-home")) as store:
        yield store


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return exported_template(tmp_path_factory)


@pytest.fixture(scope="module")
def app(store, template, module_tmp) -> Iterator[str]:
    register_version(store, template)
    log_path = module_tmp("app-log") / "app.log"
    with running_app(CHAMPION_URI, log_path, env=store.env,
                     serve_config={"reload_interval_s": 0.5, "max_file_size_mb": 2}) as url:
        yield url


@pytest.fixture(scope="module")
def client(app):
    from gradio_client import Client

    return Client(app, verbose=False)


# -- classification and bad input ----------------------------------------------------------


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def bad_inputs() -> dict[str, tuple[bytes, str | None]]:
    """name -> (file bytes, expected refusal text or None when the model must run on it)."""
    from PIL import ImageEnhance, ImageFilter

    real = Image.open(example_images()[0])
    jpeg = encode(real, "JPEG", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated; "rotate 90 CW to display"
    return {
        "not_an_image.jpg": (b"GIF89a? no, just some text pretending", "not a readable image"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "not a readable image"),
        # Mode "1" keeps the 20000x20000 file small and quick to make; its header is the bomb.
        "bomb.png": (encode(Image.new("1", (20000, 20000)), "PNG"), "too large"),
        "one_pixel.png": (encode(Image.new("RGB", (1, 1), "red"), "PNG"), "at least 16x16"),
        # The quality checks, before the model runs.
        "thumbnail.jpg": (encode(real.resize((120, 90)), "JPEG"), "too small"),
        "dark.jpg": (encode(ImageEnhance.Brightness(real).enhance(0.1), "JPEG"), "too dark"),
        "overexposed.jpg": (encode(ImageEnhance.Brightness(real).enhance(4), "JPEG"),
                            "too bright"),
        "blurred.jpg": (encode(real.filter(ImageFilter.GaussianBlur(4)), "JPEG"), "too blurry"),
        "grayscale.jpg": (encode(real.convert("L"), "JPEG"), None),
        "rgba.png": (encode(real.convert("RGBA"), "PNG"), None),
        "lesion.webp": (encode(real, "WEBP"), None),
        "exif_rotated.jpg": (encode(real.transpose(Image.Transpose.ROTATE_90), "JPEG",
                                    exif=exif), None),
    }


BAD_INPUTS = bad_inputs()


def test_a_real_sample_is_classified(client, template):
    from skinsense.serving.answers import label_text
    from skinsense.serving.predictor import Predictor

    # An old-style call: the same input, the same two outputs.
    label, details = classify(client, example_images()[0])
    # The served version is a copy of the template: its top 3 are the predictor's, in order.
    expected = Predictor.from_model_dir(template).classify(example_images()[0])
    top3 = sorted(expected.items(), key=lambda kv: kv[1], reverse=True)[:3]
    assert [c["label"] for c in label["confidences"]] == [label_text(k) for k, _ in top3]
    assert [c["confidence"] for c in label["confidences"]] == pytest.approx(
        [p for _, p in top3], abs=1e-5)
    assert label["label"] == label_text(top3[0][0])
    assert "Answered by model version" in details
    assert details.count("\n- ") == 2  # three described classes
    assert "Higher risk" in details or "Lower risk" in details  # the referral rule's verdict


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_classified_or_refused_and_the_app_keeps_serving(client, app, name,
                                                                      tmp_path):
    from gradio_client.exceptions import AppError

    data, refusal = BAD_INPUTS[name]
    path = tmp_path / name
    path.write_bytes(data)
    if refusal is None:
        # Decoded and run through the model (whether the gate then calls a grey or rotated
        # copy in domain is the gate's business, tested elsewhere).
        answer = assess(client, path)
        assert answer["quality_issues"] == [] and len(answer["probabilities"]) == 7
    else:
        with pytest.raises(AppError, match=refusal) as caught:
            classify(client, path)
        assert str(tmp_path) not in str(caught.value) and "/tmp/gradio" not in str(caught.value)
    assert health(app)["status"] == "ok"


def test_an_exif_rotated_upload_is_turned_upright_before_classifying(client, tmp_path):
    # The same pixels once stored upright and once stored rotated with an EXIF tag must get
    # (nearly) the same answer; ignoring the tag would feed the network a rotated lesion.
    real = Image.open(example_images()[0])
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "upright.png").write_bytes(encode(real, "PNG"))
    (tmp_path / "tagged.png").write_bytes(
        encode(real.transpose(Image.Transpose.ROTATE_90), "PNG", exif=exif))
    upright, _ = classify(client, tmp_path / "upright.png")
    tagged, _ = classify(client, tmp_path / "tagged.png")
    assert [c["label"] for c in tagged["confidences"]] == [c["label"] for c in upright["confidences"]]
    assert [c["confidence"] for c in tagged["confidences"]] == pytest.approx(
        [c["confidence"] for c in upright["confidences"]], abs=1e-4)


def test_an_upload_over_the_size_limit_is_refused(client, app, tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(os.urandom(3 * 1024 * 1024))  # the app allows 2 MB
    with pytest.raises(Exception, match="(?i)size|large"):
        classify(client, big)
    assert health(app)["status"] == "ok"


def test_health_describes_the_served_model(app):
    state = health(app)
    assert state["status"] == "ok"
    assert state["model_name"] == MODEL_NAME and state["version"]
    assert state["model_uri"] == CHAMPION_URI
    assert state["arch"] == "resnet18" and state["image_size"] == 32
    assert state["backend"] == "onnxruntime"  # registered versions carry model.onnx
    assert state["reload_error"] is None and state["reload_interval_s"] == 0.5
    from skinsense.lifecycle.packaging import load_card

    threshold = load_card(_TEMPLATE[0]).ood_threshold
    assert state["ood_threshold"] == pytest.approx(threshold)
    assert state["ood_gate"] == {"status": "on", "threshold": pytest.approx(threshold),
                                 "percentile": 95.0, "note": ""}
    for key in ("loaded_at", "last_check_at", "backend", "trained_at"):
        assert state[key]


# -- the out-of-domain gate and the explanation ------------------------------------------


def test_a_photo_that_is_not_dermatoscopic_gets_no_classification(client, tmp_path):
    from gradio_client.exceptions import AppError

    photo = non_dermatoscopic_photo(tmp_path)
    with pytest.raises(AppError, match="does not look like a dermatoscopic image of a skin "
                                       "lesion, so no classification is given"):
        classify(client, photo)
    answer = assess(client, photo)
    assert answer["answered"] is False and answer["gate"]["in_domain"] is False
    assert answer["gate"]["ood_score"] > answer["gate"]["ood_threshold"]
    # "Show anyway": the probabilities are there, but no referral verdict on a cat.
    assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert answer["referral"] is None
    assert "does not look like a dermatoscopic image" in answer["message"]


def test_assess_gives_the_gate_and_the_referral_for_a_real_sample(client):
    answer = assess(client, example_images()[2])
    assert answer["answered"] is True and answer["quality_issues"] == []
    assert answer["gate"]["status"] == "on" and answer["gate"]["in_domain"] is True
    assert answer["gate"]["ood_score"] <= answer["gate"]["ood_threshold"]
    referral = answer["referral"]
    assert referral["threshold"] == REFERRAL_THRESHOLD
    assert referral["refer"] is (referral["score"] >= REFERRAL_THRESHOLD)
    assert answer["top_class"] == max(answer["probabilities"], key=answer["probabilities"].get)


def test_explain_returns_an_overlay_of_the_uploads_size(client, tmp_path):
    from gradio_client import handle_file

    overlay, caption = client.predict(handle_file(str(example_images()[1])), api_name="/explain")
    assert Image.open(overlay).size == (600, 450)
    assert "Grad-CAM for" in caption and "layer4" in caption
    # An upload stored rotated (EXIF) is explained as it is seen: upright, 450x600.
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = tmp_path / "rotated.jpg"
    rotated.write_bytes(encode(Image.open(example_images()[1]), "JPEG", exif=exif))
    overlay, _ = client.predict(handle_file(str(rotated)), api_name="/explain")
    assert Image.open(overlay).size == (450, 600)
    # No explanation of a classification that is not given.
    overlay, caption = client.predict(handle_file(str(non_dermatoscopic_photo(tmp_path))),
                                      api_name="/explain")
    assert overlay is None and "does not look like a dermatoscopic image" in caption


@pytest.mark.slow
def test_a_model_without_a_gate_still_serves_and_says_so(tmp_path):
    """An older version (no ood_gate.safetensors) answers as before, and every answer says
    that the image's domain was not checked: absent is not "in domain"."""
    from gradio_client import Client

    model_dir = save_tiny_model(tmp_path / "old-model")
    with running_app(str(model_dir), tmp_path / "app.log") as url:
        state = health(url)
        assert state["ood_threshold"] is None and state["ood_gate"]["status"] == "absent"
        assert "no out-of-domain gate" in state["ood_gate"]["note"]
        client = Client(url, verbose=False)
        label, details = classify(client, non_dermatoscopic_photo(tmp_path))
        assert label["confidences"] and "no out-of-domain check" in details
        answer = assess(client, example_images()[0])
        assert answer["answered"] is True and answer["gate"]["status"] == "absent"
        assert answer["gate"]["in_domain"] is None and answer["gate"]["ood_score"] is None


def test_the_app_binds_loopback_only(app):
    """The app's process listens on its port at 127.0.0.1 only (read from the kernel's
    socket table, so the check holds on a machine whose name resolves to loopback too)."""
    import psutil

    port = int(app.rsplit(":", 1)[1])
    listening = [c for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert listening, f"nothing listens on port {port}"
    assert {c.laddr.ip for c in listening} == {"127.0.0.1"}
    owners = {c.pid for c in listening}
    assert len(owners) == 1 and None not in owners
    assert "serve" in psutil.Process(owners.pop()).cmdline()


# -- reload -------------------------------------------------------------------------------


def test_reload_is_refused_to_other_machines_and_allowed_locally(tmp_path):
    from starlette.testclient import TestClient

    from skinsense.config import ServeConfig
    from skinsense.serving.app import create_server

    model_dir = save_tiny_model(tmp_path / "model")
    server = create_server(str(model_dir), ServeConfig(reload_interval_s=0))
    with TestClient(server, client=("10.0.0.1", 1234)) as remote:
        response = remote.post("/reload")
        assert response.status_code == 403 and "this machine" in response.json()["detail"]
        assert remote.get("/health").status_code == 200  # health is public
    with TestClient(server, client=("127.0.0.1", 1234)) as local:
        response = local.post("/reload?force=1")
        assert response.status_code == 200 and response.json()["swapped"] is True


def test_the_app_follows_the_champion_alias(app, store, template):
    before = health(app)["version"]
    version = register_version(store, template)
    assert version != before
    state = wait_for(lambda: (s := health(app)) and s["version"] == version and s,
                     what=f"version {version} on /health")
    assert state["reload_error"] is None and state["last_reload_at"]
    _, details = classify_fresh(app)
    assert f"version {version}" in details


def classify_fresh(url: str) -> tuple[dict, str]:
    from gradio_client import Client

    return classify(Client(url, verbose=False), example_images()[1])


def test_a_broken_champion_is_not_served_and_health_says_so(app, store, template):
    served = health(app)["version"]
    broken = register_version(store, template, broken=True)
    state = wait_for(lambda: (s := health(app)) and s["reload_error"] and s,
                     what="reload_error on /health")
    assert state["version"] == served
    assert f"version {broken} failed to load" in state["reload_error"]
    assert f"still serving version {served}" in state["reload_error"]
    label, details = classify_fresh(app)
    assert label["label"] and f"version {served}" in details
    # A good champion afterwards clears the error.
    good = register_version(store, template)
    state = wait_for(lambda: (s := health(app)) and s["version"] == good and s,
                     what=f"version {good}")
    assert state["reload_error"] is None


def test_a_champion_with_a_damaged_gate_is_not_served_and_health_says_so(app, store,
                                                                        template):
    """Hot reload: a new version whose gate file is truncated would serve images unchecked;
    the app keeps the version it has and says why in /health. The MLflow pyfunc of the same
    version refuses to answer rather than pass images unchecked."""
    import mlflow

    served = health(app)["version"]
    damaged = register_version(store, template, damaged_gate=True)
    state = wait_for(lambda: (s := health(app)) and s["reload_error"] and s,
                     what="reload_error on /health")
    assert state["version"] == served and state["ood_gate"]["status"] == "on"
    assert f"version {damaged} failed to load" in state["reload_error"]
    assert "out-of-domain gate is damaged" in state["reload_error"]
    assert "ood_gate.safetensors could not be read" in state["reload_error"]
    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}/{damaged}")
    with pytest.raises(Exception, match="out-of-domain gate is damaged"):
        model.predict(pd_frame([example_images()[0].read_bytes()]))
    good = register_version(store, template)
    state = wait_for(lambda: (s := health(app)) and s["version"] == good and s,
                     what=f"version {good}")
    assert state["reload_error"] is None


def pd_frame(images: list[bytes]):
    import pandas as pd

    return pd.DataFrame({"image": images})


def page_markdown(url: str, elem_id: str) -> str:
    """The value of the page's markdown component `elem_id` as Gradio serves it."""
    import urllib.request

    with urllib.request.urlopen(f"{url}/config", timeout=30) as response:
        config = json.load(response)
    for component in config["components"]:
        if component.get("props", {}).get("elem_id") == elem_id:
            return str(component["props"].get("value") or "")
    raise AssertionError(f"no component {elem_id} on the page")


@pytest.mark.slow
def test_a_model_with_a_damaged_gate_serves_at_a_cold_start_and_says_so(template, tmp_path):
    """No version to keep at a cold start: the model serves, and the page, every answer and
    /health say that its gate is damaged (not 'absent', as for a model from before it)."""
    from gradio_client import Client

    model_dir = tmp_path / "damaged"
    shutil.copytree(template, model_dir)
    truncate_gate(model_dir)
    with running_app(str(model_dir), tmp_path / "app.log") as url:
        state = health(url)
        assert state["ood_gate"]["status"] == "damaged" and state["ood_threshold"] is None
        assert "could not be read" in state["ood_gate"]["note"]
        warning = page_markdown(url, "gate-warning")
        assert "Out-of-domain check damaged" in warning and "could not be read" in warning
        assert "out-of-domain gate DAMAGED" in page_markdown(url, "model-footer")
        client = Client(url, verbose=False)
        answer = assess(client, non_dermatoscopic_photo(tmp_path))
        assert answer["answered"] is True and answer["gate"]["status"] == "damaged"
        assert answer["gate"]["in_domain"] is None
        _, details = classify(client, example_images()[0])
        assert "out-of-domain check is damaged" in details
    # The MLflow pyfunc on the same folder answers nothing, saying why.
    from skinsense.serving.pyfunc import MODEL_DIR_ARTIFACT, SkinSensePyfunc

    pyfunc = SkinSensePyfunc()
    pyfunc.load_context(type("Context", (), {"artifacts": {MODEL_DIR_ARTIFACT: str(model_dir)}}))
    with pytest.raises(Exception, match="out-of-domain gate is damaged"):
        pyfunc.predict(None, pd_frame([example_images()[0].read_bytes()]))


@pytest.mark.slow
def test_a_model_whose_gate_is_unusable_serves_without_it_and_says_so(template, tmp_path):
    """The evaluation found the gate cannot judge (the card's ood_gate.status): the app
    serves the model without it, and the page, the answers and /health say so and why."""
    from gradio_client import Client

    from skinsense.lifecycle.packaging import load_card, save_card

    model_dir = tmp_path / "unusable"
    shutil.copytree(template, model_dir)
    card = load_card(model_dir)
    reason = ("it does not tell non-dermatoscopic photos from the test part's images "
              "(AUROC 0.51, no better than chance: p = 0.45)")
    card.ood_gate = card.ood_gate | {"status": "unusable", "reason": reason}
    save_card(card, model_dir)
    with running_app(str(model_dir), tmp_path / "app.log") as url:
        state = health(url)
        assert state["ood_gate"]["status"] == "unusable" and reason in state["ood_gate"]["note"]
        assert "Out-of-domain check off for this model" in page_markdown(url, "gate-warning")
        assert reason in page_markdown(url, "gate-warning")
        client = Client(url, verbose=False)
        # The cat the gate would refuse is answered, with the warning.
        answer = assess(client, non_dermatoscopic_photo(tmp_path))
        assert answer["answered"] is True and answer["gate"]["status"] == "unusable"
        _, details = classify(client, non_dermatoscopic_photo(tmp_path))
        assert "out-of-domain check is switched off" in details and reason in details


@pytest.mark.slow
def test_eight_clients_and_a_champion_swap_under_load(app, store, template):
    from gradio_client import Client

    clients, per_client = 8, 25
    samples = example_images()
    answered_by: list[str] = []
    failures: list[str] = []
    lock = threading.Lock()
    started = threading.Barrier(clients + 1)

    def work(i: int) -> None:
        client = Client(app, verbose=False)
        started.wait()
        for j in range(per_client):
            try:
                label, details = classify(client, samples[(i + j) % len(samples)])
                assert label["confidences"]
                with lock:
                    answered_by.append(details.rsplit("version ", 1)[1].split(".")[0])
            except Exception as exc:  # noqa: BLE001 (every failure is reported below)
                with lock:
                    failures.append(f"client {i} request {j}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    started.wait()
    before = health(app)["version"]
    wait_for(lambda: len(answered_by) >= 40, what="the load to get going")
    new_version = register_version(store, template)
    for thread in threads:
        thread.join(timeout=240)
    assert not failures, failures[:5]
    assert len(answered_by) == clients * per_client
    assert health(app)["version"] == new_version
    # The swap happened during the load: both versions answered requests.
    assert {before, new_version} <= set(answered_by)


def test_an_unsure_answer_says_so_and_claims_calibration_only_when_fitted():
    from skinsense.serving.answers import likely_wrong_note

    sure = {"nv": 0.7, "mel": 0.2, "bkl": 0.1}
    unsure = {"nv": 0.4, "mel": 0.35, "bkl": 0.25}
    assert likely_wrong_note(sure, calibrated=True) == ""
    assert "more likely wrong than right" in likely_wrong_note(unsure, calibrated=True)
    plain = likely_wrong_note(unsure, calibrated=False)
    assert "40%" in plain and "not calibrated" in plain and "wrong" not in plain
