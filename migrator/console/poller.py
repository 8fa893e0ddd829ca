"""The one loop that reads the databases for every viewer: ten viewers cost the databases what one does.

Every `[console] poll_interval` seconds it reads the control schema on the target (steps as they start and end,
flags, the sync samples, new audit rows) through one session; every `source_interval` seconds, through one session of
its own, the legacy database: one statement (`deltalog.read.overview`: frozen or not, the events pending per table
and their age, the delta log's size). While sync records samples younger than two of its intervals, the pending
events and lag come from them and that statement leaves them out. A second thread evaluates the go/no-go checklist every
`checklist_interval` seconds (gonogo.run, which opens its own sessions), and not while a cutover or rollback runs.

What it read becomes the page's view (migrator/console/view.py), published with a version number: the server-sent
events of every viewer send a view when its version changes.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections import deque
from typing import Any

import psycopg

from migrator import db, gonogo, state, status
from migrator.config import Config
from migrator.console import view as view_mod
from migrator.console.actions import Runner
from migrator.deltalog import read as read_log
from migrator.errors import MigratorError
from migrator.log import get
from migrator.redaction import scrub
from migrator.state.lock import action_lock_held

SAMPLES_KEPT = 720
"""Samples the page's chart shows: an hour at sync's default interval."""
AUDIT_KEPT = 400
RECHECK_AFTER = 5.0
"""Seconds at least between two evaluations of the checklist that actions asked for."""


class CountingCursor(psycopg.Cursor[Any]):
    """Counts the statements the console sends the legacy database (the console's own session)."""

    sent = 0
    _lock = threading.Lock()

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        with CountingCursor._lock:
            CountingCursor.sent += 1
        return super().execute(*args, **kwargs)


class Poller:
    def __init__(self, cfg: Config, runner: Runner) -> None:
        self.cfg = cfg
        self.runner = runner
        self.log = get(phase="console")
        self.version = 0
        self.text = "{}"
        """The view as JSON, as the page gets it."""
        self.view: dict[str, Any] = {}
        self.status: dict[str, Any] = {}
        """`status --json` as last read (for /api/status)."""
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._recheck = threading.Event()
        self._lock = threading.Lock()
        self._target: psycopg.Connection[Any] | None = None
        self._source: psycopg.Connection[Any] | None = None
        self._source_reading: status.SourceReading | None = None
        self._source_at = -float("inf")
        self._samples: deque[state.SyncSample] = deque(maxlen=SAMPLES_KEPT)
        self._audit: deque[state.AuditRow] = deque(maxlen=AUDIT_KEPT)
        self._checklist: dict[str, Any] | None = None
        self._busy = False
        """A cutover or rollback holds the action lock (the checklist waits)."""
        self._phase = ""
        self._clock = (dt.datetime.now(dt.UTC), time.monotonic())
        self._threads = [threading.Thread(target=self._loop, name="console-poller", daemon=True),
                         threading.Thread(target=self._checklist_loop, name="console-checklist", daemon=True)]

    # --- life ---------------------------------------------------------------------------------------------------

    def start(self) -> None:
        self.tick()
        for t in self._threads:
            t.start()

    def wake(self) -> None:
        """Read again now (after an action), not at the next interval."""
        self._wake.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            if t.is_alive():
                t.join(timeout=10)
        for conn in (self._target, self._source):
            if conn is not None:
                conn.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            self.tick()
            self._wake.wait(max(self.cfg.console.poll_interval - (time.monotonic() - t0), 0.05))
            self._wake.clear()

    # --- one read -----------------------------------------------------------------------------------------------

    def tick(self) -> None:
        """Read what changed and publish the view if it differs."""
        self.runner.reap()
        try:
            target = self._session("target")
            st, reading = status.read_target(self.cfg, target)
            extras = self._extras(target, reading)
            if reading is not None and st.cleaned_up_at is None:
                self._read_source(reading, extras)
                if self._source_reading is not None:
                    self._source_reading.apply(st)
            self._phase, self._busy = st.phase, extras.lock_held
            if extras.now is not None:
                self._clock = (extras.now, time.monotonic())
            view = view_mod.build(self.cfg, st, extras, self._checklist, self.runner)
            self.status = st.to_dict()
        except (psycopg.Error, MigratorError) as exc:
            self._drop("target")
            view = view_mod.unreadable(self.cfg, f"target not readable: {_line(exc)}")
        self._publish(view)

    def _extras(self, target: psycopg.Connection[Any], reading: status.TargetReading | None) -> view_mod.Extras:
        extras = view_mod.Extras()
        if reading is None:
            return extras
        since = self._samples[-1].at if self._samples else None
        self._samples.extend(state.samples(target, since=since, limit=SAMPLES_KEPT))
        extras.samples = list(self._samples)
        after = self._audit[-1].id if self._audit else 0
        self._audit.extend(state.audit_rows(target, after=after, limit=None if after else AUDIT_KEPT))
        extras.audit = list(self._audit)
        extras.hold = state.cutover_hold(target)
        extras.lock_held = action_lock_held(target)
        extras.last_verify = state.last_verify(target)
        extras.chunks = state.chunks(target)
        extras.tables = state.tables(target)
        row = target.execute("SELECT now()").fetchone()
        extras.now = row[0] if row else None
        return extras

    def _read_source(self, reading: status.TargetReading, extras: view_mod.Extras) -> None:
        """At most every `source_interval` seconds, one statement (`read.overview`); the pending events and lag
        from a fresh sample instead when sync records them."""
        if time.monotonic() - self._source_at < self.cfg.console.source_interval:
            return
        self._source_at = time.monotonic()
        sample = extras.samples[-1] if extras.samples else None
        fresh = (sample is not None and extras.now is not None
                 and (extras.now - sample.at).total_seconds() < 2 * self.cfg.sync.sample_interval)
        pos = reading.position
        try:
            frozen, by_rel, age, log_bytes = read_log.overview(self._session("source"),
                                                               pos.applied_snapshot if pos else None,
                                                               pending=not fresh)
        except (psycopg.Error, MigratorError) as exc:
            self._drop("source")
            self._source_reading = status.SourceReading(warnings=[f"source not readable: {_line(exc)}"])
            return
        found = status.SourceReading(frozen=frozen, delta_log={"rows": None, "bytes": log_bytes, "children": []})
        if fresh and sample is not None:
            found.pending_events, found.lag_seconds = sample.pending_events, sample.lag_seconds
            found.pending_by_table = sample.per_table
        else:
            found.pending_events, found.lag_seconds = sum(by_rel.values()), age
            found.pending_by_table = {reading.tables.get(oid, f"oid {oid}"): n for oid, n in sorted(by_rel.items())}
        self._source_reading = found

    def _session(self, side: str) -> psycopg.Connection[Any]:
        conn = self._target if side == "target" else self._source
        if conn is None or conn.closed:
            dsn = self.cfg.target_dsn if side == "target" else self.cfg.source_dsn
            conn = db.connect(dsn, role=side, autocommit=True, application_name="migrator-console",
                              connect_timeout=5)
            if side == "source":
                conn.cursor_factory = CountingCursor
                self._source = conn
            else:
                self._target = conn
        return conn

    def _drop(self, side: str) -> None:
        conn = self._target if side == "target" else self._source
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error:
                pass
        if side == "target":
            self._target = None
        else:
            self._source = None

    def _publish(self, view: dict[str, Any]) -> None:
        text = json.dumps(view, default=_json, sort_keys=True)
        with self._lock:
            if text == self.text:
                return
            self.view, self.text = view, text
            self.version += 1

    def now(self) -> dt.datetime:
        """The target's clock (which times the steps), as of the last read plus the time since."""
        at, mono = self._clock
        return at + dt.timedelta(seconds=time.monotonic() - mono)

    def snapshot(self) -> tuple[int, str]:
        """The current view's version and JSON."""
        with self._lock:
            return self.version, self.text

    # --- the checklist ------------------------------------------------------------------------------------------

    def recheck(self) -> None:
        """Evaluate the checklist again soon (an action was carried out)."""
        self._recheck.set()
        self.wake()

    def _checklist_loop(self) -> None:
        evaluated: tuple[str, float] = ("", -float("inf"))
        while not self._stop.wait(0.2):
            if self._phase not in ("syncing", "cut over"):
                self._checklist = None
                continue
            since = time.monotonic() - evaluated[1]
            due = (since >= self.cfg.console.checklist_interval or evaluated[0] != self._phase
                   or (self._recheck.is_set() and since >= RECHECK_AFTER))
            if self._busy or not due:
                continue  # a running cutover or rollback records its own checklist
            self._recheck.clear()
            evaluated = (self._phase, time.monotonic())
            self.evaluate_checklist()

    def evaluate_checklist(self) -> None:
        at = dt.datetime.now(dt.UTC)
        try:
            if self._phase == "cut over":
                found = gonogo.rollback_checklist(self.cfg)
                kind = "rollback"
            else:
                found = gonogo.run(self.cfg)
                kind = "cutover"
            self._checklist = {"for": kind, "go": found.go, "items": found.to_list(), "at": at}
        except (MigratorError, psycopg.Error) as exc:
            self._checklist = {"for": "cutover", "go": False, "items": [], "at": at, "error": _line(exc)}


def _line(exc: BaseException) -> str:
    text = scrub(str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _json(v: Any) -> Any:
    if isinstance(v, dt.datetime):
        return v.isoformat()
    if hasattr(v, "to_dict"):
        return v.to_dict()
    return str(v)

