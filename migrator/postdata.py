"""Post-data after the bulk copy: whole when the target holds the source as of one snapshot, in two parts otherwise.

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

import threading
import time
from typing import Any

import psycopg

from migrator import schema, state
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
        schema.load_section(cfg.source_dsn, cfg.target_dsn, "post-data", jobs=jobs)
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
