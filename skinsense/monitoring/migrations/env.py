"""Alembic environment of the monitoring database (run through `database.upgrade`)."""

from alembic import context

from skinsense.monitoring.database import VERSION_TABLE, Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata,
                  version_table=VERSION_TABLE, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
