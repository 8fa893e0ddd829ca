"""The health gate's verdict on each cutover attempt: what it saw of the clients on the target after the switch.

Revision ID: 0009
Revises: 0003
"""

from alembic import op

revision = "0009"
down_revision = "0003"
branch_labels = None
depends_on = None

S = "migrator_control"


def upgrade() -> None:
    op.execute(f"""
    ALTER TABLE {S}.cutover_attempt ADD COLUMN health jsonb;
    COMMENT ON COLUMN {S}.cutover_attempt.health IS
        'The health gate after the switch (migrator/health.py): its verdict (pass or fail), what the operator chose '
        'for an unhealthy one, and its figures (probe, canary, client transactions, rollbacks, waiting clients).';
    """)


def downgrade() -> None:
    op.execute(f"ALTER TABLE {S}.cutover_attempt DROP COLUMN IF EXISTS health")
