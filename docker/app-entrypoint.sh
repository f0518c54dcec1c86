#!/bin/sh
# The app of the compose stack: waits until the registry has a champion (the first pipeline
# run registers one), then serves it. The app reloads the champion by itself when a later run
# promotes a better model, so the pipeline does not restart it here.
set -eu
until python - <<'PY'
import os, sys, urllib.parse, urllib.request
from skinsense.stack.auth import basic_auth_header
query = urllib.parse.urlencode({"name": os.environ.get("SKINSENSE_MODEL_NAME", "skinsense"), "alias": "champion"})
# MLflow's basic-auth app answers 401 without the login.
headers = (basic_auth_header(os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"])
           if os.environ.get("MLFLOW_TRACKING_USERNAME") else {})
try:
    urllib.request.urlopen(urllib.request.Request(
        f"{os.environ['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/registered-models/alias?{query}",
        headers=headers), timeout=30)
except Exception:
    sys.exit(1)
PY
do
  echo "no champion model yet; start a run of skinsense-pipeline/manual in the Prefect UI"; sleep 30
done
exec skinsense serve --model-uri "models:/${SKINSENSE_MODEL_NAME:-skinsense}@champion" --host 0.0.0.0 --port 7860
