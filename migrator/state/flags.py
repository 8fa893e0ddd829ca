"""Operator flags, and the values passed between phases as flags: each name declared once here, read and written
through typed functions. The copy's pause, the cutover's hold, the end of the migration (cleanup), the last verify of
every table, the tables whose post-data waits for copy, and the post-data that waits for sync."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from psycopg import sql

from migrator.state.control import Conn, relation

COPY_PAUSED_FLAG = "copy_paused"
"""Set by `migrator copy --pause`: every copy worker stops reading the source while it is set."""
HOLD_FLAG = "cutover.hold"
"""Set by `migrator cutover --hold`: a cutover waits at the go/no-go point while it is set."""
CLEANUP_FLAG = "cleanup.done"
"""Set by `migrator cleanup` when it removes capture from the legacy database: the migration is over."""
VERIFY_FLAG = "verify.last"
"""JSON {"identical": bool, "differences": n, "not_verified": n, "started_at": iso}, written by whoever records a
verify of every table (record_verify)."""
POST_DATA_PENDING_FLAG = "post_data_pending"
"""JSON list of [schema, table]: tables prepare created on the target after its first post-data; copy restores their
post-data once it has copied them (post_data_pending, add_post_data_pending, clear_post_data_pending)."""
POST_DATA_DEFERRED_FLAG = "post_data.deferred"
"""JSON {"tables": null (every table) or a list of [schema, table], "objects": [description, ...]}: the post-data items
that relate rows (unique and exclusion indexes and constraints, foreign keys, and what depends on them) which copy
left for sync, because its chunks were read under different snapshots (post_data_deferred, defer_post_data,
clear_post_data_deferred)."""


def set_flag(conn: Conn, name: str, value: str) -> None:
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("INSERT INTO {} (name, value) VALUES (%s, %s) ON CONFLICT (name) DO UPDATE "
                    "SET value = excluded.value, set_at = now()").format(relation("flag")),
            (name, value),
        )


def clear_flag(conn: Conn, name: str) -> None:
    with conn.cursor() as cur:
        cur.execute(sql.SQL("DELETE FROM {} WHERE name = %s").format(relation("flag")), (name,))


def record_cleanup(conn: Conn) -> None:
    """Record the first cleanup (a second one keeps its time: that is when changes stopped being recorded)."""
    with conn.cursor() as cur:
        cur.execute(sql.SQL("INSERT INTO {} (name, value) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING")
                    .format(relation("flag")), (CLEANUP_FLAG, "capture removed from the legacy database"))


def cleaned_up(conn: Conn) -> dt.datetime | None:
    """When `migrator cleanup` removed capture from the legacy database, or None."""
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT set_at FROM {} WHERE name = %s").format(relation("flag")), (CLEANUP_FLAG,))
        row = cur.fetchone()
    return row[0] if row else None


def flag(conn: Conn, name: str) -> str | None:
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT value FROM {} WHERE name = %s").format(relation("flag")), (name,))
        row = cur.fetchone()
    return row[0] if row else None


# --- the copy's pause ----------------------------------------------------------------------------------------------

def pause_copy(conn: Conn) -> None:
    set_flag(conn, COPY_PAUSED_FLAG, "paused by the operator")


def resume_copy(conn: Conn) -> None:
    clear_flag(conn, COPY_PAUSED_FLAG)


def copy_paused(conn: Conn) -> bool:
    return flag(conn, COPY_PAUSED_FLAG) is not None



# --- the cutover's hold ---------------------------------------------------------------------------------------------

def hold_cutover(conn: Conn, reason: str) -> None:
    set_flag(conn, HOLD_FLAG, reason)


def cutover_held(conn: Conn) -> bool:
    return flag(conn, HOLD_FLAG) is not None


def cutover_hold(conn: Conn) -> tuple[str, dt.datetime] | None:
    """The hold's reason (who set it) and when it was set; None when no hold is set."""
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT value, set_at FROM {} WHERE name = %s").format(relation("flag")), (HOLD_FLAG,))
        row = cur.fetchone()
    return (str(row[0]), row[1]) if row else None


def release_cutover_hold(conn: Conn) -> None:
    clear_flag(conn, HOLD_FLAG)

# --- tables whose post-data waits for copy -------------------------------------------------------------------------

def post_data_pending(conn: Conn) -> list[tuple[str, str]]:
    """The (schema, table) pairs prepare created after the first post-data, whose post-data copy still owes."""
    return [(str(s), str(n)) for s, n in json.loads(flag(conn, POST_DATA_PENDING_FLAG) or "[]")]


def add_post_data_pending(conn: Conn, tables: Iterable[tuple[str, str]]) -> None:
    """Add tables to those whose post-data copy owes (kept sorted, each once); the caller commits."""
    have = post_data_pending(conn)
    set_flag(conn, POST_DATA_PENDING_FLAG, json.dumps(sorted({*have, *((s, n) for s, n in tables)})))


def clear_post_data_pending(conn: Conn) -> None:
    clear_flag(conn, POST_DATA_PENDING_FLAG)


# --- post-data that waits for sync -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class DeferredPostData:
    """Post-data items copy left for sync, and when: they are built once a batch's snapshot contains every chunk's."""

    tables: list[tuple[str, str]] | None
    """The (schema, table) pairs whose post-data the items belong to; None for every table."""
    objects: list[str]
    """What waits, described (e.g. "foreign key visit_patient_id_fkey on public.visit")."""
    since: dt.datetime


def post_data_deferred(conn: Conn) -> DeferredPostData | None:
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT value, set_at FROM {} WHERE name = %s").format(relation("flag")),
                    (POST_DATA_DEFERRED_FLAG,))
        row = cur.fetchone()
    if row is None:
        return None
    found = json.loads(row[0])
    tables = found.get("tables")
    return DeferredPostData(None if tables is None else [(str(s), str(n)) for s, n in tables],
                            [str(o) for o in found.get("objects", [])], row[1])


def defer_post_data(conn: Conn, tables: Iterable[tuple[str, str]] | None, objects: Iterable[str]) -> None:
    """Add post-data items of `tables` (None: of every table) to what waits for sync; the caller commits."""
    have = post_data_deferred(conn)
    scope: list[tuple[str, str]] | None = None
    if tables is not None and (have is None or have.tables is not None):
        scope = sorted({*(have.tables or [] if have else []), *((s, n) for s, n in tables)})
    listed = list(dict.fromkeys([*(have.objects if have else []), *objects]))
    set_flag(conn, POST_DATA_DEFERRED_FLAG, json.dumps({"tables": scope, "objects": listed}))


def clear_post_data_deferred(conn: Conn) -> None:
    clear_flag(conn, POST_DATA_DEFERRED_FLAG)


# --- the last verify ------------------------------------------------------------------------------------------------

def record_verify(conn: Conn, identical: bool, differences: int, started_at: dt.datetime | None = None, *,
                  not_verified: int = 0) -> None:
    """Remember the outcome of a verify of every table, for the cutover's go/no-go checklist (`not_verified`: tables
    it could not compare, which make it not identical); `started_at` (the target's clock when it began) is what the
    checklist compares with later events, since rows compared early in a long verify say nothing about a re-copy or a
    rollback that happened while it ran."""
    set_flag(conn, VERIFY_FLAG, json.dumps({"identical": identical and not not_verified, "differences": differences,
                                            "not_verified": not_verified,
                                            "started_at": started_at.isoformat() if started_at else None}))


def last_verify(conn: Conn) -> tuple[dict[str, Any], dt.datetime] | None:
    """The last recorded verify and when it started (when it was recorded, for one that did not say)."""
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT value, set_at FROM {} WHERE name = %s").format(relation("flag")), (VERIFY_FLAG,))
        row = cur.fetchone()
    if row is None:
        return None
    found = json.loads(row[0])
    started = found.get("started_at")
    return found, dt.datetime.fromisoformat(started) if started else row[1]
