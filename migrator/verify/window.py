"""The in-flight window of a live verify, and the pair of sessions a worker reads each table in (`Pair`).

While sync follows, the target holds exactly the source's state at its applied position A (data and position commit
together). The target snapshot is opened first and reads A; the source snapshot S, opened next, contains A
(`Pair.window`). A row that no change in S but not in A touched is the same on the source at A and at S, so if the
target differs from S there, the difference is real. A row such a change touched is in flight (`in_flight`): its
range is read again once sync has applied everything S contains (`wait_for_sync`), under a new window.

Which events a window holds, how a logged key decodes, and the log's lock are the delta log's own (deltalog/read.py
on `deltalog.snapshot.window` and `decode_key`, as sync and rollback use them).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from migrator import db, log, state
from migrator.config import Config
from migrator.deltalog import read
from migrator.deltalog.snapshot import Snapshot
from migrator.errors import MigratorError
from migrator.verify.planning import Plan, row_form

_WINDOW_TRIES = 20


@dataclass(frozen=True)
class Window:
    """The two snapshots a live comparison reads: the target's sync position and the source's newer snapshot."""

    applied: str
    """The sync position (a source snapshot) the target snapshot holds."""
    snapshot: str
    """The source snapshot the comparison reads."""


@dataclass(frozen=True)
class InFlight:
    """What changes in the window touched: keys as the leaf streams them (without a key: row md5s)."""

    keys: frozenset[tuple[Any, ...]]
    everything: bool = False
    """A TRUNCATE in the window: every row of the table is in flight."""


class Pair:
    """A worker's own source and target sessions: read-only, one repeatable-read snapshot per table."""

    def __init__(self, cfg: Config) -> None:
        self._cfg = cfg
        self._conns: tuple[psycopg.Connection[Any], psycopg.Connection[Any]] | None = None

    def open(self) -> tuple[psycopg.Connection[Any], psycopg.Connection[Any]]:
        if self._conns is None:
            source = db.connect(self._cfg.source_dsn, role="source", application_name="migrator-verify")
            try:
                target = db.connect(self._cfg.target_dsn, role="target", application_name="migrator-verify")
            except BaseException:
                source.close()
                raise
            for conn in (source, target):
                conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
                conn.read_only = True
            self._conns = (source, target)
        return self._conns

    def end_table(self) -> None:
        if self._conns is not None:
            for conn in self._conns:
                conn.rollback()

    def window(self) -> Window:
        """Open both snapshots for a live comparison: the target's first, with the sync position it holds, then the
        source's, which therefore contains every change the target holds.

        The changes between the two are read from the source's delta log in the source snapshot. Sync truncates
        children of the log whose events the target holds; TRUNCATE is not MVCC-safe, so the source transaction
        locks the log (ACCESS SHARE, before its snapshot) and no truncate happens while it reads. Should sync apply
        a newer batch (and maybe truncate) between the two snapshots, the window is opened again, so no event of the
        window is missing from the log the source snapshot sees.
        """
        source, target = self.open()
        with db.session(self._cfg.target_dsn, role="target", autocommit=True,
                        application_name="migrator-verify") as monitor:
            for attempt in range(_WINDOW_TRIES):
                if attempt:
                    self.end_table()
                applied = state.position(target)
                with source.cursor() as cur:
                    read.lock_log(cur)
                    row = cur.execute("SELECT pg_current_snapshot()::text").fetchone()
                if applied is None or row is None:
                    raise MigratorError("the target lost its sync position while verify ran")
                now = state.position(monitor)
                if now is not None and now.applied_snapshot == applied.applied_snapshot:
                    break
        assert applied is not None and row is not None
        return Window(applied.applied_snapshot, str(row[0]))

    def close(self) -> None:
        if self._conns is not None:
            for conn in self._conns:
                conn.close()
            self._conns = None


def has_delta_log(conn: psycopg.Connection[Any]) -> bool:
    """Whether the source has a delta log (a capture is installed), so a verify may run while sync follows."""
    found = read.has_log(conn)
    conn.rollback()
    return found


def in_flight(source_conn: psycopg.Connection[Any], plan: Plan, window: Window | None) -> InFlight | None:
    """Keys (or row hashes) that changes committed in the window touched, from the delta log in the source snapshot
    (locked since before that snapshot was taken: see Pair.window)."""
    if window is None:
        return None
    applied, current = Snapshot.parse(window.applied), Snapshot.parse(window.snapshot)
    with source_conn.cursor() as cur:
        if read.truncated(cur, plan.table, applied, current):
            return InFlight(frozenset(), everything=True)
        if plan.keys:
            # A table with a key logs the keys its changes touched.
            touched = read.touched_keys(plan.table, applied, current)
            keys = sql.SQL(", ").join(k.expression_of(sql.SQL("x")) for k in plan.keys)
            rows = cur.execute(sql.SQL("SELECT DISTINCT {} FROM ({}) AS x").format(keys, touched)).fetchall()
            return InFlight(frozenset(tuple(r) for r in rows))
        images = read.row_images(plan.table, applied, current)
        keys = sql.SQL("decode(md5({}), 'hex')").format(row_form(plan.table, plan.binary, sql.SQL("(x.r)")))
        rows = cur.execute(sql.SQL("SELECT DISTINCT {} FROM ({}) AS x").format(keys, images)).fetchall()
    return InFlight(frozenset(tuple(r) for r in rows))


def wait_for_sync(cfg: Config, snapshots: list[str], live_wait: float) -> bool:
    """Wait until sync has applied everything the source `snapshots` (the first pass's) contained; False (logged) if
    it has not after `live_wait` seconds."""
    logger = log.get(phase="verify")
    wanted = [Snapshot.parse(s) for s in snapshots]
    deadline = time.monotonic() + live_wait
    with db.session(cfg.target_dsn, role="target", autocommit=True, application_name="migrator-verify") as conn:
        while True:
            pos = state.position(conn)
            applied = Snapshot.parse(pos.applied_snapshot) if pos is not None else None
            if applied is not None and all(applied.includes(w) for w in wanted):
                return True
            if time.monotonic() >= deadline:
                logger.warning("verify.sync_behind_first_pass", waited=live_wait)
                return False
            time.sleep(0.2)
