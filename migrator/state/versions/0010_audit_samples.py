"""The audit trail of operator actions (append-only), and the samples sync records for the console's lag chart.

Revision ID: 0010
Revises: 0008
"""

from alembic import op

revision = "0010"
down_revision = "0008"
branch_labels = None
depends_on = None

S = "migrator_control"


def upgrade() -> None:
    op.execute(f"""
    CREATE TABLE {S}.audit (
        id bigserial PRIMARY KEY,
        at timestamptz NOT NULL DEFAULT clock_timestamp(),
        of_id bigint REFERENCES {S}.audit(id),
        actor text NOT NULL,
        via text NOT NULL CHECK (via IN ('console', 'cli', 'guardian', 'health')),
        action text NOT NULL,
        arguments jsonb NOT NULL DEFAULT '{{}}',
        outcome text NOT NULL CHECK (outcome IN ('started', 'done', 'refused', 'failed', 'stopped', 'interrupted')),
        detail text,
        seconds double precision,
        host text,
        pid int
    );
    CREATE INDEX ON {S}.audit (of_id);
    COMMENT ON TABLE {S}.audit IS
        'Every operator action (console, command line) and what the guardian or a health gate did on their behalf: '
        'a row when it starts (outcome started) and one when it ends (of_id names the first), or one row for a '
        'refusal. Append-only: a trigger refuses UPDATE, DELETE and TRUNCATE. No row values, no passwords.';
    CREATE FUNCTION {S}.audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'the audit trail is append-only' USING ERRCODE = 'insufficient_privilege';
    END $$;
    CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE ON {S}.audit
        FOR EACH ROW EXECUTE FUNCTION {S}.audit_append_only();
    CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON {S}.audit
        FOR EACH STATEMENT EXECUTE FUNCTION {S}.audit_append_only();

    CREATE TABLE {S}.sync_sample (
        at timestamptz PRIMARY KEY DEFAULT clock_timestamp(),
        lag_seconds double precision,
        pending_events bigint NOT NULL,
        log_bytes bigint,
        events_applied bigint NOT NULL DEFAULT 0,
        per_table jsonb NOT NULL DEFAULT '{{}}'
    );
    COMMENT ON TABLE {S}.sync_sample IS
        'What sync saw every [sync] sample_interval seconds: the lag, the pending events (per table: schema.table -> '
        'count), the delta log''s size on the legacy database; kept [sync] sample_days days.';
    """)


def downgrade() -> None:
    op.execute(f"DROP TABLE IF EXISTS {S}.sync_sample")
    op.execute(f"DROP TABLE IF EXISTS {S}.audit")
    op.execute(f"DROP FUNCTION IF EXISTS {S}.audit_append_only()")
