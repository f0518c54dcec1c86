#!/bin/sh
# Runs once, on the first start of an empty Postgres volume: one database for the Prefect
# server, one for the MLflow tracking server and registry, one for MLflow's users, one for
# the app's prediction log and confirmed diagnoses (skinsense).
set -eu
for db in prefect mlflow mlflow_auth skinsense; do
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -c "CREATE DATABASE $db OWNER \"$POSTGRES_USER\";"
done
