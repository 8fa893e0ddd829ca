"""The applied sync position: the snapshot up to which the delta log is applied, moved compare-and-set."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from psycopg import sql
from psycopg.rows import dict_row

from migrator.errors import ConcurrentRun
from migrator.state.control import Conn, relation


@dataclass(frozen=True)
class Position:
    applied_snapshot: str
    events_applied: int
    batches: int
    updated_at: dt.datetime


def position(conn: Conn) -> Position | None:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            sql.SQL("SELECT applied_snapshot, events_applied, batches, updated_at FROM {} WHERE id = 1")
            .format(relation("sync_position"))
        )
        row = cur.fetchone()
    return Position(**row) if row else None


def init_position(conn: Conn, snapshot: str) -> None:
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("INSERT INTO {} (id, applied_snapshot) VALUES (1, %s) ON CONFLICT (id) DO NOTHING")
            .format(relation("sync_position")),
            (snapshot,),
        )


def advance_position(conn: Conn, expected: str, snapshot: str, events: int) -> None:
    """Move the applied position from `expected` to `snapshot`, in the caller's transaction with the changes.

    Fails when another sync moved it meanwhile, so two sync processes can never apply the same batch twice.
    """
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL(
                "UPDATE {} SET applied_snapshot = %s, events_applied = events_applied + %s, "
                "batches = batches + 1, updated_at = clock_timestamp() WHERE id = 1 AND applied_snapshot = %s"
            ).format(relation("sync_position")),
            (snapshot, events, expected),
        )
        if cur.rowcount != 1:
            raise ConcurrentRun("the sync position moved under this process: another sync is running",
                                hint="Let the other `migrator sync` (or cutover) go on, or stop it; then run the "
                                     "command again: it resumes from the recorded position, and nothing is "
                                     "applied twice.")


def lock_position(conn: Conn) -> None:
    """Take the row lock that makes one sync process at a time the applier (held until the transaction ends)."""
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT 1 FROM {} WHERE id = 1 FOR UPDATE").format(relation("sync_position")))
