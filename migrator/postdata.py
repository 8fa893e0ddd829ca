"""Post-data after the bulk copy: whole when the target holds the source as of one snapshot, in two parts otherwise.

A first copy, every chunk read under its one snapshot, restores it table by table as the tables arrive
(`AsTablesArrive`): a table's own items once its chunks are in, a foreign key once both its tables are.

Copy reads every chunk under its coordinator's exported snapshot; a copy killed and resumed reads the chunks left
under a new one, and tables prepare added later (or a post-data owed for them) are copied while sync has moved the
other tables on. Until sync has applied a batch whose snapshot contains every chunk's, the target then holds rows of
several moments: a child whose parent was deleted between two chunks' snapshots, two rows that swapped a unique
value. Post-data items that relate rows to each other would fail on them (a foreign key validated, a unique or
exclusion index built), for good, since copying again cannot help. So copy restores what holds for any such mix
(schema.py's "immediate" part) and records the rest in the control schema (`state.defer_post_data`); sync restores
it (`after_batch`) once its applied position contains every chunk's snapshot, when the target is the source as of
one snapshot, and the go/no-go refuses a cutover until it has.

Sync applies batches with `session_replication_role = replica`, so foreign keys are not checked while it writes and
their absence changes nothing; a unique index built after that batch holds in every later state, since each batch
turns the rows of one snapshot into those of a later one.
"""

from __future__ import annotations

import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from migrator import db, schema, state
from migrator.catalog import Table
from migrator.config import Config
from migrator.deltalog.snapshot import Snapshot
from migrator.log import get


def after_copy(cfg: Config, target: psycopg.Connection[Any], m: state.Migration, jobs: int) -> list[str]:
    """Restore the post-data copy owes once every chunk is copied: the whole of it the first time, when every
    chunk was read under one snapshot; otherwise (chunks of several snapshots, or tables prepare added after the first
    post-data) the part that holds for rows of several moments, recording the rest for sync. Commits; returns the
    descriptions of the items left for sync."""
    owed_tables = state.post_data_pending(target)
    if m.post_data_at is not None and not owed_tables:
        return []
    tables = None if m.post_data_at is None else owed_tables
    one_snapshot = len({c.snapshot for c in state.chunks(target)}) <= 1
    target.commit()
    if tables is None and one_snapshot:
        # Resumable: a first copy killed after its last chunk may have restored some tables' items already.
        schema.load_section(cfg.source_dsn, cfg.target_dsn, "post-data", jobs=jobs, resumable=True)
        left: list[str] = []
    else:
        left = schema.load_section(cfg.source_dsn, cfg.target_dsn, "post-data", jobs=jobs, tables=tables,
                                   part="immediate")
    if left:
        state.defer_post_data(target, tables, left)
        get(phase="copy").info("copy.post_data_deferred", objects=len(left), tables=len(tables or []) or None)
    if m.post_data_at is None:
        state.mark(target, "post_data_at")
    state.clear_post_data_pending(target)
    target.commit()
    return left


class AsTablesArrive:
    """A first copy's post-data, restored table by table while the copy goes on: a table's indexes, constraints and
    triggers as soon as all its chunks are in, then its ANALYZE; a foreign key once both its tables' own items are
    in; the rest (comments, index attachments, materialized views' data) at the end (`finish`), with whatever was
    not started by then. Only for a run whose every chunk is read under its one snapshot (copy decides), so nothing
    here relates rows of two snapshots. Each group is a pg_restore of its items with `jobs` jobs, and `jobs` groups
    run at once, beside the copy workers (the servers' index builds fill what the copy leaves of the machine)."""

    def __init__(self, cfg: Config, tables: list[Table], jobs: int) -> None:
        self.cfg = cfg
        self.jobs = max(1, jobs)
        self._tmp = tempfile.TemporaryDirectory(prefix="migrator-postdata-")
        self._dump: schema.PostDataDump | None = None
        self.tables = {(t.schema, t.name): t for t in tables}
        self.pool = ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="postdata")
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.started: set[tuple[str, str]] = set()
        self.built: set[tuple[str, str]] = set()
        self.fks_left: list[tuple[str, set[tuple[str, str]]]] | None = None
        self.analyzed: set[str] = set()
        # The dump is made at once, while the first chunks copy, so the first table in restores without waiting.
        self.futures: list[Future[Any]] = [self.pool.submit(lambda: self.dump)]

    @property
    def dump(self) -> schema.PostDataDump:
        """The post-data dump, made once, by the task submitted when this starts (off the coordinator's thread)."""
        with self.lock:
            if self._dump is None:
                started = time.monotonic()
                self._dump = schema.PostDataDump(self.cfg.source_dsn, self.cfg.target_dsn, Path(self._tmp.name))
                self.fks_left = list(self._dump.foreign_keys)
                get(phase="copy").info("copy.post_data_dumped", seconds=round(time.monotonic() - started, 3))
            return self._dump

    def table_copied(self, schema_name: str, table_name: str) -> None:
        """Every chunk of this table is in: restore its own items, then analyze it (in the background)."""
        key = (schema_name, table_name)
        if key in self.started or key not in self.tables:
            return
        self.started.add(key)
        self.futures.append(self.pool.submit(self._table, key))

    def _table(self, key: tuple[str, str]) -> None:
        dump = self.dump
        items = dump.of_table.get(key, [])
        started = time.monotonic()
        # With `jobs` jobs: the last table's indexes build side by side, as nothing else runs then.
        dump.restore(items, jobs=self.jobs, stop=self.stop)
        with self.lock:
            assert self.fks_left is not None
            self.built.add(key)
            ready = [fk for fk in self.fks_left if fk[1] <= self.built]
            self.fks_left = [fk for fk in self.fks_left if fk not in ready]
        if ready:
            self.futures.append(self.pool.submit(dump.restore, [line for line, _ in ready], stop=self.stop))
        table = self.tables[key]
        with db.session(self.cfg.target_dsn, role="target", autocommit=True) as conn:
            conn.execute(sql.SQL("ANALYZE {}").format(table.ident))
        self.analyzed.add(table.display)
        get(phase="copy").info("copy.table_post_data_done", table=table.display, items=len(items),
                               seconds=round(time.monotonic() - started, 3))

    def finish(self, jobs: int) -> None:
        """Wait for what runs; restore what is left (tables never reported, foreign keys to tables outside the copy,
        the rest) with `jobs` parallel jobs."""
        while self.futures:
            self.futures.pop(0).result()
        dump = self.dump
        left = [line for key, lines in dump.of_table.items() if key not in self.built for line in lines]
        left += [line for line, _ in self.fks_left or []] + dump.others
        dump.restore(left, jobs=jobs, stop=self.stop)

    def close(self) -> None:
        """End early (a failed or interrupted copy): running restores are stopped, what they finished stays."""
        self.stop.set()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self._tmp.cleanup()


def mark_restored(target: psycopg.Connection[Any]) -> None:
    """Record the first post-data restored whole (by AsTablesArrive); commits."""
    state.mark(target, "post_data_at")
    state.clear_post_data_pending(target)
    target.commit()


def after_batch(cfg: Config, target: psycopg.Connection[Any], stop: threading.Event | None = None) -> list[str]:
    """Restore the post-data copy left for sync once the applied position contains every chunk's snapshot, under
    sync's position lock (no batch writes meanwhile, so building an index never waits on one, nor one on it); then
    record it done. Returns the descriptions of the items restored (empty when none waited, or not yet).

    Interrupted when `stop` is set meanwhile: the items already restored stay, the record too, and the next batch
    restores the rest."""
    if state.post_data_deferred(target) is None or (stop is not None and stop.is_set()):
        target.rollback()
        return []
    state.lock_position(target)
    owed = state.post_data_deferred(target)  # again under the lock: another sync may have restored it
    pos = state.position(target)
    applied = Snapshot.parse(pos.applied_snapshot) if pos else None
    snapshots = {c.snapshot for c in state.chunks(target) if c.snapshot}
    if owed is None or applied is None or not all(applied.includes(Snapshot.parse(s)) for s in snapshots):
        target.rollback()
        return []
    log = get(phase="sync")
    log.info("sync.post_data_started", objects=len(owed.objects))
    started = time.monotonic()
    try:
        schema.load_section(cfg.source_dsn, cfg.target_dsn, "post-data", jobs=max(1, cfg.copy.workers),
                            tables=owed.tables, part="deferred", stop=stop)
        state.clear_post_data_deferred(target)
        target.commit()
    except BaseException:
        target.rollback()
        raise
    log.info("sync.post_data_done", objects=len(owed.objects), seconds=round(time.monotonic() - started, 3))
    return owed.objects


def describe(owed: state.DeferredPostData, limit: int = 3) -> str:
    """What waits, for the operator: the count and the first few, by name."""
    shown = "; ".join(owed.objects[:limit]) + (f"; and {len(owed.objects) - limit} more"
                                               if len(owed.objects) > limit else "")
    return f"{len(owed.objects)} item(s) that relate rows ({shown})"
