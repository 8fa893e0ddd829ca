"""Cutover through a pooler: the client-visible pause and go/no-go checklist of each attempt, rollbacks, and the
pooler entries a cutover rewrote (so that a rollback can point them back, days later if need be).

Revision ID: 0003
Revises: 0001
"""

from alembic import op

revision = "0003"
down_revision = "0001"
branch_labels = None
depends_on = None

S = "migrator_control"


def upgrade() -> None:
    op.execute(f"""
    ALTER TABLE {S}.cutover_attempt
        ADD COLUMN kind text NOT NULL DEFAULT 'cutover' CHECK (kind IN ('cutover', 'rollback')),
        ADD COLUMN pause_seconds double precision,
        ADD COLUMN checklist jsonb;
    COMMENT ON COLUMN {S}.cutover_attempt.pause_seconds IS
        'Client-visible pause: from PAUSE sent to the pooler until RESUME returned.';

    CREATE TABLE {S}.pooler_entry (
        name text PRIMARY KEY,
        ini_path text NOT NULL,
        legacy_entry text NOT NULL,
        target_entry text NOT NULL,
        pointing text NOT NULL DEFAULT 'legacy' CHECK (pointing IN ('legacy', 'target')),
        attempt_id int REFERENCES {S}.cutover_attempt(id),
        updated_at timestamptz NOT NULL DEFAULT now()
    );
    COMMENT ON TABLE {S}.pooler_entry IS
        'Each PgBouncer database the cutover moves: its [databases] entry for the legacy and for the new server, '
        'and which one the pooler was last pointed at.';
    """)


def downgrade() -> None:
    op.execute(f"DROP TABLE IF EXISTS {S}.pooler_entry")
    op.execute(f"ALTER TABLE {S}.cutover_attempt DROP COLUMN IF EXISTS kind, DROP COLUMN IF EXISTS pause_seconds, "
               "DROP COLUMN IF EXISTS checklist")
