"""The SkinSense Gradio app, mounted in a FastAPI server that also answers `/health`.

The app says plainly that it is not a diagnosis, and that it was trained on dermatoscopic
images (a phone photo is out of its domain). It serves whatever `ModelHolder.current` is,
so a new champion is picked up without a restart (see `skinsense.serving.reload`).

It knows when not to answer (`Predictor.assess`): an image that fails a quality check
(too small, dark, bright or blurry) gets the reason and no classification; an image the
out-of-domain gate refuses gets a plain message that it does not look like a dermatoscopic
image of a skin lesion, and its class list only behind "Show anyway", marked unreliable.
An image in domain gets the top 3 classes with calibrated probabilities and a referral
banner from the model's referral rule. "Explain" draws a Grad-CAM overlay of the top class
on request. A model without a gate (an older version) is served as before, with a note
that the image's domain is unchecked; so is a model whose gate the evaluation found unusable
(`ood_gate.status` in its card) or whose gate file is damaged, each with its own note on
every answer and a warning at the top of the page.

Routes: `/` the UI; `/gradio_api/...` its API for gradio_client: `/classify` (as before:
the top-3 label and the description; an image refused by a quality check or the gate is an
error with the reason), `/assess` (everything as JSON: quality, gate, probabilities,
referral) and `/explain` (the overlay, an image of the upload's size, and a caption);
`GET /health` JSON (with the gate's threshold, the precision served and why, and the
threads and concurrency of the runtime); `POST /reload` check the registry now
(loopback callers only).
"""

from __future__ import annotations

import base64
import functools
import ipaddress
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import gradio as gr
from PIL import Image
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from skinsense.config import ServeConfig, skinsense_home
from skinsense.labels import BY_CODE
from skinsense.models import NoExplanationError
from skinsense.serving.explain import explain_image
from skinsense.serving.feedback_form import build_feedback_form
from skinsense.serving.loading import LoadedModel, load_model
from skinsense.serving.prediction_log import PredictionLog
from skinsense.serving.predictor import Assessment, ImageRejected
from skinsense.serving.reload import ModelHolder
from skinsense.serving.runtime import serving_concurrency

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
OUT_OF_DOMAIN = ("This image does not look like a dermatoscopic image of a skin lesion, so no "
                 "classification is given.")
OUT_OF_DOMAIN_WHY = (
    "SkinSense only knows close-up images of skin lesions taken through a dermatoscope. "
    "Photos of faces, pets, objects, screens or documents, and most ordinary phone photos, "
    "are outside what it can judge, and any class it named for them would be a guess. If "
    "you are worried about a spot on your skin, show it to a doctor.")
HIGHER_RISK = "Higher risk: please see a dermatologist soon"
LOWER_RISK = ("Lower risk: no sign of the malignant classes this model knows; see a doctor "
              "if it changes, bleeds or worries you")
NO_GATE = ("This model has no out-of-domain check (it was trained before SkinSense had one), "
           "so the app cannot tell whether this is a dermatoscopic image: make sure it is one "
           "before reading anything into the answer.")
GATE_UNUSABLE = ("This model's out-of-domain check is switched off: its evaluation found that "
                 "it cannot tell dermatoscopic images from other pictures. Why: {note}. So the "
                 "app cannot tell whether this is a dermatoscopic image: make sure it is one "
                 "before reading anything into the answer.")
GATE_DAMAGED = ("This model's out-of-domain check is damaged ({note}), so the app cannot tell "
                "whether this is a dermatoscopic image: make sure it is one before reading "
                "anything into the answer, and tell whoever runs this app.")
CSS = """
#model-footer { font-size: 0.85em; opacity: 0.8; }
#disclaimer { border-left: 4px solid #d97706; padding-left: 0.75em; }
.verdict { border-radius: 8px; padding: 0.6em 0.9em; margin-bottom: 0.4em; }
.verdict-high { background: #fde2e1; border-left: 6px solid #b91c1c; }
.verdict-low { background: #dcfce7; border-left: 6px solid #15803d; }
.verdict-ood, .verdict-quality { background: #fef3c7; border-left: 6px solid #b45309; }
.verdict-note { background: #e0e7ff; border-left: 6px solid #4338ca; }
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


def unchecked_note(status: str, note: str) -> str:
    """Why the image's domain was not checked, for a gate status other than 'on' and 'off'
    ('' for those two)."""
    if status == "absent":
        return NO_GATE
    if status == "unusable":
        return GATE_UNUSABLE.format(note=note.split(": ", 1)[-1])
    if status == "damaged":
        return GATE_DAMAGED.format(note=note)
    return ""


def gate_warning(model: LoadedModel) -> str:
    """The page's warning at the top when the served model's gate is unusable or damaged."""
    predictor = model.predictor
    if predictor.gate_status not in ("unusable", "damaged"):
        return ""
    title = ("Out-of-domain check damaged." if predictor.gate_status == "damaged" else
             "Out-of-domain check off for this model.")
    return verdict_html("ood", title, unchecked_note(predictor.gate_status, predictor.gate_note))


def footer_text(model: LoadedModel) -> str:
    """One line from the model card: version, architecture, test score, calibration, date."""
    card = model.predictor.card
    version = f"version {model.version}" if model.version else f"from {Path(model.model_uri).name}/"
    score = card.metrics.get("test_balanced_accuracy")
    score_text = f"{score:.3f}" if score is not None else "n/a"
    calibration = card.calibration_text()
    gate = {"on": f"out-of-domain gate on (threshold {card.ood_threshold or 0:.1f})",
            "unusable": "out-of-domain gate off (unusable for this model)",
            "damaged": "out-of-domain gate DAMAGED"}.get(model.predictor.gate_status,
                                                         "no out-of-domain gate")
    predictor = model.predictor
    precision = predictor.precision + (f" ({predictor.precision_note})"
                                       if predictor.precision == "fp32"
                                       and predictor.precision_note else "")
    return (f"Model: {model.model_name or 'skinsense'} {version} - {card.arch} at "
            f"{card.image_size} px - test balanced accuracy {score_text} - {calibration} - "
            f"{gate} - trained {card.trained_at[:10]} - runs on {predictor.backend}, {precision}")


def verdict_html(kind: str, title: str, text: str = "") -> str:
    """A coloured panel: kind 'high', 'low', 'ood', 'quality' or 'note'."""
    body = f"<p>{text}</p>" if text else ""
    return f'<div class="verdict verdict-{kind}"><strong>{title}</strong>{body}</div>'


def referral_banner(assessment: Assessment) -> str:
    """The banner of the referral rule for an image in domain ('' when the model has none)."""
    referral = assessment.referral
    if referral is None or referral.refer is None:
        return verdict_html("note", "This model has no referral rule.",
                            "It gives class probabilities only; see a doctor about any "
                            "lesion that worries you.")
    detail = (f"Melanoma, basal cell carcinoma and actinic keratosis together: "
              f"{referral.score:.0%}; this model refers from {referral.threshold:.0%}.")
    if referral.refer:
        return verdict_html("high", HIGHER_RISK + ".", detail)
    return verdict_html("low", LOWER_RISK + ".", detail)


def quality_message(assessment: Assessment) -> str:
    """Why the image was refused before the model ran (markdown)."""
    reasons = "".join(f"<li>{issue.message}</li>" for issue in assessment.quality_issues)
    return verdict_html("quality", "Cannot classify this image:", f"</p><ul>{reasons}</ul><p>")


def likely_wrong_note(probabilities: dict[str, float], *, calibrated: bool) -> str:
    """A note when the top class has less than one chance in two.

    Only calibrated probabilities (a card with a fitted temperature) support "more likely
    wrong than right"; a card from before calibration gets the plain fact.
    """
    top = max(probabilities.values())
    if top >= 0.5:
        return ""
    if calibrated:
        return (f"\n\n*The model is unsure: its top class has {top:.0%}, and its probabilities "
                f"are calibrated, so it is more likely wrong than right about the class.*")
    return (f"\n\n*The model is unsure: its top class has only {top:.0%} (this model's "
            f"probabilities are not calibrated).*")


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


def _refusal(exc: ImageRejected, image: str | bytes) -> gr.Error:
    # The user knows the file by its own name, not by Gradio's cache path.
    why = str(exc).replace(image, "the upload") if isinstance(image, str) else str(exc)
    return gr.Error(f"Cannot classify this image: {why}")


def build_blocks(holder: ModelHolder, cfg: ServeConfig,
                 prediction_log: PredictionLog | None = None) -> gr.Blocks:
    """The user interface; its API endpoints are `/classify`, `/assess` and `/explain`.

    With `prediction_log`, every answer (refusals too) is logged before it is returned.
    """
    # Requests that run the model at once (one per core unless configured): no request
    # waits on another's worker while a core is idle (skinsense.serving.runtime).
    concurrency = serving_concurrency(cfg.concurrency_limit)

    def logged(endpoint: str, model: LoadedModel, image: str | bytes, start: float,
               **answer) -> None:
        if prediction_log is not None:
            prediction_log.record(
                endpoint=endpoint, image=image, latency_ms=(time.perf_counter() - start) * 1000,
                model_name=model.model_name, model_version=model.version,
                backend=model.predictor.backend, **answer)

    def assess(image: str | bytes | None, endpoint: str) -> tuple[LoadedModel, Assessment]:
        if not image:
            raise gr.Error("Upload, paste or take a photo of a skin lesion first.")
        start = time.perf_counter()
        model = holder.current  # read once: a swap mid-request must not mix two models
        try:
            assessment = model.predictor.assess(
                Path(image) if isinstance(image, str) else image, gate=cfg.gate)
        except ImageRejected as exc:
            logged(endpoint, model, image, start, unreadable="unreadable")
            raise _refusal(exc, image) from exc
        except Exception as exc:
            log.exception("classifying an upload failed")
            raise gr.Error("Something went wrong while classifying this image; try another "
                           "JPEG or PNG photo.") from exc
        logged(endpoint, model, image, start, quality_issues=assessment.quality_issues,
               gate=assessment.gate, probabilities=assessment.probabilities,
               top_class=assessment.top_class, referral=assessment.referral)
        return model, assessment

    def answered_by(model: LoadedModel) -> str:
        source = f"model version {model.version}" if model.version else "a local model folder"
        return f"\n\n<sub>Answered by {source}.</sub>"

    def details_text(model: LoadedModel, assessment: Assessment, *,
                     gate_note: bool = True) -> str:
        text = describe_top(assessment.probabilities)
        text += likely_wrong_note(assessment.probabilities,
                                  calibrated=model.predictor.card.calibrated)
        if gate_note and (unchecked := unchecked_note(assessment.gate.status,
                                                      assessment.gate.note)):
            text += f"\n\n*{unchecked}*"
        return text + answered_by(model)

    def classify(image: str | bytes | None) -> tuple[dict[str, float], str]:
        model, assessment = assess(image, "classify")
        if assessment.quality_issues:
            raise gr.Error("Cannot classify this image: " + "; ".join(
                issue.message for issue in assessment.quality_issues))
        if assessment.gate.in_domain is False:
            raise gr.Error(f"{OUT_OF_DOMAIN} {OUT_OF_DOMAIN_WHY}")
        shown = {label_text(code): p for code, p in assessment.probabilities.items()}
        banner = assessment.referral
        referral = ("" if banner is None or banner.refer is None
                    else f"\n\n**{HIGHER_RISK if banner.refer else LOWER_RISK}.**")
        return shown, details_text(model, assessment).replace(
            answered_by(model), referral + answered_by(model))

    def assess_json(image: str | bytes | None) -> dict:
        model, assessment = assess(image, "assess")
        return {**assessment.as_dict(), "model_version": model.version,
                "message": (OUT_OF_DOMAIN if assessment.gate.in_domain is False else
                            "; ".join(q.message for q in assessment.quality_issues))}

    def answer(verdict: str = "", top3: dict | None = None, details: str = "",
               anyway: dict | None = None, anyway_note: str = "") -> tuple:
        """Updates of the answer's components (the order of `answer_outputs` below); the
        explanation of an earlier image is always cleared."""
        return (verdict, gr.update(visible=top3 is not None, value=top3), details,
                gr.update(visible=anyway is not None, open=False), anyway, anyway_note,
                gr.update(visible=False), None, "")

    def show(image: str | bytes | None) -> tuple:
        """The UI's answer: verdict panel, top 3, details, or 'show anyway' when refused."""
        model, assessment = assess(image, "ui")
        if assessment.quality_issues:
            return answer(quality_message(assessment))
        shown = {label_text(code): p for code, p in assessment.probabilities.items()}
        if assessment.gate.in_domain is False:
            note = (f"**Unreliable.** The out-of-domain gate scored this image "
                    f"{assessment.gate.score:.1f}, above its threshold of "
                    f"{assessment.gate.threshold:.1f}: the model has not seen images like it, "
                    f"and these numbers mean little." + answered_by(model))
            return answer(verdict_html("ood", OUT_OF_DOMAIN, OUT_OF_DOMAIN_WHY),
                          anyway=shown, anyway_note=note)
        verdict = referral_banner(assessment)
        if unchecked := unchecked_note(assessment.gate.status, assessment.gate.note):
            # Said once, in the panel above the classes (the API says it in the details).
            verdict += verdict_html("note", "No out-of-domain check.", unchecked)
        return answer(verdict, shown, details_text(model, assessment, gate_note=False))

    def explain(image: str | bytes | None) -> tuple[Image.Image | None, str]:
        """Grad-CAM overlay of the top class at the upload's size (None when there is no
        explanation), and a caption that says what it shows or why there is none."""
        if not image:
            raise gr.Error("Upload, paste or take a photo of a skin lesion first.")
        start = time.perf_counter()
        model = holder.current
        try:
            result = explain_image(
                model.predictor, Path(image) if isinstance(image, str) else image, gate=cfg.gate)
        except NoExplanationError as exc:
            return None, f"*{str(exc)[0].upper()}{str(exc)[1:]}.*"
        except ImageRejected as exc:
            logged("explain", model, image, start, unreadable="unreadable")
            raise _refusal(exc, image) from exc
        except Exception as exc:
            log.exception("explaining an upload failed")
            raise gr.Error("Something went wrong while explaining this image.") from exc
        logged("explain", model, image, start, quality_issues=result.quality_issues,
               gate=result.gate, top_class=result.class_code)
        if result.quality_issues:
            return None, "No explanation: " + "; ".join(q.message for q in result.quality_issues)
        if result.overlay is None:
            return None, f"No explanation: {OUT_OF_DOMAIN[0].lower()}{OUT_OF_DOMAIN[1:]}"
        cls = BY_CODE[result.class_code]
        caption = f"Grad-CAM for **{cls.name}** ({result.class_code}, {result.probability:.0%})"
        where = f"the model ({model.predictor.card.arch}, layer `{result.target_layer}`)"
        if result.flat:
            caption += (f": {where} points to no particular place in this image (its map is "
                        f"flat), so there is nothing to show.")
        else:
            caption += (f": red marks where {where} found the evidence for this class, blue "
                        f"where it found none. It shows what the model used, not what a "
                        f"dermatologist would look at.")
        return result.overlay, caption

    with gr.Blocks(title="SkinSense") as blocks:
        gr.Markdown("# SkinSense: skin-lesion classifier")
        gr.Markdown(DISCLAIMER, elem_id="disclaimer")
        # Evaluated on every page load, like the footer.
        gr.Markdown(lambda: gate_warning(holder.current), elem_id="gate-warning")
        with gr.Row():
            with gr.Column():
                image = LesionImage(type="filepath", image_mode=None,
                                    sources=["upload", "clipboard", "webcam"],
                                    label="Dermatoscopic image")
                with gr.Row():
                    button = gr.Button("Classify", variant="primary", elem_id="classify")
                    explain_button = gr.Button("Explain: where did it look?",
                                               elem_id="explain")
            with gr.Column():
                verdict = gr.Markdown(elem_id="verdict")
                label = gr.Label(num_top_classes=3, label="Top 3 classes",
                                 elem_id="top3", visible=False)
                details = gr.Markdown(elem_id="details")
                with gr.Accordion("Show anyway (unreliable)", open=False, visible=False,
                                  elem_id="show-anyway") as anyway:
                    anyway_label = gr.Label(num_top_classes=3, elem_id="anyway-top3",
                                            label="Unreliable: top 3 for an image outside "
                                                  "the model's domain")
                    anyway_note = gr.Markdown(elem_id="anyway-note")
                with gr.Column(visible=False, elem_id="explanation-box") as explanation_box:
                    explanation = gr.Image(label="Explanation (Grad-CAM)", type="pil",
                                           format="jpeg", interactive=False,
                                           elem_id="explanation")
                    explanation_caption = gr.Markdown(elem_id="explanation-caption")
        examples = [str(p) for p in example_images()]
        if examples:
            gr.Examples(examples=examples, inputs=image, label=EXAMPLES_LABEL)
        if cfg.feedback:
            build_feedback_form(image, cfg, skinsense_home())
        # A callable value is evaluated on every page load, so the footer follows a swap.
        gr.Markdown(lambda: footer_text(holder.current), elem_id="model-footer")

        answer_outputs = [verdict, label, details, anyway, anyway_label, anyway_note,
                          explanation_box, explanation, explanation_caption]
        button.click(show, inputs=image, outputs=answer_outputs, api_visibility="private",
                     concurrency_limit=concurrency, concurrency_id="model")
        # A new image must not keep the answer or the explanation of the last one.
        image.change(lambda: answer(), outputs=answer_outputs, api_visibility="private",
                     queue=False, show_progress="hidden")
        # API-only endpoints (no trigger in the page). /classify keeps its inputs and its two
        # outputs, so existing gradio_client code works unchanged.
        gr.on(triggers=[], fn=classify, inputs=image, outputs=[label, details],
              api_name="classify", concurrency_limit=concurrency,
              concurrency_id="model")
        gr.on(triggers=[], fn=assess_json, inputs=image, outputs=gr.JSON(visible=False),
              api_name="assess", concurrency_limit=concurrency,
              concurrency_id="model")
        # One explanation at a time: Grad-CAM runs on all cores and holds a lock anyway.
        explain_button.click(explain, inputs=image, outputs=[explanation, explanation_caption],
                             api_name="explain", concurrency_limit=1).then(
            lambda: gr.update(visible=True), outputs=explanation_box, api_visibility="private",
            queue=False, show_progress="hidden")
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
