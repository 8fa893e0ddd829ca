-- migrator rollback position: installed into the LEGACY database by `migrator cutover`, when it arms the rollback.
--
-- Expects: triggers/capture.sql installed (the schema "_migrator"). After cutover clients write to the target,
-- where the same capture (capture.sql, capture_keys.sql) records every change. `migrator rollback` replays those
-- changes onto the legacy database with the forward algorithm, roles swapped: batches cut by snapshots of the
-- TARGET. This one row is the target snapshot whose committed changes the legacy database already holds; it is
-- updated in the transaction that applies a batch, so the position commits with the changes it covers.
-- `DROP SCHEMA _migrator CASCADE` (migrator cleanup) removes it.

CREATE TABLE IF NOT EXISTS _migrator.rollback_position (
    id              int PRIMARY KEY CHECK (id = 1),
    target_snapshot text        NOT NULL,   -- pg_snapshot of the target: its visible changes are applied here
    armed_at        timestamptz NOT NULL DEFAULT now(),
    events_applied  bigint      NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE _migrator.rollback_position IS
    'migrator rollback: the target snapshot whose changes this legacy database holds; remove with `migrator cleanup`';
