"""A cutover or rollback step's figures as data (beside its detail text): what `migrator report` models the freeze
window from, e.g. the verify step's row counts and seconds per table, the drain's events.

Revision ID: 0015
Revises: 0001
"""

from alembic import op

revision = "0015"
down_revision = "0001"
branch_labels = None
depends_on = None

S = "migrator_control"


def upgrade() -> None:
    op.execute(f"""
    ALTER TABLE {S}.cutover_step ADD COLUMN figures jsonb;
    COMMENT ON COLUMN {S}.cutover_step.figures IS
        'What the step measured, as data (counts, seconds, table names; never a row value): the verify step''s '
        'tables with their row counts and seconds counting them, the drain''s events applied.';
    """)


def downgrade() -> None:
    op.execute(f"ALTER TABLE {S}.cutover_step DROP COLUMN IF EXISTS figures")
