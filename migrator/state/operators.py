"""Who acts, and the blockers an operator accepted by name at prepare (revision 0006)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from psycopg import sql
from psycopg.rows import dict_row

from migrator.config import CONTROL_SCHEMA
from migrator.state.control import Conn, relation


def operator() -> str:
    """Who an operator's action is recorded as: the operating-system user running migrator, on which host (a
    container's uid without a name still says who)."""
    import getpass
    import os
    import socket

    try:
        user = getpass.getuser()
    except (OSError, KeyError):
        user = f"uid {os.getuid()}"
    return f"{user}@{socket.gethostname()}"


# --- blocker overrides --------------------------------------------------------------------------------------------
# Blockers the operator accepted by name at prepare (revision 0006): what the blocker said, who, when.

@dataclass(frozen=True)
class Override:
    name: str
    detail: str
    os_user: str
    db_role: str
    overridden_at: dt.datetime

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "detail": self.detail, "os_user": self.os_user, "db_role": self.db_role,
                "overridden_at": self.overridden_at.isoformat()}


def record_override(conn: Conn, name: str, detail: str, os_user: str, db_role: str) -> None:
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("INSERT INTO {} (name, detail, os_user, db_role) VALUES (%s, %s, %s, %s) ON CONFLICT (name) "
                    "DO UPDATE SET detail = excluded.detail, os_user = excluded.os_user, db_role = excluded.db_role, "
                    "overridden_at = now()").format(relation("blocker_override")),
            (name, detail, os_user, db_role),
        )


def overrides(conn: Conn) -> dict[str, Override]:
    """The recorded overrides by blocker name; empty before prepare."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL AS present", (f"{CONTROL_SCHEMA}.blocker_override",))
        row = cur.fetchone()
        if not row or not row["present"]:
            return {}
        cur.execute(sql.SQL("SELECT name, detail, os_user, db_role, overridden_at FROM {} ORDER BY name")
                    .format(relation("blocker_override")))
        return {r["name"]: Override(**r) for r in cur.fetchall()}
