"""The migration's secret for keyed hashes of key values that may be patient data (redaction.KeyMask).

Revision ID: 0008
Revises: 0004
"""

from alembic import op

revision = "0008"
down_revision = "0004"
branch_labels = None
depends_on = None

S = "migrator_control"


def upgrade() -> None:
    op.execute(f"""
    CREATE TABLE {S}.key_secret (
        id smallint PRIMARY KEY CHECK (id = 1),
        secret bytea NOT NULL CHECK (length(secret) = 32),
        created_at timestamptz NOT NULL DEFAULT now()
    );
    COMMENT ON TABLE {S}.key_secret IS
        'Random bytes keying the HMAC that stands for key values in verify findings and sync and copy errors '
        '(hmac:...), so that a dictionary of names cannot reverse them. Made on first use; never printed.';
    """)


def downgrade() -> None:
    op.execute(f"DROP TABLE {S}.key_secret")
