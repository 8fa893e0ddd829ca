"""Owner: the migration's id, which the legacy database's capture records as its owner (`_migrator.migration_owner`).

Revision ID: 0005
Revises: 0004
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

S = "migrator_control"


def upgrade() -> None:
    # A volatile default: the row of a migration prepared before this revision gets an id of its own too.
    op.execute(f"""
    ALTER TABLE {S}.migration ADD COLUMN migration_id uuid NOT NULL DEFAULT gen_random_uuid();
    COMMENT ON COLUMN {S}.migration.migration_id IS
        'This migration, as the legacy database''s _migrator.migration_owner names the one its capture serves.';
    """)


def downgrade() -> None:
    op.execute(f"ALTER TABLE {S}.migration DROP COLUMN IF EXISTS migration_id")
