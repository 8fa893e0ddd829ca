-- migrator freeze: replaces _migrator.capture() in the LEGACY database at cutover, so that every captured table
-- rejects writes from every client (the application's background writers too) until `migrator release` or
-- `migrator rollback` puts the capture body back (triggers/capture.sql).
--
-- Expects: triggers/capture.sql installed. Replacing the function body takes no lock on the application's
-- tables; cutover first takes SHARE locks on them (bounded by lock_timeout) so that no writer is in flight when
-- this commits. The freeze survives migrator exiting: it is a committed catalog change, not a held lock.

CREATE OR REPLACE FUNCTION _migrator.capture() RETURNS trigger
LANGUAGE plpgsql
AS $freeze$
BEGIN
    RAISE EXCEPTION 'migrator: % is frozen for cutover; this database no longer takes writes', TG_TABLE_NAME
        USING ERRCODE = 'read_only_sql_transaction',
              HINT = 'The migration moved this database to its new server. Connect there, or ask the migration team.';
END
$freeze$;

INSERT INTO _migrator.freeze_state (id, frozen, reason) VALUES (1, true, 'cutover')
ON CONFLICT (id) DO UPDATE SET frozen = true, since = now(), reason = excluded.reason;
