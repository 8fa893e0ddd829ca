-- migrator row capture: the trigger function _migrator.capture(), installed into the LEGACY database by
-- `migrator prepare` and made again whenever sync rotates the delta log (migrator/deltalog/triggers.py fills in
-- {log}, the child of _migrator.delta_log that is current).
--
-- Expects: triggers/capture.sql installed. Tables without a key log full row images with it: their text form under
-- fixed output settings (the SET clauses), so that they parse back to the same bits on the target whatever the
-- writer's own DateStyle or extra_float_digits. The settings must match migrator/db.py PINNED_SETTINGS. It also
-- logs TRUNCATE for every captured table.

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
        INSERT INTO {log} (rel, op, new_row) VALUES (TG_RELID, 'I', NEW::text);
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO {log} (rel, op, old_row, new_row) VALUES (TG_RELID, 'U', OLD::text, NEW::text);
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO {log} (rel, op, old_row) VALUES (TG_RELID, 'D', OLD::text);
    ELSE
        INSERT INTO {log} (rel, op) VALUES (TG_RELID, 'T');
    END IF;
    RETURN NULL;
END
$capture$;
