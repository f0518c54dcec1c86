"""The MLflow pyfunc flavour of a SkinSense model, so standard MLflow tooling can serve it.

`mlflow.pyfunc.load_model("models:/skinsense@champion").predict(df)` takes a DataFrame with a
column `image` (raw bytes, or base64 text as sent over MLflow's REST scoring) and returns a
DataFrame with one row per image (`OUTPUT_COLUMNS`):

- the seven calibrated class probabilities (`akiec` ... `vasc`; NaN when the image failed a
  quality check, since the model does not run on it);
- `in_domain` (bool): the out-of-domain gate's verdict; None when the model has no gate (a
  version from before SkinSense had one) or the image failed a quality check;
- `ood_score` (float): the gate's score (larger: further from the training images; refused
  above the card's `ood_threshold`); NaN where `in_domain` is None;
- `referral` (bool): the referral rule's "see a dermatologist" (`skinsense.trust.referral`); None
  when the model has no rule, the model did not run or the gate refused the image;
- `quality_issue` (str): why the image was refused before the model ran ('' when it passed).

Trust a row's probabilities only when `quality_issue` is '' and `in_domain` is True, as the
app does. A model whose gate file is damaged answers nothing: `predict` raises, saying so
(a None `in_domain` would read as a model from before the gate); one whose gate the
evaluation found unusable answers with `in_domain` None, as one without a gate. The model runs on ONNX Runtime when the registered folder holds `model.onnx`
(every version registered by `skinsense.lifecycle.registry` does), else on PyTorch; in int8
(`model.int8.onnx`) exactly when the app would (`skinsense.quantize.serving_precision`: the
evaluation's parity verdict in the card). `mlflow.pyfunc.load_model(uri, model_config=
{"precision": "fp32"})` (or "int8") forces one, as `ServeConfig.precision` does for the app;
`threads` and `concurrency` set ONNX Runtime's threads (`skinsense.serving.runtime`).
"""

from __future__ import annotations

import base64
import math
from pathlib import Path

import mlflow.pyfunc
import pandas as pd

from skinsense.labels import CLASS_CODES
from skinsense.serving.predictor import Assessment, Predictor
from skinsense.trust.gate import GateDamagedError

MODEL_DIR_ARTIFACT = "model_dir"
GATE_COLUMNS = ("in_domain", "ood_score", "referral", "quality_issue")
OUTPUT_COLUMNS = (*CLASS_CODES, *GATE_COLUMNS)


def assessment_row(assessment: Assessment) -> dict:
    """One output row of the pyfunc for one image's assessment."""
    probabilities = assessment.probabilities or {}
    referral = assessment.referral
    return {**{code: probabilities.get(code, math.nan) for code in CLASS_CODES},
            "in_domain": assessment.gate.in_domain,
            "ood_score": math.nan if assessment.gate.score is None else assessment.gate.score,
            "referral": None if referral is None else referral.refer,
            "quality_issue": "; ".join(issue.message for issue in assessment.quality_issues)}


class SkinSensePyfunc(mlflow.pyfunc.PythonModel):
    """Wraps a model folder (weights.safetensors + model_card.json, optionally model.onnx
    and ood_gate.safetensors)."""

    def load_context(self, context) -> None:
        config = dict(getattr(context, "model_config", None) or {})
        unknown = set(config) - {"precision", "threads", "concurrency"}
        if unknown:
            raise ValueError(f"unknown model_config keys {sorted(unknown)}; the SkinSense pyfunc "
                             f"takes precision ('auto', 'int8' or 'fp32'), threads and concurrency")
        precision = config.get("precision") or "auto"
        if precision not in ("auto", "int8", "fp32"):
            raise ValueError(f"model_config precision {precision!r}: use 'auto', 'int8' or "
                             f"'fp32'")
        self.predictor = Predictor.from_model_dir(
            Path(context.artifacts[MODEL_DIR_ARTIFACT]), precision=precision,
            threads=config.get("threads"), concurrency=config.get("concurrency"))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        if self.predictor.gate_status == "damaged":
            raise GateDamagedError(
                f"this model's out-of-domain gate is damaged ({self.predictor.gate_note}); it "
                f"answers nothing rather than pass images unchecked. Register the model again "
                f"(evaluation refits the gate) or serve another version")
        if isinstance(model_input, pd.DataFrame):
            if "image" not in model_input.columns:
                raise ValueError("input needs a column 'image' of image bytes or base64 text")
            images = list(model_input["image"])
        else:
            images = list(model_input)
        images = [base64.b64decode(im) if isinstance(im, str) else im for im in images]
        rows = [assessment_row(a) for a in self.predictor.assess_many(images)]
        frame = pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))
        # object columns: True/False, or None where the verdict is unknown (JSON null).
        for column in ("in_domain", "referral"):
            frame[column] = frame[column].astype(object).where(frame[column].notna(), None)
        return frame
