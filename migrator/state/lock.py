"""The operator-action lock: one at a time, the actions that move clients (cutover, rollback) run against a target.

A session advisory lock on the target, keyed by the control schema's name: it lives as long as the session that took
it, so a process that dies (even by SIGKILL) lets go of it with its connection, and nothing is left to clean by hand.
A second cutover or rollback started while one runs (a second terminal, a retry by a service manager) is refused
before it records an attempt or touches anything. Later operator actions that must not overlap a switchover (the
console, a re-run) take the same lock.

Beside it, a local file lock (`local_lock`, flock on a file in `Config.local_dir`), which the kernel also lets go of
when its process dies: the cutover's guardian takes it, not the advisory one, since the target it lives on may be the
server that failed. A flow holds both for its whole run; a guardian takes only the local one, once its flow is gone; a
re-run (refused at once by the advisory lock while a live flow runs) waits for a guardian that is resolving an
attempt (`GUARDIAN_WAIT`), then goes on.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from migrator.config import CONTROL_SCHEMA, Config
from migrator.errors import Blocked

KEY = (CONTROL_SCHEMA, "action")
"""The two texts hashed (`hashtext`) into the lock's two 32-bit keys."""
LOCK_FILE = "action.lock"
GUARDIAN_WAIT = 120.0
"""How long a cutover or rollback waits for the local lock (a guardian resolving an attempt holds it for seconds)."""


@contextmanager
def local_lock(cfg: Config, *, wait: float | None, action: str = "the guardian") -> Iterator[None]:
    """Hold the local file lock for the `with` block, waiting at most `wait` seconds (None: as long as it takes);
    `Blocked` when it stays taken."""
    d = cfg.local_dir
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(d / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = None if wait is None else time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() > deadline:
                    raise Blocked(f"{action} refused: a cutover, a rollback or a guardian resolving one holds "
                                  f"{d / LOCK_FILE} on this host; nothing was recorded or touched",
                                  hint="Wait for it to finish (`migrator status` shows its steps), then run the "
                                       "command again.") from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)  # closing the descriptor lets go of the lock


@contextmanager
def action_lock(cfg: Config, conn: psycopg.Connection[Any], action: str) -> Iterator[None]:
    """Hold the action lock on `conn` (an autocommit target session), then the local lock (waiting for a guardian
    resolving an attempt), for the `with` block; `Blocked`, naming the session that holds it, when another does."""
    with _advisory(conn, action), local_lock(cfg, wait=GUARDIAN_WAIT, action=action):
        yield


@contextmanager
def _advisory(conn: psycopg.Connection[Any], action: str) -> Iterator[None]:
    row = conn.execute("SELECT pg_try_advisory_lock(hashtext(%s), hashtext(%s))", KEY).fetchone()
    if not (row and row[0]):
        holder = conn.execute(
            "SELECT a.pid, coalesce(nullif(a.application_name, ''), 'no application name'), "
            "       a.backend_start::timestamptz(0)::text "
            "FROM pg_locks AS l JOIN pg_stat_activity AS a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 AND l.database = "
            "      (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "  AND l.classid = hashtext(%s)::oid AND l.objid = hashtext(%s)::oid", KEY).fetchone()
        who = f"session {holder[0]} ({holder[1]}, connected {holder[2]})" if holder else "a session that just ended"
        raise Blocked(f"{action} refused: another cutover or rollback is running on this target, in {who}; "
                      "nothing was recorded or touched",
                      hint="Wait for it to finish (`migrator status` shows its steps), then run the command again.")
    try:
        yield
    finally:
        try:
            conn.execute("SELECT pg_advisory_unlock(hashtext(%s), hashtext(%s))", KEY)
        except psycopg.Error:
            pass  # the connection is gone, and the lock with it


def action_lock_held(conn: psycopg.Connection[Any]) -> bool:
    """Whether a session holds the action lock (a cutover or rollback is running), without taking it."""
    row = conn.execute(
        "SELECT EXISTS (SELECT FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2 "
        "  AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
        "  AND classid = hashtext(%s)::oid AND objid = hashtext(%s)::oid)", KEY).fetchone()
    return bool(row and row[0])


@contextmanager
def advisory_if_reachable(cfg: Config, wait: float = 3.0) -> Iterator[None]:
    """The guardian's share of the action lock: taken when the target answers within `wait` seconds (the dead
    flow's session may hold it until its server notices), so that a re-run from another host is refused while the
    guardian acts; skipped when the target is the server that failed, where the local lock alone takes turns."""
    try:
        conn = psycopg.connect(cfg.target_dsn, autocommit=True, connect_timeout=max(1, int(wait)),
                               application_name="migrator-guardian")
    except psycopg.Error:
        yield
        return
    try:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            row = conn.execute("SELECT pg_try_advisory_lock(hashtext(%s), hashtext(%s))", KEY).fetchone()
            if row and row[0]:
                break
            time.sleep(0.1)
        yield
    finally:
        conn.close()  # with the session goes the lock
