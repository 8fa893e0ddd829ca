-- migrator capture: the delta log and the trigger function, installed into the LEGACY (source) database.
--
-- Expects: PostgreSQL 13 or newer (xid8, pg_current_xact_id, pg_visible_in_snapshot); a role that may create a
-- schema and triggers on the captured tables. Creates only objects inside the schema "_migrator"; the per-table
-- triggers that call _migrator.capture() are created by `migrator prepare` and removed by `migrator cleanup`,
-- after which `DROP SCHEMA _migrator CASCADE` leaves no trace.
--
-- Every INSERT, UPDATE, DELETE and TRUNCATE on a captured table writes into _migrator.delta_log in the writer's
-- own transaction, so the event commits or rolls back with the change. `txid` is the writer's 64-bit top-level
-- transaction id: the replay decides which events a snapshot already contains by transaction visibility
-- (pg_visible_in_snapshot), so a transaction that commits late is never skipped.
-- Tables with a key log only the keys a statement touched (capture_keys.sql, one function per table); replay
-- reads those rows' state from the source in its batch snapshot. Tables without a key log full row images with
-- _migrator.capture() below: their text form under fixed output settings (the SET clauses), so that they parse
-- back to the same bits on the target whatever the writer's own DateStyle or extra_float_digits.
-- The settings must match migrator/db.py PINNED_SETTINGS. _migrator.capture() also logs TRUNCATE for every table.

CREATE SCHEMA IF NOT EXISTS _migrator;
COMMENT ON SCHEMA _migrator IS 'migrator delta capture; remove with `migrator cleanup`';

CREATE TABLE IF NOT EXISTS _migrator.delta_log (
    txid        xid8        NOT NULL DEFAULT pg_current_xact_id(),
    captured_at timestamptz NOT NULL DEFAULT now(),
    rel         oid         NOT NULL,
    op          "char"      NOT NULL,   -- I insert, U update, D delete, T truncate
    key         text[],                 -- tables with a key: the key of a row the change touched
    old_row     text,                   -- tables without a key: the row before (U, D)
    new_row     text                    -- tables without a key: the row after (I, U)
);
CREATE INDEX IF NOT EXISTS delta_log_txid ON _migrator.delta_log (txid);

-- The tables whose changes are captured, as prepared. sync compares them with the catalog to detect DDL.
CREATE TABLE IF NOT EXISTS _migrator.captured_table (
    rel         oid PRIMARY KEY,
    schema_name text NOT NULL,
    table_name  text NOT NULL,
    fingerprint text NOT NULL,
    installed_at timestamptz NOT NULL DEFAULT now()
);

-- One row saying whether the database is frozen for cutover, for operators reading the legacy side.
CREATE TABLE IF NOT EXISTS _migrator.freeze_state (
    id        int PRIMARY KEY CHECK (id = 1),
    frozen    boolean NOT NULL,
    since     timestamptz NOT NULL DEFAULT now(),
    reason    text
);

CREATE OR REPLACE FUNCTION _migrator.capture() RETURNS trigger
LANGUAGE plpgsql
SET "DateStyle" = 'ISO, YMD'
SET "IntervalStyle" = 'postgres'
SET "TimeZone" = 'UTC'
SET extra_float_digits = 3
SET bytea_output = 'hex'
SET lc_monetary = 'C'
AS $capture$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO _migrator.delta_log (rel, op, new_row) VALUES (TG_RELID, 'I', NEW::text);
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO _migrator.delta_log (rel, op, old_row, new_row) VALUES (TG_RELID, 'U', OLD::text, NEW::text);
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO _migrator.delta_log (rel, op, old_row) VALUES (TG_RELID, 'D', OLD::text);
    ELSE
        INSERT INTO _migrator.delta_log (rel, op) VALUES (TG_RELID, 'T');
    END IF;
    RETURN NULL;
END
$capture$;
