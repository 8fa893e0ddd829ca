"""What sync saw every few seconds (revision 0010): the lag, the pending events per table and the delta log's size on
the legacy database. The console charts them and reads them instead of asking the legacy database; the rehearsal
report summarises them. Kept `[sync] sample_days` days: older samples go as new ones come."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from migrator.state.audit import audit_present
from migrator.state.control import Conn, relation


@dataclass(frozen=True)
class SyncSample:
    at: dt.datetime
    lag_seconds: float | None
    """Age of the oldest committed change not yet applied; None when nothing is pending."""
    pending_events: int
    log_bytes: int | None
    events_applied: int = 0
    """The applied position's running count of events, at the sample."""
    per_table: dict[str, int] = field(default_factory=dict)
    """schema.table -> pending events (tables with none left out)."""

    def to_dict(self) -> dict[str, Any]:
        return {"at": self.at.isoformat(), "lag_seconds": self.lag_seconds, "pending_events": self.pending_events,
                "log_bytes": self.log_bytes, "events_applied": self.events_applied, "per_table": self.per_table}


def record_sample(conn: Conn, *, lag_seconds: float | None, pending_events: int, log_bytes: int | None,
                  events_applied: int, per_table: dict[str, int], keep_days: float) -> None:
    """Add a sample and delete those older than `keep_days`; the caller commits."""
    conn.execute(sql.SQL("INSERT INTO {} (lag_seconds, pending_events, log_bytes, events_applied, per_table) "
                         "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (at) DO NOTHING").format(relation("sync_sample")),
                 (lag_seconds, pending_events, log_bytes, events_applied, Jsonb(per_table)))
    conn.execute(sql.SQL("DELETE FROM {} WHERE at < clock_timestamp() - make_interval(secs => %s)")
                 .format(relation("sync_sample")), (keep_days * 86400.0,))


def samples(conn: Conn, *, since: dt.datetime | None = None, limit: int = 10_000) -> list[SyncSample]:
    """The samples after `since` (all kept, without), oldest first; at most the newest `limit`."""
    if not audit_present(conn):  # the revision that made both tables
        return []
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(sql.SQL("SELECT * FROM (SELECT at, lag_seconds, pending_events, log_bytes, events_applied, "
                            "per_table FROM {} WHERE at > coalesce(%s, '-infinity'::timestamptz) "
                            "ORDER BY at DESC LIMIT %s) AS newest ORDER BY at").format(relation("sync_sample")),
                    (since, limit))
        return [SyncSample(**r) for r in cur.fetchall()]
