#!/bin/sh
# The MLflow server of the compose stack, with MLflow's basic-auth app. Its config file names
# the user database (MLFLOW_AUTH_DATABASE_URI, in Postgres) and so holds a password: it is
# written here, readable by this user only, from the environment compose passes. The admin
# account (MLFLOW_AUTH_ADMIN_USERNAME/PASSWORD) and MLFLOW_FLASK_SERVER_SECRET_KEY are read by
# MLflow from the environment. Arguments go to `mlflow server`.
set -eu
python - "$MLFLOW_AUTH_CONFIG_PATH" <<'PY'
import os
import sys
from pathlib import Path

from skinsense.stack_auth import write_mlflow_auth_config

write_mlflow_auth_config(Path(sys.argv[1]), os.environ["MLFLOW_AUTH_DATABASE_URI"])
PY
exec mlflow server --app-name basic-auth "$@"
