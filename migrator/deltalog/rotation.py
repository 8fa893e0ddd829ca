"""The rotating delta log: its children, the switch of writers from one to the next, the truncate of a child that
nothing writes any more and whose events the target holds, and the policy sync applies after its batches (`rotate`).

Applied events are never deleted row by row, so weeks of sync leave no dead rows on the legacy server.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from migrator.config import CAPTURE_SCHEMA, SyncSettings
from migrator.deltalog.freeze import is_frozen
from migrator.deltalog.snapshot import Snapshot
from migrator.deltalog.triggers import FUNCTIONS_LOCK, create_functions, log_child
from migrator.log import get

# Three children take turns: one current (written), one draining (switched away from, its last writers finishing,
# its events not all applied yet), one empty (truncated, next in line). `rotate` decides when to switch and when a
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


def children_files(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """Each child's file (pg_relation_filenode), which every TRUNCATE replaces: a reader that remembers them knows
    whether a child was truncated since (the events it held gone); empty when the database is not prepared."""
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{CAPTURE_SCHEMA}.delta_log_child",))
        row = cur.fetchone()
        if not row or not row[0]:
            return {}
        cur.execute(sql.SQL(
            "SELECT l.child, pg_relation_filenode(format('%%I.%%I', %s::text, 'delta_log_' || l.child)::regclass) "
            "FROM {}.delta_log_child AS l ORDER BY l.child").format(sql.Identifier(CAPTURE_SCHEMA)), (CAPTURE_SCHEMA,))
        return {str(r[0]): int(r[1]) for r in cur.fetchall()}


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
        create_functions(cur, following)
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


def empty_log(conn: psycopg.Connection[Any], lock_timeout: float) -> None:
    """TRUNCATE every child of the log, in one transaction under FUNCTIONS_LOCK (the target's log when a rollback
    window closes: every event it holds is on the legacy database, or belongs to a cutover that was undone). For a
    database nobody writes through capture: frozen, or staged with its triggers disabled."""
    with conn.transaction(), conn.cursor() as cur:
        _bounded(cur, lock_timeout, max(lock_timeout, 30.0))
        cur.execute(FUNCTIONS_LOCK)
        cur.execute(sql.SQL("TRUNCATE {}").format(sql.SQL(", ").join(log_child(c) for c in range(3))))


def rotate(source: psycopg.Connection[Any], applied: Snapshot, settings: SyncSettings) -> list[str]:
    """Truncate the children whose events the target holds, and move writers on to the next child when the current
    one is old or large enough; returns why anything left to do waits (empty when nothing does).

    `applied` is the position just committed on the target. A draining child may go once every transaction below
    the xmax of the snapshot taken after the switch has finished, i.e. the applied snapshot's xmin is past them:
    those are all the transactions that can still have resolved the old function body, and being below the xmin of
    the applied snapshot, the committed ones among them are on the target. A few short statements, each bounded; on
    contention they give up until the next time.
    """
    s = settings
    log = get(phase="sync")
    bounds = {"lock_timeout": s.lock_timeout, "statement_timeout": s.statement_timeout}
    notes = []
    try:
        children = log_children(source)
        source.rollback()
        for c in children:
            if c.state != "draining":
                continue
            if c.switch_snapshot is None:
                record_switch_snapshot(source, c.child)
                notes.append(f"child {c.child}: switch snapshot recorded late")
            elif not applied.surely_contains(Snapshot.parse(c.switch_snapshot)):
                notes.append(f"child {c.child} drains: transactions running at its switch are not all applied")
            else:
                freed = truncate_log_child(source, c.child, applied.xmin, **bounds)
                if freed is None:
                    notes.append(f"child {c.child} holds events not yet applied")
                else:
                    log.info("sync.log_truncated", child=c.child, bytes=freed)
        current = next((c for c in children if c.state == "current"), None)
        if current is not None and (current.age_seconds >= s.rotate_seconds or current.rows >= s.rotate_rows):
            switched = switch_log(source, current.child, **bounds)
            if switched is not None:
                log.info("sync.log_rotated", old=current.child, new=switched, rows=current.rows,
                         bytes=current.bytes, age=round(current.age_seconds, 1))
            else:
                notes.append(f"child {current.child} stays current: the next child still drains, or the "
                             "legacy database is frozen")
    except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled) as exc:
        # Someone holds the log (verify, another sync) or the function lock: the next round tries again.
        source.rollback()
        notes.append(f"deferred: {str(exc).splitlines()[0]}")
    return notes
