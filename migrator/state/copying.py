"""The running copy (its exported snapshot, importable while the coordinator lives), each table's chunks (heap block
or key ranges) with the snapshot each was read under, and what each worker is loading now (revisions 0002, 0016)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from psycopg import sql
from psycopg.rows import dict_row

from migrator.state.control import Conn, relation


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
    blocks: bool = False
    """The bounds are heap block numbers (ctid ranges), not key values."""
    relfilenode: int | None = None
    """For block chunks: the table's file on the source when planned (a rewrite moves rows between blocks)."""

    @property
    def display(self) -> str:
        return f"{self.schema_name}.{self.table_name}"


def copy_run(conn: Conn) -> CopyRun | None:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(sql.SQL("SELECT * FROM {} WHERE id = 1").format(relation("copy_run")))
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
                    "max_rate = excluded.max_rate, started_at = now(), finished_at = NULL").format(relation("copy_run")),
            (snapshot_id, snapshot, coordinator, max_rate),
        )


def copy_heartbeat(conn: Conn) -> None:
    with conn.cursor() as cur:
        cur.execute(sql.SQL("UPDATE {} SET heartbeat_at = now() WHERE id = 1").format(relation("copy_run")))


def finish_copy_run(conn: Conn) -> None:
    """The snapshot is no longer importable: workers that still wait for chunks stop."""
    with conn.cursor() as cur:
        cur.execute(sql.SQL("UPDATE {} SET finished_at = now(), snapshot_id = NULL WHERE id = 1").format(relation("copy_run")))


def chunks(conn: Conn) -> list[Chunk]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(sql.SQL("SELECT * FROM {} ORDER BY schema_name, table_name, chunk_no").format(relation("copy_chunk")))
        return [Chunk(**r) for r in cur.fetchall()]


def plan_chunks(conn: Conn, schema_name: str, table_name: str,
                ranges: list[tuple[list[str] | None, list[str] | None, int]], *, relfilenode: int | None = None) -> None:
    """Record a table's ranges [lower, upper) (None: unbounded) with their estimated sizes, all pending: key ranges,
    or heap block ranges when `relfilenode` (the table's file on the source, as planned) is given."""
    with conn.cursor() as cur:
        cur.executemany(
            sql.SQL("INSERT INTO {} (schema_name, table_name, chunk_no, lower_bound, upper_bound, est_bytes, blocks, "
                    "relfilenode) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)").format(relation("copy_chunk")),
            [(schema_name, table_name, i, lo, hi, size, relfilenode is not None, relfilenode)
             for i, (lo, hi, size) in enumerate(ranges)],
        )


def reset_chunks(conn: Conn, names: list[tuple[str, str]]) -> None:
    """Forget the chunks of tables sent back to pending; the next copy plans them again."""
    with conn.cursor() as cur:
        for schema_name, table_name in names:
            cur.execute(sql.SQL("DELETE FROM {} WHERE schema_name = %s AND table_name = %s").format(relation("copy_chunk")),
                        (schema_name, table_name))


def claim_chunk(conn: Conn) -> Chunk | None:
    """Lock the next pending chunk nobody holds, in the caller's transaction (the one that loads it): the largest
    table's first, in order, then the next table's. A table's post-data starts when its last chunk is in, and the
    largest table's (its index builds, its foreign keys' checks) is the longest: started first, it runs while the
    smaller tables still copy, rather than after them (measured against the order by chunk size in bench/README.md).

    The row lock is the claim: a worker that dies releases it with its transaction, and the chunk is pending again.
    """
    with conn.cursor(row_factory=dict_row) as cur:
        # The tables' sizes summed once per claim (one pass over the chunks, as the sort itself takes).
        cur.execute(sql.SQL("SELECT c.* FROM {t} c JOIN (SELECT schema_name, table_name, sum(est_bytes) AS size "
                            "FROM {t} GROUP BY 1, 2) s USING (schema_name, table_name) WHERE c.status = 'pending' "
                            "ORDER BY s.size DESC, c.schema_name, c.table_name, c.chunk_no LIMIT 1 "
                            "FOR UPDATE OF c SKIP LOCKED").format(t=relation("copy_chunk")))
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
                    "WHERE schema_name = %s AND table_name = %s AND chunk_no = %s").format(relation("copy_chunk")),
            (snapshot, rows, nbytes, worker, started_at, chunk.schema_name, chunk.table_name, chunk.chunk_no),
        )
        # Two workers finishing a table's last two chunks at once: the row lock orders them, and the second's next
        # statement (read committed) sees the first's chunk committed.
        cur.execute(sql.SQL("SELECT 1 FROM {} WHERE schema_name = %s AND table_name = %s FOR UPDATE")
                    .format(relation("table_state")), (chunk.schema_name, chunk.table_name))
        cur.execute(
            sql.SQL("SELECT count(*) FILTER (WHERE status <> 'copied'), count(DISTINCT snapshot), min(snapshot), "
                    "sum(rows_copied), sum(bytes_copied), min(copy_started_at) FROM {} "
                    "WHERE schema_name = %s AND table_name = %s").format(relation("copy_chunk")),
            (chunk.schema_name, chunk.table_name),
        )
        row = cur.fetchone()
        assert row is not None
        pending, snapshots, one_snapshot, total_rows, total_bytes, first_started = row
        if pending:
            cur.execute(sql.SQL("UPDATE {} SET status = 'copying', copy_started_at = coalesce(copy_started_at, %s) "
                                "WHERE schema_name = %s AND table_name = %s").format(relation("table_state")),
                        (first_started, chunk.schema_name, chunk.table_name))
            return False
        cur.execute(
            sql.SQL("UPDATE {} SET status = 'copied', copy_snapshot = %s, rows_copied = %s, bytes_copied = %s, "
                    "copy_started_at = %s, copy_finished_at = clock_timestamp() "
                    "WHERE schema_name = %s AND table_name = %s").format(relation("table_state")),
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
            .format(relation("copy_worker")),
            (worker, chunk.schema_name if chunk else None, chunk.table_name if chunk else None,
             chunk.chunk_no if chunk else None, rows, nbytes),
        )


def worker_gone(conn: Conn, worker: str) -> None:
    with conn.cursor() as cur:
        cur.execute(sql.SQL("DELETE FROM {} WHERE worker = %s").format(relation("copy_worker")), (worker,))


def copy_workers(conn: Conn, fresh_seconds: float = 10.0) -> list[dict[str, Any]]:
    """Workers that reported within `fresh_seconds`, with the chunk they load and how far they are."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(sql.SQL("SELECT * FROM {} WHERE updated_at > now() - make_interval(secs => %s) ORDER BY worker")
                    .format(relation("copy_worker")), (fresh_seconds,))
        return cur.fetchall()
