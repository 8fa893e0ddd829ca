"""Chunks by block range: a large table with a key, on a source that scans block ranges (PostgreSQL 14 and later),
is split at heap block numbers instead of key values, so each chunk reads its own pages once (a key uncorrelated with
the rows' places, a DICOM UID, made every key-range chunk read pages all over the table).

Revision ID: 0016
Revises: 0002
"""

from alembic import op

revision = "0016"
down_revision = "0002"
branch_labels = None
depends_on = None

S = "migrator_control"


def upgrade() -> None:
    op.execute(f"""
    ALTER TABLE {S}.copy_chunk ADD COLUMN blocks boolean NOT NULL DEFAULT false, ADD COLUMN relfilenode bigint;
    COMMENT ON COLUMN {S}.copy_chunk.blocks IS
        'true: lower_bound and upper_bound are heap block numbers [lower, upper) (ctid ranges), not key values.';
    COMMENT ON COLUMN {S}.copy_chunk.relfilenode IS
        'For block chunks: the table''s file on the source when planned. A table rewritten since (VACUUM FULL, '
        'CLUSTER, pg_repack, a rewriting ALTER TABLE) has moved its rows between blocks without a change the capture '
        'sees, so its block chunks no longer partition it: the table is copied again from the start.';
    """)


def downgrade() -> None:
    op.execute(f"ALTER TABLE {S}.copy_chunk DROP COLUMN IF EXISTS blocks, DROP COLUMN IF EXISTS relfilenode")
