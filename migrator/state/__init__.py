"""The control-state store: the one module that reads and writes the control schema on the target.

Runs, per-table copy progress and boundaries, the applied sync position, cutover attempts and steps, and operator
flags live here, so every phase can be resumed from what is recorded. The schema itself is created and upgraded by
alembic (`upgrade`); the functions below take an open target connection so that callers can write state in the same
transaction as the data it describes (the applied position commits with the changes it covers).
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from migrator.catalog import Table
from migrator.config import CONTROL_SCHEMA
from migrator.errors import NotReady

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
    migration_id: uuid.UUID | None = None
    """Generated with the row; the legacy database's capture names its migration by it. None on a control schema
    not yet upgraded to revision 0005 (the next prepare fills it)."""


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


CLEANUP_FLAG = "cleanup.done"
"""Set by `migrator cleanup` when it removes capture from the legacy database: the migration is over."""


def record_cleanup(conn: Conn) -> None:
    """Record the first cleanup (a second one keeps its time: that is when changes stopped being recorded)."""
    with conn.cursor() as cur:
        cur.execute(sql.SQL("INSERT INTO {} (name, value) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING")
                    .format(_t("flag")), (CLEANUP_FLAG, "capture removed from the legacy database"))


def cleaned_up(conn: Conn) -> dt.datetime | None:
    """When `migrator cleanup` removed capture from the legacy database, or None."""
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT set_at FROM {} WHERE name = %s").format(_t("flag")), (CLEANUP_FLAG,))
        row = cur.fetchone()
    return row[0] if row else None


def flag(conn: Conn, name: str) -> str | None:
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT value FROM {} WHERE name = %s").format(_t("flag")), (name,))
        row = cur.fetchone()
    return row[0] if row else None


# --- who acts ------------------------------------------------------------------------------------------------------

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
                    "overridden_at = now()").format(_t("blocker_override")),
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
                    .format(_t("blocker_override")))
        return {r["name"]: Override(**r) for r in cur.fetchall()}


# --- the key secret -----------------------------------------------------------------------------------------------

def key_secret(conn: Conn) -> bytes | None:
    """The migration's secret for keyed hashes of key values (`redaction.KeyMask`): 32 random bytes, made on first
    use and kept here, on the target, never on the legacy database. None when the control schema predates it (the
    next `prepare` adds it). The caller commits."""
    import secrets

    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{CONTROL_SCHEMA}.key_secret",))
        row = cur.fetchone()
        if not (row and row[0]):
            return None
        cur.execute(sql.SQL("SELECT secret FROM {} WHERE id = 1").format(_t("key_secret")))
        row = cur.fetchone()
        if row is None:
            # A concurrent first use may have made it meanwhile: keep theirs, so the migration has one secret.
            cur.execute(sql.SQL("INSERT INTO {} (id, secret) VALUES (1, %s) ON CONFLICT (id) DO UPDATE "
                                "SET id = excluded.id RETURNING secret").format(_t("key_secret")),
                        (secrets.token_bytes(32),))
            row = cur.fetchone()
    assert row is not None
    return bytes(row[0])


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


# --- copy chunks --------------------------------------------------------------------------------------------------
# The running copy (its exported snapshot, importable while the coordinator lives), each table's key-range chunks
# with the snapshot each was read under, and what each worker is loading now (revision 0002).

@dataclass(frozen=True)
class CopyRun:
    snapshot_id: str | None
    snapshot: str | None
    coordinator: str | None
    heartbeat_at: dt.datetime | None
    max_rate: float | None
    started_at: dt.datetime
    finished_at: dt.datetime | None


@dataclass(frozen=True)
class Chunk:
    schema_name: str
    table_name: str
    chunk_no: int
    lower_bound: list[str] | None
    upper_bound: list[str] | None
    est_bytes: int
    status: str
    snapshot: str | None
    rows_copied: int | None
    bytes_copied: int | None
    worker: str | None
    copy_started_at: dt.datetime | None
    copy_finished_at: dt.datetime | None

    @property
    def display(self) -> str:
        return f"{self.schema_name}.{self.table_name}"


def copy_run(conn: Conn) -> CopyRun | None:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(sql.SQL("SELECT * FROM {} WHERE id = 1").format(_t("copy_run")))
        row = cur.fetchone()
    if row is None:
        return None
    row.pop("id")
    return CopyRun(**row)


def start_copy_run(conn: Conn, snapshot_id: str, snapshot: str, coordinator: str, max_rate: float | None) -> None:
    """Publish the coordinator's exported snapshot: from this commit on, workers import it to read chunks."""
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("INSERT INTO {} (id, snapshot_id, snapshot, coordinator, heartbeat_at, max_rate) "
                    "VALUES (1, %s, %s, %s, now(), %s) ON CONFLICT (id) DO UPDATE SET snapshot_id = excluded.snapshot_id, "
                    "snapshot = excluded.snapshot, coordinator = excluded.coordinator, heartbeat_at = now(), "
                    "max_rate = excluded.max_rate, started_at = now(), finished_at = NULL").format(_t("copy_run")),
            (snapshot_id, snapshot, coordinator, max_rate),
        )


def copy_heartbeat(conn: Conn) -> None:
    with conn.cursor() as cur:
        cur.execute(sql.SQL("UPDATE {} SET heartbeat_at = now() WHERE id = 1").format(_t("copy_run")))


def finish_copy_run(conn: Conn) -> None:
    """The snapshot is no longer importable: workers that still wait for chunks stop."""
    with conn.cursor() as cur:
        cur.execute(sql.SQL("UPDATE {} SET finished_at = now(), snapshot_id = NULL WHERE id = 1").format(_t("copy_run")))


def chunks(conn: Conn) -> list[Chunk]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(sql.SQL("SELECT * FROM {} ORDER BY schema_name, table_name, chunk_no").format(_t("copy_chunk")))
        return [Chunk(**r) for r in cur.fetchall()]


def plan_chunks(conn: Conn, schema_name: str, table_name: str,
                ranges: list[tuple[list[str] | None, list[str] | None, int]]) -> None:
    """Record a table's key ranges [lower, upper) (None: unbounded) with their estimated sizes, all pending."""
    with conn.cursor() as cur:
        cur.executemany(
            sql.SQL("INSERT INTO {} (schema_name, table_name, chunk_no, lower_bound, upper_bound, est_bytes) "
                    "VALUES (%s, %s, %s, %s, %s, %s)").format(_t("copy_chunk")),
            [(schema_name, table_name, i, lo, hi, size) for i, (lo, hi, size) in enumerate(ranges)],
        )


def reset_chunks(conn: Conn, names: list[tuple[str, str]]) -> None:
    """Forget the chunks of tables sent back to pending; the next copy plans them again."""
    with conn.cursor() as cur:
        for schema_name, table_name in names:
            cur.execute(sql.SQL("DELETE FROM {} WHERE schema_name = %s AND table_name = %s").format(_t("copy_chunk")),
                        (schema_name, table_name))


def claim_chunk(conn: Conn) -> Chunk | None:
    """Lock the largest pending chunk nobody holds, in the caller's transaction (the one that loads it).

    The row lock is the claim: a worker that dies releases it with its transaction, and the chunk is pending again.
    """
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(sql.SQL("SELECT * FROM {} WHERE status = 'pending' ORDER BY est_bytes DESC, schema_name, "
                            "table_name, chunk_no LIMIT 1 FOR UPDATE SKIP LOCKED").format(_t("copy_chunk")))
        row = cur.fetchone()
    return Chunk(**row) if row else None


def chunk_copied(conn: Conn, chunk: Chunk, snapshot: str, rows: int, nbytes: int, worker: str,
                 started_at: dt.datetime) -> bool:
    """Mark a chunk copied under `snapshot`, in the transaction that loaded its rows; True when it was the table's
    last. The table then becomes copied, with the snapshot its chunks share (NULL when they were read under
    different ones, which only a table with a key can be: replay replaces the rows of the keys a batch touched with
    the source's rows in the batch snapshot, which contains every chunk's)."""
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("UPDATE {} SET status = 'copied', snapshot = %s, rows_copied = %s, bytes_copied = %s, worker = %s, "
                    "copy_started_at = %s, copy_finished_at = clock_timestamp() "
                    "WHERE schema_name = %s AND table_name = %s AND chunk_no = %s").format(_t("copy_chunk")),
            (snapshot, rows, nbytes, worker, started_at, chunk.schema_name, chunk.table_name, chunk.chunk_no),
        )
        # Two workers finishing a table's last two chunks at once: the row lock orders them, and the second's next
        # statement (read committed) sees the first's chunk committed.
        cur.execute(sql.SQL("SELECT 1 FROM {} WHERE schema_name = %s AND table_name = %s FOR UPDATE")
                    .format(_t("table_state")), (chunk.schema_name, chunk.table_name))
        cur.execute(
            sql.SQL("SELECT count(*) FILTER (WHERE status <> 'copied'), count(DISTINCT snapshot), min(snapshot), "
                    "sum(rows_copied), sum(bytes_copied), min(copy_started_at) FROM {} "
                    "WHERE schema_name = %s AND table_name = %s").format(_t("copy_chunk")),
            (chunk.schema_name, chunk.table_name),
        )
        row = cur.fetchone()
        assert row is not None
        pending, snapshots, one_snapshot, total_rows, total_bytes, first_started = row
        if pending:
            cur.execute(sql.SQL("UPDATE {} SET status = 'copying', copy_started_at = coalesce(copy_started_at, %s) "
                                "WHERE schema_name = %s AND table_name = %s").format(_t("table_state")),
                        (first_started, chunk.schema_name, chunk.table_name))
            return False
        cur.execute(
            sql.SQL("UPDATE {} SET status = 'copied', copy_snapshot = %s, rows_copied = %s, bytes_copied = %s, "
                    "copy_started_at = %s, copy_finished_at = clock_timestamp() "
                    "WHERE schema_name = %s AND table_name = %s").format(_t("table_state")),
            (one_snapshot if snapshots == 1 else None, total_rows, total_bytes, first_started,
             chunk.schema_name, chunk.table_name),
        )
    return True


def worker_progress(conn: Conn, worker: str, chunk: Chunk | None, rows: int, nbytes: int) -> None:
    """What a worker is loading now (autocommit connection: the load's own transaction holds the chunk's lock)."""
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("INSERT INTO {} AS w (worker, schema_name, table_name, chunk_no, rows_done, bytes_done) "
                    "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (worker) DO UPDATE SET schema_name = excluded.schema_name, "
                    "table_name = excluded.table_name, chunk_no = excluded.chunk_no, rows_done = excluded.rows_done, "
                    "bytes_done = excluded.bytes_done, updated_at = now(), started_at = CASE WHEN "
                    "(w.schema_name, w.table_name, w.chunk_no) IS NOT DISTINCT FROM "
                    "(excluded.schema_name, excluded.table_name, excluded.chunk_no) THEN w.started_at ELSE now() END")
            .format(_t("copy_worker")),
            (worker, chunk.schema_name if chunk else None, chunk.table_name if chunk else None,
             chunk.chunk_no if chunk else None, rows, nbytes),
        )


def worker_gone(conn: Conn, worker: str) -> None:
    with conn.cursor() as cur:
        cur.execute(sql.SQL("DELETE FROM {} WHERE worker = %s").format(_t("copy_worker")), (worker,))


def copy_workers(conn: Conn, fresh_seconds: float = 10.0) -> list[dict[str, Any]]:
    """Workers that reported within `fresh_seconds`, with the chunk they load and how far they are."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(sql.SQL("SELECT * FROM {} WHERE updated_at > now() - make_interval(secs => %s) ORDER BY worker")
                    .format(_t("copy_worker")), (fresh_seconds,))
        return cur.fetchall()


# --- cutover through a pooler -------------------------------------------------------------------------------------
# The client-visible pause and go/no-go checklist of an attempt, and the pooler entries a cutover rewrote. The hold
# flag (HOLD_FLAG) is an operator flag: a cutover waits at the go/no-go point while it is set.

HOLD_FLAG = "cutover.hold"
VERIFY_FLAG = "verify.last"
"""JSON {"identical": bool, "differences": n, "not_verified": n, "started_at": iso}, written by whoever records a
verify of every table (record_verify)."""


def record_attempt_pooler(conn: Conn, attempt: int, *, kind: str = "cutover", pause_seconds: float | None = None,
                          checklist: list[dict[str, Any]] | None = None) -> None:
    from psycopg.types.json import Jsonb

    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("UPDATE {} SET kind = %s, pause_seconds = coalesce(%s, pause_seconds), "
                    "checklist = coalesce(%s, checklist) WHERE id = %s").format(_t("cutover_attempt")),
            (kind, pause_seconds, None if checklist is None else Jsonb(checklist), attempt),
        )


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
                    "attempt_id = excluded.attempt_id, updated_at = now()").format(_t("pooler_entry")),
            (entry.name, entry.ini_path, entry.legacy_entry, entry.target_entry, entry.pointing, attempt),
        )


def pooler_entries(conn: Conn) -> dict[str, PoolerEntry]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(sql.SQL("SELECT name, ini_path, legacy_entry, target_entry, pointing FROM {}")
                    .format(_t("pooler_entry")))
        return {r["name"]: PoolerEntry(**r) for r in cur.fetchall()}


def set_pointing(conn: Conn, names: list[str], pointing: str) -> None:
    with conn.cursor() as cur:
        cur.execute(sql.SQL("UPDATE {} SET pointing = %s, updated_at = now() WHERE name = ANY(%s)")
                    .format(_t("pooler_entry")), (pointing, names))


def record_verify(conn: Conn, identical: bool, differences: int, started_at: dt.datetime | None = None, *,
                  not_verified: int = 0) -> None:
    """Remember the outcome of a verify of every table, for the cutover's go/no-go checklist (`not_verified`: tables
    it could not compare, which make it not identical); `started_at` (the target's clock when it began) is what the
    checklist compares with later events, since rows compared early in a long verify say nothing about a re-copy or a
    rollback that happened while it ran."""
    import json

    set_flag(conn, VERIFY_FLAG, json.dumps({"identical": identical and not not_verified, "differences": differences,
                                            "not_verified": not_verified,
                                            "started_at": started_at.isoformat() if started_at else None}))


def last_verify(conn: Conn) -> tuple[dict[str, Any], dt.datetime] | None:
    """The last recorded verify and when it started (when it was recorded, for one that did not say)."""
    import json

    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT value, set_at FROM {} WHERE name = %s").format(_t("flag")), (VERIFY_FLAG,))
        row = cur.fetchone()
    if row is None:
        return None
    found = json.loads(row[0])
    started = found.get("started_at")
    return found, dt.datetime.fromisoformat(started) if started else row[1]
