#!/bin/sh
# The MLflow server of the compose stack, with MLflow's basic-auth app. Its config file names
# the user database (MLFLOW_AUTH_DATABASE_URI, in Postgres) and so holds a password: it is
# written here, readable by this user only, from the environment compose passes. The admin
# account (MLFLOW_AUTH_ADMIN_USERNAME/PASSWORD) and MLFLOW_FLASK_SERVER_SECRET_KEY are read by
# MLflow from the environment. Arguments go to `mlflow server`. The app gets an account of
# its own that may only read (see below).
set -eu
python - "$MLFLOW_AUTH_CONFIG_PATH" <<'PY'
import os
import sys
from pathlib import Path

from skinsense.stack.auth import write_mlflow_auth_config

write_mlflow_auth_config(Path(sys.argv[1]), os.environ["MLFLOW_AUTH_DATABASE_URI"])
PY
# The app's account (MLFLOW_APP_USERNAME/PASSWORD), which may only read: created, or its
# password set, once the server answers. The server's port is the --port argument.
if [ -n "${MLFLOW_APP_USERNAME:-}" ]; then
  port=5000; previous=""
  for argument in "$@"; do
    [ "$previous" = "--port" ] && port=$argument
    previous=$argument
  done
  # Logged in as the admin, in this helper only.
  MLFLOW_TRACKING_USERNAME="${MLFLOW_AUTH_ADMIN_USERNAME:-admin}" \
  MLFLOW_TRACKING_PASSWORD="$MLFLOW_AUTH_ADMIN_PASSWORD" \
  python - "http://127.0.0.1:$port" <<'PY' &
import os
import sys

from skinsense.stack.auth import ensure_mlflow_reader

done = ensure_mlflow_reader(
    sys.argv[1], (os.environ["MLFLOW_APP_USERNAME"], os.environ["MLFLOW_APP_PASSWORD"]))
print(f"mlflow-entrypoint: the app's read-only account {os.environ['MLFLOW_APP_USERNAME']!r} "
      f"{done}", flush=True)
PY
fi
exec mlflow server --app-name basic-auth "$@"
