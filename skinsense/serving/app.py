"""The SkinSense Gradio app, mounted in a FastAPI server that also answers `/health`.

The app says plainly that it is not a diagnosis, and that it was trained on dermatoscopic
images (a phone photo is out of its domain).
"""

from __future__ import annotations

import logging
from pathlib import Path

import gradio as gr
from fastapi import FastAPI

from skinsense.labels import BY_CODE
from skinsense.serving.loading import LoadedModel, load_model
from skinsense.serving.predictor import ImageRejected

log = logging.getLogger(__name__)

EXAMPLES_DIR = Path(__file__).parent / "examples"
MAX_UPLOAD = "10mb"  # a dermatoscope JPEG is 0.2-3 MB
DISCLAIMER = (
    "**This is not a diagnosis.** SkinSense is a research demo trained on dermatoscopic images "
    "(HAM10000, taken through a dermatoscope); ordinary phone photos are outside what it has "
    "seen and its answers on them mean little. Anyone worried about a skin lesion should see "
    "a doctor or dermatologist."
)


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
    card = model.predictor.card
    version = f"version {model.version}" if model.version else model.model_uri
    score = card.metrics.get("test_balanced_accuracy")
    score_text = f"{score:.3f}" if score is not None else "n/a"
    return (f"Model: {model.model_name or 'skinsense'} {version} - {card.arch} at "
            f"{card.image_size} px - test balanced accuracy {score_text} - trained "
            f"{card.trained_at[:10]}")


def build_blocks(model: LoadedModel) -> gr.Blocks:
    """The user interface; its API endpoint is `/classify`."""

    def classify(image_path: str | None) -> tuple[dict[str, float], str]:
        if not image_path:
            raise gr.Error("Upload, paste or take a photo of a skin lesion first.")
        try:
            probabilities = model.predictor.classify(Path(image_path))
        except ImageRejected as exc:
            raise gr.Error(f"Cannot classify this image: {exc}") from exc
        shown = {label_text(code): p for code, p in probabilities.items()}
        return shown, describe_top(probabilities)

    with gr.Blocks(title="SkinSense") as blocks:
        gr.Markdown("# SkinSense: skin-lesion classifier")
        gr.Markdown(DISCLAIMER)
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", sources=["upload", "clipboard", "webcam"],
                                 label="Dermatoscopic image")
                button = gr.Button("Classify", variant="primary")
            with gr.Column():
                label = gr.Label(num_top_classes=3, label="Top 3 classes")
                details = gr.Markdown()
        examples = sorted(str(p) for p in EXAMPLES_DIR.glob("*.jpg"))
        if examples:
            gr.Examples(examples=examples, inputs=image,
                        label="Real HAM10000 images (CC BY-NC 4.0, Tschandl et al. 2018)")
        gr.Markdown(footer_text(model), elem_id="model-footer")
        button.click(classify, inputs=image, outputs=[label, details], api_name="classify")
    return blocks


def create_server(model_uri: str) -> FastAPI:
    """A FastAPI app with `/health` and the Gradio UI at `/`."""
    model = load_model(model_uri)
    log.info("serving %s (version %s)", model.model_uri, model.version)
    server = FastAPI(title="SkinSense")

    @server.get("/health")
    def health() -> dict:
        card = model.predictor.card
        return {"status": "ok", "model_name": model.model_name, "version": model.version,
                "model_uri": model.model_uri, "arch": card.arch, "image_size": card.image_size,
                "loaded_at": model.loaded_at}

    return gr.mount_gradio_app(server, build_blocks(model), path="/",
                               max_file_size=MAX_UPLOAD, allowed_paths=[str(EXAMPLES_DIR)])


def serve(model_uri: str, *, host: str = "127.0.0.1", port: int = 7860) -> None:
    """Serve the app until interrupted (blocks)."""
    import uvicorn

    uvicorn.run(create_server(model_uri), host=host, port=port, log_level="info")
