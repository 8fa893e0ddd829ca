"""One copy worker: claims the next pending chunk (the largest table's first), streams its range (heap blocks or keys)
from the source's COPY into the target's, and records it copied in the same target transaction (`migrator copy`
starts these in worker processes, `LocalWorkers`; `migrator copy --worker` on other hosts; see migrator/copy.py for
the coordinator).

Rows go through libpq's COPY calls in a tight loop, never into Python objects; once a second the worker reports its
progress, reads the operators' pause flag and rate limit from the control schema, and throttles to its share.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import socket
import sys
import threading
import time
from functools import partial
from typing import Any

import psycopg
from psycopg import pq, sql

from migrator import catalog, db, schema, state
from migrator import log as log_mod
from migrator.catalog import Table
from migrator.config import Config
from migrator.errors import CopyError, MigratorError, NotReady
from migrator.log import get
from migrator.redaction import KeyMask, database_error, scrub

_BUFFER = 256 * 1024
"""Bytes gathered from the source's per-row COPY messages before one write to the target."""
_REPORT_EVERY = 1.0
"""Seconds between a worker's progress reports, pause checks and throttle adjustments."""
_WAIT_POLL = 0.25
"""Seconds between a waiting worker's looks for the copy run to start (its coordinator plans meanwhile)."""
_LOCAL_WAIT = 3600.0
"""Seconds a local worker waits for its coordinator's run to start (planning a large database takes a while)."""
STOP_WORKERS_WITHIN = 5.0
"""Seconds local workers get to end after the coordinator is interrupted, before they are killed."""
_REFUSED_HINT = ("Fix what the target refused (named above: a constraint, a column's type or size), then run "
                 "`migrator copy` again: chunks already copied are kept and this one is copied again.")


def _blocks(lower: list[str] | None, upper: list[str] | None) -> sql.Composable:
    """WHERE clause of a heap block range [lower, upper) (PostgreSQL 14 and later scan it as a TID range)."""
    parts = [sql.SQL("ctid {} {}::tid").format(sql.SQL(op), sql.Literal(f"({int(bound[0])},0)"))
             for op, bound in ((">=", lower), ("<", upper)) if bound is not None]
    return sql.SQL(" WHERE ") + sql.SQL(" AND ").join(parts) if parts else sql.SQL("")


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


class _Stream:
    """One chunk's rows from the source COPY to the target COPY through libpq, with throttle and pause checks."""

    def __init__(self, worker: Worker, chunk: state.Chunk) -> None:
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
                    self.worker.sent += len(buf)
                    buf = bytearray()
                    if time.monotonic() >= next_check:
                        self.worker.checkpoint(self)
                        next_check = time.monotonic() + _REPORT_EVERY
                    self.worker.throttle()
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


class Worker:
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
        self.sent = 0
        """Bytes this worker has written to the target, over all its chunks (what its share of the rate bounds)."""
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
        share = run.max_rate * 1e6 / workers if run and run.max_rate else None
        if share != self.rate_share:  # a new rate, or a new number of workers: the window starts again
            self.rate_share, self.window_start, self.window_bytes = share, time.monotonic(), self.sent
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
            self.window_start, self.window_bytes = time.monotonic(), self.sent

    def throttle(self) -> None:
        if self.rate_share is None:
            return
        # Sleep until this worker's bytes since the window began (over every chunk: a chunk's own count starts at
        # zero, and bounded only each chunk's start) fit its share of the rate.
        due = self.window_start + (self.sent - self.window_bytes) / self.rate_share
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(min(delay, _REPORT_EVERY))

    def run(self, *, wait: float, coordinator: str | None = None) -> int:
        """Copy chunks while any is pending (waiting for those other workers hold, in case one dies); returns how
        many this worker copied. `wait`: seconds to wait for a copy to be started when none is running.
        `coordinator`: join only the run this coordinator starts (a local worker, started while its coordinator
        still plans: the run recorded before may be one a killed coordinator left)."""
        done = 0
        joined = False  # saw a copy running: once it has finished, this worker's work is over
        deadline = time.monotonic() + wait
        with db.session(self.cfg.source_dsn, role="source") as source, \
                db.session(self.cfg.target_dsn, role="target") as target:
            while True:
                self.checkpoint(None)
                run = state.copy_run(self.control)
                mine = run is not None and coordinator in (None, run.coordinator)
                if run is None or not mine or run.finished_at is not None or run.snapshot_id is None:
                    if run is not None and mine and run.finished_at is not None and (joined or coordinator):
                        return done
                    if time.monotonic() < deadline:
                        time.sleep(_WAIT_POLL)
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
        """The chunk's range as it may be printed (key values that may be patient data as keyed hashes)."""
        if chunk.blocks:
            return (f"heap blocks from {chunk.lower_bound[0] if chunk.lower_bound else 0} "
                    f"{f'below {chunk.upper_bound[0]}' if chunk.upper_bound else 'to the end'}")
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

    def _same_file(self, source: psycopg.Connection[Any], table: Table, chunk: state.Chunk) -> None:
        """With the lock the chunk's read takes anyway (no rewrite can start until it ends): the table has the file
        the snapshot sees (a rewrite committed since, ALTER TABLE's or pg_repack's, gives every row a transaction
        the snapshot does not see: read on, the chunk would be empty), and a block chunk's is the one it was planned
        on (a rewrite moves rows between blocks)."""
        with source.cursor() as cur:
            cur.execute(sql.SQL("LOCK TABLE ONLY {} IN ACCESS SHARE MODE").format(table.ident))
            cur.execute("SELECT c.relfilenode, pg_relation_filenode(c.oid) FROM pg_class c WHERE c.oid = %s",
                        (table.oid,))
            row = cur.fetchone()
        seen, now = (row[0], row[1]) if row else (None, None)
        if seen is None or seen != now or (chunk.blocks and seen != chunk.relfilenode):
            # A TRUNCATE too: the capture records it, but the chunks read on would leave the target, as of this
            # snapshot, without rows other tables' rows refer to (and a foreign key restored now would fail).
            raise CopyError(f"{table.display} was rewritten or truncated on the source since this copy's snapshot or "
                            "plan (VACUUM FULL, CLUSTER, pg_repack, TRUNCATE or an ALTER TABLE that rewrites it): the "
                            "snapshot would not see its rows, or they have moved between the blocks its chunks divide",
                            hint="Run `migrator copy` again: it reads under a new snapshot, and copies a table split "
                                 "by blocks again from its start.")

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
                    # A block range by a TID range scan, a key range by a bitmap scan (its pages once, in order): a
                    # sequential scan per chunk would read the whole table each time.
                    scur.execute("SET LOCAL enable_seqscan = off")
                    scur.execute("SET LOCAL enable_tidscan = on")
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
            self._same_file(source, table, chunk)
            where = (_blocks if chunk.blocks else partial(_range, table))(chunk.lower_bound, chunk.upper_bound)
            cols = sql.SQL(", ").join(sql.Identifier(c.name) for c in table.writable_columns)
            select = sql.SQL("COPY (SELECT {} FROM ONLY {}{}) TO STDOUT (FORMAT binary)").format(
                cols, table.ident, where)
            load = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT binary)").format(table.ident, cols)
            stream = _Stream(self, chunk)
            try:
                # Triggers on the target exist only when a table is copied again after post-data, or on a target
                # frozen after a rollback (its capture); ALWAYS ones must not fire either.
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


# --- worker processes ---------------------------------------------------------------------------------------------

def work(cfg: Config, *, name: str | None = None, wait: float = 0.0, coordinator: str | None = None) -> int:
    """Join a running copy: claim and copy chunks until none is pending (`migrator copy --worker`).

    `wait`: seconds to wait for a copy to start, or for chunks a dead worker left, before giving up.
    `coordinator`: join only the run this coordinator starts. Returns the number of chunks copied.
    """
    worker = Worker(cfg, name or f"{socket.gethostname()}:{os.getpid()}")
    try:
        return worker.run(wait=wait, coordinator=coordinator)
    finally:
        worker.close()


def _worker_process(cfg: Config, name: str, coordinator: str, parent: int, json_logs: bool, failures: Any) -> None:
    """A local worker: its failure is one log line (no traceback for a failure the server or migrator named) and a
    message on `failures` for the coordinator's error. Started while its coordinator plans, it waits for the
    coordinator's run (it ends with its coordinator, and is stopped if planning fails)."""
    _as_if_new()
    _die_with_parent(parent)
    log_mod.configure(json=json_logs)
    log = get(phase="copy", worker=name)
    try:
        work(cfg, name=name, wait=_LOCAL_WAIT, coordinator=coordinator)
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


def _as_if_new() -> None:
    """A worker starts as a spawned one would: the signals its coordinator handles with Python code (the command
    line's SIGTERM, say) back to Python's defaults (those it ignores stay ignored), then delivered again, as
    `LocalWorkers.start` blocks them while it starts a worker. (A forked worker never uses its coordinator's
    sessions, nor closes them: it ends by os._exit, as multiprocessing's children do, and the server sees nothing.)"""
    for signum in _HELD:
        if callable(signal.getsignal(signum)):
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD)


_HELD = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT}
"""Signals held while a worker starts: a forked one must not run its coordinator's handlers meanwhile."""


def _die_with_parent(parent: int) -> None:
    """A local worker ends when its coordinator does, even by kill -9 (Linux); a resumed copy starts its own."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # orphaned before the line above took effect
        os._exit(1)


def _alone() -> bool:
    """Whether this process runs a single thread: on Linux its tasks (threads that C code or `_thread` started
    included, which `threading` does not list), elsewhere the threads `threading` knows."""
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return threading.active_count() == 1


class LocalWorkers:
    """The coordinator's worker processes, started as soon as the copy is known to run (they wait for its run while
    the coordinator plans). A context manager: leaving it by an exception stops the workers still running (planning
    failed, or an interrupt).

    The first workers are forked while the coordinator runs no other thread: a forked worker has migrator imported
    already, where a spawned one spends about half a second of a core importing it again, on a machine whose cores
    the copy needs. With a thread running (a progress display's, a test runner's, a program's that runs the copy
    inside it), another thread may hold a lock the child would need (a log stream's), so workers are spawned then;
    and so are workers started again after some died (rare, and by then the coordinator's sessions are busy)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.coordinator = f"{socket.gethostname()}:{os.getpid()}"
        self.ctx = multiprocessing.get_context("spawn")
        self.json_logs = log_mod.renders_json()
        self.messages = self.ctx.SimpleQueue()
        self.procs: dict[str, Any] = {}
        self.spawned = 0

    def __enter__(self) -> LocalWorkers:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: Any) -> None:
        if kind is not None:
            self.stop()
        self.join()

    def start(self, n: int) -> None:
        fork = self.spawned == 0 and _alone() and "fork" in multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork") if fork else self.ctx
        get(phase="copy").info("copy.workers_started", workers=n, start=ctx.get_start_method())
        held = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
        try:
            for _ in range(n):
                self._start_one(ctx)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)

    def _start_one(self, ctx: Any) -> None:
        self.spawned += 1
        name = f"{self.coordinator}/{self.spawned}"
        proc = ctx.Process(target=_worker_process, name=name, daemon=True,
                           args=(self.cfg, name, self.coordinator, os.getpid(), self.json_logs, self.messages))
        proc.start()
        self.procs[name] = proc

    def reap(self) -> list[tuple[str, str | None]]:
        """Forget the workers that ended; why those that failed did."""
        failed: list[tuple[str, str | None]] = []
        for name, proc in list(self.procs.items()):
            if not proc.is_alive():
                proc.join()
                if proc.exitcode != 0:
                    failed.append(self.messages.get() if not self.messages.empty()
                                  else (f"copy worker {name} ended with exit code {proc.exitcode}", None))
                del self.procs[name]
        return failed

    def stop(self) -> None:
        """End the workers within a bound: SIGTERM (a worker that is starting, or loading a chunk, ends at once; its
        transactions roll back on the servers), then SIGKILL after STOP_WORKERS_WITHIN seconds."""
        procs = list(self.procs.values())
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        deadline = time.monotonic() + STOP_WORKERS_WITHIN
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()

    def join(self) -> None:
        for proc in self.procs.values():
            proc.join()
