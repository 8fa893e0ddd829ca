"""The bulk copy: every captured table, in chunks, from a consistent snapshot of the source into the target.

A coordinator (`migrator copy`) starts its worker processes (forked, see copyworker.LocalWorkers), opens a
transaction on the source, exports its snapshot (pg_export_snapshot) and publishes it in the control schema
(`copy_run`), and splits each large table with a key into chunks: heap block ranges on PostgreSQL 14 and later (each
chunk reads its own pages once, a TID range scan, whatever the key's order: a DICOM UID's has nothing to do with
where rows lie), key ranges at sampled key values before. Each worker (also `migrator copy --worker` on other hosts)
claims the next pending chunk (the largest table's first) with a row lock (SKIP LOCKED) in a target transaction,
imports the snapshot, and streams `COPY (SELECT ... WHERE ctid or key in range) TO STDOUT (FORMAT binary)` straight
into `COPY ... FROM STDIN` through libpq: no rows in Python, no temporary files, a few hundred kilobytes of buffer.
The same target transaction records the chunk copied with the snapshot it was read under (its *boundary*); a worker
that dies releases its claim with its transaction. The worker's side is migrator/copyworker.py.

The boundary is kept per chunk. Normally every chunk shares the coordinator's snapshot and the table records it.
After a kill -9 the finished chunks are kept and the rest are read under a new coordinator's snapshot (but a table
copied again after post-data starts over: its unique indexes on the target check its rows as they load; so does one
rewritten on the source since its block chunks were planned, as its rows have moved between blocks). Such a table
records no single snapshot, and replay skips none of its changes: it replaces the target's rows of every key a
change touched since the first snapshot with the source's. A row that such a change moved to a block read later
may have been copied twice: one row per key is kept before the primary key is built. Tables without a key are
copied whole, in one chunk.

On a first copy (every chunk pending, all read under the run's one snapshot) the schema's post-data (indexes,
constraints, the application's triggers) is restored table by table while other tables still copy: a table's own
items as soon as its last chunk is in, then its ANALYZE; a foreign key once both its tables are in; the rest after
the last chunk. Otherwise it is restored after the data with parallel jobs, tolerating items a killed earlier run
already created; when the chunks were read under different snapshots, the items that relate rows to each other
(unique and exclusion indexes, foreign keys) are left for sync, which restores them once the target is the source as
of one snapshot (migrator/postdata.py); then the tables are analyzed in parallel. Operators throttle (`max_rate`, MB/s over all workers) and pause it
(`pause`/`resume`, a flag in the control schema every worker reads each second).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from migrator import catalog, copyplan, copyworker, db, postdata, schema, state
from migrator.catalog import Table
from migrator.config import Config
from migrator.deltalog import freeze
from migrator.errors import CopyError, MigratorError, NotReady
from migrator.log import get


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
    post_data_deferred: list[str] = field(default_factory=list)
    """Post-data items that relate rows, left for sync (the chunks were read under different snapshots)."""

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
            "post_data_deferred": self.post_data_deferred,
        }

    def render_text(self) -> str:
        text = (f"copied {len(self.copied)} tables ({self.rows} rows, {self.bytes / 1e6:.1f} MB) in "
                f"{self.seconds:.1f}s (post-data {self.post_data_seconds:.1f}s); {len(self.skipped)} already copied")
        if self.post_data_deferred:
            text += (f"\n{len(self.post_data_deferred)} post-data item(s) that relate rows (unique and exclusion "
                     "indexes, foreign keys) wait for sync, since the chunks were read under different snapshots: "
                     "`migrator sync` restores them after its next batch")
        return text


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
_POLL = 0.2
"""Seconds between the coordinator's looks at the chunks (a table all in starts its post-data at the next look)."""

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
    with db.session(cfg.target_dsn, role="target") as target, db.session(cfg.source_dsn, role="source") as holder, \
            copyworker.LocalWorkers(cfg) as local:
        m = state.require_prepared(target)
        state.catch_up(target)  # prepared by an older migrator: the control schema gains what this copy records
        if freeze.is_frozen(holder):
            raise NotReady("the legacy database is frozen after cutover; there is nothing to copy")
        holder.rollback()
        # The workers start now and import migrator while the run is planned (one of their cores' half a second).
        local.start(workers)
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
        # A table sent back to pending (by --tables, or by prepare after DDL) keeps no chunk it had copied. Nor does
        # one whose copy again was killed: its post-data is on the target, and its unique and exclusion indexes check
        # each row as it loads, so its rows must all be read under one snapshot (a new table, whose post-data waits
        # for its copy, keeps its chunks: what relates its rows waits for sync, see postdata.py).
        # So does one whose block chunks no longer divide its file (rewritten on the source since they were planned).
        owed = set(state.post_data_pending(target))
        with holder.cursor() as cur:
            moved = copyplan.rewritten(cur, state.chunks(target), by_name) - {
                (s.schema_name, s.table_name) for s in states.values() if s.status == "copied"}
        if moved:
            log.warning("copy.rewritten_tables_copied_again", tables=sorted(f"{s}.{t}" for s, t in moved))
        stale = [(s.schema_name, s.table_name) for s in states.values() if s.status == "pending" or (
            s.status == "copying" and m.post_data_at is not None and (s.schema_name, s.table_name) not in owed)
            or (s.status != "copied" and (s.schema_name, s.table_name) in moved)]
        with_copied = {(c.schema_name, c.table_name) for c in state.chunks(target) if c.status == "copied"}
        state.reset_chunks(target, [n for n in stale if n in with_copied or n in moved])
        planned = {c.display for c in state.chunks(target)}
        result = CopyResult(snapshot=snapshot, skipped=[n for n, s in states.items() if s.status == "copied"])
        with holder.cursor() as cur, target.cursor() as tcur:
            firing = schema.firing_in_replica(tcur)
            for t in pending:
                if t.display in planned:
                    continue
                # A table never copied, or reset: empty it (a table copied again after post-data is referenced by
                # foreign keys; with triggers off a DELETE empties it just the same), then plan its chunks.
                _empty(target, t, firing.get((t.schema, t.name), []))
                ranges, relfilenode = copyplan.chunks(cur, t, int(cfg.copy.chunk_mb * 1e6))
                state.plan_chunks(target, t.schema, t.name, ranges, relfilenode=relfilenode)
        if m.copy_snapshot is None:
            # The first snapshot is where replay starts: every change it does not contain is in the delta log.
            state.mark(target, "copy_snapshot", snapshot)
            state.mark(target, "copy_started_at")
            state.init_position(target, snapshot)
        state.start_copy_run(target, snapshot_id, snapshot, local.coordinator, rate)
        run_started = target.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
        target.commit()
        log.info("copy.start", tables=len(pending), already_copied=len(result.skipped), workers=workers,
                 chunks=sum(1 for c in state.chunks(target) if c.status == "pending"))
        target.rollback()
        # A first copy, every chunk read under this run's snapshot: each table's post-data as soon as it is in.
        early = (postdata.AsTablesArrive(cfg, tables, workers) if m.post_data_at is None and not only
                 and all(c.status == "pending" for c in state.chunks(target)) else None)
        target.rollback()
        failed = _copy_chunks(cfg, target, holder, local, workers, progress, overall, early)
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
        # Only where the primary key is still to be built: the first post-data, or a table it owes (added later).
        _one_row_per_key(target, [c for c in done if m.post_data_at is None or (c.schema_name, c.table_name) in owed],
                         by_name)
        _post_data(cfg, target, m, early, workers, result, by_name)
        state.mark(target, "copy_finished_at")
        target.commit()
    result.seconds = time.monotonic() - started
    log.info("copy.done", tables=len(result.copied), rows=result.rows, bytes=result.bytes,
             seconds=round(result.seconds, 3), post_data_seconds=round(result.post_data_seconds, 3))
    return result


def _copy_chunks(cfg: Config, target: psycopg.Connection[Any], holder: psycopg.Connection[Any],
                 local: copyworker.LocalWorkers, workers: int, progress: Progress | None, overall: Overall | None,
                 early: postdata.AsTablesArrive | None) -> list[tuple[str, str | None]]:
    """Supervise the workers until every chunk is copied, then end the run; the early post-data stops when the copy
    fails. Returns why local workers failed."""
    try:
        failed = _supervise(cfg, target, local, workers, progress, overall,
                            early.table_copied if early else None)
    except BaseException:
        if early:
            early.close()
        raise
    finally:
        _end_run(cfg, target)
        holder.rollback()
    if failed and early:
        early.close()
    return failed


def _post_data(cfg: Config, target: psycopg.Connection[Any], m: state.Migration,
               early: postdata.AsTablesArrive | None, workers: int, result: CopyResult, by_name: dict[str, Table]) -> None:
    """After the last chunk: the post-data not yet restored, then ANALYZE of the tables not yet analyzed."""
    t0 = time.monotonic()
    if early:
        try:
            early.finish(workers)
        finally:
            early.close()
        postdata.mark_restored(target)
    else:
        # The first time, or for tables prepare created after the first post-data (new on the legacy database);
        # what relates rows read under different snapshots waits for sync (postdata.py).
        result.post_data_deferred = postdata.after_copy(cfg, target, m, workers)
    result.post_data_seconds = time.monotonic() - t0
    t0 = time.monotonic()
    names = {c.table for c in result.copied if not early or c.table not in early.analyzed}
    # And the tables an earlier run copied but did not analyze (killed before it could).
    names |= _never_analyzed(target, by_name)
    _analyze(cfg, [by_name[n] for n in sorted(names)], workers)
    result.analyze_seconds = time.monotonic() - t0


def _never_analyzed(target: psycopg.Connection[Any], by_name: dict[str, Table]) -> set[str]:
    with target.cursor() as cur:
        cur.execute("SELECT schemaname, relname FROM pg_stat_user_tables "
                    "WHERE last_analyze IS NULL AND last_autoanalyze IS NULL")
        never = {(str(r[0]), str(r[1])) for r in cur.fetchall()}
        found = {name for name, t in by_name.items() if (t.schema, t.name) in never}
    target.rollback()
    return found


def _one_row_per_key(target: psycopg.Connection[Any], chunks: list[state.Chunk], by_name: dict[str, Table]) -> None:
    """A table split by blocks whose chunks were read under different snapshots (a resumed copy) may hold a key
    twice: a row that a change between those snapshots moved to a block read later (the change is in the delta log,
    and replay replaces that key's rows on the target with the source's). One row of each key is kept, before the
    table's primary key is built; what relates rows otherwise waits for sync (postdata.py)."""
    snapshots: dict[str, set[str | None]] = {}
    for c in chunks:
        if c.blocks:
            snapshots.setdefault(c.display, set()).add(c.snapshot)
    mixed = sorted(n for n, seen in snapshots.items() if len(seen) > 1)
    if not mixed:
        return
    with target.cursor() as cur:
        firing = schema.firing_in_replica(cur)
    for name in mixed:
        table = by_name[name]
        keys = sql.SQL(", ").join(sql.Identifier(k) for k in table.key)
        with target.cursor() as cur:
            with target.transaction(), schema.silenced(cur, table.ident, firing.get((table.schema, table.name), [])):
                cur.execute("SET LOCAL session_replication_role = replica")
                # One sort of the table (it has no index yet); the few rows found are deleted by their ctid.
                cur.execute(sql.SQL("DELETE FROM ONLY {t} WHERE ctid = ANY (ARRAY(SELECT ctid FROM (SELECT ctid, "
                                    "row_number() OVER (PARTITION BY {keys}) AS n FROM ONLY {t}) AS r WHERE n > 1))")
                            .format(t=table.ident, keys=keys))
                removed = cur.rowcount
        target.commit()
        get(phase="copy").info("copy.duplicate_keys_removed", table=name, rows=removed)


def _empty(target: psycopg.Connection[Any], table: Table, firing: list[tuple[str, bool]]) -> None:
    # The table's ALWAYS triggers (`firing`) stay silent, as when its rows are loaded: the application's, and the
    # capture of a target frozen after a rollback (whose TRUNCATE trigger rejects the statement).
    with target.cursor() as cur:
        try:
            with target.transaction(), schema.silenced(cur, table.ident, firing):
                cur.execute(sql.SQL("TRUNCATE ONLY {}").format(table.ident))
        except psycopg.errors.FeatureNotSupported:
            cur.execute("SET LOCAL session_replication_role = replica")
            with schema.silenced(cur, table.ident, firing):
                cur.execute(sql.SQL("DELETE FROM ONLY {}").format(table.ident))


def _supervise(cfg: Config, target: psycopg.Connection[Any], local: copyworker.LocalWorkers, workers: int,
               progress: Progress | None, overall: Overall | None = None,
               table_copied: Callable[[str, str], None] | None = None) -> list[tuple[str, str | None]]:
    """Run local worker processes until every chunk is copied (workers of other hosts may help); heartbeat and
    progress meanwhile, and `table_copied(schema, table)` when every chunk of a table is. Returns why local workers
    failed ((message, hint) each; empty when none did)."""
    eta = Eta()
    failed: list[tuple[str, str | None]] = []
    try:
        while True:
            failed += local.reap()
            chunks = state.chunks(target)
            pending = [c for c in chunks if c.status == "pending"]
            target.commit()
            _tables_copied(chunks, table_copied)
            if not pending:
                break
            # Chunks left pending with no local worker alive: a worker (local or remote) died; start fresh ones,
            # unless local ones failed (a failure that repeats needs the operator).
            if not local.procs and not failed:
                local.start(min(workers, len(pending)))
            elif not local.procs and failed:
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
            time.sleep(_POLL)
    except BaseException:
        # Interrupted (SIGINT, SIGTERM) or failed: the workers must not copy on, nor outlive this process, even
        # when paused. A chunk cut short rolls back with its transaction; the next run copies it again.
        local.stop()
        raise
    finally:
        local.join()
    target.rollback()
    return failed


def _tables_copied(chunks: list[state.Chunk], table_copied: Callable[[str, str], None] | None) -> None:
    """Call `table_copied` for each table whose every chunk is copied (again on every call)."""
    if table_copied is None:
        return
    unfinished = {(c.schema_name, c.table_name) for c in chunks if c.status != "copied"}
    for schema_name, table_name in sorted({(c.schema_name, c.table_name) for c in chunks} - unfinished):
        table_copied(schema_name, table_name)


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
