"""Copy chunks: the running copy's exported snapshot, each table's key-range chunks with their boundaries, workers.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

S = "migrator_control"


def upgrade() -> None:
    op.execute(f"""
    CREATE TABLE {S}.copy_run (
        id int PRIMARY KEY CHECK (id = 1),
        snapshot_id text,
        snapshot text,
        coordinator text,
        heartbeat_at timestamptz,
        max_rate double precision,
        started_at timestamptz NOT NULL DEFAULT now(),
        finished_at timestamptz
    );
    COMMENT ON TABLE {S}.copy_run IS
        'The running copy: the snapshot its coordinator exported (importable while the coordinator lives), which '
        'workers on any host import to read chunks, and the throttle they share.';

    CREATE TABLE {S}.copy_chunk (
        schema_name text NOT NULL,
        table_name text NOT NULL,
        chunk_no int NOT NULL,
        lower_bound text[],
        upper_bound text[],
        est_bytes bigint NOT NULL DEFAULT 0,
        status text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'copied')),
        snapshot text,
        rows_copied bigint,
        bytes_copied bigint,
        worker text,
        copy_started_at timestamptz,
        copy_finished_at timestamptz,
        PRIMARY KEY (schema_name, table_name, chunk_no),
        FOREIGN KEY (schema_name, table_name) REFERENCES {S}.table_state ON DELETE CASCADE
    );
    COMMENT ON TABLE {S}.copy_chunk IS
        'Key ranges [lower_bound, upper_bound) of each table (key values as text; NULL: unbounded). A worker claims '
        'a chunk with a row lock (SKIP LOCKED) held by the target transaction that loads it, which also records it '
        'copied with the snapshot it was read under: replay judges each change by the chunk holding its key.';

    CREATE TABLE {S}.copy_worker (
        worker text PRIMARY KEY,
        schema_name text,
        table_name text,
        chunk_no int,
        rows_done bigint NOT NULL DEFAULT 0,
        bytes_done bigint NOT NULL DEFAULT 0,
        started_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now()
    );
    COMMENT ON TABLE {S}.copy_worker IS
        'Progress of each copy worker on the chunk it is loading, written every second outside the load.';

    """)


def downgrade() -> None:
    for t in ("copy_worker", "copy_chunk", "copy_run"):
        op.execute(f"DROP TABLE IF EXISTS {S}.{t}")
