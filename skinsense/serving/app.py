"""The SkinSense Gradio app, mounted in a FastAPI server that also answers `/health`.

It serves whatever `ModelHolder.current` is, so a new champion is picked up without a
restart (see `skinsense.serving.reload`). The page is built in `skinsense.serving.page`;
what it says about each upload (quality refusals, the out-of-domain gate, the top 3 with a
referral banner, Grad-CAM) in `skinsense.serving.answers`. A model without a gate (an older
version) is served as before, with a note that the image's domain is unchecked; so is a
model whose gate the evaluation found unusable (`ood_gate.status` in its card) or whose
gate file is damaged, each with its own note on every answer and a warning at the top of
the page.

Routes: `/` the UI; `/gradio_api/...` its API for gradio_client: `/classify` (as before:
the top-3 label and the description; an image refused by a quality check or the gate is an
error with the reason), `/assess` (everything as JSON: quality, gate, probabilities,
referral) and `/explain` (the overlay, an image of the upload's size, and a caption);
`GET /health` JSON (with the gate's threshold, the precision served and why, and the
threads and concurrency of the runtime); `POST /reload` check the registry now
(loopback callers only).
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import gradio as gr
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from skinsense.config import ServeConfig, skinsense_home
from skinsense.serving.loading import load_model
from skinsense.serving.page import CSS, EXAMPLES_DIR, build_blocks, example_images
from skinsense.serving.prediction_log import PredictionLog
from skinsense.serving.reload import ModelHolder
from skinsense.serving.runtime import serving_concurrency

log = logging.getLogger(__name__)

# `skinsense serve` and the deploy step pass the rest of a ServeConfig as JSON here, so the
# server process needs no flags of its own.
SERVE_CONFIG_ENV = "SKINSENSE_SERVE_CONFIG"


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
            **model.predictor.runtime_summary(),
            "concurrency_limit": serving_concurrency(cfg.concurrency_limit),
            "test_balanced_accuracy": card.metrics.get("test_balanced_accuracy"),
            "ood_threshold": card.ood_threshold if model.predictor.gate is not None else None,
            "ood_gate": model.predictor.gate_summary(enabled=cfg.gate),
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
    holder = holder or ModelHolder(
        model_uri, smoke_image=next(iter(example_images()), None),
        loader=functools.partial(load_model, precision=cfg.precision, threads=cfg.model_threads,
                                 concurrency=serving_concurrency(cfg.concurrency_limit)))
    log.info("serving %s (version %s, %s, %s: %s)", holder.current.model_uri,
             holder.current.version, holder.current.predictor.backend,
             holder.current.predictor.precision, holder.current.predictor.precision_note)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        holder.start_watching(cfg.reload_interval_s)
        try:
            yield
        finally:
            holder.stop_watching()

    server = FastAPI(title="SkinSense", lifespan=lifespan)
    server.state.holder = holder
    server.state.prediction_log = prediction_log = (
        PredictionLog(None, skinsense_home(), keep_images=cfg.keep_images,
                      keep_images_days=cfg.keep_images_days) if cfg.log_predictions else None)

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
        server, build_blocks(holder, cfg, prediction_log), path="/", css=CSS, theme=gr.themes.Soft(),
        max_file_size=int(cfg.max_file_size_mb * 1024 * 1024),
        allowed_paths=[str(EXAMPLES_DIR)], footer_links=[])


def serve(model_uri: str, *, host: str = "127.0.0.1", port: int = 7860,
          cfg: ServeConfig | None = None) -> None:
    """Serve the app until interrupted (blocks)."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The feedback form's login rule follows where the app really listens.
    cfg = (cfg or serve_config_from_env()).model_copy(update={"host": host})
    uvicorn.run(create_server(model_uri, cfg), host=host, port=port, log_level="info")
