"""After deployment: the prediction log, confirmed diagnoses (feedback) and drift statistics.

`database` holds the schema (SQLAlchemy, migrated with Alembic) shared by the app, which
appends to the log, the `skinsense feedback` command and the monitoring flow, which read it.
Nothing here imports prefect.
"""
