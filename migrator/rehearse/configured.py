"""Rehearsal on the site's own test databases: `migrator --config FILE rehearse`.

The whole pipeline against the databases of the configuration, each phase timed and recorded in the target's control
schema (`state.rehearsal_phase`) as well as reported:

    admit (refuse, changing nothing, unless both may be written: `target.admit`) → start (what an earlier rehearsal
    left removed; the rehearsal marked on the target) → workload (started: `loads`) → inspect → prepare → copy →
    sync (follows for [rehearsal] sync_seconds under the workload) → live_verify (every row, while sync follows and
    the workload writes) → cutover (the configured pooler or switch_command, and the health gate; with neither,
    `--override no-switch`, said in the report) → verify (every row, the workload stopped, and what the workload
    committed checked on the target) → rollback and verify_back (with [rehearsal] rollback = true) → cleanup

Cleanup removes migrator's objects from the legacy database (the capture and the cutover's freeze; `migrator
cleanup --release-freeze`), unless the state is kept (`--keep`), also when a phase failed. What the workload wrote
stays in the legacy database, and the target keeps the migrated data and the control schema (what the report
reads); the next rehearsal empties it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg

from migrator import cleanup, copy, cutover, db, gonogo, prepare, rollback, state, sync, verify
from migrator import inspect as inspect_mod
from migrator import report as report_mod
from migrator.config import Config
from migrator.errors import MigratorError
from migrator.log import get
from migrator.rehearse import loads, target
from migrator.rehearse.report import Phase, RehearsalReport


def run(cfg: Config, spec: loads.LoadSpec, *, keep: bool = False, report_dir: Path | None = None,
        on_phase: Callable[[str], None] | None = None) -> RehearsalReport:
    """Rehearse on the configured test databases; refused (Blocked, nothing changed) unless `target.admit` says
    both may be written. Errors of a phase propagate, after cleanup (unless `keep`)."""
    admitted = target.admit(cfg, spec.kind)
    return _Rehearsal(cfg, spec, keep, on_phase, report_dir).run(admitted)


@dataclass
class _Lag:
    """sync's figures while it follows: aggregates only, so memory does not grow with the rehearsal."""

    batches: int = 0
    events: int = 0
    samples: int = 0
    total: float = 0.0
    worst: float = 0.0
    last: float = 0.0
    pending: int = 0


class _Rehearsal:
    def __init__(self, cfg: Config, spec: loads.LoadSpec, keep: bool,
                 on_phase: Callable[[str], None] | None, report_dir: Path | None = None) -> None:
        self.cfg, self.spec, self.keep, self.on_phase = cfg, spec, keep, on_phase
        self.report_dir = report_dir
        self.report = RehearsalReport(mode="configured", source=db.describe_dsn(cfg.source_dsn),
                                      target=db.describe_dsn(cfg.target_dsn), workload_kind=spec.kind, kept=keep)
        self.log = get(phase="rehearse")
        self.rehearsal_id: int | None = None
        self.load: loads.Load | None = None
        self.prepared = False
        self.cleaned = False
        self.in_flight = False
        self.lag = _Lag()
        self.sync_stop = threading.Event()
        self.sync_thread: threading.Thread | None = None
        self.sync_error: BaseException | None = None

    def timed(self, name: str, fn: Callable[[], str]) -> None:
        if self.on_phase:
            self.on_phase(name)
        t0 = time.monotonic()
        detail = fn()
        phase = Phase(name, time.monotonic() - t0, detail)
        self.report.phases.append(phase)
        self.log.info("rehearse.phase", name=name, seconds=round(phase.seconds, 3))
        if self.rehearsal_id is not None:
            with db.session(self.cfg.target_dsn, role="target", autocommit=True) as conn:
                state.rehearsal_phase(conn, self.rehearsal_id, name, phase.seconds, detail)

    def run(self, admitted: target.Admitted) -> RehearsalReport:
        try:
            self.timed("start", lambda: self._start(admitted))
            self.load = loads.make(self.cfg, self.spec)
            self.timed("workload", self.load.start)
            self.timed("inspect", self._inspect)
            self.timed("prepare", self._prepare)
            self.timed("copy", self._copy)
            self._follow()
            self.timed("sync", self._sync)
            self.timed("live_verify", self._live_verify)
            self._unfollow()
            self.timed("cutover", self._cutover)
            self.timed("verify", self._verify)
            if self.cfg.rehearsal.rollback:
                self.timed("rollback", self._rollback)
                self.timed("verify_back", self._verify_back)
            if not self.keep:
                self.timed("cleanup", self._cleanup)
            self.report.ok = not self.report.problems
        finally:
            self._unfollow(raising=False)  # an error on the way out is the one to report
            if self.load is not None:
                self.load.close()
            if not self.keep and self.prepared and not self.cleaned:
                self._cleanup_after_failure()
            self._finish()
        return self.report

    # Phases ---------------------------------------------------------------------------------------------------

    def _start(self, admitted: target.Admitted) -> str:
        done = target.start_over(self.cfg, admitted)
        self.rehearsal_id = target.mark(self.cfg, self.spec.kind)
        return done or "the target was empty"

    def _inspect(self) -> str:
        r = inspect_mod.run(self.cfg)
        return f"{'ready' if r.ready else 'BLOCKERS'}; {len(r.findings)} findings"

    def _prepare(self) -> str:
        self.prepared = True
        r = prepare.prepare(self.cfg)
        return f"{len(r.tables)} tables captured"

    def _copy(self) -> str:
        r = copy.run(self.cfg)
        self.report.rows, self.report.bytes = r.rows, r.bytes
        return f"{r.rows} rows, {r.bytes / 1e6:.1f} MB, {r.rows / max(r.seconds, 1e-6):.0f} rows/s"

    def _follow(self) -> None:
        """sync --follow in a thread, from the copy's end until the cutover begins."""
        def on_batch(info: sync.BatchInfo, lag: sync.Lag) -> None:
            seconds = lag.oldest_pending_seconds or 0.0
            self.lag.batches += 1 if info.events else 0
            self.lag.events += info.events
            self.lag.samples += 1
            self.lag.total += seconds
            self.lag.worst = max(self.lag.worst, seconds)
            self.lag.last, self.lag.pending = seconds, lag.pending_events

        def body() -> None:
            try:
                sync.sync(self.cfg, follow=True, stop=self.sync_stop, on_batch=on_batch)
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which raises it
                self.sync_error = exc

        self.sync_thread = threading.Thread(target=body, name="rehearse-sync", daemon=True)
        self.sync_thread.start()

    def _unfollow(self, *, raising: bool = True) -> None:
        if self.sync_thread is not None:
            self.sync_stop.set()
            self.sync_thread.join()
            self.sync_thread = None
        if raising:
            self._raise_sync_error()

    def _raise_sync_error(self) -> None:
        if self.sync_error is not None:
            error, self.sync_error = self.sync_error, None
            raise error

    def _sync(self) -> str:
        deadline = time.monotonic() + self.cfg.rehearsal.sync_seconds
        while time.monotonic() < deadline and self.sync_thread is not None and self.sync_thread.is_alive():
            time.sleep(0.2)
        self._raise_sync_error()
        lag = self.lag
        mean = lag.total / lag.samples if lag.samples else 0.0
        self.report.events_applied += lag.events
        self.report.sync = {"seconds": self.cfg.rehearsal.sync_seconds, "events": lag.events,
                            "batches": lag.batches, "lag_mean_seconds": round(mean, 3),
                            "lag_max_seconds": round(lag.worst, 3), "lag_last_seconds": round(lag.last, 3),
                            "pending_events": lag.pending}
        return (f"{lag.events} events applied in {lag.batches} batches; lag mean {mean:.2f}s, worst "
                f"{lag.worst:.2f}s, last {lag.last:.2f}s ({lag.pending} pending)")

    def _live_verify(self) -> str:
        rep = verify.verify(self.cfg)
        in_flight = sum(t.in_flight for t in rep.tables)
        if rep.exit_code != 0:
            self.report.problems.append("the live verify found differences:\n" + rep.render_text())
            return "DIFFERENT"
        # Rows still in flight after the re-read (the workload keeps writing them) leave the recorded verify short of
        # "identical", which the go/no-go `verify` item requires: the cutover overrides it by name then (recorded
        # with the attempt); its own verify inside the freeze, and the full verify after it, decide.
        self.in_flight = not rep.identical
        return f"no differences ({len(rep.tables)} tables; {in_flight} rows in flight, read again)"

    def _cutover(self) -> str:
        assert self.load is not None
        c = self.cfg.cutover
        moves = c.uses_pooler or bool(c.switch_command)
        overrides = (() if moves else (gonogo.NO_SWITCH,)) + (("verify",) if self.in_flight else ())
        self.load.at_cutover()
        r = cutover.run(self.cfg, overrides=overrides)
        self.report.freeze_seconds = r.freeze_seconds
        self.report.events_applied += r.events_drained
        pause = f", clients paused {r.pause_seconds:.2f}s" if r.pause_seconds is not None else ""
        health = f"; health gate: {r.health['verdict']}" if r.health else ""
        moved = "" if r.clients_moved else "; clients were not moved (no pooler and no switch_command configured)"
        verified = "; go/no-go verify overridden (rows in flight at the live verify)" if self.in_flight else ""
        return f"freeze {r.freeze_seconds or 0:.2f}s{pause}, {r.events_drained} events drained{health}{moved}{verified}"

    def _verify(self) -> str:
        assert self.load is not None
        text, stats = self.load.stop()
        self.report.workload, self.report.workload_text = stats, text
        rep = verify.verify(self.cfg)
        self.report.parity = {"identical": rep.identical, "summary": "identical" if rep.identical else "DIFFERENT",
                              "exit_code": rep.exit_code}
        if not rep.identical:
            self.report.problems.append("parity found differences:\n" + rep.render_text())
        checked = self.load.check()
        if checked is None:
            self.report.workload_check = {"by": "full verify"}
            return f"{self.report.parity['summary']} (the site's workload: checked by this full verify)"
        self.report.workload_check = checked.figures
        self.report.workload_check_text = checked.text
        if not checked.ok:
            self.report.problems.append(checked.text)
        return f"{self.report.parity['summary']}; {checked.text}"

    def _rollback(self) -> str:
        c = self.cfg.cutover
        moves = c.uses_pooler or bool(c.rollback_command)
        r = rollback.run(self.cfg, overrides=() if moves else (gonogo.NO_SWITCH,))
        pause = f", clients paused {r.pause_seconds:.2f}s" if r.pause_seconds is not None else ""
        return f"{r.events_replayed} events replayed onto the legacy database{pause}"

    def _verify_back(self) -> str:
        rep = verify.verify(self.cfg)
        if not rep.identical:
            self.report.problems.append("after the rollback, parity found differences:\n" + rep.render_text())
        return "identical" if rep.identical else "DIFFERENT"

    def _cleanup(self) -> str:
        r = cleanup.run(self.cfg, release_freeze=True, release_target=True)  # throwaway: both sides may take writes
        self.cleaned = True
        return r.render_text()

    def _cleanup_after_failure(self) -> None:
        """A phase failed: migrator's objects still leave the legacy database (the error goes on being raised)."""
        try:
            self._cleanup()
        except (MigratorError, psycopg.Error) as exc:
            self.log.warning("rehearse.cleanup_failed", error=str(exc).splitlines()[0])
            self.report.problems.append(f"cleanup of the legacy database failed: {exc}")

    def _finish(self) -> None:
        legacy = f"the legacy database {self.report.source}"
        if self.cleaned:
            self.report.notes.append(f"{legacy} holds no migrator object any more (capture and freeze removed); "
                                     "what the workload wrote there stays")
        elif self.prepared:
            self.report.notes.append(
                f"kept: migrator's capture on {legacy} (and its freeze, unless the rehearsal rolled back), and the "
                "target's state; "
                "`migrator --config FILE cleanup --release-freeze --yes` removes them from the legacy database. "
                "What the workload wrote there stays")
        self.report.notes.append(f"the target {self.report.target} keeps the migrated data and the rehearsal's "
                                 "record; the next rehearsal empties it")
        if self.rehearsal_id is None:
            return
        try:
            with db.session(self.cfg.target_dsn, role="target", autocommit=True) as conn:
                state.finish_rehearsal(conn, self.rehearsal_id, self.report.ok)
            self.report.report = str(report_mod.write(self.cfg, self.report_dir).html)
        except (MigratorError, psycopg.Error, OSError) as exc:
            self.log.warning("rehearse.not_recorded", error=str(exc).splitlines()[0])
