-- migrator capture: the schema, the delta log and the registries, installed into the LEGACY (source) database.
--
-- Expects: PostgreSQL 13 or newer (xid8, pg_current_xact_id, pg_visible_in_snapshot); a role that may create a
-- schema and triggers on the captured tables. Creates only objects inside the schema "_migrator"; the per-table
-- triggers and the trigger functions (capture_rows.sql, capture_keys.sql) are created by `migrator prepare` and
-- removed by `migrator cleanup`, after which `DROP SCHEMA _migrator CASCADE` leaves no trace. Re-runnable.
--
-- Every INSERT, UPDATE, DELETE and TRUNCATE on a captured table writes into the delta log in the writer's own
-- transaction, so the event commits or rolls back with the change. `txid` is the writer's 64-bit top-level
-- transaction id: the replay decides which events a snapshot already contains by transaction visibility
-- (pg_visible_in_snapshot), so a transaction that commits late is never skipped.
--
-- The log rotates, as PgQ's does: _migrator.delta_log is the parent that readers query and never holds a row; the
-- trigger functions insert into one of its three children directly (the child's name is written into their
-- bodies). Sync moves the writers to the next child by replacing the function bodies, and TRUNCATEs a child once
-- every transaction that could have written to it has finished and is applied on the target, so weeks of sync
-- leave no dead rows and no bloat behind. _migrator.delta_log_child records which child is current and when each
-- child stopped being written.

CREATE SCHEMA IF NOT EXISTS _migrator;
COMMENT ON SCHEMA _migrator IS 'migrator delta capture; remove with `migrator cleanup`';

CREATE TABLE IF NOT EXISTS _migrator.delta_log (
    txid        xid8        NOT NULL DEFAULT pg_current_xact_id(),
    captured_at timestamptz NOT NULL DEFAULT now(),
    rel         oid         NOT NULL,
    op          "char"      NOT NULL,   -- I insert, U update, D delete, T truncate
    key         text[],                 -- tables with a key: the key of a row the change touched
    old_row     text,                   -- tables without a key: the row before (U, D)
    new_row     text,                   -- tables without a key: the row after (I, U)
    CONSTRAINT delta_log_rows_in_children CHECK (false) NO INHERIT
);
-- The children inherit the columns and their defaults; each has its own index on txid, which serves the batch
-- query (txid >= xmin of the applied snapshot) and the check before a truncate.
CREATE TABLE IF NOT EXISTS _migrator.delta_log_0 () INHERITS (_migrator.delta_log);
CREATE TABLE IF NOT EXISTS _migrator.delta_log_1 () INHERITS (_migrator.delta_log);
CREATE TABLE IF NOT EXISTS _migrator.delta_log_2 () INHERITS (_migrator.delta_log);
CREATE INDEX IF NOT EXISTS delta_log_0_txid ON _migrator.delta_log_0 (txid);
CREATE INDEX IF NOT EXISTS delta_log_1_txid ON _migrator.delta_log_1 (txid);
CREATE INDEX IF NOT EXISTS delta_log_2_txid ON _migrator.delta_log_2 (txid);

-- One row per child: 'current' (the trigger functions write to it), 'draining' (switched away from; transactions
-- that began before the switch may still write to it) or 'empty' (truncated, ready to become current).
-- switch_snapshot: pg_current_snapshot() taken right after the switch away from the child committed; the child may
-- be truncated once the target's applied snapshot has every transaction below its xmax finished.
CREATE TABLE IF NOT EXISTS _migrator.delta_log_child (
    child           int PRIMARY KEY CHECK (child BETWEEN 0 AND 2),
    state           text NOT NULL CHECK (state IN ('current', 'draining', 'empty')),
    since           timestamptz NOT NULL DEFAULT now(),
    switch_snapshot pg_snapshot
);
INSERT INTO _migrator.delta_log_child (child, state) VALUES (0, 'current'), (1, 'empty'), (2, 'empty')
    ON CONFLICT (child) DO NOTHING;

-- The tables whose changes are captured, as prepared. sync compares them with the catalog to detect DDL.
CREATE TABLE IF NOT EXISTS _migrator.captured_table (
    rel         oid PRIMARY KEY,
    schema_name text NOT NULL,
    table_name  text NOT NULL,
    fingerprint text NOT NULL,
    installed_at timestamptz NOT NULL DEFAULT now()
);

-- The key each table was captured by (added after the first release; altered only when missing, so that a re-run
-- takes no ACCESS EXCLUSIVE lock on the registry).
DO $add$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = '_migrator.captured_table'::regclass
                   AND attname = 'key_columns' AND NOT attisdropped) THEN
        ALTER TABLE _migrator.captured_table ADD COLUMN key_columns text[];
    END IF;
END $add$;

-- One row saying whether the database is frozen for cutover, for operators reading the legacy side.
CREATE TABLE IF NOT EXISTS _migrator.freeze_state (
    id        int PRIMARY KEY CHECK (id = 1),
    frozen    boolean NOT NULL,
    since     timestamptz NOT NULL DEFAULT now(),
    reason    text
);

-- The trigger functions run as the role whose statement fired them (the application's, never migrator's), so
-- every role that may write a captured table must be able to write the log: without these grants a non-superuser
-- application's every write to a captured table fails ("permission denied for schema _migrator"). Writing is all
-- they may do (no SELECT, UPDATE or DELETE). A role that inserted events by hand could make sync re-read rows by
-- key, harmless, or, for a table without a key, add a row image that `verify` then reports as a difference.
GRANT USAGE ON SCHEMA _migrator TO PUBLIC;
GRANT INSERT ON _migrator.delta_log_0, _migrator.delta_log_1, _migrator.delta_log_2 TO PUBLIC;
