-- migrator key capture: the trigger function of ONE captured table that has a key, installed into the LEGACY
-- database by `migrator prepare` and made again whenever sync rotates the delta log (migrator/deltalog/triggers.py
-- fills in the placeholders in braces with quoted names; {log} is the child of _migrator.delta_log that is current).
--
-- Expects: triggers/capture.sql installed. For an ordinary table it runs as three statement-level triggers with
-- transition tables (AFTER INSERT / UPDATE / DELETE ... REFERENCING ... FOR EACH STATEMENT): one call and one
-- INSERT per statement, however many rows it touched; the UPDATE statement trigger logs the new keys, and a
-- row-level UPDATE trigger (`_migrator_capture_key_change`) whose WHEN clause compares the key calls it only for a
-- row whose key changed, to log the old key. Partitions and inheritance parents and children use it
-- as a row-level trigger instead, because a statement addressed to a parent does not fire a child's statement
-- triggers. It logs only the key of each row touched (old and new key of an UPDATE); replay reads the row itself
-- from the source in the snapshot of its batch. {settings} pins output settings when a key column's text form
-- depends on them (dates, times, floats, bytea, money); for integer, text and uuid keys it is empty.

CREATE OR REPLACE FUNCTION {function}() RETURNS trigger
LANGUAGE plpgsql
{settings}
AS $keys$
BEGIN
    IF TG_LEVEL = 'ROW' THEN
        IF TG_NAME = {key_change_trigger} THEN
            -- An ordinary table's UPDATE of a row whose key changed (the trigger's WHEN clause compared the key):
            -- its statement trigger logs the new key, this adds the old one.
            INSERT INTO {log} (rel, op, key) VALUES (TG_RELID, 'U', {old_row_key});
        ELSIF TG_OP = 'INSERT' THEN
            INSERT INTO {log} (rel, op, key) VALUES (TG_RELID, 'I', {new_row_key});
        ELSIF TG_OP = 'DELETE' THEN
            INSERT INTO {log} (rel, op, key) VALUES (TG_RELID, 'D', {old_row_key});
        ELSIF {old_row_key} = {new_row_key} THEN
            INSERT INTO {log} (rel, op, key) VALUES (TG_RELID, 'U', {new_row_key});
        ELSE
            INSERT INTO {log} (rel, op, key) VALUES (TG_RELID, 'U', {old_row_key}), (TG_RELID, 'U', {new_row_key});
        END IF;
    ELSIF TG_OP = 'INSERT' THEN
        INSERT INTO {log} (rel, op, key) SELECT TG_RELID, 'I', {n_key} FROM new_rows AS n;
    ELSIF TG_OP = 'UPDATE' THEN
        -- The new keys; the row-level key-change trigger (above) adds the old key of a row whose key changed.
        INSERT INTO {log} (rel, op, key) SELECT TG_RELID, 'U', {n_key} FROM new_rows AS n;
    ELSE
        INSERT INTO {log} (rel, op, key) SELECT TG_RELID, 'D', {n_key} FROM old_rows AS n;
    END IF;
    RETURN NULL;
END
$keys$;
