"""Prepare: refuse while a blocker stands, then create the control schema and the target schema on the target and
install capture on the legacy database (deltalog/triggers.py). Re-runnable: a table created on the legacy database
since is created on the target too, and capture is made again where it is missing or out of date.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import psycopg

from migrator import catalog, db, inspect, ownership, schema, state
from migrator.catalog import Table
from migrator.config import Config
from migrator.deltalog.freeze import is_frozen
from migrator.deltalog.triggers import has_capture, install
from migrator.errors import Blocked, MigratorError, NotReady
from migrator.log import get


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

    def render_text(self) -> str:
        return (f"prepared: {len(self.tables)} tables captured ({self.triggers_installed} newly), target schema "
                f"{'created' if self.target_schema_created else 'already present'}"
                + (f"; blocker(s) overridden: {', '.join(self.overridden)} (recorded)" if self.overridden else ""))

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


class _Loading:
    """The target's pre-data schema loading in a thread (its work is in pg_dump's and pg_restore's processes)."""

    def __init__(self, cfg: Config) -> None:
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._load, args=(cfg,), name="prepare-pre-data", daemon=True)
        self.thread.start()

    def _load(self, cfg: Config) -> None:
        try:
            schema.load_section(cfg.source_dsn, cfg.target_dsn, "pre-data")
        except BaseException as exc:  # re-raised in the caller's thread by result()
            self.error = exc

    def result(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error


def prepare(cfg: Config, *, overrides: Iterable[str] = ()) -> PrepareResult:
    """Control schema and target schema on the target, capture on the source. Re-runnable.

    Refuses first, creating nothing, while a blocker stands (inspect's `check_blockers`) that `overrides` does not
    name; each override is recorded in the control schema with the operating-system user and the source role."""
    log = get(phase="prepare")
    db.refuse_same_database(cfg.source_dsn, cfg.target_dsn)
    with db.session(cfg.target_dsn, role="target") as target, db.session(cfg.source_dsn, role="source") as source:
        state.preload_upgrade(target)  # alembic imports while the servers are checked, if it is to upgrade one
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
        # A new target (ownership.check_prepare refused one holding objects this migration did not create): its
        # schema loads (pg_dump and pg_restore, in one transaction) while the control schema is made (from
        # control_schema.sql), instead of after it.
        loading = _Loading(cfg) if not state.exists(target) else None
        target.rollback()
        try:
            state.upgrade(target)
            state.start_migration(target, db.describe_dsn(cfg.source_dsn))
            for name, detail, role in accepted:
                state.record_override(target, name, detail, state.operator(), role)
                log.warning("prepare.blocker_overridden", blocker=name, db_role=role)
            target.commit()
        finally:
            if loading:
                loading.thread.join()
        m = state.migration(target)
        assert m is not None
        created_schema = False
        new: list[tuple[str, str]] = []
        if m.target_schema_at is None:
            if loading:
                loading.result()
            else:
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
                state.add_post_data_pending(target, new)
                target.commit()
                log.info("prepare.new_tables_created", tables=[f"{s}.{n}" for s, n in new])
        check_target_columns(target, tables)
        if new:
            target.commit()
            _freeze_new_on_target(cfg)
        ownership.claim(source, target, cfg.target_dsn)
        installed = install(source, tables, lock_timeout=cfg.sync.lock_timeout)
        state.register_tables(target, tables)
        state.mark(target, "prepared_at")
        target.commit()
    return PrepareResult([t.display for t in tables], created_schema, installed,
                         tuple(name for name, _, _ in accepted))


def _freeze_new_on_target(cfg: Config) -> None:
    """A target frozen after a rollback rejects writes to the tables created on it since too (their capture
    triggers, installed frozen: deltalog/triggers.install keeps a frozen database frozen)."""
    with db.session(cfg.target_dsn, role="target", autocommit=True) as target:
        if has_capture(target) and is_frozen(target):
            install(target, catalog.list_tables(target, cfg.tables), lock_timeout=cfg.sync.lock_timeout)
