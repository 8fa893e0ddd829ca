"""Cutover and rollback attempts, their steps as each starts and ends, and the pooler entries a cutover rewrote.

The client-visible pause, go/no-go checklist and health gate's verdict of an attempt are recorded with it; the hold
an operator sets on a cutover is a flag (`flags.HOLD_FLAG`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from psycopg import sql
from psycopg.rows import dict_row

from migrator.state.control import Conn, relation


def start_attempt(conn: Conn) -> int:
    with conn.cursor() as cur:
        cur.execute(sql.SQL("INSERT INTO {} DEFAULT VALUES RETURNING id").format(relation("cutover_attempt")))
        row = cur.fetchone()
    assert row is not None
    return int(row[0])


def step_started(conn: Conn, attempt: int, step: str) -> None:
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("INSERT INTO {} (attempt_id, step) VALUES (%s, %s) ON CONFLICT (attempt_id, step) DO UPDATE "
                    "SET started_at = clock_timestamp(), status = 'running'").format(relation("cutover_step")),
            (attempt, step),
        )


def step_finished(conn: Conn, attempt: int, step: str, status: str = "done", detail: str | None = None) -> None:
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("UPDATE {} SET finished_at = clock_timestamp(), status = %s, detail = %s "
                    "WHERE attempt_id = %s AND step = %s").format(relation("cutover_step")),
            (status, detail, attempt, step),
        )


def _has_figures(conn: Conn) -> bool:
    """Whether the control schema has revision 0015's step figures (a migration prepared before it has not, and its
    cutover must not fail for a missing column: the figures are then not kept)."""
    row = conn.execute("SELECT EXISTS (SELECT FROM pg_attribute WHERE attrelid = to_regclass(%s) "
                       "AND attname = 'figures' AND NOT attisdropped)", (relation("cutover_step").as_string(conn),)
                       ).fetchone()
    return bool(row and row[0])


def step_figures(conn: Conn, attempt: int, step: str, figures: dict[str, Any]) -> bool:
    """Keep what a step measured, as data (counts, seconds, table names; never a row value); False when the
    control schema predates them."""
    from psycopg.types.json import Jsonb

    if not _has_figures(conn):
        return False
    with conn.cursor() as cur:
        cur.execute(sql.SQL("UPDATE {} SET figures = %s WHERE attempt_id = %s AND step = %s")
                    .format(relation("cutover_step")), (Jsonb(figures), attempt, step))
    return True


def finish_attempt(conn: Conn, attempt: int, status: str, *, failed_step: str | None = None,
                   error: str | None = None, freeze_seconds: float | None = None) -> None:
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("UPDATE {} SET finished_at = clock_timestamp(), status = %s, failed_step = %s, error = %s, "
                    "freeze_seconds = %s WHERE id = %s").format(relation("cutover_attempt")),
            (status, failed_step, error, freeze_seconds, attempt),
        )


def attempts(conn: Conn) -> list[dict[str, Any]]:
    figures = _has_figures(conn)
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(sql.SQL("SELECT * FROM {} ORDER BY id").format(relation("cutover_attempt")))
        rows = cur.fetchall()
        for r in rows:
            cur.execute(sql.SQL("SELECT step, status, started_at, finished_at, detail{} FROM {} "
                                "WHERE attempt_id = %s ORDER BY started_at").format(
                                    sql.SQL(", figures" if figures else ", NULL AS figures"),
                                    relation("cutover_step")), (r["id"],))
            r["steps"] = cur.fetchall()
    return rows


def record_attempt_pooler(conn: Conn, attempt: int, *, kind: str = "cutover", pause_seconds: float | None = None,
                          checklist: list[dict[str, Any]] | None = None) -> None:
    from psycopg.types.json import Jsonb

    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("UPDATE {} SET kind = %s, pause_seconds = coalesce(%s, pause_seconds), "
                    "checklist = coalesce(%s, checklist) WHERE id = %s").format(relation("cutover_attempt")),
            (kind, pause_seconds, None if checklist is None else Jsonb(checklist), attempt),
        )


def record_health(conn: Conn, attempt: int, health: dict[str, Any]) -> None:
    """The health gate's verdict and figures for a cutover attempt (see migrator/health.py)."""
    from psycopg.types.json import Jsonb

    with conn.cursor() as cur:
        cur.execute(sql.SQL("UPDATE {} SET health = %s WHERE id = %s").format(relation("cutover_attempt")),
                    (Jsonb(health), attempt))


def health_passes(conn: Conn) -> list[tuple[int, Any, dict[str, Any]]]:
    """(attempt, when it finished, the gate's record) of every cutover attempt whose health gate passed with client
    transactions through the switch, oldest first."""
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT id, coalesce(finished_at, started_at), health FROM {} WHERE kind = 'cutover' "
                            "AND health->>'verdict' = 'pass' AND (health->>'client_transactions')::bigint > 0 "
                            "ORDER BY id").format(relation("cutover_attempt")))
        return [(int(r[0]), r[1], r[2]) for r in cur.fetchall()]


@dataclass(frozen=True)
class PoolerEntry:
    name: str
    ini_path: str
    legacy_entry: str
    target_entry: str
    pointing: str


def save_pooler_entry(conn: Conn, attempt: int, entry: PoolerEntry) -> None:
    """Record an entry before the file is rewritten (the legacy entry is kept from the first cutover on)."""
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("INSERT INTO {} (name, ini_path, legacy_entry, target_entry, pointing, attempt_id) "
                    "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (name) DO UPDATE SET ini_path = excluded.ini_path, "
                    "target_entry = excluded.target_entry, pointing = excluded.pointing, "
                    "attempt_id = excluded.attempt_id, updated_at = now()").format(relation("pooler_entry")),
            (entry.name, entry.ini_path, entry.legacy_entry, entry.target_entry, entry.pointing, attempt),
        )


def pooler_entries(conn: Conn) -> dict[str, PoolerEntry]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(sql.SQL("SELECT name, ini_path, legacy_entry, target_entry, pointing FROM {}")
                    .format(relation("pooler_entry")))
        return {r["name"]: PoolerEntry(**r) for r in cur.fetchall()}


def set_pointing(conn: Conn, names: list[str], pointing: str) -> None:
    with conn.cursor() as cur:
        cur.execute(sql.SQL("UPDATE {} SET pointing = %s, updated_at = now() WHERE name = ANY(%s)")
                    .format(relation("pooler_entry")), (pointing, names))
