"""The bulk copy: every captured table, in key-range chunks, from a consistent snapshot of the source into the target.

A coordinator (`migrator copy`) opens a transaction on the source, exports its snapshot (pg_export_snapshot) and
publishes it in the control schema (`copy_run`), splits each large table with a key into key ranges at sampled key
values (text and UUID keys as well as integers), and starts worker processes. Each worker (also `migrator copy
--worker` on other hosts) claims the largest pending chunk with a row lock (SKIP LOCKED) in a target transaction,
imports the snapshot, and streams `COPY (SELECT ... WHERE key in range) TO STDOUT (FORMAT binary)` straight into
`COPY ... FROM STDIN` through libpq: no rows in Python, no temporary files, a few hundred kilobytes of buffer. The
same target transaction records the chunk copied with the snapshot it was read under (its *boundary*); a worker
that dies releases its claim with its transaction.

The boundary is kept per chunk. Normally every chunk shares the coordinator's snapshot and the table records it.
After a kill -9 the finished chunks are kept and the rest are read under a new coordinator's snapshot; such a
table records no single snapshot, and replay judges each change by the snapshot of the chunk holding the key of
each row image (an update that moves a key is a delete judged by the old key's chunk and an insert judged by the new
key's). Tables without a key are copied whole, in one chunk.

After the data, the schema's post-data (indexes, constraints, foreign keys, the application's triggers) is restored
with parallel jobs, tolerating items a killed earlier run already created; then the tables are analyzed in
parallel. Operators throttle (`max_rate`, MB/s over all workers) and pause it (`pause`/`resume`, a flag in the
control schema every worker reads each second).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import pq, sql

from migrator import catalog, db, schema, state
from migrator import log as log_mod
from migrator.catalog import Table
from migrator.config import Config
from migrator.deltalog import freeze
from migrator.errors import CopyError, MigratorError, NotReady
from migrator.log import get
from migrator.redaction import KeyMask, database_error, scrub

_BUFFER = 256 * 1024
"""Bytes gathered from the source's per-row COPY messages before one write to the target."""
_REPORT_EVERY = 1.0
"""Seconds between a worker's progress reports, pause checks and throttle adjustments."""
_REFUSED_HINT = ("Fix what the target refused (named above: a constraint, a column's type or size), then run "
                 "`migrator copy` again: chunks already copied are kept and this one is copied again.")


@dataclass(frozen=True)
class TableCopy:
    table: str
    rows: int
    bytes: int
    seconds: float
    chunks: int = 1


@dataclass
class CopyResult:
    snapshot: str | None
    copied: list[TableCopy] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    post_data_seconds: float = 0.0
    analyze_seconds: float = 0.0

    @property
    def rows(self) -> int:
        return sum(c.rows for c in self.copied)

    @property
    def bytes(self) -> int:
        return sum(c.bytes for c in self.copied)

    def to_dict(self) -> dict[str, Any]:
        return {
            "snapshot": self.snapshot, "seconds": round(self.seconds, 3), "rows": self.rows, "bytes": self.bytes,
            "post_data_seconds": round(self.post_data_seconds, 3), "analyze_seconds": round(self.analyze_seconds, 3),
            "tables": [c.__dict__ for c in self.copied], "already_copied": self.skipped,
        }

    def render_text(self) -> str:
        return (f"copied {len(self.copied)} tables ({self.rows} rows, {self.bytes / 1e6:.1f} MB) in "
                f"{self.seconds:.1f}s (post-data {self.post_data_seconds:.1f}s); {len(self.skipped)} already copied")


@dataclass(frozen=True)
class CopyControl:
    """What `copy --pause` or `copy --resume` asked of the running copy."""

    paused: bool

    def to_dict(self) -> dict[str, Any]:
        return {"paused": self.paused}

    def render_text(self) -> str:
        return "copy paused: workers stop reading within seconds" if self.paused else "copy resumed"


@dataclass(frozen=True)
class WorkerResult:
    """What `copy --worker` did: the chunks it copied before none was left."""

    chunks: int

    def to_dict(self) -> dict[str, Any]:
        return {"chunks": self.chunks}

    def render_text(self) -> str:
        return f"worker done: copied {self.chunks} chunks"


Progress = Callable[[str, int, int], None]
"""progress(table, rows_so_far, bytes_so_far); rows is -1 while a table is still loading."""
Overall = Callable[[int, int], None]
"""overall(done, total): estimated source bytes of the run's chunks copied so far (in-flight ones in part), of all."""
_LOG_PROGRESS_EVERY = 10.0
"""Seconds between the coordinator's `copy.progress` log events (percentage done, estimated time left)."""
STOP_WORKERS_WITHIN = 5.0
"""Seconds local workers get to end after the coordinator is interrupted, before they are killed."""


# --- planning -----------------------------------------------------------------------------------------------------

def _key_text(table: Table) -> sql.Composable:
    return sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(k)) for k in table.key)


def plan(cur: psycopg.Cursor[Any], table: Table, chunk_bytes: int) -> list[tuple[list[str] | None,
                                                                                  list[str] | None, int]]:
    """Key ranges [lower, upper) of about `chunk_bytes` each, at key values sampled from the table (any key type:
    the bounds are the keys' text forms, compared on the source as the key's own type and collation)."""
    if not table.key or table.bytes < 2 * chunk_bytes or table.est_rows < 1000:
        return [(None, None, table.bytes)]
    n = min(math.ceil(table.bytes / chunk_bytes), 256)
    # About 200 sampled keys per chunk; SYSTEM sampling reads whole pages, so it costs a fraction of a scan.
    percent = min(100.0, max(0.01, 100.0 * 200 * n / table.est_rows))
    # ORDER BY names the columns through the table's alias: unqualified, "id" would be the output column, the key's
    # text form, and integer bounds sorted as text ('11533' < '2540') would make chunks overlap.
    cur.execute(sql.SQL("SELECT {} FROM ONLY {} AS t TABLESAMPLE SYSTEM ({}) ORDER BY {}").format(
        _key_text(table), table.ident, sql.Literal(percent),
        sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(k)) for k in table.key)))
    sample = [list(r) for r in cur.fetchall()]
    bounds: list[list[str]] = []
    for i in range(1, n):
        b = sample[len(sample) * i // n] if sample else None
        if b is not None and (not bounds or b != bounds[-1]):
            bounds.append(b)
    if not bounds:
        return [(None, None, table.bytes)]
    edges: list[list[str] | None] = [None, *bounds, None]
    size = table.bytes // (len(edges) - 1)
    return [(edges[i], edges[i + 1], size) for i in range(len(edges) - 1)]


def _range(table: Table, lower: list[str] | None, upper: list[str] | None) -> sql.Composable:
    """WHERE clause of a key range, with the bounds cast to the key columns' types."""
    types = {c.name: c.type for c in table.columns}

    def row(values: list[str]) -> sql.Composable:
        # The type names come from format_type() on the source's catalog, which quotes what needs quoting.
        return sql.SQL("ROW({})").format(sql.SQL(", ").join(
            sql.SQL("{}::{}").format(sql.Literal(v), sql.SQL(types[k])) for k, v in zip(table.key, values, strict=True)))

    keys = sql.SQL("ROW({})").format(sql.SQL(", ").join(sql.Identifier(k) for k in table.key))
    parts: list[sql.Composable] = []
    if lower is not None:
        parts.append(sql.SQL("{} >= {}").format(keys, row(lower)))
    if upper is not None:
        parts.append(sql.SQL("{} < {}").format(keys, row(upper)))
    return sql.SQL(" WHERE ") + sql.SQL(" AND ").join(parts) if parts else sql.SQL("")


# --- workers ------------------------------------------------------------------------------------------------------

class _Stream:
    """One chunk's rows from the source COPY to the target COPY through libpq, with throttle and pause checks."""

    def __init__(self, worker: _Worker, chunk: state.Chunk) -> None:
        self.worker = worker
        self.chunk = chunk
        self.rows = 0
        self.bytes = 0

    def run(self, source: psycopg.Connection[Any], target: psycopg.Connection[Any], select: sql.Composable,
            load: sql.Composable) -> int:
        sp, tp = source.pgconn, target.pgconn
        # psycopg's Copy object costs several microseconds per row (one COPY message per row); libpq's own calls in
        # a tight loop keep the relay far below the servers' cost. Blocking mode on the target: a full socket waits.
        sp.send_query(select.as_bytes(source))
        res = sp.get_result()
        if res is None or res.status != pq.ExecStatus.COPY_OUT:
            raise CopyError(f"the source refused the chunk's COPY: {_error(sp, res)}")
        tp.send_query(load.as_bytes(target))
        res = tp.get_result()
        if res is None or res.status != pq.ExecStatus.COPY_IN:
            raise CopyError(f"the target refused the chunk's COPY: {_error(tp, res)}")
        tp.nonblocking = 0
        try:
            buf = bytearray()
            get, put = sp.get_copy_data, tp.put_copy_data
            next_check = time.monotonic() + _REPORT_EVERY
            while True:
                n, data = get(0)
                if n < 0:
                    break
                buf += data
                self.rows += 1
                if len(buf) >= _BUFFER:
                    if put(buf) != 1:
                        raise CopyError(f"writing to the target failed: {_error(tp, None)}")
                    self.bytes += len(buf)
                    buf = bytearray()
                    if time.monotonic() >= next_check:
                        self.worker.checkpoint(self)
                        next_check = time.monotonic() + _REPORT_EVERY
                    self.worker.throttle(self.bytes)
            if n == -2:
                tp.put_copy_end(b"the source failed")
                raise CopyError(f"reading from the source failed: {_error(sp, None)}")
            if buf:
                put(buf)
                self.bytes += len(buf)
            tp.put_copy_end(None)
            res = tp.get_result()
            if res is None or res.status != pq.ExecStatus.COMMAND_OK:
                raise CopyError(f"the target refused the chunk's rows: {_error(tp, res)}")
            rows = int(res.command_tuples or 0)
            while tp.get_result() is not None:
                pass
            res = sp.get_result()
            if res is None or res.status != pq.ExecStatus.COMMAND_OK:
                raise CopyError(f"the source's COPY failed: {_error(sp, res)}")
            while sp.get_result() is not None:
                pass
        finally:
            tp.nonblocking = 1
        return rows


def _error(conn: pq.abc.PGconn, res: pq.abc.PGresult | None) -> str:
    """The server's error, without the row values it may carry (a refused row's DETAIL, a COPY's CONTEXT); with the
    number of the row in the chunk when the server names it."""
    if res is None:
        return scrub(conn.error_message.decode(errors="replace")).strip() or "unknown error"
    text = database_error(psycopg.errors.error_from_result(res, encoding="utf-8"))
    context = (res.error_field(pq.DiagnosticField.CONTEXT) or b"").decode(errors="replace")
    line = re.match(r"COPY [^\n]*, line (\d+)", context)
    return text + (f", at row {line[1]} of the chunk" if line else "")


class _Worker:
    """Claims chunks and copies them until none is left; one per process, on any host."""

    def __init__(self, cfg: Config, name: str) -> None:
        self.cfg = cfg
        self.name = name
        self.log = get(phase="copy", worker=name)
        self.control = db.connect(cfg.target_dsn, role="target", autocommit=True)
        try:
            state.require_prepared(self.control)
        except NotReady:
            self.control.close()
            raise
        self.rate_share: float | None = None
        self.tables: dict[tuple[str, str], Table] = {}
        self.tables_snapshot: str | None = None
        self.window_start = time.monotonic()
        self.window_bytes = 0
        self.mask: KeyMask | None = None

    def close(self) -> None:
        try:
            state.worker_gone(self.control, self.name)
            self.control.close()
        except psycopg.Error:
            pass

    # Operator controls, read once a second from the control schema.
    def checkpoint(self, stream: _Stream | None) -> None:
        state.worker_progress(self.control, self.name, stream.chunk if stream else None,
                              stream.rows if stream else 0, stream.bytes if stream else 0)
        run = state.copy_run(self.control)
        workers = max(1, len(state.copy_workers(self.control)))
        self.rate_share = run.max_rate * 1e6 / workers if run and run.max_rate else None
        paused = False
        while state.copy_paused(self.control):
            if not paused:
                self.log.info("copy.paused")
                paused = True
            time.sleep(0.5)
            state.worker_progress(self.control, self.name, stream.chunk if stream else None,
                                  stream.rows if stream else 0, stream.bytes if stream else 0)
        if paused:
            self.log.info("copy.resumed")
            self.window_start, self.window_bytes = time.monotonic(), stream.bytes if stream else 0

    def throttle(self, nbytes: int) -> None:
        if self.rate_share is None:
            return
        # Sleep until this worker's bytes since the window began fit its share of the rate.
        due = self.window_start + (nbytes - self.window_bytes) / self.rate_share
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(min(delay, _REPORT_EVERY))

    def run(self, *, wait: float) -> int:
        """Copy chunks while any is pending (waiting for those other workers hold, in case one dies); returns how
        many this worker copied. `wait`: seconds to wait for a copy to be started when none is running."""
        done = 0
        joined = False  # saw a copy running: once it has finished, this worker's work is over
        deadline = time.monotonic() + wait
        with db.session(self.cfg.source_dsn, role="source") as source, \
                db.session(self.cfg.target_dsn, role="target") as target:
            while True:
                self.checkpoint(None)
                run = state.copy_run(self.control)
                if run is None or run.finished_at is not None or run.snapshot_id is None:
                    if joined and run is not None and run.finished_at is not None:
                        return done
                    if time.monotonic() < deadline:
                        time.sleep(0.5)
                        continue
                    return done
                joined = True
                outcome = self._copy_one(source, target, run)
                if outcome == "copied":
                    done += 1
                elif outcome == "none":
                    if not self._pending_left():
                        return done
                    time.sleep(0.5)
                else:  # the snapshot could not be imported: its coordinator is gone; wait for the next one
                    time.sleep(1.0)

    def _bounds(self, table: Table, chunk: state.Chunk) -> str:
        """The chunk's key range as it may be printed (key values that may be patient data as keyed hashes)."""
        if self.mask is None:
            self.mask = KeyMask.of(self.control)
        types = {c.name: c.type for c in table.columns}
        key = [types[k] for k in table.key]
        lower = None if chunk.lower_bound is None else self.mask.key(table.key, key, chunk.lower_bound)
        upper = None if chunk.upper_bound is None else self.mask.key(table.key, key, chunk.upper_bound)
        if lower is None and upper is None:
            return "the whole table"
        return " ".join(part for part in (f"keys from {lower}" if lower else "keys",
                                          f"below {upper}" if upper else "") if part)

    def _pending_left(self) -> bool:
        return any(c.status == "pending" for c in state.chunks(self.control))

    def _copy_one(self, source: psycopg.Connection[Any], target: psycopg.Connection[Any], run: state.CopyRun) -> str:
        """Claim and copy one chunk: "copied", "none" (nothing to claim) or "retry" (snapshot not importable)."""
        started = time.monotonic()
        with target.cursor() as tcur:
            tcur.execute("SET LOCAL session_replication_role = replica")
            chunk = state.claim_chunk(target)
            if chunk is None:
                target.rollback()
                return "none"
            started_at = tcur.execute("SELECT clock_timestamp()").fetchone()[0]  # type: ignore[index]
            try:
                with source.cursor() as scur:
                    scur.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                    scur.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(run.snapshot_id)))
                    # Bitmap scans read a key range's pages once, in order; a sequential scan per chunk reads all.
                    scur.execute("SET LOCAL enable_seqscan = off")
                    scur.execute("SET LOCAL work_mem = '64MB'")
                    scur.execute("SELECT pg_current_snapshot()::text")
                    snapshot = scur.fetchone()[0]  # type: ignore[index]
                    if self.tables_snapshot != run.snapshot_id:
                        # The tables as this snapshot sees them, listed once per snapshot.
                        self.tables = {(t.schema, t.name): t for t in catalog.list_tables(source, self.cfg.tables)}
                        self.tables_snapshot = run.snapshot_id
            except (psycopg.errors.InvalidParameterValue, psycopg.errors.ObjectNotInPrerequisiteState) as exc:
                # The coordinator that exported the snapshot is gone: wait for the next one.
                source.rollback()
                target.rollback()
                self.log.warning("copy.snapshot_gone", error=str(exc).splitlines()[0])
                return "retry"
            table = self.tables.get((chunk.schema_name, chunk.table_name))
            if table is None:
                raise CopyError(f"{chunk.display} is no longer on the source")
            log = self.log.bind(table=table.display, chunk=chunk.chunk_no)
            cols = sql.SQL(", ").join(sql.Identifier(c.name) for c in table.writable_columns)
            select = sql.SQL("COPY (SELECT {} FROM ONLY {}{}) TO STDOUT (FORMAT binary)").format(
                cols, table.ident, _range(table, chunk.lower_bound, chunk.upper_bound))
            load = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT binary)").format(table.ident, cols)
            stream = _Stream(self, chunk)
            try:
                # Triggers on the target exist only when a table is copied again after post-data; ALWAYS ones must
                # not fire either.
                firing = schema.firing_in_replica(tcur).get((table.schema, table.name), [])
                with schema.silenced(tcur, table.ident, firing):
                    rows = stream.run(source, target, select, load)
                state.chunk_copied(target, chunk, snapshot, rows, stream.bytes, self.name, started_at)
            except (CopyError, psycopg.Error) as exc:
                why = str(exc) if isinstance(exc, CopyError) else database_error(exc)
                raise CopyError(f"copying {table.display} chunk {chunk.chunk_no} ({self._bounds(table, chunk)}) "
                                f"failed: {why}; the chunk stays pending",
                                hint=None if isinstance(exc, psycopg.OperationalError) else _REFUSED_HINT) from exc
        target.commit()
        source.rollback()
        state.worker_progress(self.control, self.name, None, 0, 0)
        log.info("copy.chunk_done", rows=rows, bytes=stream.bytes, seconds=round(time.monotonic() - started, 3))
        return "copied"


def work(cfg: Config, *, name: str | None = None, wait: float = 0.0) -> int:
    """Join a running copy: claim and copy chunks until none is pending (`migrator copy --worker`).

    `wait`: seconds to wait for a copy to start, or for chunks a dead worker left, before giving up.
    Returns the number of chunks copied.
    """
    worker = _Worker(cfg, name or f"{socket.gethostname()}:{os.getpid()}")
    try:
        return worker.run(wait=wait)
    finally:
        worker.close()


def _worker_process(cfg: Config, name: str, json_logs: bool, failures: Any) -> None:
    """A local worker: its failure is one log line (no traceback for a failure the server or migrator named) and a
    message on `failures` for the coordinator's error."""
    _die_with_parent()
    log_mod.configure(json=json_logs)
    log = get(phase="copy", worker=name)
    try:
        work(cfg, name=name)
    except KeyboardInterrupt:
        pass
    except (MigratorError, psycopg.Error) as exc:
        message = scrub(str(exc)) if isinstance(exc, MigratorError) else database_error(exc)
        log.error("copy.worker_failed", error=message)
        failures.put((message, exc.hint if isinstance(exc, MigratorError) else None))
        sys.exit(1)
    except Exception as exc:
        log.error("copy.worker_failed", error=scrub(str(exc)) or type(exc).__name__, exc_info=True)
        failures.put((f"a copy worker failed: {scrub(str(exc)) or type(exc).__name__}", None))
        sys.exit(1)


def _die_with_parent() -> None:
    """A local worker ends when its coordinator does, even by kill -9 (Linux); a resumed copy starts its own."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:
        os._exit(1)


# --- operator controls --------------------------------------------------------------------------------------------

def pause(cfg: Config) -> CopyControl:
    """Ask every copy worker to stop reading the source within a second or two (they keep their place)."""
    with db.session(cfg.target_dsn, role="target") as target:
        state.require_prepared(target)
        state.pause_copy(target)
        target.commit()
    return CopyControl(paused=True)


def resume(cfg: Config) -> CopyControl:
    with db.session(cfg.target_dsn, role="target") as target:
        state.require_prepared(target)
        state.resume_copy(target)
        target.commit()
    return CopyControl(paused=False)


# --- the coordinator ----------------------------------------------------------------------------------------------

def run(cfg: Config, *, workers: int | None = None, progress: Progress | None = None,
        only: list[str] | None = None, max_rate: float | None = None, overall: Overall | None = None) -> CopyResult:
    """Copy every chunk not yet copied; then post-data and ANALYZE. Re-runnable: finished chunks are kept.

    `only` re-copies the named tables (schema.table) even if copied already, each under a new boundary.
    """
    db.refuse_same_database(cfg.source_dsn, cfg.target_dsn)
    log = get(phase="copy")
    started = time.monotonic()
    workers = max(1, workers or cfg.copy.workers)
    rate = max_rate if max_rate is not None else cfg.copy.max_rate
    with db.session(cfg.target_dsn, role="target") as target, db.session(cfg.source_dsn, role="source") as holder:
        m = state.require_prepared(target)
        if freeze.is_frozen(holder):
            raise NotReady("the legacy database is frozen after cutover; there is nothing to copy")
        holder.rollback()
        states = {s.display: s for s in state.tables(target)}
        if only:
            unknown = [n for n in only if n not in states]
            if unknown:
                raise MigratorError(f"not a captured table: {', '.join(unknown)}")
            names = [(states[n].schema_name, states[n].table_name) for n in only]
            # Under sync's position lock: a batch in progress commits first, and every later batch sees the tables
            # pending and stops until this copy has finished them.
            state.lock_position(target)
            state.reset_tables(target, names)
            state.reset_chunks(target, names)
            target.commit()
            states = {s.display: s for s in state.tables(target)}
        with holder.cursor() as cur:
            cur.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            cur.execute("SELECT pg_export_snapshot(), pg_current_snapshot()::text")
            row = cur.fetchone()
            assert row is not None
            snapshot_id, snapshot = row
            tables = catalog.list_tables(holder, cfg.tables)
        by_name = {t.display: t for t in tables}
        missing = [n for n in states if n not in by_name]
        new = [n for n in by_name if n not in states]
        if missing or new:
            raise NotReady(
                f"captured tables changed since prepare (gone: {', '.join(missing) or '-'}; "
                f"new: {', '.join(new) or '-'})",
                hint="Run `migrator prepare` again to capture the current set of tables, then `migrator copy`.",
            )
        changed = [n for n, t in by_name.items() if t.fingerprint != states[n].fingerprint]
        if changed:
            raise NotReady(f"table definitions changed since prepare: {', '.join(changed)}",
                           hint="Apply the same DDL to the target, run `migrator prepare` again, then `migrator copy`.")
        pending = [by_name[n] for n, s in states.items() if s.status != "copied"]
        # A table sent back to pending (by --tables, or by prepare after DDL) keeps no chunk it had copied.
        stale = [(s.schema_name, s.table_name) for s in states.values() if s.status == "pending"]
        with_copied = {(c.schema_name, c.table_name) for c in state.chunks(target) if c.status == "copied"}
        state.reset_chunks(target, [n for n in stale if n in with_copied])
        planned = {c.display for c in state.chunks(target)}
        result = CopyResult(snapshot=snapshot, skipped=[n for n, s in states.items() if s.status == "copied"])
        with holder.cursor() as cur:
            for t in pending:
                if t.display in planned:
                    continue
                # A table never copied, or reset: empty it (a table copied again after post-data is referenced by
                # foreign keys; with triggers off a DELETE empties it just the same), then plan its chunks.
                _empty(target, t)
                state.plan_chunks(target, t.schema, t.name, plan(cur, t, int(cfg.copy.chunk_mb * 1e6)))
        if m.copy_snapshot is None:
            # The first snapshot is where replay starts: every change it does not contain is in the delta log.
            state.mark(target, "copy_snapshot", snapshot)
            state.mark(target, "copy_started_at")
            state.init_position(target, snapshot)
        coordinator = f"{socket.gethostname()}:{os.getpid()}"
        state.start_copy_run(target, snapshot_id, snapshot, coordinator, rate)
        run_started = target.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
        target.commit()
        log.info("copy.start", tables=len(pending), already_copied=len(result.skipped), workers=workers,
                 chunks=sum(1 for c in state.chunks(target) if c.status == "pending"))
        target.rollback()
        try:
            failed = _supervise(cfg, target, workers, coordinator, progress, overall)
        finally:
            _end_run(cfg, target)
            holder.rollback()
        if failed:
            message, hint = failed[0]
            more = f" ({len(failed) - 1} more worker(s) failed too; see their log lines)" if len(failed) > 1 else ""
            raise CopyError(message + more, hint=hint)
        done = state.chunks(target)
        unfinished = sorted({c.display for c in done if c.status != "copied"})
        if unfinished:
            raise CopyError(f"chunks of {len(unfinished)} table(s) are not copied, first {unfinished[0]}")
        for name in sorted({c.display for c in done if c.copy_finished_at and c.copy_finished_at >= run_started}):
            mine = [c for c in done if c.display == name and c.copy_finished_at and c.copy_finished_at >= run_started]
            seconds = (max(c.copy_finished_at for c in mine if c.copy_finished_at)
                       - min(c.copy_started_at for c in mine if c.copy_started_at)).total_seconds()
            result.copied.append(TableCopy(name, sum(c.rows_copied or 0 for c in mine),
                                           sum(c.bytes_copied or 0 for c in mine), seconds, len(mine)))
            if progress:
                progress(name, sum(c.rows_copied or 0 for c in mine), sum(c.bytes_copied or 0 for c in mine))
        m = state.require_prepared(target)
        target.commit()
        t0 = time.monotonic()
        pending_post_data = state.post_data_pending(target)
        if m.post_data_at is None:
            schema.load_section(cfg.source_dsn, cfg.target_dsn, "post-data", jobs=workers)
            state.mark(target, "post_data_at")
            state.clear_post_data_pending(target)
            target.commit()
        elif pending_post_data:
            # Tables prepare created after the first post-data (new on the legacy database): now that they are
            # filled, their indexes, constraints and triggers.
            schema.load_section(cfg.source_dsn, cfg.target_dsn, "post-data", jobs=workers,
                                tables=pending_post_data)
            state.clear_post_data_pending(target)
            target.commit()
        result.post_data_seconds = time.monotonic() - t0
        t0 = time.monotonic()
        _analyze(cfg, [by_name[c.table] for c in result.copied], workers)
        result.analyze_seconds = time.monotonic() - t0
        state.mark(target, "copy_finished_at")
        target.commit()
    result.seconds = time.monotonic() - started
    log.info("copy.done", tables=len(result.copied), rows=result.rows, bytes=result.bytes,
             seconds=round(result.seconds, 3), post_data_seconds=round(result.post_data_seconds, 3))
    return result


def _empty(target: psycopg.Connection[Any], table: Table) -> None:
    with target.cursor() as cur:
        try:
            with target.transaction():
                cur.execute(sql.SQL("TRUNCATE ONLY {}").format(table.ident))
        except psycopg.errors.FeatureNotSupported:
            cur.execute("SET LOCAL session_replication_role = replica")
            firing = schema.firing_in_replica(cur).get((table.schema, table.name), [])
            with schema.silenced(cur, table.ident, firing):
                cur.execute(sql.SQL("DELETE FROM ONLY {}").format(table.ident))


def _supervise(cfg: Config, target: psycopg.Connection[Any], workers: int, coordinator: str,
               progress: Progress | None, overall: Overall | None = None) -> list[tuple[str, str | None]]:
    """Run local worker processes until every chunk is copied (workers of other hosts may help); heartbeat and
    progress meanwhile. Returns why local workers failed ((message, hint) each; empty when none did)."""
    eta = Eta()
    ctx = multiprocessing.get_context("spawn")
    json_logs = log_mod.renders_json()
    messages = ctx.SimpleQueue()
    procs: dict[str, Any] = {}
    failed: list[tuple[str, str | None]] = []
    spawned = 0
    try:
        while True:
            for name, proc in list(procs.items()):
                if not proc.is_alive():
                    proc.join()
                    if proc.exitcode != 0:
                        failed.append(messages.get() if not messages.empty()
                                      else (f"copy worker {name} ended with exit code {proc.exitcode}", None))
                    del procs[name]
            chunks = state.chunks(target)
            pending = [c for c in chunks if c.status == "pending"]
            target.commit()
            if not pending:
                break
            # Chunks left pending with no local worker alive: a worker (local or remote) died; start fresh ones,
            # unless local ones failed (a failure that repeats needs the operator).
            if not procs and not failed:
                for _ in range(min(workers, len(pending))):
                    spawned += 1
                    name = f"{coordinator}/{spawned}"
                    proc = ctx.Process(target=_worker_process, args=(cfg, name, json_logs, messages), name=name,
                                       daemon=True)
                    proc.start()
                    procs[name] = proc
            elif not procs and failed:
                break
            state.copy_heartbeat(target)
            active = state.copy_workers(target)
            if progress:
                for w in active:
                    if w["table_name"]:
                        progress(f"{w['schema_name']}.{w['table_name']}#{w['chunk_no']}", -1, int(w["bytes_done"]))
            done, total = estimated_done(chunks, active)
            if overall:
                overall(done, total)
            eta.log(done, total)
            target.commit()
            time.sleep(0.3)
    except BaseException:
        # Interrupted (SIGINT, SIGTERM) or failed: the workers must not copy on, nor outlive this process, even
        # when paused. A chunk cut short rolls back with its transaction; the next run copies it again.
        _stop_workers(list(procs.values()))
        raise
    finally:
        for proc in procs.values():
            proc.join()
    target.rollback()
    return failed


def _end_run(cfg: Config, target: psycopg.Connection[Any]) -> None:
    """Mark the run finished: its snapshot is no longer importable, and workers of other hosts stop waiting. An
    interrupt (KeyboardInterrupt) can cut a statement of the coordinator's session short and leave it unusable;
    then a new session records it."""
    try:
        target.rollback()
        state.finish_copy_run(target)
        target.commit()
    except psycopg.Error:
        with db.session(cfg.target_dsn, role="target") as fresh:
            state.finish_copy_run(fresh)
            fresh.commit()


def _stop_workers(procs: list[Any]) -> None:
    """End local worker processes within a bound: SIGTERM (a worker that is starting, or loading a chunk, ends at
    once; its transactions roll back on the servers), then SIGKILL after STOP_WORKERS_WITHIN seconds."""
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    deadline = time.monotonic() + STOP_WORKERS_WITHIN
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join()


def estimated_done(chunks: list[state.Chunk], active: list[dict[str, Any]]) -> tuple[int, int]:
    """(done, total) in the chunks' estimated source bytes: copied chunks whole, chunks in flight by the bytes loaded
    so far (at most their estimate)."""
    estimate = {(c.schema_name, c.table_name, c.chunk_no): c.est_bytes for c in chunks}
    done = sum(c.est_bytes for c in chunks if c.status == "copied")
    done += sum(min(int(w["bytes_done"]), estimate.get((w["schema_name"], w["table_name"], w["chunk_no"]), 0))
                for w in active if w["table_name"])
    return done, sum(estimate.values())


class Eta:
    """The `copy.progress` log event now and then: share done and time left at the rate since the coordinator
    started (what a non-terminal operator, or a log shipper, sees)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.first: int | None = None
        self.next = self.started + _LOG_PROGRESS_EVERY

    def log(self, done: int, total: int) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = done  # chunks a previous run copied do not count towards this run's rate
        if now < self.next or total <= 0:
            return
        self.next = now + _LOG_PROGRESS_EVERY
        rate = (done - self.first) / (now - self.started)
        left = round((total - done) / rate) if rate > 0 else None
        get(phase="copy").info("copy.progress", done_pct=round(100 * done / total, 1), eta_seconds=left,
                               mb_per_second=round(rate / 1e6, 1))


def _analyze(cfg: Config, tables: list[Table], jobs: int) -> None:
    """ANALYZE the copied tables, `jobs` at a time (server-side work: threads wait on their connections)."""
    queue = sorted(tables, key=lambda t: -t.bytes)
    lock = threading.Lock()

    def one() -> None:
        with db.session(cfg.target_dsn, role="target", autocommit=True) as conn:
            while True:
                with lock:
                    if not queue:
                        return
                    t = queue.pop(0)
                conn.execute(sql.SQL("ANALYZE {}").format(t.ident))

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for f in [pool.submit(one) for _ in range(max(1, jobs))]:
            f.result()
