"""MLflow models-from-code entry: the pyfunc model is defined by code, not by a pickle."""

import mlflow

from skinsense.serving.pyfunc import SkinSensePyfunc

mlflow.models.set_model(SkinSensePyfunc())
