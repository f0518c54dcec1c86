#!/bin/sh
# The app of the compose stack: waits until the registry has a champion (the first pipeline
# run registers one), then serves it. The app reloads the champion by itself when a later run
# promotes a better model, so the pipeline does not restart it here.
set -eu
until python - <<'PY'
import os, sys, urllib.parse, urllib.request
query = urllib.parse.urlencode({"name": os.environ.get("SKINSENSE_MODEL_NAME", "skinsense"), "alias": "champion"})
try:
    urllib.request.urlopen(f"{os.environ['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/registered-models/alias?{query}", timeout=5)
except Exception:
    sys.exit(1)
PY
do
  echo "no champion model yet; start a run of skinsense-pipeline/manual in the Prefect UI"; sleep 30
done
exec skinsense serve --model-uri "models:/${SKINSENSE_MODEL_NAME:-skinsense}@champion" --host 0.0.0.0 --port 7860
