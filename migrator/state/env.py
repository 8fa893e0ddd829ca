"""Alembic environment for the control schema. Run only through `migrator.state.control`: `upgrade` passes a
connection; `offline_script` runs it in offline mode, which writes the SQL of every revision instead of running it.

Offline, the script creates the schema itself first (online, `upgrade` does), and writes no BEGIN or COMMIT
(`transactional_ddl=False`): `upgrade` runs it inside its own transaction.
"""

from alembic import context
from psycopg import sql

from migrator.config import CONTROL_SCHEMA

if context.is_offline_mode():
    context.configure(url="postgresql+psycopg://", literal_binds=True, dialect_opts={"paramstyle": "named"},
                      version_table_schema=CONTROL_SCHEMA, version_table="alembic_version",
                      transactional_ddl=False, transaction_per_migration=False)
    context.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(CONTROL_SCHEMA)).as_string())
    context.run_migrations()
else:
    connection = context.config.attributes["connection"]
    context.configure(connection=connection, version_table_schema=CONTROL_SCHEMA, version_table="alembic_version")
    with context.begin_transaction():
        context.run_migrations()
