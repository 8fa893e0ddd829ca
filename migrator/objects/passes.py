"""`objects sync`: passes over the objects query that copy what the target store lacks and quarantine the files
whose row left the source.

A full pass lists every object (one snapshot of the legacy database), copies what is missing or changed, and
quarantines each recorded copy whose location no row lists any more. A follow pass (`--follow`, after the first)
lists only the rows that changed since the last pass: their keys come from the delta log, in the window from the
recorded snapshot to the pass's own, read under the log's lock so that no rotation truncates it meanwhile; a
recorded copy of a changed key that no row lists any more is quarantined once no row of the snapshot references its
location. A pass is full when there is no delta log, when a table the query reads is not captured, when a child of
the log was truncated since the last pass (its events are gone), when changes name no row by key (a TRUNCATE), every
`[objects] full_pass_interval` seconds (files changed in place leave no trace in the log), and for `objects sync`
without --follow (on demand). A pass cut short by a stop quarantines nothing and records no position.
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime as dt
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from migrator import db, log, state
from migrator.config import Config, ObjectSettings
from migrator.deltalog import read, rotation, triggers
from migrator.deltalog.snapshot import Snapshot
from migrator.objects import quarantine
from migrator.objects.copying import MISSING, Copier, Outcome, Throttle
from migrator.objects.listing import MAX_LISTED, ObjectRow, list_objects, query_tables, settings
from migrator.store import BadLocation, Store, normalise, open_store

_RECORD_EVERY = 500
_BATCH = 500
_LISTED = sql.Identifier("pg_temp", "migrator_objects_listed")


@dataclass
class ObjectSyncResult:
    passes: int = 0
    full_passes: int = 0
    listed: int = 0
    """Rows the last pass listed (a follow pass: only those of the changed keys)."""
    changed_keys: int = 0
    """Keys the last follow pass read from the delta log."""
    last_pass: str = ""
    """"full (why)" or "follow"."""
    pass_seconds: float = 0.0
    """How long the last pass took."""
    copied: int = 0
    present: int = 0
    """Already in the target store with the source's bytes (recorded, or read and compared)."""
    bytes_copied: int = 0
    seconds: float = 0.0
    quarantined: int = 0
    """Files moved to the quarantine because their row left the source."""
    quarantined_keys: list[str] = field(default_factory=list)
    quarantine_root: str = ""
    failed: list[tuple[str, str]] = field(default_factory=list)
    """(key, reason) of objects that could not be copied or quarantined (first MAX_LISTED)."""
    failed_count: int = 0

    @property
    def ok(self) -> bool:
        return self.failed_count == 0

    def fail(self, key: str, reason: str) -> None:
        self.failed_count += 1
        if len(self.failed) < MAX_LISTED:
            self.failed.append((key, reason))

    def to_dict(self) -> dict[str, Any]:
        return {
            "passes": self.passes, "full_passes": self.full_passes, "last_pass": self.last_pass,
            "pass_seconds": round(self.pass_seconds, 3), "listed": self.listed, "changed_keys": self.changed_keys,
            "copied": self.copied,
            "present": self.present, "bytes_copied": self.bytes_copied, "seconds": round(self.seconds, 3),
            "megabytes_per_second": round(self.bytes_copied / 1e6 / self.seconds, 1) if self.seconds else None,
            "quarantined": self.quarantined, "quarantined_keys": self.quarantined_keys,
            "quarantine": self.quarantine_root, "failed_count": self.failed_count,
            "failed": [{"key": k, "reason": r} for k, r in self.failed],
        }

    def render_text(self) -> str:
        lines = [f"objects: {self.listed:,} listed, {self.copied:,} copied ({self.bytes_copied / 1e6:.1f} MB), "
                 f"{self.present:,} already present, {self.quarantined:,} quarantined, {self.failed_count:,} failed; "
                 f"{self.passes} pass(es), last {self.last_pass}; {self.seconds:.1f}s"]
        if self.quarantined:
            lines.append(f"  quarantined (row left the source) into {self.quarantine_root}: keys "
                         + ", ".join(self.quarantined_keys) + (" ..." if self.quarantined > MAX_LISTED else ""))
        lines += [f"  FAILED  key={k}: {r}" for k, r in self.failed]
        if self.failed_count > len(self.failed):
            lines.append(f"  ... and {self.failed_count - len(self.failed):,} more")
        return "\n".join(lines)


class _Pipeline:
    """Rows in, copies out: batches of rows looked up in the recorded copies, copied by the workers, recorded."""

    def __init__(self, tconn: psycopg.Connection[Any], copier: Copier, pool: cf.ThreadPoolExecutor, workers: int,
                 result: ObjectSyncResult, progress: Callable[[int, int], None] | None) -> None:
        self.tconn, self.copier, self.pool, self.workers = tconn, copier, pool, workers
        self.result, self.progress = result, progress
        self.pending: set[cf.Future[Outcome]] = set()
        self.records: list[state.ObjectCopy] = []
        self.missing: list[ObjectRow] = []
        """Rows whose file the source store lacked: looked at again once the pass is over."""

    def submit(self, rows: list[ObjectRow]) -> list[str]:
        """Copy these rows' files; returns their locations in canonical form ("" for one that is not a location)."""
        locations = [_location(r) for r in rows]
        known = state.objects_copied(self.tconn, set(locations) - {""})
        self.tconn.commit()
        for row, location in zip(rows, locations, strict=True):
            self.pending.add(self.pool.submit(self.copier, row, known.get(location)))
            if len(self.pending) >= self.workers * 4:
                done, self.pending = cf.wait(self.pending, return_when=cf.FIRST_COMPLETED)
                self._collect(done)
        return locations

    def drain(self) -> None:
        done, _ = cf.wait(self.pending)
        self.pending = set()
        self._collect(done)
        state.record_objects(self.tconn, self.records)
        self.tconn.commit()
        self.records.clear()

    def _collect(self, done: Iterable[cf.Future[Outcome]]) -> None:
        r = self.result
        for f in done:
            out = f.result()
            if out.kind == "copied":
                r.copied += 1
                r.bytes_copied += out.nbytes
            elif out.kind == "present":
                r.present += 1
            elif out.kind == "missing":
                self.missing.append(out.row)
            else:
                r.fail(out.row.key, out.reason or "failed")
            if out.record is not None:
                self.records.append(out.record)
        if len(self.records) >= _RECORD_EVERY:
            state.record_objects(self.tconn, self.records)
            self.tconn.commit()
            self.records.clear()
        if self.progress is not None:
            self.progress(r.copied + r.present + r.failed_count, r.bytes_copied)


def _location(row: ObjectRow) -> str:
    try:
        return normalise(row.location)
    except BadLocation:
        return ""


@dataclass
class _Run:
    """What every pass of one run shares."""

    cfg: Config
    settings: ObjectSettings
    sconn: psycopg.Connection[Any]
    tconn: psycopg.Connection[Any]
    target: Store
    pipeline: _Pipeline
    stop: threading.Event
    result: ObjectSyncResult
    followed: list[int] | None = None
    """The captured tables the query reads (oids); None: a follow pass is not possible (`why_full`)."""
    why_full: str = ""

    def batches(self, rows: Iterable[ObjectRow]) -> Iterable[list[ObjectRow]]:
        batch: list[ObjectRow] = []
        for row in rows:
            if self.stop.is_set():
                return
            batch.append(row)
            self.result.listed += 1
            if len(batch) >= _BATCH:
                yield batch
                batch = []
        if batch:
            yield batch

    def to_quarantine(self, copies: list[state.ObjectCopy], before: dt.datetime) -> None:
        for m in quarantine.move(self.tconn, self.target, copies, before):
            self.moved(m)

    def moved(self, m: quarantine.Moved) -> None:
        if m.outcome == "moving":
            self.result.fail(m.entry.key or "?", f"could not be moved to the quarantine: {m.error}")
            return
        if m.outcome != "quarantined":
            return  # no file there any more: recorded as absent, nothing moved
        self.result.quarantined += 1
        if len(self.result.quarantined_keys) < MAX_LISTED:
            self.result.quarantined_keys.append(m.entry.key or "?")


def _followed(sconn: psycopg.Connection[Any], query: str) -> tuple[list[int] | None, str]:
    """The tables whose changes say which rows to list again, or None and why every pass must be full."""
    if not read.has_log(sconn):
        sconn.rollback()
        return None, "no delta log on the legacy database (not prepared)"
    tables = query_tables(sconn, query)
    captured = triggers.installed_tables(sconn)
    sconn.rollback()
    missing = [t for t in tables if t not in captured]
    if missing or not tables:
        return None, f"{len(missing) or 'no'} table(s) the query reads not captured"
    return tables, ""


def sync(cfg: Config, *, follow: bool = False, stop: threading.Event | None = None, workers: int | None = None,
         max_rate: float | None = None, progress: Callable[[int, int], None] | None = None,
         passes: int | None = None, first_full: bool = True) -> ObjectSyncResult:
    """One full pass; with `follow`, then a pass every `poll_interval` until `stop` is set (or `passes` were made),
    reading the rows changed since the last from the delta log. `first_full=False` makes the first pass of a follow
    read the log from the recorded position too (tests, benchmarks). `progress(files, bytes)` is called as objects
    are done."""
    s = settings(cfg)
    source, target = open_store(s.source_root, "source"), open_store(s.target_root, "target")
    workers = max(1, workers or s.workers)
    stop = stop or threading.Event()
    result = ObjectSyncResult(quarantine_root=target.quarantine_root())
    started = time.monotonic()
    copier = Copier(source, target, Throttle(max_rate if max_rate is not None else s.max_rate))
    with db.session(cfg.target_dsn, role="target", application_name="migrator-objects") as tconn, \
            db.session(cfg.source_dsn, role="source", application_name="migrator-objects") as sconn, \
            cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="objects") as pool:
        state.upgrade(tconn)
        # Each pass reads the legacy database in one snapshot: the log's window and the rows it lists.
        sconn.isolation_level, sconn.read_only = psycopg.IsolationLevel.REPEATABLE_READ, True
        run = _Run(cfg, s, sconn, tconn, target, _Pipeline(tconn, copier, pool, workers, result, progress), stop,
                   result)
        for m in quarantine.recover(tconn, target):
            run.moved(m)
        assert s.query is not None
        run.followed, run.why_full = _followed(sconn, s.query)
        full: str | None = ("first pass" if first_full else None) if follow else "on demand"
        while not stop.is_set():
            _one_pass(run, full)
            full = None
            if not follow or (passes is not None and result.passes >= passes):
                break
            stop.wait(s.poll_interval)
    result.seconds = time.monotonic() - started
    return result


def _one_pass(run: _Run, full: str | None) -> None:
    r = run.result
    r.listed = r.changed_keys = 0
    failed_before = r.failed_count
    t0 = time.monotonic()
    why = full or run.why_full or _follow_pass(run)
    if why:
        _full_pass(run, why)
    _missing(run)
    if run.stop.is_set():
        return  # cut short: nothing counted as a pass
    r.passes += 1
    r.pass_seconds = time.monotonic() - t0
    log.get(phase="objects").info("objects.pass", mode=r.last_pass, listed=r.listed, changed_keys=r.changed_keys,
                                  copied=r.copied, present=r.present, quarantined=r.quarantined,
                                  failed=r.failed_count, bytes=r.bytes_copied)
    if r.failed_count > failed_before:
        log.get(phase="objects").warning("objects.failed", count=r.failed_count - failed_before)


def _missing(run: _Run) -> None:
    """A file missing in the source store is a failure when its row still names it now and a second try finds it
    missing again: a row deleted or pointed elsewhere after the pass's snapshot (the application removing its file)
    is the next pass's business."""
    rows, run.pipeline.missing = run.pipeline.missing, []
    if not rows:
        return
    assert run.settings.query is not None
    try:
        still = {(r.key, r.location) for r in list_objects(run.sconn, run.settings.query,
                                                           keys=sorted({r.key for r in rows}))}
    finally:
        run.sconn.rollback()
    for row in rows:
        if (row.key, row.location) in still:
            # The row still names it: a copy again tells a file the source store lacks from one that came back.
            run.pipeline.submit([row])
    run.pipeline.drain()
    for row in run.pipeline.missing:
        run.result.fail(row.key, MISSING)
    run.pipeline.missing = []


def _full_pass(run: _Run, why: str) -> None:
    """List every object in one snapshot; quarantine each recorded copy whose location no row lists any more."""
    sconn, tconn, query = run.sconn, run.tconn, run.settings.query
    assert query is not None
    r = run.result
    r.listed = 0
    before = state.clock(tconn)
    tconn.execute(sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} (location text)").format(_LISTED))
    tconn.execute(sql.SQL("TRUNCATE {}").format(_LISTED))
    tconn.commit()
    # The log's children before the snapshot: a truncate after this is seen by the next pass.
    children = rotation.children_files(sconn) if run.followed is not None else None
    sconn.rollback()
    snap = _snapshot(sconn)
    try:
        for batch in run.batches(list_objects(sconn, query)):
            locations = run.pipeline.submit(batch)
            with tconn.cursor() as cur, cur.copy(sql.SQL("COPY {} (location) FROM STDIN").format(_LISTED)) as cp:
                for location in locations:
                    cp.write_row((location,))
            tconn.commit()
    finally:
        run.pipeline.drain()
        sconn.rollback()
    if run.stop.is_set():
        return
    run.to_quarantine(state.copies_not_listed(tconn, _LISTED, before), before)
    tconn.execute(sql.SQL("DROP TABLE {}").format(_LISTED))
    if run.followed is not None:
        state.save_objects_position(tconn, snap, children, full=True)
    tconn.commit()
    r.full_passes += 1
    r.last_pass = f"full ({why})"


def _snapshot(conn: psycopg.Connection[Any]) -> str:
    row = conn.execute("SELECT pg_current_snapshot()::text").fetchone()
    assert row is not None
    return str(row[0])


def _follow_pass(run: _Run) -> str:
    """List the rows changed since the last pass; returns why a full pass must be made instead ("" when done)."""
    sconn, tconn, query, followed = run.sconn, run.tconn, run.settings.query, run.followed
    assert query is not None and followed is not None
    position = state.objects_position(tconn)
    now = state.clock(tconn)
    tconn.commit()
    if position is None:
        return "no position recorded"
    if (now - position.full_at).total_seconds() >= run.settings.full_pass_interval:
        return "periodic"
    try:
        with sconn.cursor() as cur:
            read.lock_log(cur)  # before the snapshot: no child is truncated while this pass reads the log
        children = rotation.children_files(sconn)
        snap = _snapshot(sconn)
        if children != position.log_children:
            return "the delta log was truncated since the last pass"
        applied = Snapshot.parse(position.snapshot)
        if read.changed_without_key(sconn, followed, applied):
            return "changes that name no row (a TRUNCATE, a table without a key)"
        keys = list(read.changed_keys(sconn, followed, applied, batch=_BATCH))
        candidates: list[state.ObjectCopy] = []
        for batch in keys:
            run.result.changed_keys += len(batch)
            listed: set[str] = set()
            for rows in run.batches(list_objects(sconn, query, keys=batch)):
                listed.update(run.pipeline.submit(rows))
            candidates += [c for c in state.copies_of_keys(tconn, batch, now) if c.location not in listed]
            tconn.commit()
        run.pipeline.drain()
        if run.stop.is_set():
            return ""
        if candidates:
            referenced = {_location(row) for row in list_objects(
                sconn, query, locations=sorted({c.location for c in candidates}))}
            run.to_quarantine([c for c in candidates if c.location not in referenced], now)
    finally:
        run.pipeline.drain()
        sconn.rollback()
    state.save_objects_position(tconn, snap, children, full=False)
    tconn.commit()
    run.result.last_pass = "follow"
    return ""
