"""Alembic environment for the control schema. Run only through `migrator.state.upgrade`, which passes a connection."""

from alembic import context

from migrator.config import CONTROL_SCHEMA

connection = context.config.attributes["connection"]
context.configure(connection=connection, version_table_schema=CONTROL_SCHEMA, version_table="alembic_version")
with context.begin_transaction():
    context.run_migrations()
