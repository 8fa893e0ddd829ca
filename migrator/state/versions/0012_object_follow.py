"""Objects follow their rows: the key each copied file belongs to and the source file it was copied from, the
quarantine of files whose row left the source, and the position of `objects sync --follow` in the delta log.

Revision ID: 0012
Revises: 0004
"""

from alembic import op

revision = "0012"
down_revision = "0004"
branch_labels = None
depends_on = None

S = "migrator_control"


def upgrade() -> None:
    op.execute(f"""
    ALTER TABLE {S}.object_copy ADD COLUMN key text, ADD COLUMN source_size bigint,
        ADD COLUMN source_mtime_ns bigint;
    CREATE INDEX object_copy_key ON {S}.object_copy (key);
    COMMENT ON COLUMN {S}.object_copy.key IS
        'The key of the row that listed the file when it was copied (or found): when that row leaves the source, or '
        'points elsewhere, the file goes to the quarantine.';
    COMMENT ON COLUMN {S}.object_copy.source_mtime_ns IS
        'The source file''s modification time when it was copied: a file changed in place since is read again.';

    CREATE TABLE {S}.object_quarantine (
        id bigserial PRIMARY KEY,
        key text,
        location text NOT NULL,
        name text NOT NULL,
        root text NOT NULL,
        recorded_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        moved_at timestamptz,
        outcome text NOT NULL DEFAULT 'moving'
            CHECK (outcome IN ('moving', 'quarantined', 'absent', 'emptied')),
        emptied_at timestamptz,
        emptied_by bigint
    );
    COMMENT ON TABLE {S}.object_quarantine IS
        'Each file of the target store whose row left the source, recorded (key, location, its name in the '
        'quarantine folder root) before objects sync renames it there: ''moving'' until the rename is done (a crash '
        'between the two is finished by the next run), then ''quarantined''; ''absent'' when the file was gone; '
        '''emptied'' once the operator emptied the quarantine (emptied_by: the audit row).';

    CREATE TABLE {S}.object_follow (
        id int PRIMARY KEY CHECK (id = 1),
        snapshot text NOT NULL,
        log_children jsonb,
        passed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        full_at timestamptz NOT NULL DEFAULT clock_timestamp()
    );
    COMMENT ON TABLE {S}.object_follow IS
        'Where objects sync stands in the legacy database''s delta log: the snapshot of its last pass (the next '
        'reads the rows changed since), the log''s children as it saw them (a child truncated since means events '
        'lost to it: a full pass), and when it last listed every object.';
    """)


def downgrade() -> None:
    op.execute(f"""
    DROP TABLE IF EXISTS {S}.object_follow;
    DROP TABLE IF EXISTS {S}.object_quarantine;
    DROP INDEX IF EXISTS {S}.object_copy_key;
    ALTER TABLE {S}.object_copy DROP COLUMN IF EXISTS key, DROP COLUMN IF EXISTS source_size,
        DROP COLUMN IF EXISTS source_mtime_ns;
    """)
