"""Objects: which files `objects sync` has copied and verified into the target store.

Revision ID: 0004
Revises: 0001
"""

from alembic import op

revision = "0004"
down_revision = "0001"
branch_labels = None
depends_on = None

S = "migrator_control"


def upgrade() -> None:
    op.execute(f"""
    CREATE TABLE {S}.object_copy (
        location text PRIMARY KEY,
        size bigint NOT NULL,
        sha256 bytea NOT NULL,
        mtime_ns bigint NOT NULL,
        copied_at timestamptz NOT NULL DEFAULT now()
    );
    COMMENT ON TABLE {S}.object_copy IS
        'Each file objects sync wrote (or found) in the target store with the source''s SHA-256, and the size and '
        'modification time it had then: a file still matching both is not read again on resume.';
    """)


def downgrade() -> None:
    op.execute(f"DROP TABLE IF EXISTS {S}.object_copy")
