"""Overrides: the blockers an operator accepted by name at prepare (`prepare --override NAME`), who and when.

Revision ID: 0006
Revises: 0004
"""

from alembic import op

revision = "0006"
down_revision = "0004"
branch_labels = None
depends_on = None

S = "migrator_control"


def upgrade() -> None:
    op.execute(f"""
    CREATE TABLE {S}.blocker_override (
        name text PRIMARY KEY,
        detail text NOT NULL,
        os_user text NOT NULL,
        db_role text NOT NULL,
        overridden_at timestamptz NOT NULL DEFAULT now()
    );
    COMMENT ON TABLE {S}.blocker_override IS
        'Each blocker inspect reported that an operator accepted at prepare with --override NAME: what it said then, '
        'the operating-system user who ran prepare, the role it used on the legacy database, and when (the last '
        'prepare that overrode it). Shown by status and by the cutover''s go/no-go item blockers.';
    """)


def downgrade() -> None:
    op.execute(f"DROP TABLE IF EXISTS {S}.blocker_override")
