"""Capture on the legacy database: install it (prepare), rotate its log (sync), freeze and release it (cutover),
remove it (cleanup).

The only module that writes to the legacy database. Everything it creates lives in the `_migrator` schema, except
the triggers on the captured tables, which call `_migrator.capture()` (row images, TRUNCATE) or the table's own
`_migrator.keys_<oid>()`. Those trigger functions insert into the current child of the delta log, whose name is
written into their bodies; rotating the log replaces the bodies to name the next child, and truncates a child
once nothing can still write to it and the target holds all it recorded (when, replay decides). Freezing replaces
every body with one that rejects the write (triggers/freeze.sql): a committed catalog change that holds after
migrator exits, taken without rewriting any table. Trigger DDL needs a short SHARE ROW EXCLUSIVE lock per table; it
is taken with lock_timeout and retried, so prepare and cleanup never queue the clinical workload behind them for
long. Replacing function bodies takes no lock the application's sessions wait for.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg
from psycopg import sql

from migrator import catalog, db, inspect, ownership, schema, state
from migrator.catalog import Table
from migrator.config import CAPTURE_SCHEMA, Config, TableFilter
from migrator.errors import Blocked, ConnectionFailed, MigratorError, NotReady
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


@dataclass(frozen=True)
class PrepareResult:
    tables: list[str]
    target_schema_created: bool
    triggers_installed: int
    overridden: tuple[str, ...] = ()
    """Blockers the operator accepted by name (`--override`), recorded in the control schema."""

    def to_dict(self) -> dict[str, Any]:
        return {"tables": self.tables, "target_schema_created": self.target_schema_created,
                "triggers_installed": self.triggers_installed, "overridden": list(self.overridden)}


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


def _template(name: str, **parts: sql.Composable) -> sql.Composed:
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
    return _template("capture_keys.sql", function=key_function(t), settings=_PINNED if sensitive else sql.SQL(""),
                     new_row_key=key("NEW"), old_row_key=key("OLD"), n_key=key("n"), log=log_child(child),
                     key_change_trigger=sql.Literal(KEY_CHANGE_TRIGGER))


def _current_child(cur: psycopg.Cursor[Any]) -> int:
    cur.execute(sql.SQL("SELECT child FROM {}.delta_log_child WHERE state = 'current'")
                .format(sql.Identifier(CAPTURE_SCHEMA)))
    row = cur.fetchone()
    if row is None:
        raise MigratorError("the delta log on the legacy database has no current child",
                            hint="Run `migrator prepare` again, which repairs the capture schema.")
    return int(row[0])


def _create_functions(cur: psycopg.Cursor[Any], child: int) -> None:
    """(Re)write every capture function so that it inserts into `child`: capture() and the key function of each
    captured table with a key. Called with FUNCTIONS_LOCK held."""
    cur.execute(_template("capture_rows.sql", log=log_child(child)))
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
        cur.execute(_key_function_sql(t, _current_child(cur)))
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
    returns how many triggers were dropped. Used by cleanup on the legacy database and by rollback's disarm on the
    target."""
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
    function are made again). With `enabled` false the new triggers are created disabled (see `enable_triggers`)."""
    log = get(phase="prepare")
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(FUNCTIONS_LOCK)
        cur.execute(sql.SQL(trigger_sql("capture.sql")))  # type: ignore[arg-type]
        cur.execute(_template("capture_rows.sql", log=log_child(_current_child(cur))))
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
            cur.execute(sql.SQL("INSERT INTO {}.captured_table (rel, schema_name, table_name, fingerprint, "
                                "key_columns) VALUES (%s, %s, %s, %s, %s) ON CONFLICT (rel) DO UPDATE SET "
                                "schema_name = excluded.schema_name, table_name = excluded.table_name, "
                                "fingerprint = excluded.fingerprint, key_columns = excluded.key_columns")
                        .format(sql.Identifier(CAPTURE_SCHEMA)), (t.oid, t.schema, t.name, t.fingerprint, list(t.key)))

        _with_lock_retries(conn, f"table {t.display}", create, lock_timeout)
        created += 1
        log.info("capture.installed", table=t.display, key=bool(t.key), statement_level=bool(t.key) and not t.in_hierarchy)
    return created


def check_target_columns(target: psycopg.Connection[Any], tables: list[Table]) -> None:
    """The target's tables must have the source's columns in the source's order (row images are positional)."""
    problems = []
    with target.cursor() as cur:
        for t in tables:
            cur.execute(
                "SELECT array_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod) ORDER BY a.attnum) "
                "FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped",
                (t.schema, t.name),
            )
            row = cur.fetchone()
            have = list(row[0]) if row and row[0] else []
            want = [f"{c.name} {c.type}" for c in t.columns]
            if have != want:
                problems.append(t.display if have else f"{t.display} (missing)")
    if problems:
        raise MigratorError(
            f"target tables differ from the source: {', '.join(problems[:20])}",
            hint="Recreate the target database empty and run `migrator prepare` again, which creates the schema.",
        )


POST_DATA_PENDING = "post_data_pending"
"""Flag: JSON list of [schema, table] created on the target after its first post-data; copy restores their
post-data once it has copied them."""


def _missing_on_target(target: psycopg.Connection[Any], tables: list[Table]) -> list[Table]:
    with target.cursor() as cur:
        missing = []
        for t in tables:
            row = cur.execute("SELECT to_regclass(%s) IS NULL", (t.ident.as_string(target),)).fetchone()
            if row and row[0]:
                missing.append(t)
    return missing


def check_target_role(target: psycopg.Connection[Any]) -> None:
    """Copy and sync write the target with session_replication_role = replica (the application's triggers and
    foreign keys stay quiet there): refuse, before anything is created, a role that may not set it."""
    with target.cursor() as cur:
        try:
            cur.execute("SET LOCAL session_replication_role = replica")
        except psycopg.errors.InsufficientPrivilege:
            target.rollback()
            user = target.execute("SELECT current_user").fetchone()
            target.rollback()
            raise Blocked(
                f"the target role {user[0] if user else '?'!r} may not set session_replication_role, which copy and "
                "sync write the target with (it keeps the application's triggers and foreign keys quiet there)",
                hint="Connect to the target as a superuser, or (PostgreSQL 15 or newer) have one run: "
                     "GRANT SET ON PARAMETER session_replication_role TO <that role>;",
            ) from None
    target.rollback()


def _accepted_blockers(source: psycopg.Connection[Any], overrides: Iterable[str]) -> list[tuple[str, str, str]]:
    """Refuse, before anything is created, while a blocker stands that the operator did not override by name;
    returns (name, detail, source role) of each blocker overridden, to record."""
    accepted = inspect.check_blockers(source, overrides)
    row = source.execute("SELECT current_user").fetchone()
    source.rollback()
    return [(f.name, f.message, str(row[0]) if row else "?") for f in accepted]


def prepare(cfg: Config, *, overrides: Iterable[str] = ()) -> PrepareResult:
    """Control schema and target schema on the target, capture on the source. Re-runnable.

    Refuses first, creating nothing, while a blocker stands (inspect's `check_blockers`) that `overrides` does not
    name; each override is recorded in the control schema with the operating-system user and the source role."""
    log = get(phase="prepare")
    db.refuse_same_database(cfg.source_dsn, cfg.target_dsn)
    with db.session(cfg.target_dsn, role="target") as target, db.session(cfg.source_dsn, role="source") as source:
        accepted = _accepted_blockers(source, overrides)
        check_target_role(target)
        done = state.cleaned_up(target) if state.exists(target) else None
        target.rollback()
        if done is not None:
            # Changes since cleanup were not recorded: capturing again would sync from a position that misses them.
            raise NotReady(f"this migration was cleaned up by `migrator cleanup` at {done:%Y-%m-%d %H:%M:%S} UTC; "
                           "changes on the legacy database since then were not recorded",
                           hint="To migrate again, point [target] at a new, empty database and run "
                                "`migrator prepare --yes`.")
        source.autocommit = True
        ownership.check_prepare(source, target)
        if is_frozen(source):
            # Installing writes the capture functions again, which would lift the freeze from every table.
            raise NotReady("the legacy database is frozen by a cutover; prepare would make it writable again",
                           hint="After a completed cutover there is nothing to prepare; to undo the cutover, "
                                "use `migrator rollback`.")
        tables = catalog.list_tables(source, cfg.tables)
        if not tables:
            raise Blocked("no source table matches [tables] include/exclude",
                          hint="Check the patterns in migration.toml ([tables] include = [\"public.*\"]).")
        inspect.require_rights(source, tables, cfg.tables)
        state.upgrade(target)
        state.start_migration(target, db.describe_dsn(cfg.source_dsn))
        for name, detail, role in accepted:
            state.record_override(target, name, detail, state.operator(), role)
            log.warning("prepare.blocker_overridden", blocker=name, db_role=role)
        target.commit()
        m = state.migration(target)
        assert m is not None
        created_schema = False
        if m.target_schema_at is None:
            # ownership.check_prepare refused a target holding objects this migration did not create.
            schema.load_section(cfg.source_dsn, cfg.target_dsn, "pre-data")
            state.mark(target, "target_schema_at")
            target.commit()
            created_schema = True
            log.info("prepare.target_schema", tables=len(tables))
        else:
            # A table created on the legacy database during the migration: create it on the target too (its
            # indexes and constraints follow when copy has filled it).
            new = [(t.schema, t.name) for t in _missing_on_target(target, tables)]
            if new:
                target.commit()
                schema.load_section(cfg.source_dsn, cfg.target_dsn, "pre-data", tables=new)
                pending = json.loads(state.flag(target, POST_DATA_PENDING) or "[]")
                state.set_flag(target, POST_DATA_PENDING, json.dumps(sorted({*map(tuple, pending), *new})))
                target.commit()
                log.info("prepare.new_tables_created", tables=[f"{s}.{n}" for s, n in new])
        check_target_columns(target, tables)
        ownership.claim(source, target, cfg.target_dsn)
        installed = install(source, tables, lock_timeout=cfg.sync.lock_timeout)
        state.register_tables(target, tables)
        state.mark(target, "prepared_at")
        target.commit()
    return PrepareResult([t.display for t in tables], created_schema, installed,
                         tuple(name for name, _, _ in accepted))


def _trigger_functions(cur: psycopg.Cursor[Any]) -> list[sql.Composed]:
    cur.execute("SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                "WHERE n.nspname = %s AND p.prorettype = 'trigger'::regtype ORDER BY 1", (CAPTURE_SCHEMA,))
    return [sql.SQL("{}.{}").format(sql.Identifier(CAPTURE_SCHEMA), sql.Identifier(r[0])) for r in cur.fetchall()]


# --- the freeze ----------------------------------------------------------------------------------------------------
#
# The application's writers hold ROW EXCLUSIVE locks on several tables at once, so a transaction that collects SHARE
# locks table by table can close a cycle with one of them (it holds A and waits for B; the writer holds B and waits
# for A). PostgreSQL looks for a cycle only in a backend that has waited deadlock_timeout, and cancels the backend
# that finds it: the freeze, or the clinical writer. So an attempt waits for no lock longer than a fraction of
# deadlock_timeout, and takes all its locks within half of it: a cycle through the freeze lasts only while the freeze
# waits, and ends (the attempt rolls back, releasing every lock) before any writer it blocks has waited long enough
# to look. Between attempts the freeze holds nothing: it waits for the transactions holding the table that stopped it
# to end (a long one would otherwise outlast every attempt), and takes that table first next time.

FREEZE_LOCK_WAIT = 0.05
"""Longest wait for one lock in a freeze attempt (a quarter of the server's deadlock_timeout if shorter). Short even
for the first lock: a writer waiting behind the freeze's queued request may hold the next table it wants, while a
long transaction is waited for between attempts, in a queue of nobody."""
FREEZE_POLL = 0.02
# Lock modes that conflict with SHARE: held by a transaction that writes the table (or changes its definition).
_WRITER_MODES = ["RowExclusiveLock", "ShareUpdateExclusiveLock", "ShareRowExclusiveLock", "ExclusiveLock",
                 "AccessExclusiveLock"]


@dataclass(frozen=True)
class Frozen:
    """How a freeze went: the attempts it took, and the seconds before the one that froze began (writers went on
    meanwhile: between attempts the freeze holds no lock)."""

    attempts: int
    waited: float


@dataclass(frozen=True)
class _AttemptStopped:
    """Why a freeze attempt rolled back: the table whose lock it did not get in time (None: the capture functions'
    lock, held by a log rotation) and the error's name."""

    table: Table | None
    reason: str


def freeze(conn: psycopg.Connection[Any], tables: list[Table], lock_timeout: float, *,
           side: str = "the legacy database") -> Frozen:
    """Reject every write to the captured tables from now on, once no writer is in flight. Raises Blocked, with
    nothing frozen, when writers kept the tables locked for lock_timeout seconds.

    An attempt takes SHARE locks on all captured tables in one transaction, each wait short (see above); a lock held
    by a writer in flight makes it roll back, releasing every lock it took, and the next attempt begins once that
    writer's transaction has ended, until lock_timeout is spent. With the locks held every capture function is
    replaced by the freeze body; the commit releases the locks and writers queued behind them then fail. Every
    change committed before is in the delta log.
    """
    log = get(phase="capture")
    deadlock_timeout = _deadlock_timeout(conn)
    started = time.monotonic()
    deadline = started + lock_timeout
    order = list(tables)
    attempt = 0
    while True:
        attempt += 1
        attempt_started = time.monotonic()
        stopped = _freeze_attempt(conn, order, deadlock_timeout, deadline)
        if stopped is None:
            return Frozen(attempt, attempt_started - started)
        name = stopped.table.display if stopped.table else None
        log.warning("freeze.retry", attempt=attempt, table=name, reason=stopped.reason)
        if time.monotonic() >= deadline:
            raise Blocked(f"could not freeze {side}: writers held locks on its captured tables for {lock_timeout}s "
                          f"({attempt} attempts, the last one stopped at {name or 'a log rotation'}); "
                          f"{side} was left writable",
                          hint="Find the long transactions with `migrator inspect`, let them finish (or raise "
                               "[cutover] freeze_lock_timeout), and run the command again.")
        if stopped.table is not None:
            order = [stopped.table, *(t for t in order if t is not stopped.table)]
            _wait_for_writers(conn, stopped.table, deadline)
        # Randomized, so that attempts do not fall into step with a periodic writer.
        time.sleep(min(random.uniform(0.01, 0.05) * min(attempt, 4), max(0.0, deadline - time.monotonic())))


def _deadlock_timeout(conn: psycopg.Connection[Any]) -> float:
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("SELECT setting::float / 1000 FROM pg_settings WHERE name = 'deadlock_timeout'")  # unit: ms
        row = cur.fetchone()
    return float(row[0]) if row else 1.0


# Before each lock of an attempt: its lock_timeout, at most %(wait)s ms and never past %(phase)s ms after the
# attempt's transaction began (computed by the server, so that the bound holds whatever the network's latency).
_BOUND_NEXT_LOCK = sql.SQL(
    "SELECT set_config('lock_timeout', greatest(1, least(%(wait)s, %(phase)s - 1000 * extract(epoch FROM "
    "clock_timestamp() - transaction_timestamp())))::int || 'ms', true)")


def _freeze_attempt(conn: psycopg.Connection[Any], tables: list[Table], deadlock_timeout: float,
                    deadline: float) -> _AttemptStopped | None:
    """One attempt: every lock, then the freeze bodies, committed; or rolled back and the reason returned."""
    bound = {"wait": int(min(FREEZE_LOCK_WAIT, deadlock_timeout / 4) * 1000),
             "phase": int(min(deadlock_timeout / 2, deadline - time.monotonic()) * 1000)}
    locks: list[tuple[Table | None, psycopg.Cursor[Any]]] = []
    try:
        with conn.transaction(), conn.cursor() as cur:
            cur.execute("SET LOCAL statement_timeout = 0")
            # One round trip for all the locks; the first one not granted is the table that stopped the attempt.
            with conn.pipeline():
                cur.execute(_BOUND_NEXT_LOCK, bound)
                locks.append((None, conn.cursor()))
                locks[-1][1].execute(FUNCTIONS_LOCK)  # a rotation in progress finishes first, and sees the freeze after
                for t in tables:
                    cur.execute(_BOUND_NEXT_LOCK, bound)
                    locks.append((t, conn.cursor()))
                    locks[-1][1].execute(sql.SQL("LOCK TABLE {} IN SHARE MODE").format(t.ident))
            for fn in _trigger_functions(cur):
                cur.execute(_template("freeze.sql", function=fn))
            cur.execute(sql.SQL("INSERT INTO {}.freeze_state (id, frozen, reason) VALUES (1, true, 'cutover') "
                                "ON CONFLICT (id) DO UPDATE SET frozen = true, since = now(), reason = excluded.reason")
                        .format(sql.Identifier(CAPTURE_SCHEMA)))
    except (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected, psycopg.errors.QueryCanceled) as exc:
        stopped = next((t for t, c in locks if c.pgresult is None), locks[-1][0] if locks else None)
        return _AttemptStopped(stopped, type(exc).__name__)
    finally:
        for _, c in locks:
            c.close()
    return None


def _wait_for_writers(conn: psycopg.Connection[Any], table: Table, deadline: float) -> None:
    """Wait, holding no lock, until the transactions holding a lock on the table that conflicts with SHARE have
    ended; transactions that began writing it since are not waited for."""
    query = ("SELECT virtualtransaction FROM pg_locks WHERE locktype = 'relation' AND relation = %s::oid AND granted "
             "AND mode = ANY(%s) AND pid <> pg_backend_pid()")
    holders: set[str] | None = None
    while time.monotonic() < deadline:
        with conn.transaction(), conn.cursor() as cur:
            cur.execute(query, (table.oid, _WRITER_MODES))
            now = {r[0] for r in cur.fetchall()}
        holders = now if holders is None else holders & now
        if not holders:
            return
        time.sleep(FREEZE_POLL)


def release(conn: psycopg.Connection[Any]) -> None:
    """Make the legacy database writable again, with capture on (the freeze undone)."""
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(FUNCTIONS_LOCK)
        cur.execute(sql.SQL(trigger_sql("capture.sql")))  # type: ignore[arg-type]
        _create_functions(cur, _current_child(cur))
        cur.execute(sql.SQL("UPDATE {}.freeze_state SET frozen = false, since = now(), reason = 'released'")
                    .format(sql.Identifier(CAPTURE_SCHEMA)))


def is_frozen(conn: psycopg.Connection[Any]) -> bool:
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{CAPTURE_SCHEMA}.freeze_state",))
        row = cur.fetchone()
        if not row or not row[0]:
            return False
        cur.execute(sql.SQL("SELECT frozen FROM {}.freeze_state WHERE id = 1").format(sql.Identifier(CAPTURE_SCHEMA)))
        row = cur.fetchone()
    return bool(row and row[0])


# --- the rotating delta log ----------------------------------------------------------------------------------------
#
# Three children take turns: one current (written), one draining (switched away from, its last writers finishing,
# its events not all applied yet), one empty (truncated, next in line). Replay decides when to switch and when a
# draining child may go; the functions below do it in short transactions bounded by lock_timeout and
# statement_timeout, and give up (returning None) rather than wait for the clinical workload.


@dataclass(frozen=True)
class LogChild:
    """One child of the delta log as the legacy database describes it."""

    child: int
    state: str
    """"current", "draining" or "empty"."""
    since: dt.datetime
    age_seconds: float
    """Seconds since it entered its state (for the current child: since writers switched to it)."""
    switch_snapshot: str | None
    """Draining: pg_current_snapshot() right after writers switched away (None if that process died just then)."""
    rows: int
    """Live rows, from the statistics collector: an estimate that trails by a second or so."""
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"child": self.child, "state": self.state, "since": self.since, "switch_snapshot": self.switch_snapshot,
                "rows": self.rows, "bytes": self.bytes}


def log_children(conn: psycopg.Connection[Any]) -> list[LogChild]:
    """The delta log's children in turn order; empty when the database is not prepared."""
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{CAPTURE_SCHEMA}.delta_log_child",))
        row = cur.fetchone()
        if not row or not row[0]:
            return []
        cur.execute(sql.SQL(
            "SELECT l.child, l.state, l.since, extract(epoch FROM now() - l.since)::float8, l.switch_snapshot::text, "
            "pg_stat_get_live_tuples(c.oid), pg_total_relation_size(c.oid) "
            "FROM {}.delta_log_child AS l CROSS JOIN LATERAL "
            "(SELECT to_regclass(format('%%I.%%I', %s::text, 'delta_log_' || l.child))::oid AS oid) AS c "
            "ORDER BY l.child").format(sql.Identifier(CAPTURE_SCHEMA)), (CAPTURE_SCHEMA,))
        return [LogChild(int(r[0]), r[1], r[2], max(float(r[3]), 0.0), r[4], max(int(r[5] or 0), 0), int(r[6] or 0))
                for r in cur.fetchall()]


def _bounded(cur: psycopg.Cursor[Any], lock_timeout: float, statement_timeout: float) -> None:
    for name, seconds in (("lock_timeout", lock_timeout), ("statement_timeout", statement_timeout)):
        cur.execute(sql.SQL("SET LOCAL {} = {}").format(sql.Identifier(name),
                                                         sql.Literal(f"{max(int(seconds * 1000), 1)}ms")))


def switch_log(conn: psycopg.Connection[Any], current: int, *, lock_timeout: float,
               statement_timeout: float) -> int | None:
    """Make writers insert into the child after `current`: every capture function is written again naming it.

    Returns the new current child; None when nothing was done: `current` is no longer current (another sync
    switched), the next child still drains, the database is frozen, or prepare, release or a freeze is writing the
    functions just now. A writer that resolved the old body keeps inserting into the old child until its
    transaction ends; the snapshot recorded right after the commit bounds those writers (see truncate_log_child).
    """
    with conn.transaction(), conn.cursor() as cur:
        _bounded(cur, lock_timeout, statement_timeout)
        cur.execute("SELECT pg_try_advisory_xact_lock(hashtext('migrator.capture'))")
        row = cur.fetchone()
        if not row or not row[0] or is_frozen(conn):
            return None
        cur.execute(sql.SQL("SELECT child, state FROM {}.delta_log_child ORDER BY child FOR UPDATE")
                    .format(sql.Identifier(CAPTURE_SCHEMA)))
        children = [(int(r[0]), str(r[1])) for r in cur.fetchall()]
        turn = [c for c, _ in children]
        states = dict(children)
        if states.get(current) != "current":
            return None
        following = turn[(turn.index(current) + 1) % len(turn)]
        if states[following] != "empty":
            return None
        _create_functions(cur, following)
        cur.execute(sql.SQL("UPDATE {}.delta_log_child SET state = CASE child WHEN %(old)s THEN 'draining' "
                            "ELSE 'current' END, since = now(), switch_snapshot = NULL "
                            "WHERE child IN (%(old)s, %(new)s)").format(sql.Identifier(CAPTURE_SCHEMA)),
                    {"old": current, "new": following})
    record_switch_snapshot(conn, current)
    return following


def record_switch_snapshot(conn: psycopg.Connection[Any], child: int) -> None:
    """Record, for a draining child, a snapshot taken after the switch away from it committed.

    Every transaction that can still insert into the child (it resolved the old function body) was running when
    the switch committed, so its transaction id is below this snapshot's xmax. Taken later than that (a sync that
    died between the switch and this), it only delays the truncate.
    """
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(sql.SQL("UPDATE {}.delta_log_child SET switch_snapshot = pg_current_snapshot() "
                            "WHERE child = %s AND state = 'draining' AND switch_snapshot IS NULL")
                    .format(sql.Identifier(CAPTURE_SCHEMA)), (child,))


def truncate_log_child(conn: psycopg.Connection[Any], child: int, applied_xmin: int, *, lock_timeout: float,
                       statement_timeout: float) -> int | None:
    """TRUNCATE a draining child whose events the target holds; returns the bytes freed, None when not done.

    The caller has checked that the target's applied snapshot has every transaction below the child's switch
    snapshot's xmax finished (xmin past them). Here the child is locked ACCESS EXCLUSIVE — granted at once unless a
    straggler still writes to it, and given up after lock_timeout: only stragglers and readers of the log queue
    behind it, never a writer of the current child — and, as the last word, nothing in it may belong to a
    transaction at or after `applied_xmin` (not surely finished and applied): a writer that held its locks across
    the switch without processing the catalog change can insert into the old child later than the snapshot says.
    """
    with conn.transaction(), conn.cursor() as cur:
        _bounded(cur, lock_timeout, statement_timeout)
        cur.execute(sql.SQL("SELECT state FROM {}.delta_log_child WHERE child = %s FOR UPDATE")
                    .format(sql.Identifier(CAPTURE_SCHEMA)), (child,))
        row = cur.fetchone()
        if not row or row[0] != "draining":
            return None
        table = log_child(child)
        cur.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(table))
        cur.execute(sql.SQL("SELECT EXISTS (SELECT FROM {} WHERE txid >= %s::text::xid8), "
                            "pg_total_relation_size(%s::regclass)").format(table),
                    (str(applied_xmin), table.as_string(conn)))
        row = cur.fetchone()
        assert row is not None
        if row[0]:
            return None
        cur.execute(sql.SQL("TRUNCATE {}").format(table))
        cur.execute(sql.SQL("UPDATE {}.delta_log_child SET state = 'empty', since = now(), switch_snapshot = NULL "
                            "WHERE child = %s").format(sql.Identifier(CAPTURE_SCHEMA)), (child,))
        return int(row[1])


@dataclass(frozen=True)
class CleanupResult:
    triggers_removed: int
    schema_dropped: bool

    def to_dict(self) -> dict[str, Any]:
        return {"triggers_removed": self.triggers_removed, "schema_dropped": self.schema_dropped}


def cleanup(cfg: Config, *, release_freeze: bool = False, migration: str | None = None) -> CleanupResult:
    """Remove the capture triggers and the `_migrator` schema from the legacy database, leaving no trace; only the
    target's migration's capture, or that of the migration the operator names (`migration`, its id)."""
    log = get(phase="cleanup")
    with db.session(cfg.source_dsn, role="source", autocommit=True) as source:
        ownership.check_cleanup(source, cfg.target_dsn, named=migration)
        if is_frozen(source) and not release_freeze:
            raise NotReady(
                "the legacy database is frozen after cutover; removing capture would make it writable again",
                hint="If clients have moved and writes to the legacy database are acceptable again, run "
                     "`migrator cleanup --release-freeze --yes`; otherwise leave it frozen.",
            )
        if migration is None:
            # A named migration is another one, abandoned: the configured target's migration goes on.
            _record_cleanup(cfg)
        removed = remove(source, cfg.sync.lock_timeout)
        log.info("cleanup.done", triggers=removed)
    return CleanupResult(removed, True)


def _record_cleanup(cfg: Config) -> None:
    """Record on the target, before capture goes, that the migration ends: sync, copy and cutover then say so
    instead of blaming triggers dropped by hand. A target that is gone (an abandoned migration) does not keep the
    legacy database from being cleaned."""
    try:
        with db.session(cfg.target_dsn, role="target", autocommit=True) as target:
            if state.exists(target):
                state.record_cleanup(target)
    except ConnectionFailed as exc:
        get(phase="cleanup").warning("cleanup.not_recorded", error=str(exc).splitlines()[0])
