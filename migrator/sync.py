"""Sync: replay the delta log onto the target, exactly once, so that the target reproduces the source.

Batches are cut by snapshots, as PgQ and Londiste do. The target records the source snapshot whose committed
changes it holds (`applied`). A batch takes a new snapshot `cur` on the source and carries every event whose
transaction is visible in `cur` but not in `applied`; its changes and the new position commit in one target
transaction. Visibility, not event order, decides membership, so a transaction that began before the copy and
commits after newer events were applied is still applied, once.

A table with a key logs only the keys its changes touched (triggers/capture_keys.sql). The batch replaces the
target's rows for those keys with the rows the source holds for them in `cur` — read in the batch's own
repeatable-read transaction and streamed by binary COPY — so the target becomes the source as of `cur` for every
key touched, whatever the order and number of changes in between (primary-key updates, delete and re-insert,
cascades, deferrable keys). A table without a key logs row images and is a multiset: the net count of each distinct
image is added or removed. For every table the copy boundary is kept (an event its copy snapshot already contains
is skipped). A TRUNCATE in the batch empties the table and copies it again from `cur`.

After a batch whose snapshot contains every copied chunk's, sync restores the post-data a copy left for it (a copy
whose chunks were read under different snapshots: postdata.py).

The window and the writing of a batch are the delta log's (deltalog/snapshot.py, deltalog/apply.py). Housekeeping
after a batch rotates the log on the source (deltalog/rotation.py): writers move to the next child of the log, and a
child that is no longer written is truncated once the applied position has every transaction that was running at
the switch finished, so none can still add to it unapplied.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from migrator import catalog, db, ownership, postdata, state
from migrator.catalog import Table
from migrator.config import Config
from migrator.deltalog import read, rotation, snapshot, triggers
from migrator.deltalog.apply import Applier
from migrator.deltalog.snapshot import Snapshot
from migrator.errors import ConnectionFailed, Interrupted, NotReady, SchemaChanged
from migrator.log import get
from migrator.redaction import KeyMask

WAIT_REPORT_AFTER = 2.0
"""Seconds a batch runs before sync looks for a lock it waits for (and again as often while it runs)."""


@dataclass(frozen=True)
class Lag:
    pending_events: int
    oldest_pending_seconds: float | None
    applied_snapshot: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"pending_events": self.pending_events, "oldest_pending_seconds": self.oldest_pending_seconds,
                "applied_snapshot": self.applied_snapshot}


@dataclass
class SyncResult:
    batches: int = 0
    events: int = 0
    seconds: float = 0.0
    caught_up: bool = False
    applied_snapshot: str | None = None
    lag: Lag | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "events": self.events, "seconds": round(self.seconds, 3),
                "events_per_second": round(self.events / self.seconds, 1) if self.seconds else None,
                "caught_up": self.caught_up, "applied_snapshot": self.applied_snapshot,
                "lag": self.lag.to_dict() if self.lag else None}

    def render_text(self) -> str:
        return (f"applied {self.events} events in {self.batches} batches ({self.seconds:.1f}s); "
                f"{'caught up' if self.caught_up else 'stopped'}")


@dataclass(frozen=True)
class BatchInfo:
    events: int
    seconds: float
    snapshot: str
    lag: Lag | None


def pending(source: psycopg.Connection[Any], applied: str | None) -> Lag:
    """Committed changes not yet applied, and the age of the oldest (from the source's delta log)."""
    events, age = read.pending(source, applied)
    return Lag(events, None if age is None else max(age, 0.0), applied)


class _Watch:
    """Beside a running batch (a thread): on `stop`, cancel the statements of the batch's two sessions, so that it
    rolls back at once instead of waiting (its changes and the new position commit together: nothing is lost or
    applied twice); and while it lasts, name what it waits for (`sync.waiting`: the lock, the sessions holding it),
    read through a separate session to each server opened only then."""

    def __init__(self, cfg: Config, sessions: dict[str, psycopg.Connection[Any]], stop: threading.Event) -> None:
        self.cfg = cfg
        self.sessions = sessions
        self.pids = {side: conn.info.backend_pid for side, conn in sessions.items()}
        self.stop = stop
        self.cancelled = False
        self.waiting: str | None = None
        """What the batch last waited for ("the target: a lock on ..., blocked by pid ..."), or None."""
        self._done = threading.Event()
        self._monitors: dict[str, psycopg.Connection[Any]] = {}
        self._thread = threading.Thread(target=self._run, name="sync-watch", daemon=True)

    def __enter__(self) -> _Watch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        started = time.monotonic()
        next_look = started + WAIT_REPORT_AFTER
        try:
            while not self._done.wait(0.1):
                if self.stop.is_set() and not self.cancelled:
                    self.cancelled = True
                    self._look(time.monotonic() - started)  # what it waited for, for the operator's message
                    for conn in self.sessions.values():
                        try:
                            conn.cancel_safe(timeout=5.0)
                        except psycopg.Error:
                            pass  # the session is gone: its transaction rolls back all the same
                if time.monotonic() >= next_look:
                    next_look = time.monotonic() + WAIT_REPORT_AFTER
                    self._look(time.monotonic() - started)
        finally:
            for conn in self._monitors.values():
                conn.close()

    def _look(self, seconds: float) -> None:
        found = []
        for side, pid in self.pids.items():
            try:
                if side not in self._monitors:
                    dsn = self.cfg.source_dsn if side == "source" else self.cfg.target_dsn
                    self._monitors[side] = db.connect(dsn, role=side, autocommit=True,
                                                      application_name="migrator-sync-watch")
                wait = db.lock_wait(self._monitors[side], pid)
            except (psycopg.Error, ConnectionFailed):
                continue  # looking is a courtesy; the batch itself reports a lost server
            if wait is not None:
                found.append(f"the {side}: {wait}")
                get(phase="sync").warning("sync.waiting", side=side, seconds=round(seconds), waits_for=wait)
        self.waiting = "; ".join(found) or None


def check_schema(source: psycopg.Connection[Any], cfg: Config,
                 states: list[state.TableState]) -> dict[int, Table]:
    """The captured tables as the source defines them now; SchemaChanged when DDL changed, added or dropped one."""
    tables = catalog.list_tables(source, cfg.tables)
    recorded = {(s.schema_name, s.table_name): s for s in states}
    problems = []
    by_oid: dict[int, Table] = {}
    for t in tables:
        s = recorded.pop((t.schema, t.name), None)
        if s is None:
            problems.append(f"new table {t.display}")
        elif s.source_oid != t.oid:
            problems.append(f"{t.display} was dropped and created again")
        elif s.fingerprint != t.fingerprint:
            problems.append(f"{t.display} was altered")
        elif tuple(s.key_columns or ()) != t.key:
            problems.append(f"{t.display}'s key changed (from {', '.join(s.key_columns) or 'none'} to "
                            f"{', '.join(t.key) or 'none'})")
        by_oid[t.oid] = t
    problems += [f"{s.display} was dropped or renamed" for s in recorded.values()]
    if problems:
        raise SchemaChanged("DDL on the legacy database: " + "; ".join(problems[:20]))
    # A capture trigger dropped or disabled by hand, or tables captured by an earlier version of migrator whose
    # trigger set differs: changes could go unlogged from now on. `prepare` makes the triggers again.
    present = triggers.present_triggers(source, enabled_always=True)
    wrong = []
    for t in tables:
        have = present.get(t.oid, set())
        if not triggers.capture_complete(t, have):
            wrong.append(f"{t.display} (now in an inheritance tree, which needs row-level capture)"
                         if t.in_hierarchy and have == triggers.STATEMENT_LEVEL_SET else t.display)
    if wrong:
        raise SchemaChanged(
            f"the capture triggers of {', '.join(wrong[:20])} on the legacy database are not the ones migrator "
            "installs, enabled ALWAYS (dropped or disabled by hand, or made by an earlier version); changes to "
            "them may not be logged",
            hint="Run `migrator prepare --yes`, which makes them again, then `migrator sync`; if a table's "
                 "triggers were missing while it was written, `migrator verify` it and copy it again with "
                 "`migrator copy --tables` when it differs.")
    return by_oid


class Syncer:
    """Reads batches from the source and hands them to the applier; owns the two connections."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.log = get(phase="sync")
        self.source = db.connect(cfg.source_dsn, role="source")
        self.target = db.connect(cfg.target_dsn, role="target")
        m = state.require_prepared(self.target)
        ownership.check(self.source, m, "sync")
        self.states = state.tables(self.target)
        not_copied = [s.display for s in self.states if s.status != "copied"]
        if m.copy_finished_at is None or not_copied:
            raise NotReady(f"the copy is not finished ({len(not_copied)} table(s) pending)",
                           hint="Run `migrator copy` until it reports done, then sync.")
        mask = KeyMask.of(self.target)
        self.target.commit()
        self.applier = Applier(self.target, {}, mask)
        self.last_housekeeping = 0.0
        self.rotation_note: str | None = None

    def close(self) -> None:
        for conn in (self.source, self.target):
            try:
                conn.close()
            except psycopg.Error:
                pass

    def _boundaries(self, applied: Snapshot) -> dict[int, str]:
        """Copy snapshots that may still contain changes of this batch, per table: their events are skipped (for a
        table with a key only an economy, and a necessity after its key changed; for one without, correctness)."""
        return {s.source_oid: s.copy_snapshot for s in self.states
                if s.copy_snapshot and not applied.surely_contains(Snapshot.parse(s.copy_snapshot))}

    def batch(self, stop: threading.Event | None = None) -> BatchInfo:
        """Apply one batch: everything committed on the source since the applied position.

        Interrupted when `stop` is set while it runs: its statements are cancelled and it rolls back (the position
        stays where it was)."""
        watch = _Watch(self.cfg, {"source": self.source, "target": self.target}, stop or threading.Event())
        try:
            with watch:
                info = self._batch()
        except psycopg.errors.QueryCanceled as exc:
            if not watch.cancelled:
                raise
            raise Interrupted(
                "sync stopped during a batch"
                + (f" that waited for {watch.waiting}" if watch.waiting else "")
                + "; the batch was rolled back and the applied position is unchanged") from exc
        # Post-data copy left because its chunks were read under different snapshots: now that the target may be the
        # source as of one snapshot.
        postdata.after_batch(self.cfg, self.target, stop)
        return info

    def _batch(self) -> BatchInfo:
        started = time.monotonic()
        src, tgt = self.source, self.target
        with src.cursor() as scur:
            scur.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            scur.execute(sql.SQL("SET LOCAL statement_timeout = {}").format(
                sql.Literal(f"{int(self.cfg.sync.statement_timeout * 1000)}ms")))
            scur.execute("SELECT pg_current_snapshot()::text")
            row = scur.fetchone()
            assert row is not None
            cur_snap = Snapshot.parse(row[0])
            self.applier.tables = check_schema(src, self.cfg, self.states)
        try:
            with tgt.cursor() as tcur:
                tcur.execute("SET LOCAL session_replication_role = replica")
                state.lock_position(tgt)
                # `copy --tables` sends tables back to pending under this same lock: a table being copied again
                # must not receive changes meanwhile (the copy empties it and fills it from a newer snapshot).
                self.states = state.tables(tgt)
                recopying = [s.display for s in self.states if s.status != "copied"]
                if recopying:
                    tgt.rollback()
                    raise NotReady(f"{', '.join(recopying)}: to be copied again (after `migrator copy --tables` or "
                                   "`prepare`); sync stopped without applying anything",
                                   hint="Run `migrator copy` until it reports done, then `migrator sync` again.")
                pos = state.position(tgt)
                assert pos is not None
                applied = Snapshot.parse(pos.applied_snapshot)
                if not cur_snap.includes(applied):
                    # Another sync applied a newer snapshot while this one waited for the lock: moving the position
                    # back to `cur_snap` would make the next batch apply those changes a second time.
                    tgt.rollback()
                    return BatchInfo(0, time.monotonic() - started, applied.text, None)
                window = snapshot.window(applied, cur_snap)
                with src.cursor() as scur:
                    changed = self.applier.changed(scur, window)
                    n_events = sum(n for _, n, _ in changed)
                    if changed:
                        self.applier.apply(scur, tcur, window, changed, self._boundaries(applied))
                if n_events or cur_snap.text != applied.text:
                    state.advance_position(tgt, applied.text, cur_snap.text, n_events)
            tgt.commit()
        except BaseException:
            tgt.rollback()
            raise
        finally:
            src.rollback()
        seconds = time.monotonic() - started
        if n_events:
            self.log.info("sync.batch", events=n_events, seconds=round(seconds, 3),
                          rate=round(n_events / seconds) if seconds else None)
        self._housekeeping(cur_snap)
        return BatchInfo(n_events, seconds, cur_snap.text, None)

    def _housekeeping(self, applied: Snapshot) -> None:
        """Rotate the legacy database's delta log (rotation.rotate), every `housekeeping_interval` seconds;
        `applied` is the position just committed. Says why rotation waits when that changes."""
        if time.monotonic() - self.last_housekeeping < self.cfg.sync.housekeeping_interval:
            return
        self.last_housekeeping = time.monotonic()
        note = "; ".join(rotation.rotate(self.source, applied, self.cfg.sync)) or None
        if note != self.rotation_note:
            if note:
                self.log.info("sync.log_rotation_waits", why=note)
            self.rotation_note = note

    def sample(self) -> None:
        """Record what sync sees now (lag, pending events per table, the delta log's size) in the control schema,
        for the console's chart; the oldest samples beyond `[sync] sample_days` go."""
        if not state.audit_present(self.target):  # a control schema from before samples: `prepare` upgrades it
            self.target.rollback()
            return
        pos = state.position(self.target)
        try:
            by_rel, age = read.pending_by_table(self.source, pos.applied_snapshot if pos else None)
            log_bytes = sum(c.bytes for c in rotation.log_children(self.source))
        finally:
            self.source.rollback()
        names = {s.source_oid: s.display for s in self.states}
        state.record_sample(self.target, lag_seconds=age, pending_events=sum(by_rel.values()), log_bytes=log_bytes,
                            events_applied=pos.events_applied if pos else 0,
                            per_table={names.get(oid, f"oid {oid}"): n for oid, n in sorted(by_rel.items())},
                            keep_days=self.cfg.sync.sample_days)
        self.target.commit()

    def lag(self) -> Lag:
        pos = state.position(self.target)
        self.target.rollback()
        try:
            return pending(self.source, pos.applied_snapshot if pos else None)
        finally:
            self.source.rollback()


def sync(cfg: Config, *, follow: bool = False, stop: threading.Event | None = None,
         on_batch: Callable[[BatchInfo, Lag], None] | None = None, max_retries: int | None = None,
         samples: bool = False) -> SyncResult:
    """Apply batches until nothing committed is pending (or, with follow, until `stop` is set); with `samples`,
    record a sample (`Syncer.sample`) after the first batch and then every `[sync] sample_interval` seconds (the
    command does; a cutover's catch-up and drain do not, to keep the freeze short).

    Connection failures are retried with backoff (for ever with follow, `max_retries` times otherwise, by default
    `[sync] connect_retries`); errors that
    need an operator (DDL, a refused change) stop it with the position unchanged. `stop` also cancels a batch in
    progress (it rolls back): with follow that is the end of the run; without, Interrupted says what was left.
    """
    stop = stop or threading.Event()
    result = SyncResult()
    started = time.monotonic()
    syncer: Syncer | None = None
    failures = 0
    last_sample = -float("inf")
    log = get(phase="sync")
    try:
        while not stop.is_set():
            try:
                if syncer is None:
                    syncer = Syncer(cfg)
                try:
                    info = syncer.batch(stop)
                except Interrupted as exc:
                    if not follow:
                        raise
                    log.info("sync.batch_cancelled", why=str(exc))
                    break
                failures = 0
                result.batches += 1 if info.events else 0
                result.events += info.events
                result.applied_snapshot = info.snapshot
                if on_batch is not None:
                    on_batch(info, syncer.lag())
                if samples and time.monotonic() - last_sample >= cfg.sync.sample_interval:
                    last_sample = time.monotonic()
                    syncer.sample()
                # Under a steady workload a batch never comes back empty; without follow, a batch shorter than the
                # poll interval counts as caught up (everything committed before it began is applied), or
                # `sync --until-caught-up` and the cutover's catch-up would never return.
                if info.events == 0 or (not follow and info.seconds < cfg.sync.poll_interval):
                    result.caught_up = True
                    if not follow:
                        break
                    stop.wait(cfg.sync.poll_interval)
                else:
                    result.caught_up = False
            # ConnectionFailed: the reconnect itself was refused (server restarting, slots full); retried alike.
            except (psycopg.OperationalError, ConnectionFailed) as exc:
                failures += 1
                if syncer is not None:
                    syncer.close()
                    syncer = None
                if not follow and failures > (cfg.sync.connect_retries if max_retries is None else max_retries):
                    raise
                delay = min(2 ** failures * 0.5, 30.0)
                log.warning("sync.retry", error=str(exc).splitlines()[0], attempt=failures, delay=delay)
                stop.wait(delay)
        if syncer is not None:
            result.lag = syncer.lag()
    finally:
        if syncer is not None:
            syncer.close()
    result.seconds = time.monotonic() - started
    if not follow and not result.caught_up:
        raise Interrupted(f"sync stopped before it caught up, after {result.events} events in {result.batches} "
                          "batches; the rest stays pending")
    return result


def lag(cfg: Config) -> Lag:
    with db.session(cfg.target_dsn, role="target") as target, db.session(cfg.source_dsn, role="source") as source:
        state.require_prepared(target)
        pos = state.position(target)
        return pending(source, pos.applied_snapshot if pos else None)
