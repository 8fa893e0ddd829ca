"""The operator-action lock: one at a time, the actions that move clients (cutover, rollback) run against a target.

A session advisory lock on the target, keyed by the control schema's name: it lives as long as the session that took
it, so a process that dies (even by SIGKILL) lets go of it with its connection, and nothing is left to clean by hand.
A second cutover or rollback started while one runs (a second terminal, a retry by a service manager) is refused
before it records an attempt or touches anything. Later operator actions that must not overlap a switchover (the
console, the cutover's guardian, a re-run) take the same lock.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from migrator.config import CONTROL_SCHEMA
from migrator.errors import Blocked

KEY = (CONTROL_SCHEMA, "action")
"""The two texts hashed (`hashtext`) into the lock's two 32-bit keys."""


@contextmanager
def action_lock(conn: psycopg.Connection[Any], action: str) -> Iterator[None]:
    """Hold the action lock on `conn` (an autocommit target session) for the `with` block; `Blocked`, naming the
    session that holds it, when another does."""
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
