"""Control schema: the migration, per-table copy progress, the applied position, cutover attempts and steps, flags.

Revision ID: 0001
Revises:
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

S = "migrator_control"


def upgrade() -> None:
    op.execute(f"""
    CREATE TABLE {S}.migration (
        id int PRIMARY KEY CHECK (id = 1),
        created_at timestamptz NOT NULL DEFAULT now(),
        source text NOT NULL,
        prepared_at timestamptz,
        target_schema_at timestamptz,
        copy_snapshot text,
        copy_started_at timestamptz,
        copy_finished_at timestamptz,
        post_data_at timestamptz,
        cutover_at timestamptz,
        frozen boolean NOT NULL DEFAULT false
    );
    COMMENT ON TABLE {S}.migration IS 'One row: the migration this target receives, and the phases it has passed.';

    CREATE TABLE {S}.table_state (
        schema_name text NOT NULL,
        table_name text NOT NULL,
        source_oid bigint NOT NULL,
        fingerprint text NOT NULL,
        key_columns text[] NOT NULL,
        status text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'copying', 'copied')),
        copy_snapshot text,
        rows_copied bigint,
        bytes_copied bigint,
        copy_started_at timestamptz,
        copy_finished_at timestamptz,
        PRIMARY KEY (schema_name, table_name)
    );
    COMMENT ON TABLE {S}.table_state IS
        'Each captured table: its definition when prepared, and its copy with the snapshot that bounds it.';

    CREATE TABLE {S}.sync_position (
        id int PRIMARY KEY CHECK (id = 1),
        applied_snapshot text NOT NULL,
        batch_snapshot text,
        events_applied bigint NOT NULL DEFAULT 0,
        batches bigint NOT NULL DEFAULT 0,
        updated_at timestamptz NOT NULL DEFAULT now()
    );
    COMMENT ON TABLE {S}.sync_position IS
        'The source snapshot whose committed changes are all applied; written in the same transaction as them.';

    CREATE TABLE {S}.cutover_attempt (
        id serial PRIMARY KEY,
        started_at timestamptz NOT NULL DEFAULT now(),
        finished_at timestamptz,
        status text NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'done', 'failed', 'released')),
        failed_step text,
        error text,
        freeze_seconds double precision
    );

    CREATE TABLE {S}.cutover_step (
        attempt_id int NOT NULL REFERENCES {S}.cutover_attempt(id),
        step text NOT NULL,
        started_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        finished_at timestamptz,
        status text NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'done', 'failed', 'skipped')),
        detail text,
        PRIMARY KEY (attempt_id, step)
    );

    CREATE TABLE {S}.flag (
        name text PRIMARY KEY,
        value text NOT NULL,
        set_at timestamptz NOT NULL DEFAULT now()
    );
    COMMENT ON TABLE {S}.flag IS 'Operator flags a running phase obeys (pause, hold).';
    """)


def downgrade() -> None:
    for t in ("flag", "cutover_step", "cutover_attempt", "sync_position", "table_state", "migration"):
        op.execute(f"DROP TABLE IF EXISTS {S}.{t}")
