-- migrator capture owner: installed into the LEGACY database by `migrator prepare`, before the capture itself.
--
-- Expects: PostgreSQL 13 or newer; a role that may create the schema "_migrator" (CREATE on the database) or owns it.
-- One capture serves one migration: its sync truncates a delta log child once ITS target holds the events, so a
-- second target fed from the same log would silently lose them. This one row names the migration the capture
-- belongs to (the id of the target's migrator_control.migration row, the target as host:port/dbname, never a
-- password); prepare, sync and cleanup of any other migration refuse to touch the capture.
-- `DROP SCHEMA _migrator CASCADE` (migrator cleanup) removes it.

CREATE SCHEMA IF NOT EXISTS _migrator;

CREATE TABLE IF NOT EXISTS _migrator.migration_owner (
    id           int PRIMARY KEY CHECK (id = 1),
    migration_id uuid        NOT NULL,
    target       text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE _migrator.migration_owner IS
    'migrator: the one migration this capture serves; remove with `migrator cleanup` of that migration';
