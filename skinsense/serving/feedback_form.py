"""The app's form for a confirmed diagnosis of the image on screen (`/feedback` in the API).

Reading the app stays open; writing a confirmed diagnosis needs a login whenever the app
listens beyond loopback (`skinsense.monitoring.feedback.check_login`). A refused caller gets
the reason and nothing is written.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from skinsense.config import ServeConfig
from skinsense.labels import BY_CODE, CLASS_CODES
from skinsense.monitoring.feedback import (
    DX_TYPES,
    LOCALIZATIONS,
    SEXES,
    FeedbackError,
    FeedbackRefused,
    add_feedback,
    check_login,
)
from skinsense.processes import is_loopback


def login_required(cfg: ServeConfig) -> bool:
    """True when the app listens beyond loopback (`serve.host`)."""
    return not is_loopback(cfg.host)


def build_feedback_form(image: gr.components.Component, cfg: ServeConfig, home: Path) -> None:
    """The 'Confirmed diagnosis' accordion, inside the caller's `gr.Blocks`."""
    needs_login = login_required(cfg)

    def submit(upload: str | bytes | None, dx: str | None, dx_type: str | None,
               age: float | None, sex: str | None, site: str | None, username: str,
               password: str) -> str:
        try:
            who = check_login(username, password, required=needs_login)
            if not upload:
                raise FeedbackError("upload the image the diagnosis is about first (the same "
                                    "file that was classified)")
            if not dx or not dx_type:
                raise FeedbackError("choose the confirmed class and how it was confirmed")
            record = add_feedback(Path(upload) if isinstance(upload, str) else upload,
                                  dx=dx, dx_type=dx_type, age=age or None, sex=sex or None,
                                  localization=site or None, entered_by=who, home=home,
                                  keep_image=cfg.keep_images)
        except (FeedbackRefused, FeedbackError) as exc:
            raise gr.Error(f"Not saved: {exc}") from exc
        kept = ("the image is kept for training" if record.image_path else
                "the image is not kept (serve.keep_images is off), so it counts for "
                "monitoring only")
        return f"Saved: {BY_CODE[record.dx].name} ({record.dx}, {record.dx_type}); {kept}."

    with gr.Accordion("Confirmed diagnosis (clinicians)", open=False, elem_id="feedback"):
        gr.Markdown("Enter the diagnosis that was later confirmed for the image above. "
                    + ("A login is needed." if needs_login else ""))
        # value=None everywhere: Gradio preselects a dropdown's first choice and a number's 0,
        # which would file an untouched form as akiec, histo, male, abdomen.
        with gr.Row():
            dx = gr.Dropdown([(f"{BY_CODE[c].name} ({c})", c) for c in CLASS_CODES],
                             value=None, label="Confirmed class", elem_id="feedback-dx")
            dx_type = gr.Dropdown(list(DX_TYPES), value=None, label="Confirmed by",
                                  elem_id="feedback-dx-type")
        with gr.Row():
            # Gradio 6 shows an empty number as 0 (placeholder or not); 0 is stored as unknown.
            age = gr.Number(value=None, label="Age (optional, 0 = unknown)", precision=0,
                            minimum=0, maximum=120, elem_id="feedback-age")
            sex = gr.Dropdown(list(SEXES), value=None, label="Sex (optional)",
                              elem_id="feedback-sex")
            site = gr.Dropdown(list(LOCALIZATIONS), value=None, label="Body site (optional)",
                               elem_id="feedback-site")
        with gr.Row(visible=needs_login):
            username = gr.Textbox(label="User", elem_id="feedback-user")
            password = gr.Textbox(label="Password", type="password",
                                  elem_id="feedback-password")
        save = gr.Button("Save confirmed diagnosis", elem_id="feedback-save")
        status = gr.Markdown(elem_id="feedback-status")
        save.click(submit, inputs=[image, dx, dx_type, age, sex, site, username, password],
                   outputs=status, api_name="feedback", concurrency_limit=1)
