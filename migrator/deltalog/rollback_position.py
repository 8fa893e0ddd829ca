"""The rollback's position on the legacy database (triggers/rollback.sql): the target snapshot whose changes the
legacy database holds during a rollback window, and the events the reverse replay applied. Reading and writing it
only; rollback.py decides when.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from migrator.config import CAPTURE_SCHEMA
from migrator.deltalog.triggers import trigger_sql

_TABLE = sql.SQL("{}.rollback_position").format(sql.Identifier(CAPTURE_SCHEMA))


def record(legacy: psycopg.Connection[Any], target_snapshot: str) -> None:
    """Record (in one transaction, creating the table if needed) that the reverse replay starts at
    `target_snapshot`, with no event applied yet."""
    with legacy.transaction(), legacy.cursor() as cur:
        cur.execute(sql.SQL(trigger_sql("rollback.sql")))  # type: ignore[arg-type]
        cur.execute(sql.SQL("INSERT INTO {} (id, target_snapshot) VALUES (1, %s) ON CONFLICT (id) DO UPDATE "
                            "SET target_snapshot = excluded.target_snapshot, armed_at = now(), "
                            "events_applied = 0, updated_at = now()").format(_TABLE), (target_snapshot,))


def drop(legacy: psycopg.Connection[Any]) -> None:
    """Remove the position (the rollback window ends)."""
    legacy.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(_TABLE))


def armed(legacy: psycopg.Connection[Any]) -> str | None:
    """The recorded position; None when no rollback is armed (no position table, or no row)."""
    row = legacy.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{CAPTURE_SCHEMA}.rollback_position",)).fetchone()
    if not row or not row[0]:
        return None
    return read(legacy)


def read(legacy: psycopg.Connection[Any]) -> str | None:
    """The recorded position (the table must exist); None when it holds no row."""
    row = legacy.execute(sql.SQL("SELECT target_snapshot FROM {} WHERE id = 1").format(_TABLE)).fetchone()
    return row[0] if row else None


def lock(cur: psycopg.Cursor[Any]) -> str | None:
    """The recorded position, locked (FOR UPDATE) until the batch's transaction ends; None when it vanished."""
    row = cur.execute(sql.SQL("SELECT target_snapshot FROM {} WHERE id = 1 FOR UPDATE").format(_TABLE)).fetchone()
    return row[0] if row else None


def advance(cur: psycopg.Cursor[Any], target_snapshot: str, events: int) -> None:
    """Move the position to `target_snapshot`, counting `events` more applied, in the batch's transaction."""
    cur.execute(sql.SQL("UPDATE {} SET target_snapshot = %s, events_applied = events_applied + %s, "
                        "updated_at = now() WHERE id = 1").format(_TABLE), (target_snapshot, events))
