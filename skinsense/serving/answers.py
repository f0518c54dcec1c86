"""What the app says about an upload: its messages and panels, and the answers that the
page's events and the API endpoints (`/classify`, `/assess`, `/explain`) return.

It knows when not to answer (`Predictor.assess`): an image that fails a quality check
(too small, dark, bright or blurry) gets the reason and no classification; an image the
out-of-domain gate refuses gets a plain message that it does not look like a dermatoscopic
image of a skin lesion, and its class list only behind "Show anyway", marked unreliable.
An image in domain gets the top 3 classes with calibrated probabilities and a referral
banner from the model's referral rule. "Explain" draws a Grad-CAM overlay of the top class
on request. A model without a usable gate gets a note on every answer that the image's
domain is unchecked.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import gradio as gr
from PIL import Image

from skinsense.config import ServeConfig
from skinsense.labels import BY_CODE
from skinsense.models import NoExplanationError
from skinsense.serving.explain import Explanation, explain_image
from skinsense.serving.loading import LoadedModel
from skinsense.serving.prediction_log import PredictionLog
from skinsense.serving.predictor import Assessment, ImageRejected
from skinsense.serving.reload import ModelHolder

log = logging.getLogger(__name__)

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


def _refusal(exc: ImageRejected, image: str | bytes) -> gr.Error:
    # The user knows the file by its own name, not by Gradio's cache path.
    why = str(exc).replace(image, "the upload") if isinstance(image, str) else str(exc)
    return gr.Error(f"Cannot classify this image: {why}")


def answered_by(model: LoadedModel) -> str:
    """The small line under an answer that names the model version that gave it."""
    source = f"model version {model.version}" if model.version else "a local model folder"
    return f"\n\n<sub>Answered by {source}.</sub>"


def details_text(model: LoadedModel, assessment: Assessment, *, gate_note: bool = True) -> str:
    """The details under the top 3: descriptions, an unsure note, the unchecked-domain note
    (unless `gate_note` is False) and the model that answered (markdown)."""
    text = describe_top(assessment.probabilities)
    text += likely_wrong_note(assessment.probabilities,
                              calibrated=model.predictor.card.calibrated)
    if gate_note and (unchecked := unchecked_note(assessment.gate.status,
                                                  assessment.gate.note)):
        text += f"\n\n*{unchecked}*"
    return text + answered_by(model)


def answer_updates(verdict: str = "", top3: dict | None = None, details: str = "",
                   anyway: dict | None = None, anyway_note: str = "") -> tuple:
    """Updates of the answer's components (the order of `Page.answer_outputs`); the
    explanation of an earlier image is always cleared."""
    return (verdict, gr.update(visible=top3 is not None, value=top3), details,
            gr.update(visible=anyway is not None, open=False), anyway, anyway_note,
            gr.update(visible=False), None, "")


class Answers:
    """What the page's events and the API endpoints return for an upload.

    Each answer reads the served model once (a swap mid-request must not mix two models)
    and, with a prediction log, logs itself (refusals too) before it is returned.
    """

    def __init__(self, holder: ModelHolder, cfg: ServeConfig,
                 prediction_log: PredictionLog | None = None) -> None:
        self.holder = holder
        self.cfg = cfg
        self.prediction_log = prediction_log

    def logged(self, endpoint: str, model: LoadedModel, image: str | bytes, start: float,
               **answer) -> None:
        if self.prediction_log is not None:
            self.prediction_log.record(
                endpoint=endpoint, image=image, latency_ms=(time.perf_counter() - start) * 1000,
                model_name=model.model_name, model_version=model.version,
                backend=model.predictor.backend, **answer)

    def assess(self, image: str | bytes | None, endpoint: str
               ) -> tuple[LoadedModel, Assessment]:
        if not image:
            raise gr.Error("Upload, paste or take a photo of a skin lesion first.")
        start = time.perf_counter()
        model = self.holder.current  # read once: a swap mid-request must not mix two models
        try:
            assessment = model.predictor.assess(
                Path(image) if isinstance(image, str) else image, gate=self.cfg.gate)
        except ImageRejected as exc:
            self.logged(endpoint, model, image, start, unreadable="unreadable")
            raise _refusal(exc, image) from exc
        except Exception as exc:
            log.exception("classifying an upload failed")
            raise gr.Error("Something went wrong while classifying this image; try another "
                           "JPEG or PNG photo.") from exc
        self.logged(endpoint, model, image, start, quality_issues=assessment.quality_issues,
                    gate=assessment.gate, probabilities=assessment.probabilities,
                    top_class=assessment.top_class, referral=assessment.referral)
        return model, assessment

    def classify(self, image: str | bytes | None) -> tuple[dict[str, float], str]:
        """`/classify`: the top 3 and the details; a refused image is an error."""
        model, assessment = self.assess(image, "classify")
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

    def assess_json(self, image: str | bytes | None) -> dict:
        """`/assess`: everything as JSON."""
        model, assessment = self.assess(image, "assess")
        return {**assessment.as_dict(), "model_version": model.version,
                "message": (OUT_OF_DOMAIN if assessment.gate.in_domain is False else
                            "; ".join(q.message for q in assessment.quality_issues))}

    def show(self, image: str | bytes | None) -> tuple:
        """The UI's answer: verdict panel, top 3, details, or 'show anyway' when refused."""
        model, assessment = self.assess(image, "ui")
        if assessment.quality_issues:
            return answer_updates(quality_message(assessment))
        shown = {label_text(code): p for code, p in assessment.probabilities.items()}
        if assessment.gate.in_domain is False:
            note = (f"**Unreliable.** The out-of-domain gate scored this image "
                    f"{assessment.gate.score:.1f}, above its threshold of "
                    f"{assessment.gate.threshold:.1f}: the model has not seen images like it, "
                    f"and these numbers mean little." + answered_by(model))
            return answer_updates(verdict_html("ood", OUT_OF_DOMAIN, OUT_OF_DOMAIN_WHY),
                                  anyway=shown, anyway_note=note)
        verdict = referral_banner(assessment)
        if unchecked := unchecked_note(assessment.gate.status, assessment.gate.note):
            # Said once, in the panel above the classes (the API says it in the details).
            verdict += verdict_html("note", "No out-of-domain check.", unchecked)
        return answer_updates(verdict, shown, details_text(model, assessment, gate_note=False))

    def explain(self, image: str | bytes | None) -> tuple[Image.Image | None, str]:
        """Grad-CAM overlay of the top class at the upload's size (None when there is no
        explanation), and a caption that says what it shows or why there is none."""
        if not image:
            raise gr.Error("Upload, paste or take a photo of a skin lesion first.")
        start = time.perf_counter()
        model = self.holder.current
        try:
            result = explain_image(
                model.predictor, Path(image) if isinstance(image, str) else image,
                gate=self.cfg.gate)
        except NoExplanationError as exc:
            return None, f"*{str(exc)[0].upper()}{str(exc)[1:]}.*"
        except ImageRejected as exc:
            self.logged("explain", model, image, start, unreadable="unreadable")
            raise _refusal(exc, image) from exc
        except Exception as exc:
            log.exception("explaining an upload failed")
            raise gr.Error("Something went wrong while explaining this image.") from exc
        self.logged("explain", model, image, start, quality_issues=result.quality_issues,
                    gate=result.gate, top_class=result.class_code)
        if result.quality_issues:
            return None, "No explanation: " + "; ".join(q.message for q in result.quality_issues)
        if result.overlay is None:
            return None, f"No explanation: {OUT_OF_DOMAIN[0].lower()}{OUT_OF_DOMAIN[1:]}"
        return result.overlay, _explanation_caption(model, result)


def _explanation_caption(model: LoadedModel, result: Explanation) -> str:
    """What the Grad-CAM overlay of `result` shows (markdown)."""
    cls = BY_CODE[result.class_code]
    caption = f"Grad-CAM for **{cls.name}** ({result.class_code}, {result.probability:.0%})"
    where = f"the model ({model.predictor.card.arch}, layer `{result.target_layer}`)"
    if result.flat:
        return caption + (f": {where} points to no particular place in this image (its map "
                          f"is flat), so there is nothing to show.")
    return caption + (f": red marks where {where} found the evidence for this class, blue "
                      f"where it found none. It shows what the model used, not what a "
                      f"dermatologist would look at.")
