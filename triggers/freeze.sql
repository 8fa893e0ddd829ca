-- migrator freeze: the body that replaces each of migrator's trigger functions in the LEGACY database at cutover
-- (_migrator.capture() and every per-table _migrator."keys_<oid>"()), so that every captured table rejects
-- writes from every client (the application's background writers too) until `migrator release` or a rollback
-- installs the capture bodies again; and in the TARGET at rollback, until the next cutover's arm_rollback or
-- `migrator release --target`. {function} is filled in by migrator/deltalog/triggers.py (write_freeze_bodies).
--
-- Expects: triggers/capture.sql installed. Replacing function bodies takes no lock on the application's tables;
-- cutover first takes SHARE locks on them (bounded by lock_timeout) so that no writer is in flight when this
-- commits. The freeze survives migrator exiting: it is a committed catalog change, not a held lock.

CREATE OR REPLACE FUNCTION {function}() RETURNS trigger
LANGUAGE plpgsql
AS $freeze$
BEGIN
    RAISE EXCEPTION 'migrator: % is frozen by the migration; this database no longer takes writes', TG_TABLE_NAME
        USING ERRCODE = 'read_only_sql_transaction',
              HINT = 'The migration moved the clients to the other server (cutover or rollback). Connect there, '
                     'or ask the migration team.';
END
$freeze$;
