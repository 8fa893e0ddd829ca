"""The control-state store: the one module that reads and writes the control schema on the target.

Runs, per-table copy progress and boundaries, the applied sync position, cutover attempts and steps, and operator
flags live here, so every phase can be resumed from what is recorded. The schema itself is created and upgraded by
alembic (`upgrade`); the functions below take an open target connection so that callers can write state in the same
transaction as the data it describes (the applied position commits with the changes it covers).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from migrator.catalog import Table
from migrator.config import CONTROL_SCHEMA

Conn = psycopg.Connection[Any]


def _t(name: str) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(CONTROL_SCHEMA), sql.Identifier(name))


def upgrade(conn: Conn) -> None:
    """Create or upgrade the control schema to the newest revision (alembic, on this connection)."""
    from alembic import command
    from alembic.config import Config as AlembicConfig
    from sqlalchemy import create_engine
    from sqlalchemy.pool import StaticPool

    with conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(CONTROL_SCHEMA)))
    conn.commit()
    engine = create_engine("postgresql+psycopg://", creator=lambda: conn, poolclass=StaticPool)
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(Path(__file__).parent))
    with engine.begin() as sa_conn:
        cfg.attributes["connection"] = sa_conn
        command.upgrade(cfg, "heads")
    conn.commit()


def exists(conn: Conn) -> bool:
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{CONTROL_SCHEMA}.migration",))
        row = cur.fetchone()
    return bool(row and row[0])


@dataclass(frozen=True)
class Migration:
    source: str
    created_at: dt.datetime
    prepared_at: dt.datetime | None
    target_schema_at: dt.datetime | None
    copy_snapshot: str | None
    copy_started_at: dt.datetime | None
    copy_finished_at: dt.datetime | None
    post_data_at: dt.datetime | None
    cutover_at: dt.datetime | None
    frozen: bool


def migration(conn: Conn) -> Migration | None:
    if not exists(conn):
        return None
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(sql.SQL("SELECT * FROM {} WHERE id = 1").format(_t("migration")))
        row = cur.fetchone()
    if row is None:
        return None
    row.pop("id")
    return Migration(**row)


def start_migration(conn: Conn, source: str) -> None:
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("INSERT INTO {} (id, source) VALUES (1, %s) ON CONFLICT (id) DO NOTHING").format(_t("migration")),
            (source,),
        )


def mark(conn: Conn, column: str, value: Any = None) -> None:
    """Set one column of the migration row (a phase timestamp, the copy snapshot, the frozen flag)."""
    expr = sql.SQL("now()") if value is None else sql.Placeholder()
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("UPDATE {} SET {} = {} WHERE id = 1").format(_t("migration"), sql.Identifier(column), expr),
            () if value is None else (value,),
        )


def clear(conn: Conn, column: str) -> None:
    with conn.cursor() as cur:
        cur.execute(sql.SQL("UPDATE {} SET {} = NULL WHERE id = 1").format(_t("migration"), sql.Identifier(column)))


# --- tables -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TableState:
    schema_name: str
    table_name: str
    source_oid: int
    fingerprint: str
    key_columns: list[str]
    status: str
    copy_snapshot: str | None
    rows_copied: int | None
    bytes_copied: int | None
    copy_started_at: dt.datetime | None
    copy_finished_at: dt.datetime | None

    @property
    def display(self) -> str:
        return f"{self.schema_name}.{self.table_name}"


def register_tables(conn: Conn, tables: list[Table]) -> None:
    """Record the captured tables as prepared; a table already recorded keeps its copy progress unless its
    definition changed, in which case it goes back to pending and is copied again."""
    with conn.cursor() as cur:
        for t in tables:
            cur.execute(
                sql.SQL(
                    "INSERT INTO {} (schema_name, table_name, source_oid, fingerprint, key_columns) "
                    "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (schema_name, table_name) DO UPDATE "
                    "SET source_oid = excluded.source_oid, fingerprint = excluded.fingerprint, "
                    "key_columns = excluded.key_columns, "
                    # A table whose definition changed (DDL) is copied again under a snapshot of its own.
                    "status = CASE WHEN {t}.fingerprint = excluded.fingerprint THEN {t}.status ELSE 'pending' END, "
                    "copy_snapshot = CASE WHEN {t}.fingerprint = excluded.fingerprint "
                    "THEN {t}.copy_snapshot END"
                ).format(_t("table_state"), t=_t("table_state")),
                (t.schema, t.name, t.oid, t.fingerprint, list(t.key)),
            )


def tables(conn: Conn) -> list[TableState]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(sql.SQL("SELECT * FROM {} ORDER BY schema_name, table_name").format(_t("table_state")))
        return [TableState(**r) for r in cur.fetchall()]


def set_fingerprint(conn: Conn, table: Table) -> None:
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("UPDATE {} SET fingerprint = %s, source_oid = %s WHERE schema_name = %s AND table_name = %s")
            .format(_t("table_state")),
            (table.fingerprint, table.oid, table.schema, table.name),
        )


def reset_tables(conn: Conn, names: list[tuple[str, str]]) -> None:
    """Send tables back to pending, so the next copy reads them again under a new boundary."""
    with conn.cursor() as cur:
        for schema_name, table_name in names:
            cur.execute(
                sql.SQL("UPDATE {} SET status = 'pending', copy_snapshot = NULL "
                        "WHERE schema_name = %s AND table_name = %s").format(_t("table_state")),
                (schema_name, table_name),
            )


def table_copy_started(conn: Conn, table: Table) -> None:
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("UPDATE {} SET status = 'copying', copy_started_at = now() "
                    "WHERE schema_name = %s AND table_name = %s").format(_t("table_state")),
            (table.schema, table.name),
        )


def table_copied(conn: Conn, table: Table, snapshot: str, rows: int, nbytes: int) -> None:
    """Mark a table copied under `snapshot`; call in the transaction that loaded its rows."""
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL(
                "UPDATE {} SET status = 'copied', copy_snapshot = %s, rows_copied = %s, bytes_copied = %s, "
                "copy_started_at = coalesce(copy_started_at, now()), copy_finished_at = clock_timestamp() "
                "WHERE schema_name = %s AND table_name = %s"
            ).format(_t("table_state")),
            (snapshot, rows, nbytes, table.schema, table.name),
        )


# --- sync position ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Position:
    applied_snapshot: str
    events_applied: int
    batches: int
    updated_at: dt.datetime


def position(conn: Conn) -> Position | None:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            sql.SQL("SELECT applied_snapshot, events_applied, batches, updated_at FROM {} WHERE id = 1")
            .format(_t("sync_position"))
        )
        row = cur.fetchone()
    return Position(**row) if row else None


def init_position(conn: Conn, snapshot: str) -> None:
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("INSERT INTO {} (id, applied_snapshot) VALUES (1, %s) ON CONFLICT (id) DO NOTHING")
            .format(_t("sync_position")),
            (snapshot,),
        )


def advance_position(conn: Conn, expected: str, snapshot: str, events: int) -> None:
    """Move the applied position from `expected` to `snapshot`, in the caller's transaction with the changes.

    Fails when another sync moved it meanwhile, so two sync processes can never apply the same batch twice.
    """
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL(
                "UPDATE {} SET applied_snapshot = %s, events_applied = events_applied + %s, "
                "batches = batches + 1, updated_at = clock_timestamp() WHERE id = 1 AND applied_snapshot = %s"
            ).format(_t("sync_position")),
            (snapshot, events, expected),
        )
        if cur.rowcount != 1:
            raise RuntimeError("the sync position moved under this process: another sync is running")


def lock_position(conn: Conn) -> None:
    """Take the row lock that makes one sync process at a time the applier (held until the transaction ends)."""
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT 1 FROM {} WHERE id = 1 FOR UPDATE").format(_t("sync_position")))


# --- flags --------------------------------------------------------------------------------------------------------

def set_flag(conn: Conn, name: str, value: str) -> None:
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("INSERT INTO {} (name, value) VALUES (%s, %s) ON CONFLICT (name) DO UPDATE "
                    "SET value = excluded.value, set_at = now()").format(_t("flag")),
            (name, value),
        )


def clear_flag(conn: Conn, name: str) -> None:
    with conn.cursor() as cur:
        cur.execute(sql.SQL("DELETE FROM {} WHERE name = %s").format(_t("flag")), (name,))


def flag(conn: Conn, name: str) -> str | None:
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT value FROM {} WHERE name = %s").format(_t("flag")), (name,))
        row = cur.fetchone()
    return row[0] if row else None


# --- cutover ------------------------------------------------------------------------------------------------------

def start_attempt(conn: Conn) -> int:
    with conn.cursor() as cur:
        cur.execute(sql.SQL("INSERT INTO {} DEFAULT VALUES RETURNING id").format(_t("cutover_attempt")))
        row = cur.fetchone()
    assert row is not None
    return int(row[0])


def step_started(conn: Conn, attempt: int, step: str) -> None:
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("INSERT INTO {} (attempt_id, step) VALUES (%s, %s) ON CONFLICT (attempt_id, step) DO UPDATE "
                    "SET started_at = clock_timestamp(), status = 'running'").format(_t("cutover_step")),
            (attempt, step),
        )


def step_finished(conn: Conn, attempt: int, step: str, status: str = "done", detail: str | None = None) -> None:
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("UPDATE {} SET finished_at = clock_timestamp(), status = %s, detail = %s "
                    "WHERE attempt_id = %s AND step = %s").format(_t("cutover_step")),
            (status, detail, attempt, step),
        )


def finish_attempt(conn: Conn, attempt: int, status: str, *, failed_step: str | None = None,
                   error: str | None = None, freeze_seconds: float | None = None) -> None:
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("UPDATE {} SET finished_at = clock_timestamp(), status = %s, failed_step = %s, error = %s, "
                    "freeze_seconds = %s WHERE id = %s").format(_t("cutover_attempt")),
            (status, failed_step, error, freeze_seconds, attempt),
        )


def attempts(conn: Conn) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(sql.SQL("SELECT * FROM {} ORDER BY id").format(_t("cutover_attempt")))
        rows = cur.fetchall()
        for r in rows:
            cur.execute(sql.SQL("SELECT step, status, started_at, finished_at, detail FROM {} "
                                "WHERE attempt_id = %s ORDER BY started_at").format(_t("cutover_step")), (r["id"],))
            r["steps"] = cur.fetchall()
    return rows


# --- objects ------------------------------------------------------------------------------------------------------
# Which files `objects sync` has written (or found identical) in the target store: the SHA-256 it proved, and the
# size and modification time the file had then, so that a resumed run skips it without reading it again.

@dataclass(frozen=True)
class ObjectCopy:
    location: str
    size: int
    sha256: bytes
    mtime_ns: int


def objects_copied(conn: Conn) -> dict[str, ObjectCopy]:
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT location, size, sha256, mtime_ns FROM {}").format(_t("object_copy")))
        return {r[0]: ObjectCopy(r[0], int(r[1]), bytes(r[2]), int(r[3])) for r in cur.fetchall()}


def record_objects(conn: Conn, copies: list[ObjectCopy]) -> None:
    if not copies:
        return
    with conn.cursor() as cur:
        cur.executemany(
            sql.SQL("INSERT INTO {} (location, size, sha256, mtime_ns) VALUES (%s, %s, %s, %s) "
                    "ON CONFLICT (location) DO UPDATE SET size = excluded.size, sha256 = excluded.sha256, "
                    "mtime_ns = excluded.mtime_ns, copied_at = now()").format(_t("object_copy")),
            [(c.location, c.size, c.sha256, c.mtime_ns) for c in copies],
        )
