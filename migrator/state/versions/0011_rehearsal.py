"""Rehearsals: a target made by `migrator --config FILE rehearse` says so, and keeps each phase's time.

Revision ID: 0011
Revises: 0001
"""

from alembic import op

revision = "0011"
down_revision = "0001"
branch_labels = None
depends_on = None

S = "migrator_control"


def upgrade() -> None:
    op.execute(f"""
    CREATE TABLE {S}.rehearsal (
        id serial PRIMARY KEY,
        started_at timestamptz NOT NULL DEFAULT now(),
        finished_at timestamptz,
        workload text NOT NULL,
        source text NOT NULL,
        os_user text NOT NULL,
        ok boolean,
        phases jsonb NOT NULL DEFAULT '[]'
    );
    COMMENT ON TABLE {S}.rehearsal IS
        'A row per rehearsal run on this target (migrator rehearse with a configuration that declares test '
        'databases), written before anything else: a target holding it was made by a rehearsal, and the next '
        'rehearsal may empty it. The workload, the legacy database as host:port/dbname, who ran it, each phase '
        '(name, seconds, detail: counts and timings only) and whether it passed.';
    """)


def downgrade() -> None:
    op.execute(f"DROP TABLE IF EXISTS {S}.rehearsal")
