"""The SkinSense Gradio app, mounted in a FastAPI server that also answers `/health`.

The app says plainly that it is not a diagnosis, and that it was trained on dermatoscopic
images (a phone photo is out of its domain). It serves whatever `ModelHolder.current` is,
so a new champion is picked up without a restart (see `skinsense.serving.reload`).

Routes: `/` the UI; `/gradio_api/...` its API (endpoint `/classify`, for gradio_client);
`GET /health` JSON; `POST /reload` check the registry now (loopback callers only).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import gradio as gr
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from skinsense.config import ServeConfig
from skinsense.labels import BY_CODE
from skinsense.serving.loading import LoadedModel
from skinsense.serving.predictor import ImageRejected
from skinsense.serving.reload import ModelHolder

log = logging.getLogger(__name__)

EXAMPLES_DIR = Path(__file__).parent / "examples"
# `skinsense serve` and the deploy step pass the rest of a ServeConfig as JSON here, so the
# server process needs no flags of its own.
SERVE_CONFIG_ENV = "SKINSENSE_SERVE_CONFIG"
DISCLAIMER = (
    "**This is not a diagnosis.** SkinSense is a research demo trained on dermatoscopic images "
    "(HAM10000, taken through a dermatoscope); ordinary phone photos are outside what it has "
    "seen and its answers on them mean little. Anyone worried about a skin lesion should see "
    "a doctor or dermatologist."
)
EXAMPLES_LABEL = ("Real HAM10000 images (Tschandl et al. 2018, CC BY-NC 4.0; see "
                  "skinsense/serving/examples/README.md)")
CSS = """
#model-footer { font-size: 0.85em; opacity: 0.8; }
#disclaimer { border-left: 4px solid #d97706; padding-left: 0.75em; }
"""


def example_images() -> list[Path]:
    """The bundled real HAM10000 example images, in a stable order."""
    return sorted(EXAMPLES_DIR.glob("*.jpg"))


def label_text(code: str) -> str:
    """The label shown for a class: display name, code, and a malignant mark."""
    cls = BY_CODE[code]
    return f"{cls.name} ({code})" + (" - malignant" if cls.malignant else "")


def describe_top(probabilities: dict[str, float], k: int = 3) -> str:
    """Markdown lines for the top-k classes with their plain-language descriptions."""
    top = sorted(probabilities.items(), key=lambda kv: kv[1], reverse=True)[:k]
    lines = []
    for code, p in top:
        cls = BY_CODE[code]
        mark = " **(malignant class)**" if cls.malignant else ""
        lines.append(f"- **{cls.name}** ({code}), {p:.1%}{mark}: {cls.description}")
    return "\n".join(lines)


def footer_text(model: LoadedModel) -> str:
    """One line from the model card: version, architecture, test score, calibration, date."""
    card = model.predictor.card
    version = f"version {model.version}" if model.version else f"from {Path(model.model_uri).name}/"
    score = card.metrics.get("test_balanced_accuracy")
    score_text = f"{score:.3f}" if score is not None else "n/a"
    calibration = (f"probabilities calibrated (temperature {card.temperature:.2f})"
                   if card.temperature != 1.0 else "probabilities not calibrated")
    return (f"Model: {model.model_name or 'skinsense'} {version} - {card.arch} at "
            f"{card.image_size} px - test balanced accuracy {score_text} - {calibration} - "
            f"trained {card.trained_at[:10]} - runs on {model.predictor.backend}")


class LesionImage(gr.Image):
    """`gr.Image` that hands the uploaded file to the predictor as it was sent.

    Gradio's own preprocessing opens the upload with PIL to convert its mode: a file that
    is not an image, or a decompression bomb, then fails inside Gradio with a bare "Error",
    and an RGBA image loses its alpha onto black. The predictor decodes, applies the EXIF
    orientation, converts the mode and refuses bad files itself, with a message for the user.
    """

    is_template = True  # rendered in the browser by gr.Image's own frontend

    def preprocess(self, payload) -> str | bytes | None:  # noqa: ANN001 (Gradio's ImageData)
        if payload is None:
            return None
        if payload.path:
            return str(payload.path)
        if payload.url and payload.url.startswith("data:") and "," in payload.url:
            try:
                return base64.b64decode(payload.url.split(",", 1)[1], validate=False)
            except ValueError as exc:
                raise gr.Error("The image data could not be decoded.") from exc
        raise gr.Error("No image was received; upload, paste or take a photo first.")


def build_blocks(holder: ModelHolder, cfg: ServeConfig) -> gr.Blocks:
    """The user interface; its API endpoint is `/classify`."""

    def classify(image: str | bytes | None) -> tuple[dict[str, float], str]:
        if not image:
            raise gr.Error("Upload, paste or take a photo of a skin lesion first.")
        model = holder.current  # read once: a swap mid-request must not mix two models
        try:
            probabilities = model.predictor.classify(
                Path(image) if isinstance(image, str) else image)
        except ImageRejected as exc:
            # The user knows the file by its own name, not by Gradio's cache path.
            why = str(exc).replace(image, "the upload") if isinstance(image, str) else str(exc)
            raise gr.Error(f"Cannot classify this image: {why}") from exc
        except Exception as exc:
            log.exception("classifying an upload failed")
            raise gr.Error("Something went wrong while classifying this image; try another "
                           "JPEG or PNG photo.") from exc
        shown = {label_text(code): p for code, p in probabilities.items()}
        source = f"model version {model.version}" if model.version else "a local model folder"
        return shown, describe_top(probabilities) + f"\n\n<sub>Answered by {source}.</sub>"

    with gr.Blocks(title="SkinSense") as blocks:
        gr.Markdown("# SkinSense: skin-lesion classifier")
        gr.Markdown(DISCLAIMER, elem_id="disclaimer")
        with gr.Row():
            with gr.Column():
                image = LesionImage(type="filepath", image_mode=None,
                                    sources=["upload", "clipboard", "webcam"],
                                    label="Dermatoscopic image")
                button = gr.Button("Classify", variant="primary", elem_id="classify")
            with gr.Column():
                label = gr.Label(num_top_classes=3, label="Top 3 classes", elem_id="top3")
                details = gr.Markdown(elem_id="details")
        examples = [str(p) for p in example_images()]
        if examples:
            gr.Examples(examples=examples, inputs=image, label=EXAMPLES_LABEL)
        # A callable value is evaluated on every page load, so the footer follows a swap.
        gr.Markdown(lambda: footer_text(holder.current), elem_id="model-footer")
        button.click(classify, inputs=image, outputs=[label, details], api_name="classify",
                     concurrency_limit=cfg.concurrency_limit)
    return blocks


def is_local_caller(request: Request) -> bool:
    """True for a request from this machine: loopback, or the address the server listens on.

    A TCP peer cannot claim the server's own address, so the second case is a process on
    this machine that reached a non-loopback bind address.
    """
    if request.client is None:
        return False
    host = request.client.host
    try:
        if ipaddress.ip_address(host).is_loopback:
            return True
    except ValueError:
        return False
    server = request.scope.get("server")
    return bool(server) and host == server[0]


def health_state(holder: ModelHolder, cfg: ServeConfig) -> dict:
    """The JSON /health returns."""
    model = holder.current
    card = model.predictor.card
    return {"status": "ok", "model_name": model.model_name, "version": model.version,
            "model_uri": model.model_uri, "arch": card.arch, "image_size": card.image_size,
            "backend": model.predictor.backend, "trained_at": card.trained_at,
            "test_balanced_accuracy": card.metrics.get("test_balanced_accuracy"),
            "loaded_at": model.loaded_at, "last_check_at": holder.last_check_at,
            "last_reload_at": holder.last_reload_at, "reload_error": holder.reload_error,
            "reload_interval_s": cfg.reload_interval_s}


def serve_config_from_env() -> ServeConfig:
    """The ServeConfig in `$SKINSENSE_SERVE_CONFIG` (JSON), else the defaults."""
    raw = os.environ.get(SERVE_CONFIG_ENV)
    return ServeConfig.model_validate(json.loads(raw)) if raw else ServeConfig()


def create_server(model_uri: str, cfg: ServeConfig | None = None, *,
                  holder: ModelHolder | None = None) -> FastAPI:
    """A FastAPI app with `/health`, `POST /reload` and the Gradio UI at `/`.

    Args:
        model_uri: `models:/NAME@champion` (followed), `models:/NAME/V` or a model folder.
        cfg: reload interval, upload limit, concurrency; default from the environment.
        holder: an already loaded holder (tests); default loads `model_uri` now.

    Raises:
        Whatever loading the model raises: the server does not start without a model.
    """
    cfg = cfg or serve_config_from_env()
    holder = holder or ModelHolder(model_uri, smoke_image=next(iter(example_images()), None))
    log.info("serving %s (version %s, %s)", holder.current.model_uri, holder.current.version,
             holder.current.predictor.backend)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        holder.start_watching(cfg.reload_interval_s)
        try:
            yield
        finally:
            holder.stop_watching()

    server = FastAPI(title="SkinSense", lifespan=lifespan)
    server.state.holder = holder

    @server.get("/health")
    def health() -> dict:
        return health_state(holder, cfg)

    @server.post("/reload")
    def reload(request: Request) -> JSONResponse:
        if not is_local_caller(request):
            return JSONResponse({"detail": "reload may only be requested from this machine"},
                                status_code=403)
        outcome = holder.reload(force=request.query_params.get("force") == "1")
        body = {"swapped": outcome.swapped, "version": outcome.version, "error": outcome.error}
        return JSONResponse(body, status_code=500 if outcome.error else 200)

    return gr.mount_gradio_app(
        server, build_blocks(holder, cfg), path="/", css=CSS, theme=gr.themes.Soft(),
        max_file_size=int(cfg.max_file_size_mb * 1024 * 1024),
        allowed_paths=[str(EXAMPLES_DIR)], footer_links=[])


def serve(model_uri: str, *, host: str = "127.0.0.1", port: int = 7860,
          cfg: ServeConfig | None = None) -> None:
    """Serve the app until interrupted (blocks)."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_server(model_uri, cfg), host=host, port=port, log_level="info")
