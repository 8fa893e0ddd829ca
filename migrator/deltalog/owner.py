"""The capture's owner row on the legacy database (triggers/owner.sql): which migration the capture serves, as
recorded there. Reading and writing it only; whether a migration may act on the capture is ownership.py's decision.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import psycopg
from psycopg import sql

from migrator.config import CAPTURE_SCHEMA
from migrator.deltalog.triggers import trigger_sql

Conn = psycopg.Connection[Any]
SCHEMA = CAPTURE_SCHEMA
"""The engine's schema on the legacy database, as messages name it."""
_OWNER_TABLE = sql.SQL("{}.migration_owner").format(sql.Identifier(CAPTURE_SCHEMA))


def read(source: Conn) -> tuple[uuid.UUID, str, dt.datetime] | None:
    """The recorded owner (migration id, target as host:port/dbname, when); None when none is recorded."""
    row = source.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{CAPTURE_SCHEMA}.migration_owner",)).fetchone()
    if not row or not row[0]:
        return None
    row = source.execute(sql.SQL("SELECT migration_id, target, created_at FROM {} WHERE id = 1")
                         .format(_OWNER_TABLE)).fetchone()
    return (row[0], row[1], row[2]) if row else None


def record(source: Conn, migration_id: uuid.UUID, target: str) -> None:
    """Record `migration_id` as the owner in one transaction, creating the owner table if needed; an owner already
    recorded stays (only its target's description follows, when it is this migration)."""
    with source.transaction(), source.cursor() as cur:
        cur.execute(sql.SQL(trigger_sql("owner.sql")))  # type: ignore[arg-type]
        # Ours already: the target's description follows the configuration (a renamed host, a new port).
        cur.execute(sql.SQL("INSERT INTO {} AS o (id, migration_id, target) VALUES (1, %s, %s) ON CONFLICT (id) DO "
                            "UPDATE SET target = excluded.target WHERE o.migration_id = excluded.migration_id")
                    .format(_OWNER_TABLE), (migration_id, target))
