"""The freeze: make every captured table of a database reject writes (cutover; rollback on the target), and release it.

Freezing replaces every capture function's body with one that rejects the write (triggers/freeze.sql): a committed
catalog change that holds after migrator exits, taken without rewriting any table. Every change committed before it
is in the delta log. Releasing writes the capture bodies again. Replacing function bodies takes no lock the
application's sessions wait for; the SHARE locks the freeze takes so that no writer is in flight are taken as below.

The engine's own writes go through a frozen database the way they go through the application's ALWAYS triggers:
sync, copy and the reverse replay disable the triggers of a table inside their own transaction and enable them
again before it commits (schema.silenced), so no other session ever sees them off. No session setting opens that
door to a client (the triggers are enabled ALWAYS, so `session_replication_role = replica` does not).

`_migrator.freeze_state` says why: frozen by a cutover (the legacy database), frozen by a rollback (the target, until
the next cutover lifts it at `arm_rollback` or `migrator release --target`), lifted by a cutover's arm (the target:
an undone cutover puts that freeze back), released.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from migrator.catalog import Table
from migrator.config import CAPTURE_SCHEMA
from migrator.deltalog.triggers import (
    FUNCTIONS_LOCK,
    create_functions,
    current_child,
    freeze_row,
    trigger_sql,
    write_freeze_bodies,
)
from migrator.deltalog.triggers import (
    is_frozen as is_frozen,  # lives beside install, which keeps a frozen database frozen; read here by callers
)
from migrator.errors import Blocked
from migrator.log import get

# Why a database is frozen or not (`_migrator.freeze_state.reason`).
BY_CUTOVER = "cutover"
"""The legacy database, frozen by a cutover."""
BY_ROLLBACK = "rollback"
"""The target, frozen by a rollback: it rejects writes until the next cutover or `migrator release --target`."""
LIFTED_BY_CUTOVER = "lifted by a cutover"
"""The target's rollback freeze, lifted by a cutover's `arm_rollback`: an undo of that cutover puts it back."""
RELEASED = "released"


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
           side: str = "the legacy database", reason: str = BY_CUTOVER) -> Frozen:
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
        stopped = _freeze_attempt(conn, order, deadlock_timeout, deadline, reason)
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
                    deadline: float, reason: str) -> _AttemptStopped | None:
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
            write_freeze_bodies(cur)
            cur.execute(sql.SQL("INSERT INTO {}.freeze_state (id, frozen, reason) VALUES (1, true, %s) "
                                "ON CONFLICT (id) DO UPDATE SET frozen = true, since = now(), reason = excluded.reason")
                        .format(sql.Identifier(CAPTURE_SCHEMA)), (reason,))
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


def release(conn: psycopg.Connection[Any], reason: str = RELEASED) -> None:
    """Make the database writable again, with capture on (the freeze undone)."""
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(FUNCTIONS_LOCK)
        cur.execute(sql.SQL(trigger_sql("capture.sql")))  # type: ignore[arg-type]
        create_functions(cur, current_child(cur))
        cur.execute(sql.SQL("INSERT INTO {}.freeze_state (id, frozen, reason) VALUES (1, false, %s) "
                            "ON CONFLICT (id) DO UPDATE SET frozen = false, since = now(), reason = excluded.reason")
                    .format(sql.Identifier(CAPTURE_SCHEMA)), (reason,))


def freeze_reason(conn: psycopg.Connection[Any]) -> str | None:
    """Why the database is frozen or not (one of the reasons above), or None when no freeze was ever recorded."""
    row = freeze_row(conn)
    return row[1] if row else None


# --- the rotating delta log ----------------------------------------------------------------------------------------
#
