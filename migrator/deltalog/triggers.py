"""The capture triggers: install them on a database's tables, say which are present and enabled, remove them.

Everything installed lives in the `_migrator` schema (triggers/capture.sql), except the triggers on the captured
tables, which call `_migrator.capture()` (row images, TRUNCATE) or the table's own `_migrator.keys_<oid>()`. Those
trigger functions insert into the current child of the delta log, whose name is written into their bodies
(`create_functions` writes them again; rotation.py and freeze.py do so to switch the child or to freeze). Trigger DDL
needs a short SHARE ROW EXCLUSIVE lock per table; it is taken with lock_timeout and retried, so prepare and cleanup
never queue the clinical workload behind them for long. Installed on the legacy database by `prepare`, and on the
target by the cutover for the rollback window.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from importlib import resources
from typing import Any

import psycopg
from psycopg import sql

from migrator import catalog
from migrator.catalog import Table
from migrator.config import CAPTURE_SCHEMA, TableFilter
from migrator.errors import Blocked, MigratorError
from migrator.log import get

ROW_TRIGGER = "_migrator_capture"
TRUNCATE_TRIGGER = "_migrator_capture_truncate"
# On a table with a key (not in a hierarchy): fires only for rows whose key an UPDATE changed, to log the old key.
KEY_CHANGE_TRIGGER = "_migrator_capture_key_change"
LOCK_RETRIES = 20
# Held (transaction-scoped) by whatever writes the trigger functions' bodies: prepare, rotation, freeze, release.
FUNCTIONS_LOCK = sql.SQL("SELECT pg_advisory_xact_lock(hashtext('migrator.capture'))")


def trigger_sql(name: str) -> str:
    return resources.files("migrator.triggers").joinpath(name).read_text()



def _with_lock_retries(conn: psycopg.Connection[Any], what: str, fn: Any, lock_timeout: float) -> None:
    """Run fn(cursor) in its own transaction with lock_timeout, retrying when the lock is not granted in time."""
    log = get(phase="capture")
    for attempt in range(1, LOCK_RETRIES + 1):
        try:
            with conn.transaction(), conn.cursor() as cur:
                cur.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{int(lock_timeout * 1000)}ms")))
                fn(cur)
            return
        except psycopg.errors.LockNotAvailable:
            log.warning("capture.lock_wait", what=what, attempt=attempt)
            time.sleep(min(0.2 * attempt, 2.0))
    raise Blocked(
        f"could not lock {what} within {lock_timeout}s after {LOCK_RETRIES} attempts: a long transaction holds it",
        hint="Find the session with `migrator inspect` (long-running transactions), let it finish, and run again.",
    )


def freeze_row(conn: psycopg.Connection[Any]) -> tuple[bool, str | None] | None:
    """The database's freeze_state (frozen, reason), or None when no freeze was ever recorded (freeze.py)."""
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{CAPTURE_SCHEMA}.freeze_state",))
        row = cur.fetchone()
        if not row or not row[0]:
            return None
        cur.execute(sql.SQL("SELECT frozen, reason FROM {}.freeze_state WHERE id = 1")
                    .format(sql.Identifier(CAPTURE_SCHEMA)))
        found = cur.fetchone()
    return (bool(found[0]), found[1]) if found else None


def is_frozen(conn: psycopg.Connection[Any]) -> bool:
    """Whether the database is frozen (its capture functions reject writes: freeze.py), as its freeze_state says."""
    row = freeze_row(conn)
    return bool(row and row[0])


def trigger_functions(cur: psycopg.Cursor[Any]) -> list[sql.Composed]:
    """Every trigger function of the capture schema (capture() and the key functions), by name."""
    cur.execute("SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                "WHERE n.nspname = %s AND p.prorettype = 'trigger'::regtype ORDER BY 1", (CAPTURE_SCHEMA,))
    return [sql.SQL("{}.{}").format(sql.Identifier(CAPTURE_SCHEMA), sql.Identifier(r[0])) for r in cur.fetchall()]


def write_freeze_bodies(cur: psycopg.Cursor[Any]) -> None:
    """Replace every capture function's body by the one that rejects the write (triggers/freeze.sql). Called with
    FUNCTIONS_LOCK held."""
    for fn in trigger_functions(cur):
        cur.execute(template("freeze.sql", function=fn))


def has_capture(conn: psycopg.Connection[Any]) -> bool:
    """Whether the database holds the engine's schema (a capture is installed, or its remains)."""
    row = conn.execute("SELECT to_regnamespace(%s) IS NOT NULL", (CAPTURE_SCHEMA,)).fetchone()
    return bool(row and row[0])


def installed_tables(conn: psycopg.Connection[Any]) -> dict[int, tuple[str, str, str, tuple[str, ...] | None]]:
    """The captured-table registry on the source: oid -> (schema, table, fingerprint, key columns); empty when not
    prepared."""
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{CAPTURE_SCHEMA}.captured_table",))
        row = cur.fetchone()
        if not row or not row[0]:
            return {}
        cur.execute(sql.SQL("SELECT rel::bigint, schema_name, table_name, fingerprint, key_columns "
                            "FROM {}.captured_table").format(sql.Identifier(CAPTURE_SCHEMA)))
        return {r[0]: (r[1], r[2], r[3], None if r[4] is None else tuple(r[4])) for r in cur.fetchall()}


# Key types whose text form depends on session settings: their functions pin the settings (as capture() does).
_SETTINGS_SENSITIVE = ("date", "time", "timestamp", "interval", "double precision", "real", "float", "money",
                       "bytea", "numeric[]")
_PINNED = sql.SQL("""SET "DateStyle" = 'ISO, YMD' SET "IntervalStyle" = 'postgres' SET "TimeZone" = 'UTC'
SET extra_float_digits = 3 SET bytea_output = 'hex' SET lc_monetary = 'C'""")
STATEMENT_TRIGGERS = (("_migrator_capture_ins", "INSERT", "NEW TABLE AS new_rows"),
                      ("_migrator_capture_upd", "UPDATE", "NEW TABLE AS new_rows"),
                      ("_migrator_capture_del", "DELETE", "OLD TABLE AS old_rows"))


def template(name: str, **parts: sql.Composable) -> sql.Composed:
    """A SQL file of triggers/ with its {placeholders} filled; its comment lines are left out."""
    body = "\n".join(line for line in trigger_sql(name).splitlines() if not line.startswith("--"))
    return sql.SQL(body).format(**parts)  # type: ignore[arg-type]


def key_function(t: Table) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(CAPTURE_SCHEMA), sql.Identifier(f"keys_{t.oid}"))


def log_child(child: int) -> sql.Composed:
    """The child of `_migrator.delta_log` numbered `child`."""
    return sql.SQL("{}.{}").format(sql.Identifier(CAPTURE_SCHEMA), sql.Identifier(f"delta_log_{child}"))


def _key_function_sql(t: Table, child: int) -> sql.Composed:
    def key(ref: str) -> sql.Composed:
        return sql.SQL("ARRAY[{}]").format(sql.SQL(", ").join(
            sql.SQL("{}.{}::text").format(sql.SQL(ref), sql.Identifier(k)) for k in t.key))

    types = {c.name: c.type for c in t.columns}
    sensitive = any(types[k].startswith(_SETTINGS_SENSITIVE) for k in t.key)
    return template("capture_keys.sql", function=key_function(t), settings=_PINNED if sensitive else sql.SQL(""),
                     new_row_key=key("NEW"), old_row_key=key("OLD"), n_key=key("n"), log=log_child(child),
                     key_change_trigger=sql.Literal(KEY_CHANGE_TRIGGER))


def current_child(cur: psycopg.Cursor[Any]) -> int:
    cur.execute(sql.SQL("SELECT child FROM {}.delta_log_child WHERE state = 'current'")
                .format(sql.Identifier(CAPTURE_SCHEMA)))
    row = cur.fetchone()
    if row is None:
        raise MigratorError("the delta log on the legacy database has no current child",
                            hint="Run `migrator prepare` again, which repairs the capture schema.")
    return int(row[0])


def create_functions(cur: psycopg.Cursor[Any], child: int) -> None:
    """(Re)write every capture function so that it inserts into `child`: capture() and the key function of each
    captured table with a key. Called with FUNCTIONS_LOCK held."""
    cur.execute(template("capture_rows.sql", log=log_child(child)))
    registered = installed_tables(cur.connection)
    for t in catalog.list_tables(cur.connection, TableFilter()):
        if t.oid in registered and t.key:
            cur.execute(_key_function_sql(t, child))


def _create_triggers(cur: psycopg.Cursor[Any], t: Table, enabled: bool = True) -> None:
    generic = sql.SQL("{}.capture()").format(sql.Identifier(CAPTURE_SCHEMA))
    names = [TRUNCATE_TRIGGER]
    if not t.key:
        # No key: full row images, one event per row.
        cur.execute(sql.SQL("CREATE TRIGGER {} AFTER INSERT OR UPDATE OR DELETE ON {} FOR EACH ROW "
                            "EXECUTE FUNCTION {}").format(sql.Identifier(ROW_TRIGGER), t.ident, generic))
        names.append(ROW_TRIGGER)
    else:
        cur.execute(_key_function_sql(t, current_child(cur)))
        fn = sql.SQL("{}()").format(key_function(t))
        if t.in_hierarchy:
            cur.execute(sql.SQL("CREATE TRIGGER {} AFTER INSERT OR UPDATE OR DELETE ON {} FOR EACH ROW "
                                "EXECUTE FUNCTION {}").format(sql.Identifier(ROW_TRIGGER), t.ident, fn))
            names.append(ROW_TRIGGER)
        else:
            for name, event, referencing in STATEMENT_TRIGGERS:
                cur.execute(sql.SQL("CREATE TRIGGER {} AFTER {} ON {} REFERENCING {} FOR EACH STATEMENT "
                                    "EXECUTE FUNCTION {}").format(sql.Identifier(name), sql.SQL(event), t.ident,
                                                                  sql.SQL(referencing), fn))
                names.append(name)
            # The UPDATE statement trigger logs the new keys only; this row trigger logs the old key of a row whose
            # key an update changed. Its WHEN clause is evaluated without calling the function, so an ordinary
            # update pays no row-level call. It makes the key columns depend on the trigger: ALTER COLUMN ... TYPE
            # on one is refused while capture is installed (comparing inside PL/pgSQL instead would let the ALTER
            # through and then fail every UPDATE of sessions that had cached the comparison).
            cur.execute(sql.SQL("CREATE TRIGGER {} AFTER UPDATE ON {} FOR EACH ROW WHEN ({} IS DISTINCT FROM {}) "
                                "EXECUTE FUNCTION {}").format(
                sql.Identifier(KEY_CHANGE_TRIGGER), t.ident, _key_row(t, "OLD"), _key_row(t, "NEW"), fn))
            names.append(KEY_CHANGE_TRIGGER)
    cur.execute(sql.SQL("CREATE TRIGGER {} AFTER TRUNCATE ON {} FOR EACH STATEMENT EXECUTE FUNCTION {}")
                .format(sql.Identifier(TRUNCATE_TRIGGER), t.ident, generic))
    # ALWAYS: capture even sessions running with session_replication_role = replica. Disabled: staged for a
    # rollback (`enable_triggers` turns them on inside the cutover's pause).
    cur.execute(_set_triggers(t, names, enabled))


def _set_triggers(t: Table, names: Iterable[str], enabled: bool) -> sql.Composed:
    """One ALTER TABLE that enables these triggers ALWAYS, or disables them."""
    return sql.SQL("ALTER TABLE {} {}").format(t.ident, sql.SQL(", ").join(
        sql.SQL("{} TRIGGER {}").format(sql.SQL("ENABLE ALWAYS" if enabled else "DISABLE"), sql.Identifier(n))
        for n in sorted(names)))


ENABLE_BATCH = 200
"""Tables whose triggers `enable_triggers` enables per transaction (each holds a lock per table until commit)."""


def enable_triggers(conn: psycopg.Connection[Any], tables: list[Table], lock_timeout: float = 2.0) -> int:
    """Enable ALWAYS every capture trigger of these tables, in a few transactions; returns how many tables had one
    to enable. Much cheaper than `install` (no function or trigger is created), which is why the cutover stages the
    rollback's capture disabled before its pause and only enables it inside."""
    present = present_triggers(conn)
    todo = [t for t in tables if present.get(t.oid)]
    for start in range(0, len(todo), ENABLE_BATCH):
        batch = todo[start:start + ENABLE_BATCH]

        def enable(cur: psycopg.Cursor[Any], batch: list[Table] = batch) -> None:
            for t in batch:
                cur.execute(_set_triggers(t, present[t.oid], True))

        _with_lock_retries(conn, f"{len(batch)} tables", enable, lock_timeout)
    return len(todo)


def _key_row(t: Table, ref: str) -> sql.Composed:
    """The key columns of OLD or NEW as a row, to compare (a one-column key compares as its column)."""
    cols = [sql.SQL("{}.{}").format(sql.SQL(ref), sql.Identifier(k)) for k in t.key]
    return sql.SQL("ROW({})").format(sql.SQL(", ").join(cols)) if len(cols) > 1 else sql.SQL("({})").format(cols[0])


ROW_LEVEL_SET = frozenset({ROW_TRIGGER, TRUNCATE_TRIGGER})
STATEMENT_LEVEL_SET = frozenset({TRUNCATE_TRIGGER, KEY_CHANGE_TRIGGER, *(n for n, _, _ in STATEMENT_TRIGGERS)})


def expected_triggers(t: Table) -> set[str]:
    """The names of the capture triggers `install` creates on table `t`."""
    return set(ROW_LEVEL_SET if not t.key or t.in_hierarchy else STATEMENT_LEVEL_SET)


def capture_complete(t: Table, present: set[str]) -> bool:
    """Whether these triggers capture every change of `t`: its expected set, or, for a keyed table, the row-level
    set (which captures everything too: a table that was in an inheritance tree when prepared keeps it)."""
    return present == expected_triggers(t) or (bool(t.key) and present == ROW_LEVEL_SET)


def _drop_triggers(cur: psycopg.Cursor[Any], t: Table) -> None:
    for name in sorted(ROW_LEVEL_SET | STATEMENT_LEVEL_SET):
        cur.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(name), t.ident))


def _capture_triggers(conn: psycopg.Connection[Any]) -> list[tuple[int, str, str, str, bool]]:
    """Every trigger calling a function of the capture schema: (table oid, schema, table, trigger, enabled ALWAYS)."""
    rows = conn.execute(
        "SELECT t.tgrelid::bigint, n.nspname, c.relname, t.tgname, t.tgenabled = 'A' FROM pg_trigger t "
        "JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "JOIN pg_proc p ON p.oid = t.tgfoid JOIN pg_namespace pn ON pn.oid = p.pronamespace "
        "WHERE pn.nspname = %s AND NOT t.tgisinternal", (CAPTURE_SCHEMA,)).fetchall()
    return [(int(r[0]), r[1], r[2], r[3], bool(r[4])) for r in rows]


def present_triggers(conn: psycopg.Connection[Any], enabled_always: bool = False) -> dict[int, set[str]]:
    """oid -> the names of the triggers calling a function of the capture schema on that table (only those enabled
    ALWAYS, which fire for every session, with `enabled_always`)."""
    present: dict[int, set[str]] = {}
    for rel, _, _, name, always in _capture_triggers(conn):
        if always or not enabled_always:
            present.setdefault(rel, set()).add(name)
    return present


def remove(conn: psycopg.Connection[Any], lock_timeout: float, where: str = "") -> int:
    """Drop every capture trigger (a short transaction each, under lock_timeout, retried) and the capture schema;
    returns how many triggers were dropped. Used by cleanup on the legacy database and, on the target, when the
    rollback's capture goes (rollback.remove_capture)."""
    triggers = _capture_triggers(conn)
    for _, schema_name, table_name, trigger, _ in triggers:
        ident = sql.SQL("{}.{}").format(sql.Identifier(schema_name), sql.Identifier(table_name))

        def drop(cur: psycopg.Cursor[Any], ident: sql.Composable = ident, trigger: str = trigger) -> None:
            cur.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(trigger), ident))

        _with_lock_retries(conn, f"{where}table {schema_name}.{table_name}", drop, lock_timeout)
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(CAPTURE_SCHEMA)))
    return len(triggers)


def install(conn: psycopg.Connection[Any], tables: list[Table], lock_timeout: float = 2.0,
            enabled: bool = True) -> int:
    """Create the capture schema and function, then the triggers on every table not yet captured (or whose
    definition changed since it was, or whose set of capture triggers is not the one expected: its triggers and key
    function are made again). With `enabled` false the new triggers are created disabled (see `enable_triggers`).

    A frozen database (the target after a rollback) stays frozen: the functions written get the freeze body, and
    the triggers are enabled whatever `enabled` says, since a disabled one would let writes through."""
    log = get(phase="prepare")
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(FUNCTIONS_LOCK)
        cur.execute(sql.SQL(trigger_sql("capture.sql")))  # type: ignore[arg-type]
        cur.execute(template("capture_rows.sql", log=log_child(current_child(cur))))
        if is_frozen(conn):
            write_freeze_bodies(cur)
            enabled = True
    done = installed_tables(conn)
    # Enabled: a capture trigger disabled by hand is made again. Staged (not enabled): present is enough.
    present = present_triggers(conn, enabled_always=enabled)
    created = 0
    for t in tables:
        if (t.oid in done and done[t.oid][2] == t.fingerprint and done[t.oid][3] == t.key
                and present.get(t.oid) == expected_triggers(t)):
            continue

        def create(cur: psycopg.Cursor[Any], t: Table = t) -> None:
            cur.execute(FUNCTIONS_LOCK)  # the current child stays current until the key function names it
            _drop_triggers(cur, t)
            _create_triggers(cur, t, enabled)
            if t.key and is_frozen(cur.connection):  # under the lock: a freeze committed since is kept
                cur.execute(template("freeze.sql", function=key_function(t)))
            cur.execute(sql.SQL("INSERT INTO {}.captured_table (rel, schema_name, table_name, fingerprint, "
                                "key_columns) VALUES (%s, %s, %s, %s, %s) ON CONFLICT (rel) DO UPDATE SET "
                                "schema_name = excluded.schema_name, table_name = excluded.table_name, "
                                "fingerprint = excluded.fingerprint, key_columns = excluded.key_columns")
                        .format(sql.Identifier(CAPTURE_SCHEMA)), (t.oid, t.schema, t.name, t.fingerprint, list(t.key)))

        _with_lock_retries(conn, f"table {t.display}", create, lock_timeout)
        created += 1
        log.info("capture.installed", table=t.display, key=bool(t.key), statement_level=bool(t.key) and not t.in_hierarchy)
    return created
