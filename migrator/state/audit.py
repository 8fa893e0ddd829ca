"""The audit trail (revision 0010): every operator action, from the console and from the command line, and what the
guardian or a health gate did on their behalf. Append-only (a trigger refuses UPDATE, DELETE and TRUNCATE): an action
is one row when it starts and one when it ends (`of_id` names the first), a refusal one row. And the run's history,
exported by `migrator cleanup` before the control schema may go (the objects quarantine's entries with it).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from migrator.config import CONTROL_SCHEMA
from migrator.state.control import Conn, relation

VIA = ("console", "cli", "guardian", "health")
"""Where an action came from: the web console, the command line, a guardian resolving a dead cutover or rollback,
a health gate after the switch."""
OUTCOMES = ("started", "done", "refused", "failed", "stopped", "interrupted")


@dataclass(frozen=True)
class AuditRow:
    id: int
    at: dt.datetime
    actor: str
    """The operator a console token belongs to; user@host for the command line; "guardian", "health gate"."""
    via: str
    action: str
    arguments: dict[str, Any]
    outcome: str
    detail: str | None = None
    seconds: float | None = None
    host: str | None = None
    pid: int | None = None
    of_id: int | None = None
    """For an outcome row: the row of the action's start."""

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "at": self.at.isoformat(), "actor": self.actor, "via": self.via,
                "action": self.action, "arguments": self.arguments, "outcome": self.outcome, "detail": self.detail,
                "seconds": self.seconds, "host": self.host, "pid": self.pid, "of_id": self.of_id}


def audit_present(conn: Conn) -> bool:
    """Whether the control schema has the audit trail (it is prepared, at revision 0010 or later)."""
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{CONTROL_SCHEMA}.audit",)).fetchone()
    return bool(row and row[0])


def audit_start(conn: Conn, *, actor: str, via: str, action: str, arguments: dict[str, Any],
                host: str | None = None, pid: int | None = None) -> int:
    """Record that an action starts; its id, for `audit_end`. The caller commits before it acts."""
    row = conn.execute(
        sql.SQL("INSERT INTO {} (actor, via, action, arguments, outcome, host, pid) "
                "VALUES (%s, %s, %s, %s, 'started', %s, %s) RETURNING id").format(relation("audit")),
        (actor, via, action, Jsonb(arguments), host, pid)).fetchone()
    assert row is not None
    return int(row[0])


def audit_end(conn: Conn, of_id: int, *, outcome: str, detail: str | None = None,
              seconds: float | None = None, pid: int | None = None) -> int:
    """Record how the action started as `of_id` ended (who, what and where are those of its start)."""
    row = conn.execute(
        sql.SQL("INSERT INTO {a} (of_id, actor, via, action, arguments, outcome, detail, seconds, host, pid) "
                "SELECT id, actor, via, action, '{{}}'::jsonb, %s, %s, %s, host, coalesce(%s, pid) FROM {a} "
                "WHERE id = %s RETURNING id").format(a=relation("audit")),
        (outcome, detail, seconds, pid, of_id)).fetchone()
    if row is None:
        raise LookupError(f"no audit row {of_id}")
    return int(row[0])


def audit_once(conn: Conn, *, actor: str, via: str, action: str, arguments: dict[str, Any], outcome: str,
               detail: str | None = None, seconds: float | None = None, host: str | None = None,
               pid: int | None = None) -> int:
    """One row for an action that is over as it is recorded: a refusal, or what a guardian did."""
    row = conn.execute(
        sql.SQL("INSERT INTO {} (actor, via, action, arguments, outcome, detail, seconds, host, pid) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id").format(relation("audit")),
        (actor, via, action, Jsonb(arguments), outcome, detail, seconds, host, pid)).fetchone()
    assert row is not None
    return int(row[0])


def audit_rows(conn: Conn, *, after: int = 0, limit: int | None = None) -> list[AuditRow]:
    """The trail in the order it was written (rows with an id above `after`; the newest `limit` of them)."""
    if not audit_present(conn):
        return []
    query = sql.SQL("SELECT id, at, actor, via, action, arguments, outcome, detail, seconds, host, pid, of_id "
                    "FROM {} WHERE id > %s ORDER BY id").format(relation("audit"))
    if limit is not None:
        query = sql.SQL("SELECT * FROM ({} DESC LIMIT {}) AS newest ORDER BY id").format(query, sql.Literal(limit))
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query, (after,))
        return [AuditRow(**r) for r in cur.fetchall()]


@dataclass
class History:
    """What the control schema knows of the run, for the file `cleanup` writes: no row values, no passwords."""

    migration: dict[str, Any] = field(default_factory=dict)
    tables: list[dict[str, Any]] = field(default_factory=list)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    overrides: list[dict[str, Any]] = field(default_factory=list)
    last_verify: dict[str, Any] | None = None
    audit: list[dict[str, Any]] = field(default_factory=list)
    lag_by_minute: list[dict[str, Any]] = field(default_factory=list)
    quarantine: list[dict[str, Any]] = field(default_factory=list)
    """Every file objects sync moved to the quarantine (key, location, where, when, emptied by which action)."""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def history(conn: Conn) -> History:
    """The run's history: phases, tables, cutover and rollback attempts with their steps, overrides, the last verify,
    the audit trail, and the lag sampled by sync (by minute: the worst of each)."""
    from migrator.state import cutover_steps, flags, object_copies, operators, phases

    h = History()
    m = phases.migration(conn)
    if m is not None:
        h.migration = {k: str(v) if k == "migration_id" and v is not None else v for k, v in m.__dict__.items()}
    h.tables = [{"table": t.display, "status": t.status, "rows": t.rows_copied, "bytes": t.bytes_copied,
                 "copy_finished_at": t.copy_finished_at} for t in phases.tables(conn)]
    h.attempts = cutover_steps.attempts(conn)
    h.overrides = [o.to_dict() for o in operators.overrides(conn).values()]
    verified = flags.last_verify(conn)
    h.last_verify = verified[0] if verified else None
    h.audit = [r.to_dict() for r in audit_rows(conn)]
    h.quarantine = [e.to_dict() for e in object_copies.quarantine_entries(
        conn, ("moving", "quarantined", "absent", "emptied"))]
    if audit_present(conn):
        with conn.cursor(row_factory=dict_row) as cur:
            cur.execute(sql.SQL("SELECT date_trunc('minute', at) AS minute, max(lag_seconds) AS lag_seconds, "
                                "max(pending_events) AS pending_events, max(log_bytes) AS log_bytes "
                                "FROM {} GROUP BY 1 ORDER BY 1").format(relation("sync_sample")))
            h.lag_by_minute = cur.fetchall()
    return h
