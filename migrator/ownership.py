"""Ownership: which migration the legacy database's capture serves, and whether a target is this migration's.

One capture serves one migration. Its delta log has one consumer: sync truncates a log child once its own target
holds the child's events, so a second migration reading the same log (a DR copy, a second site) would lose them
without a word. The legacy database therefore records the capture's owner (deltalog/owner.py: the id of the
target's migration row, the target as host:port/dbname, when), and prepare, sync and cleanup refuse a capture that
belongs to another migration. A capture installed by a migrator that recorded no owner is adopted by a target this
capture was already prepared for (its control schema has prepared_at), and refused to every other.

A target is this migration's when it holds the control schema; any other target must hold no user object at all
before prepare creates anything there (pg_restore of the source's schema would collide with it, or, worse, not).
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any

import psycopg

from migrator import db, state
from migrator.config import CONTROL_SCHEMA
from migrator.deltalog import owner as recorded
from migrator.deltalog import triggers
from migrator.errors import Blocked, ConnectionFailed
from migrator.log import get

Conn = psycopg.Connection[Any]


@dataclass(frozen=True)
class Owner:
    """The migration a legacy database's capture serves, as that database records it."""

    migration_id: uuid.UUID
    target: str
    """host:port/dbname of its target (`db.describe_dsn`): never a password."""
    created_at: dt.datetime

    def describe(self) -> str:
        when = self.created_at.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        return f"migration {self.migration_id} to {self.target}, prepared {when}"


def legacy_owner(source: Conn) -> Owner | None:
    """The owner the legacy database records; None when it records none (not prepared, or by an older migrator)."""
    row = recorded.read(source)
    return Owner(*row) if row else None


def _has_capture(source: Conn) -> bool:
    return triggers.has_capture(source)


def _foreign(source: Conn, m: state.Migration | None, owner: Owner | None) -> str | None:
    """Why the legacy database's capture (recorded `owner`) is not this migration's (`m`: the target's migration
    row); None when it is, or when there is none."""
    if owner is not None:
        if m is not None and m.migration_id == owner.migration_id:
            return None
        return f"is captured for {owner.describe()}"
    if not _has_capture(source) or (m is not None and m.prepared_at is not None):
        return None
    return (f"already has capture (schema {recorded.SCHEMA}) installed by an earlier migrator version for a "
            "migration it did not record (its target is unknown)")


def check_prepare(source: Conn, target: Conn) -> None:
    """Refuse, before prepare creates anything on either side: a legacy database captured for another migration,
    and a target that is not this migration's (no control schema) yet holds user objects."""
    m = state.migration(target)
    owner = legacy_owner(source)
    why = _foreign(source, m, owner)
    if why:
        get(phase="prepare").warning("prepare.refused", reason="captured_for_another_migration")
        resume = f"; to resume that migration, point [target] at {owner.target}" if owner else ""
        raise Blocked(
            f"the legacy database {why}. One capture serves one migration: that migration's sync deletes the delta "
            "log's events once its own target holds them, so this one would lose them",
            hint="Finish that migration, or run `migrator cleanup` with its configuration, before preparing another "
                 f"target from this legacy database{resume}.",
        )
    if m is not None and m.prepared_at is not None and not _has_capture(source):
        # This target follows a capture that is not on the configured legacy database: another legacy database (a
        # second site, a DR node), or its capture dropped by hand. Syncing from here would read other transaction ids
        # against the recorded position, or miss every change made since the capture went.
        get(phase="prepare").warning("prepare.refused", reason="capture_missing_for_prepared_target")
        raise Blocked(
            f"this target was prepared from {m.source}, and the configured legacy database holds no capture of its "
            "migration: it is another database, or its capture was removed without `migrator cleanup`, so changes "
            "since then were not recorded",
            hint="Check [source] in the configuration; to migrate this legacy database, point [target] at a new, "
                 "empty database and run `migrator prepare --yes` there.",
        )
    if state.exists(target):
        return
    found = foreign_objects(target)
    if found:
        get(phase="prepare").warning("prepare.refused", reason="target_not_empty", objects=len(found))
        raise Blocked(
            f"the target holds {len(found)} object(s) this migration did not create: {', '.join(found[:10])}"
            f"{' ...' if len(found) > 10 else ''}",
            hint="Point [target] at a new, empty database (createdb), or drop these objects from it first.",
        )


def claim(source: Conn, target: Conn, target_dsn: str) -> None:
    """Record this migration (the target's migration row) as the owner of the legacy database's capture, before
    prepare installs it; refuse when another migration recorded itself first (its prepare ran at the same time)."""
    m = state.migration(target)
    assert m is not None and m.migration_id is not None
    recorded.record(source, m.migration_id, db.describe_dsn(target_dsn))
    check(source, m, "prepare")


def check(source: Conn, m: state.Migration | None, action: str) -> None:
    """Refuse `action` (prepare, sync, cleanup, release) on a legacy database whose capture belongs to another
    migration than `m` (the target's migration row): it would truncate that migration's delta log, drop its
    triggers, or lift its freeze.
    Leaves the connection's transaction state as it found it."""
    idle = source.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    try:
        owner = legacy_owner(source)
        why = _foreign(source, m, owner)
    finally:
        if idle and not source.autocommit:
            source.rollback()
    if not why and owner is None and action == "sync" and _has_capture(source):
        # Installed by a migrator that recorded no owner: two targets may both have been prepared from it, and each
        # sync would truncate the other's events. Prepare records the owner once; the second target is then refused.
        get(phase=action).warning("sync.refused", reason="capture_without_owner")
        raise Blocked(
            "sync refused: the legacy database's capture records no owning migration (installed by an earlier "
            "migrator version)",
            hint="Run `migrator prepare --yes` once with this configuration: it records this migration as the "
                 "capture's owner (and refuses if another migration's target was prepared from it first).",
        )
    if why:
        get(phase=action).warning(f"{action}.refused", reason="captured_for_another_migration")
        ours = "this target is not prepared" if m is None else f"this target's is migration {m.migration_id}"
        raise Blocked(
            f"{action} refused: the legacy database {why} ({ours}); {action} would act on that migration's capture",
            hint=f"Run {action} with that migration's configuration"
                 f"{f' ([target] {owner.target})' if owner else ''}; this target can be prepared once that migration "
                 "is finished and cleaned up.",
        )


def check_cleanup(source: Conn, target_dsn: str, *, named: str | None = None) -> None:
    """Refuse cleanup of a capture that belongs to another migration than the target's (asked only when there is a
    capture to remove). `named`: the operator names the migration whose capture goes (its target is gone, or
    unreachable), and the target is not asked."""
    if not _has_capture(source):
        return
    owner = legacy_owner(source)
    if named is not None:
        if owner is not None and str(owner.migration_id) == named.strip().lower():
            get(phase="cleanup").warning("cleanup.named_migration", migration=named)
            return
        raise Blocked(f"cleanup refused: the legacy database's capture is not migration {named}"
                      f"{f' but {owner.describe()}' if owner else ' (it records no migration)'}",
                      hint="Name the migration the legacy database records (inspect shows it), or run cleanup with "
                           "its configuration.")
    gone = (f" If that migration is abandoned and its target gone, `migrator cleanup --migration "
            f"{owner.migration_id} --yes` removes its capture." if owner else "")
    try:
        with db.session(target_dsn, role="target") as target:
            m = state.migration(target)
    except ConnectionFailed as exc:
        raise ConnectionFailed(str(exc), hint=f"{exc.hint}{gone}") from exc
    try:
        check(source, m, "cleanup")
    except Blocked as exc:
        raise Blocked(str(exc), hint=f"{exc.hint}{gone}") from None


# Everything a user can create in a database, outside the system schemas, that neither belongs to an extension nor
# exists only as part of another object (a table's row type, an array type, an identity sequence: dependency 'i').
_USER_OBJECTS = """
SELECT o.kind || ' ' || o.name
  FROM (SELECT CASE c.relkind WHEN 'S' THEN 'sequence' WHEN 'v' THEN 'view' WHEN 'm' THEN 'materialized view'
                              WHEN 'f' THEN 'foreign table' WHEN 'c' THEN 'type' ELSE 'table' END,
               format('%%I.%%I', n.nspname, c.relname), c.oid, 'pg_class'::regclass, n.nspname
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind IN ('r', 'p', 'S', 'v', 'm', 'f', 'c')
        UNION ALL
        SELECT 'function', format('%%I.%%I', n.nspname, p.proname), p.oid, 'pg_proc'::regclass, n.nspname
          FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        UNION ALL
        SELECT 'type', format('%%I.%%I', n.nspname, t.typname), t.oid, 'pg_type'::regclass, n.nspname
          FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
         WHERE t.typrelid = 0
        UNION ALL
        SELECT 'schema', format('%%I', n.nspname), n.oid, 'pg_namespace'::regclass, n.nspname
          FROM pg_namespace n WHERE n.nspname <> 'public'
       ) AS o(kind, name, oid, classid, schema_name)
 WHERE o.schema_name NOT IN ('pg_catalog', 'information_schema', %(control)s) AND o.schema_name NOT LIKE 'pg\\_%%'
   AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = o.classid AND d.objid = o.oid AND d.deptype IN ('e', 'i'))
 ORDER BY o.schema_name, o.kind, o.name
"""


def foreign_objects(target: Conn) -> list[str]:
    """The target's user objects ("table public.x", "sequence public.y_seq"), the control schema's left out."""
    return [r[0] for r in target.execute(_USER_OBJECTS, {"control": CONTROL_SCHEMA}).fetchall()]
