"""Rehearsals on this target: the mark that a rehearsal made it (so that the next one may empty it), each run's
phases and outcome, and the removal of the control schema when a rehearsal starts over."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from psycopg import sql

from migrator.config import CONTROL_SCHEMA
from migrator.state.control import Conn, relation


@dataclass(frozen=True)
class Rehearsal:
    id: int
    workload: str
    source: str
    ok: bool | None
    phases: list[dict[str, Any]]


def _has_table(conn: Conn) -> bool:
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{CONTROL_SCHEMA}.rehearsal",)).fetchone()
    return bool(row and row[0])


def rehearsals(conn: Conn) -> list[Rehearsal]:
    """The rehearsals recorded on this target, oldest first; [] when none (or no control schema)."""
    if not _has_table(conn):
        return []
    rows = conn.execute(sql.SQL("SELECT id, workload, source, ok, phases FROM {} ORDER BY id")
                        .format(relation("rehearsal"))).fetchall()
    return [Rehearsal(int(r[0]), r[1], r[2], r[3], list(r[4])) for r in rows]


def start_rehearsal(conn: Conn, workload: str, source: str, os_user: str) -> int:
    """Record a rehearsal starting (the control schema must be upgraded); its id."""
    row = conn.execute(sql.SQL("INSERT INTO {} (workload, source, os_user) VALUES (%s, %s, %s) RETURNING id")
                       .format(relation("rehearsal")), (workload, source, os_user)).fetchone()
    assert row is not None
    return int(row[0])


def rehearsal_phase(conn: Conn, rehearsal_id: int, name: str, seconds: float, detail: str) -> None:
    """Append a finished phase (counts and timings only: never a row value)."""
    phase = {"name": name, "seconds": round(seconds, 3), "detail": detail}
    conn.execute(sql.SQL("UPDATE {} SET phases = phases || %s::jsonb WHERE id = %s").format(relation("rehearsal")),
                 (json.dumps([phase]), rehearsal_id))


def finish_rehearsal(conn: Conn, rehearsal_id: int, ok: bool) -> None:
    conn.execute(sql.SQL("UPDATE {} SET finished_at = now(), ok = %s WHERE id = %s").format(relation("rehearsal")),
                 (ok, rehearsal_id))


def drop_control_schema(conn: Conn) -> None:
    """Remove the control schema and everything in it (a rehearsal starting over on the target an earlier one made)."""
    conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(CONTROL_SCHEMA)))
