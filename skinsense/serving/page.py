"""The SkinSense page: its parts (header and disclaimer, upload, results, "Show anyway",
explanation, examples, feedback form, model footer) and the events that wire them to the
answers (`skinsense.serving.answers`).

The page says plainly that it is not a diagnosis, and that the model was trained on
dermatoscopic images (a phone photo is out of its domain). Its gate warning and footer are
evaluated on every page load, so they follow a swap of the served model. Element ids
(`#classify`, `#explain`, `#verdict`, `#top3`, `#details`, `#show-anyway`, `#explanation`,
`#model-footer`, ...) are what the browser tests and the CSS address.
"""

from __future__ import annotations

import base64
import dataclasses
from pathlib import Path

import gradio as gr

from skinsense.config import ServeConfig, skinsense_home
from skinsense.serving.answers import (
    Answers,
    answer_updates,
    unchecked_note,
    verdict_html,
)
from skinsense.serving.feedback_form import build_feedback_form
from skinsense.serving.loading import LoadedModel
from skinsense.serving.prediction_log import PredictionLog
from skinsense.serving.reload import ModelHolder
from skinsense.serving.runtime import serving_concurrency

EXAMPLES_DIR = Path(__file__).parent / "examples"
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
.verdict { border-radius: 8px; padding: 0.6em 0.9em; margin-bottom: 0.4em; }
.verdict-high { background: #fde2e1; border-left: 6px solid #b91c1c; }
.verdict-low { background: #dcfce7; border-left: 6px solid #15803d; }
.verdict-ood, .verdict-quality { background: #fef3c7; border-left: 6px solid #b45309; }
.verdict-note { background: #e0e7ff; border-left: 6px solid #4338ca; }
"""


def example_images() -> list[Path]:
    """The bundled real HAM10000 example images, in a stable order."""
    return sorted(EXAMPLES_DIR.glob("*.jpg"))


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


@dataclasses.dataclass(frozen=True)
class Page:
    """The components of the page that the events read or update."""

    image: LesionImage
    classify: gr.Button
    explain: gr.Button
    verdict: gr.Markdown
    top3: gr.Label
    details: gr.Markdown
    anyway: gr.Accordion
    anyway_top3: gr.Label
    anyway_note: gr.Markdown
    explanation_box: gr.Column
    explanation: gr.Image
    explanation_caption: gr.Markdown

    @property
    def answer_outputs(self) -> list:
        """The components an answer updates, in the order of `answer_updates`."""
        return [self.verdict, self.top3, self.details, self.anyway, self.anyway_top3,
                self.anyway_note, self.explanation_box, self.explanation,
                self.explanation_caption]


def _build_header(holder: ModelHolder) -> None:
    """Title, the not-a-diagnosis disclaimer and the warning of a model without a usable gate."""
    gr.Markdown("# SkinSense: skin-lesion classifier")
    gr.Markdown(DISCLAIMER, elem_id="disclaimer")
    # Evaluated on every page load, like the footer.
    gr.Markdown(lambda: gate_warning(holder.current), elem_id="gate-warning")


def _build_upload() -> tuple[LesionImage, gr.Button, gr.Button]:
    """The image input with its Classify and Explain buttons."""
    image = LesionImage(type="filepath", image_mode=None,
                        sources=["upload", "clipboard", "webcam"],
                        label="Dermatoscopic image")
    with gr.Row():
        classify = gr.Button("Classify", variant="primary", elem_id="classify")
        explain = gr.Button("Explain: where did it look?", elem_id="explain")
    return image, classify, explain


def _build_results() -> tuple[gr.Markdown, gr.Label, gr.Markdown]:
    """The verdict panel, the top 3 and the details."""
    verdict = gr.Markdown(elem_id="verdict")
    top3 = gr.Label(num_top_classes=3, label="Top 3 classes", elem_id="top3", visible=False)
    details = gr.Markdown(elem_id="details")
    return verdict, top3, details


def _build_show_anyway() -> tuple[gr.Accordion, gr.Label, gr.Markdown]:
    """The closed 'Show anyway' accordion with the classes of an image the gate refused."""
    with gr.Accordion("Show anyway (unreliable)", open=False, visible=False,
                      elem_id="show-anyway") as anyway:
        anyway_top3 = gr.Label(num_top_classes=3, elem_id="anyway-top3",
                               label="Unreliable: top 3 for an image outside "
                                     "the model's domain")
        anyway_note = gr.Markdown(elem_id="anyway-note")
    return anyway, anyway_top3, anyway_note


def _build_explanation() -> tuple[gr.Column, gr.Image, gr.Markdown]:
    """The hidden box of the Grad-CAM overlay and its caption."""
    with gr.Column(visible=False, elem_id="explanation-box") as explanation_box:
        explanation = gr.Image(label="Explanation (Grad-CAM)", type="pil", format="jpeg",
                               interactive=False, elem_id="explanation")
        explanation_caption = gr.Markdown(elem_id="explanation-caption")
    return explanation_box, explanation, explanation_caption


def _build_examples(image: LesionImage) -> None:
    """The bundled real HAM10000 images, one click to load each into `image`."""
    examples = [str(p) for p in example_images()]
    if examples:
        gr.Examples(examples=examples, inputs=image, label=EXAMPLES_LABEL)


def _build_footer(holder: ModelHolder) -> None:
    """The model line at the bottom (version, architecture, scores, gate, precision)."""
    # A callable value is evaluated on every page load, so the footer follows a swap.
    gr.Markdown(lambda: footer_text(holder.current), elem_id="model-footer")


def build_page(holder: ModelHolder, cfg: ServeConfig) -> Page:
    """Lay out the page, inside the caller's `gr.Blocks`; no events yet."""
    _build_header(holder)
    with gr.Row():
        with gr.Column():
            image, classify, explain = _build_upload()
        with gr.Column():
            verdict, top3, details = _build_results()
            anyway, anyway_top3, anyway_note = _build_show_anyway()
            explanation_box, explanation, explanation_caption = _build_explanation()
    _build_examples(image)
    if cfg.feedback:
        build_feedback_form(image, cfg, skinsense_home())
    _build_footer(holder)
    return Page(image, classify, explain, verdict, top3, details, anyway, anyway_top3,
                anyway_note, explanation_box, explanation, explanation_caption)


def wire_events(page: Page, answers: Answers, concurrency: int) -> None:
    """The page's events and the API endpoints `/classify`, `/assess` and `/explain`.

    `concurrency`: requests that run the model at once (they share the queue "model").
    """
    page.classify.click(answers.show, inputs=page.image, outputs=page.answer_outputs,
                        api_visibility="private", concurrency_limit=concurrency,
                        concurrency_id="model")
    # A new image must not keep the answer or the explanation of the last one.
    page.image.change(lambda: answer_updates(), outputs=page.answer_outputs,
                      api_visibility="private", queue=False, show_progress="hidden")
    # API-only endpoints (no trigger in the page). /classify keeps its inputs and its two
    # outputs, so existing gradio_client code works unchanged.
    gr.on(triggers=[], fn=answers.classify, inputs=page.image,
          outputs=[page.top3, page.details], api_name="classify",
          concurrency_limit=concurrency, concurrency_id="model")
    gr.on(triggers=[], fn=answers.assess_json, inputs=page.image,
          outputs=gr.JSON(visible=False), api_name="assess", concurrency_limit=concurrency,
          concurrency_id="model")
    # One explanation at a time: Grad-CAM runs on all cores and holds a lock anyway.
    page.explain.click(answers.explain, inputs=page.image,
                       outputs=[page.explanation, page.explanation_caption],
                       api_name="explain", concurrency_limit=1).then(
        lambda: gr.update(visible=True), outputs=page.explanation_box,
        api_visibility="private", queue=False, show_progress="hidden")


def build_blocks(holder: ModelHolder, cfg: ServeConfig,
                 prediction_log: PredictionLog | None = None) -> gr.Blocks:
    """The user interface; its API endpoints are `/classify`, `/assess` and `/explain`.

    With `prediction_log`, every answer (refusals too) is logged before it is returned.
    """
    # Requests that run the model at once (one per core unless configured): no request
    # waits on another's worker while a core is idle (skinsense.serving.runtime).
    concurrency = serving_concurrency(cfg.concurrency_limit)
    with gr.Blocks(title="SkinSense") as blocks:
        wire_events(build_page(holder, cfg), Answers(holder, cfg, prediction_log), concurrency)
    return blocks
