"""The MLflow pyfunc flavour of a SkinSense model, so standard MLflow tooling can serve it.

`mlflow.pyfunc.load_model("models:/skinsense@champion").predict(df)` takes a DataFrame with a
column `image` (raw bytes, or base64 text as sent over MLflow's REST scoring) and returns a
DataFrame of the seven class probabilities. The model runs on ONNX Runtime when the registered
folder holds `model.onnx` (every version registered by `skinsense.registry` does), else on
PyTorch.
"""

from __future__ import annotations

import base64
from pathlib import Path

import mlflow.pyfunc
import pandas as pd

from skinsense.labels import CLASS_CODES
from skinsense.serving.predictor import Predictor

MODEL_DIR_ARTIFACT = "model_dir"


class SkinSensePyfunc(mlflow.pyfunc.PythonModel):
    """Wraps a model folder (weights.safetensors + model_card.json, optionally model.onnx)."""

    def load_context(self, context) -> None:
        self.predictor = Predictor.from_model_dir(Path(context.artifacts[MODEL_DIR_ARTIFACT]))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        if isinstance(model_input, pd.DataFrame):
            if "image" not in model_input.columns:
                raise ValueError("input needs a column 'image' of image bytes or base64 text")
            images = list(model_input["image"])
        else:
            images = list(model_input)
        images = [base64.b64decode(im) if isinstance(im, str) else im for im in images]
        return pd.DataFrame(self.predictor.predict_proba(images), columns=list(CLASS_CODES))
