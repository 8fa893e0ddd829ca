"""The bulk copy: every captured table from one consistent snapshot of the source into the target.

A snapshot-holder transaction exports its snapshot (pg_export_snapshot); each worker imports it, so every table is
read as of the same instant, and streams `COPY ... TO STDOUT (FORMAT binary)` straight into `COPY ... FROM STDIN` on
the target: no rows in Python, no temporary files. Each table loads in one target transaction that also records the
table as copied together with the snapshot it was read under (its *boundary*): replay skips exactly the changes
that snapshot already contains. A copy killed mid-way keeps its finished tables; a resumed copy reads the rest
under a new snapshot, and each of those tables carries its own boundary. After the data, the schema's post-data
(indexes, constraints, foreign keys, the application's triggers) is loaded, then the tables are analyzed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from migrator import capture, catalog, db, schema, state
from migrator.catalog import Table
from migrator.config import Config
from migrator.errors import CopyError, MigratorError, NotReady
from migrator.log import get


@dataclass(frozen=True)
class TableCopy:
    table: str
    rows: int
    bytes: int
    seconds: float


@dataclass
class CopyResult:
    snapshot: str | None
    copied: list[TableCopy] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    post_data_seconds: float = 0.0

    @property
    def rows(self) -> int:
        return sum(c.rows for c in self.copied)

    @property
    def bytes(self) -> int:
        return sum(c.bytes for c in self.copied)

    def to_dict(self) -> dict[str, Any]:
        return {
            "snapshot": self.snapshot, "seconds": round(self.seconds, 3), "rows": self.rows, "bytes": self.bytes,
            "post_data_seconds": round(self.post_data_seconds, 3),
            "tables": [c.__dict__ for c in self.copied], "already_copied": self.skipped,
        }


Progress = Callable[[str, int, int], None]
"""progress(table, rows_so_far, bytes_so_far), called from worker threads."""


def _copy_table(cfg: Config, table: Table, snapshot_id: str, snapshot: str, progress: Progress | None) -> TableCopy:
    log = get(phase="copy", table=table.display)
    started = time.monotonic()
    cols = sql.SQL(", ").join(sql.Identifier(c.name) for c in table.writable_columns)
    select = sql.SQL("COPY (SELECT {} FROM ONLY {}) TO STDOUT (FORMAT binary)").format(cols, table.ident)
    load = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT binary)").format(table.ident, cols)
    nbytes = 0
    with db.session(cfg.source_dsn, role="source") as source, db.session(cfg.target_dsn, role="target") as target:
        with source.cursor() as cur:
            cur.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            cur.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot_id)))
        with target.transaction(), target.cursor() as tcur, source.cursor() as scur:
            tcur.execute("SET LOCAL session_replication_role = replica")
            state.table_copy_started(target, table)
            # Triggers exist only when a table is copied again after post-data; ALWAYS ones must not fire either.
            firing = schema.firing_in_replica(tcur).get((table.schema, table.name), [])
            with schema.silenced(tcur, table.ident, firing):
                try:
                    with target.transaction():
                        tcur.execute(sql.SQL("TRUNCATE ONLY {}").format(table.ident))
                except psycopg.errors.FeatureNotSupported:
                    # Referenced by a foreign key (a table copied again after post-data): with triggers off
                    # (replica role) a DELETE empties it just the same.
                    tcur.execute(sql.SQL("DELETE FROM ONLY {}").format(table.ident))
                last_report = time.monotonic()
                with scur.copy(select) as out, tcur.copy(load) as into:
                    for block in out:
                        into.write(block)
                        nbytes += len(block)
                        if progress and time.monotonic() - last_report > 0.5:
                            progress(table.display, -1, nbytes)
                            last_report = time.monotonic()
                rows = tcur.rowcount
            state.table_copied(target, table, snapshot, rows, nbytes)
        source.rollback()
    if progress:
        progress(table.display, rows, nbytes)
    seconds = time.monotonic() - started
    log.info("copy.table_done", rows=rows, bytes=nbytes, seconds=round(seconds, 3))
    return TableCopy(table.display, rows, nbytes, seconds)


def run(cfg: Config, *, workers: int | None = None, progress: Progress | None = None,
        only: list[str] | None = None) -> CopyResult:
    """Copy every table not yet copied; then post-data and ANALYZE. Re-runnable: finished tables are kept.

    `only` re-copies the named tables (schema.table) even if copied already, each under a new boundary.
    """
    log = get(phase="copy")
    started = time.monotonic()
    workers = max(1, workers or cfg.copy.workers)
    with db.session(cfg.target_dsn, role="target") as target, db.session(cfg.source_dsn, role="source") as holder:
        m = state.migration(target)
        if m is None or m.prepared_at is None:
            raise NotReady("the migration is not prepared", hint="Run `migrator prepare` first.")
        if capture.is_frozen(holder):
            raise NotReady("the legacy database is frozen after cutover; there is nothing to copy")
        holder.rollback()
        states = {s.display: s for s in state.tables(target)}
        if only:
            unknown = [n for n in only if n not in states]
            if unknown:
                raise MigratorError(f"not a captured table: {', '.join(unknown)}")
            state.reset_tables(target, [(states[n].schema_name, states[n].table_name) for n in only])
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
        result = CopyResult(snapshot=snapshot, skipped=[n for n, s in states.items() if s.status == "copied"])
        if m.copy_snapshot is None:
            # The first snapshot is where replay starts: every change it does not contain is in the delta log.
            state.mark(target, "copy_snapshot", snapshot)
            state.mark(target, "copy_started_at")
            state.init_position(target, snapshot)
            target.commit()
        log.info("copy.start", tables=len(pending), already_copied=len(result.skipped), workers=workers)
        # Largest first, so the longest table does not start last.
        pending.sort(key=lambda t: -t.bytes)
        failures: list[tuple[str, BaseException]] = []
        lock = threading.Lock()
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="copy") as pool:
            futures = {pool.submit(_copy_table, cfg, t, snapshot_id, snapshot, progress): t for t in pending}
            for fut in as_completed(futures):
                t = futures[fut]
                try:
                    done = fut.result()
                    with lock:
                        result.copied.append(done)
                except (psycopg.Error, MigratorError) as exc:
                    log.error("copy.table_failed", table=t.display, error=str(exc).splitlines()[0])
                    failures.append((t.display, exc))
        holder.rollback()
        if failures:
            name, first = failures[0]
            raise CopyError(f"copy of {len(failures)} table(s) failed, first {name}: {str(first).splitlines()[0]}") \
                from first
        m = state.migration(target)
        assert m is not None
        if m.post_data_at is None:
            t0 = time.monotonic()
            target.commit()
            schema.load_section(cfg.source_dsn, cfg.target_dsn, "post-data")
            state.mark(target, "post_data_at")
            target.commit()
            result.post_data_seconds = time.monotonic() - t0
        target.commit()  # a re-run skips post-data and still has its state reads open; autocommit needs none
        target.autocommit = True
        with target.cursor() as cur:
            for done in result.copied:
                cur.execute(sql.SQL("ANALYZE {}").format(by_name[done.table].ident))
        target.autocommit = False
        state.mark(target, "copy_finished_at")
        target.commit()
    result.seconds = time.monotonic() - started
    log.info("copy.done", tables=len(result.copied), rows=result.rows, bytes=result.bytes,
             seconds=round(result.seconds, 3))
    return result
