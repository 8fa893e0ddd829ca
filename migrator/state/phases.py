"""The migration row (when each phase ran, the copy snapshot, the frozen flag) and each captured table's state."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from psycopg import sql
from psycopg.rows import dict_row

from migrator.catalog import Table
from migrator.errors import NotReady
from migrator.state.control import Conn, exists, relation
from migrator.state.flags import cleaned_up

MigrationColumn = Literal["prepared_at", "target_schema_at", "copy_snapshot", "copy_started_at", "copy_finished_at",
                          "post_data_at", "cutover_at", "frozen"]
"""The columns of the migration row a phase sets (`mark`) or clears (`clear`): each phase's time, the copy
snapshot, the frozen flag."""


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
    migration_id: uuid.UUID | None = None
    """Generated with the row; the legacy database's capture names its migration by it. None on a control schema
    not yet upgraded to revision 0005 (the next prepare fills it)."""


def migration(conn: Conn) -> Migration | None:
    if not exists(conn):
        return None
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(sql.SQL("SELECT * FROM {} WHERE id = 1").format(relation("migration")))
        row = cur.fetchone()
    if row is None:
        return None
    row.pop("id")
    return Migration(**row)


def require_prepared(conn: Conn, *, after_cleanup: bool = False) -> Migration:
    """The recorded migration; NotReady, naming what to run, when `prepare` has not run, or when `cleanup` has ended
    it (unless `after_cleanup`: reading both sides, as verify does, still makes sense then). Every command that
    needs the control schema (or the legacy database's capture) asks this first, instead of failing on a missing
    relation."""
    m = migration(conn)
    if m is None or m.prepared_at is None:
        raise NotReady("not prepared: the target has no migration recorded by `migrator prepare`",
                       hint="Run `migrator prepare --yes` first (then `migrator copy`).")
    done = cleaned_up(conn)
    if done is not None and not after_cleanup:
        raise NotReady(f"the migration was cleaned up: capture was removed from the legacy database by "
                       f"`migrator cleanup` at {done:%Y-%m-%d %H:%M:%S} UTC, so changes since are not recorded",
                       hint="Nothing is left to sync, copy, cut over or roll back for this migration. To migrate "
                            "again, point [target] at a new, empty database and start with `migrator prepare`.")
    return m


def start_migration(conn: Conn, source: str) -> None:
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("INSERT INTO {} (id, source) VALUES (1, %s) ON CONFLICT (id) DO NOTHING").format(relation("migration")),
            (source,),
        )


def mark(conn: Conn, column: MigrationColumn, value: Any = None) -> None:
    """Set one column of the migration row (a phase timestamp, the copy snapshot, the frozen flag)."""
    expr = sql.SQL("now()") if value is None else sql.Placeholder()
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("UPDATE {} SET {} = {} WHERE id = 1").format(relation("migration"), sql.Identifier(column), expr),
            () if value is None else (value,),
        )


def clear(conn: Conn, column: MigrationColumn) -> None:
    with conn.cursor() as cur:
        cur.execute(sql.SQL("UPDATE {} SET {} = NULL WHERE id = 1").format(relation("migration"), sql.Identifier(column)))


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
    definition or its key changed, in which case it goes back to pending and is copied again."""
    with conn.cursor() as cur:
        for t in tables:
            cur.execute(
                sql.SQL(
                    "INSERT INTO {} (schema_name, table_name, source_oid, fingerprint, key_columns) "
                    "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (schema_name, table_name) DO UPDATE "
                    "SET source_oid = excluded.source_oid, fingerprint = excluded.fingerprint, "
                    "key_columns = excluded.key_columns, "
                    # A table whose definition or key changed (DDL) is copied again under a snapshot of its own:
                    # the events logged before the change name rows by the old key (or by none).
                    "status = CASE WHEN {t}.fingerprint = excluded.fingerprint AND {t}.key_columns = "
                    "excluded.key_columns THEN {t}.status ELSE 'pending' END, "
                    "copy_snapshot = CASE WHEN {t}.fingerprint = excluded.fingerprint AND {t}.key_columns = "
                    "excluded.key_columns THEN {t}.copy_snapshot END"
                ).format(relation("table_state"), t=relation("table_state")),
                (t.schema, t.name, t.oid, t.fingerprint, list(t.key)),
            )


def tables(conn: Conn) -> list[TableState]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(sql.SQL("SELECT * FROM {} ORDER BY schema_name, table_name").format(relation("table_state")))
        return [TableState(**r) for r in cur.fetchall()]


def set_fingerprint(conn: Conn, table: Table) -> None:
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("UPDATE {} SET fingerprint = %s, source_oid = %s WHERE schema_name = %s AND table_name = %s")
            .format(relation("table_state")),
            (table.fingerprint, table.oid, table.schema, table.name),
        )


def reset_tables(conn: Conn, names: list[tuple[str, str]]) -> None:
    """Send tables back to pending, so the next copy reads them again under a new boundary."""
    with conn.cursor() as cur:
        for schema_name, table_name in names:
            cur.execute(
                sql.SQL("UPDATE {} SET status = 'pending', copy_snapshot = NULL "
                        "WHERE schema_name = %s AND table_name = %s").format(relation("table_state")),
                (schema_name, table_name),
            )


def table_copy_started(conn: Conn, table: Table) -> None:
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("UPDATE {} SET status = 'copying', copy_started_at = now() "
                    "WHERE schema_name = %s AND table_name = %s").format(relation("table_state")),
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
            ).format(relation("table_state")),
            (snapshot, rows, nbytes, table.schema, table.name),
        )
