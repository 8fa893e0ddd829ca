"""Cutover: freeze writes on the legacy database, drain the last changes, verify, carry sequences, switch clients.

Either it completes, leaving the legacy database frozen (it rejects writes from every client until `migrator
release` or a rollback, even after migrator exits), or it stops and makes the legacy database writable again. Every
step is timed and recorded in the control schema; the report gives the write-freeze window in seconds.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from migrator import capture, catalog, db, parity, replay, state
from migrator.config import Config, redact
from migrator.errors import Blocked, CutoverFailed, MigratorError, NotReady
from migrator.log import get

STEPS = ("catch_up", "preflight", "freeze", "drain", "verify", "sequences", "switch")


@dataclass
class StepTiming:
    step: str
    seconds: float
    detail: str | None = None


@dataclass
class CutoverReport:
    attempt: int
    ok: bool
    freeze_seconds: float | None = None
    steps: list[StepTiming] = field(default_factory=list)
    events_drained: int = 0
    sequences_set: int = 0
    failed_step: str | None = None
    error: str | None = None
    already_done: bool = False
    """The cutover had already completed; nothing was done (the legacy database stays frozen)."""

    def to_dict(self) -> dict[str, Any]:
        return {"attempt": self.attempt, "ok": self.ok, "freeze_seconds": self.freeze_seconds,
                "events_drained": self.events_drained, "sequences_set": self.sequences_set,
                "failed_step": self.failed_step, "error": self.error, "already_done": self.already_done,
                "steps": [{"step": s.step, "seconds": round(s.seconds, 3), "detail": s.detail} for s in self.steps]}


def _counts(cfg: Config, tables: list[catalog.Table]) -> list[str]:
    """Tables whose row counts differ between source and target."""
    differ = []
    with db.session(cfg.source_dsn, role="source", autocommit=True) as s, \
            db.session(cfg.target_dsn, role="target", autocommit=True) as t:
        for table in tables:
            q = sql.SQL("SELECT count(*) FROM ONLY {}").format(table.ident)
            a = s.execute(q).fetchone()
            b = t.execute(q).fetchone()
            if a != b:
                differ.append(table.display)
    return differ


def _sequences(cfg: Config, source: psycopg.Connection[Any]) -> int:
    """Set every target sequence at least to the source's position, so the first insert after cutover is free."""
    seqs = catalog.list_sequences(source, cfg.tables)
    with db.session(cfg.target_dsn, role="target") as target, target.cursor() as cur:
        for seq in seqs:
            if seq.last_value is None:
                continue
            cur.execute(sql.SQL("SELECT last_value, is_called FROM {}").format(seq.ident))
            row = cur.fetchone()
            assert row is not None
            t_last, t_called = row
            if (t_last, t_called) >= (seq.last_value, seq.is_called):
                continue
            cur.execute("SELECT setval(%s::regclass, %s, %s)",
                        (seq.ident.as_string(target), seq.last_value, seq.is_called))
        target.commit()
    return len(seqs)


def _switch(cfg: Config) -> str | None:
    cmd = cfg.cutover.switch_command
    if not cmd:
        return "no switch_command configured"
    env = dict(os.environ, MIGRATOR_TARGET=db.describe_dsn(cfg.target_dsn),
               MIGRATOR_SOURCE=db.describe_dsn(cfg.source_dsn))
    proc = subprocess.run(cmd, shell=True, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise MigratorError(f"switch_command exited {proc.returncode}: {redact(proc.stderr.strip())[-500:]}")
    return "switch_command exited 0"


def run(cfg: Config, *, on_step: Callable[[str, str], None] | None = None) -> CutoverReport:
    """Run the cutover. Returns the report; raises CutoverFailed (legacy writable again) when a step fails."""
    log = get(phase="cutover")
    with db.session(cfg.target_dsn, role="target", autocommit=True) as target, \
            db.session(cfg.source_dsn, role="source") as source:
        m = state.migration(target)
        if m is None or m.copy_finished_at is None:
            raise NotReady("copy has not finished", hint="Run `migrator copy` and `migrator sync` first.")
        if m.cutover_at is not None and m.frozen:
            log.info("cutover.nothing_to_do")
            return CutoverReport(attempt=0, ok=True, already_done=True)
        report = CutoverReport(attempt=state.start_attempt(target), ok=False)
        frozen = False
        freeze_started = 0.0
        current = ""

        def step(name: str, fn: Callable[[], str | None]) -> None:
            nonlocal current
            current = name
            if on_step:
                on_step(name, "running")
            state.step_started(target, report.attempt, name)
            t0 = time.monotonic()
            detail = fn()
            report.steps.append(StepTiming(name, time.monotonic() - t0, detail))
            state.step_finished(target, report.attempt, name, "done", detail)
            log.info("cutover.step", step=name, seconds=round(time.monotonic() - t0, 3))
            if on_step:
                on_step(name, "done")

        tables: list[catalog.Table] = []
        try:
            def catch_up() -> str:
                r = replay.sync(cfg)
                return f"{r.events} events applied"

            def preflight() -> str:
                lag = replay.lag(cfg)
                if lag.oldest_pending_seconds is not None and lag.oldest_pending_seconds > cfg.cutover.max_lag_seconds:
                    raise Blocked(f"sync lag {lag.oldest_pending_seconds:.1f}s exceeds {cfg.cutover.max_lag_seconds}s")
                nonlocal tables
                source.autocommit = True
                tables = catalog.list_tables(source, cfg.tables)
                source.autocommit = False
                return f"{lag.pending_events} events pending"

            def freeze() -> str:
                nonlocal frozen, freeze_started
                freeze_started = time.monotonic()
                try:
                    capture.freeze(source, tables, cfg.cutover.freeze_lock_timeout)
                except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled) as exc:
                    raise Blocked(f"writers still in flight after {cfg.cutover.freeze_lock_timeout}s; "
                                  "the legacy database was not frozen") from exc
                frozen = True
                state.mark(target, "frozen", True)
                return f"{len(tables)} tables frozen"

            def drain() -> str:
                r = replay.sync(cfg)
                report.events_drained = r.events
                left = replay.lag(cfg)
                if left.pending_events:
                    raise MigratorError(f"{left.pending_events} events still pending after the drain")
                return f"{r.events} events applied"

            def verify() -> str:
                mode = cfg.cutover.verify
                if mode == "none":
                    return "skipped"
                if mode == "full":
                    rep = parity.verify(cfg)
                    if not rep.identical:
                        raise MigratorError("parity check found differences; run `migrator verify` for the keys")
                    return "rows identical"
                differ = _counts(cfg, tables)
                if differ:
                    raise MigratorError(f"row counts differ: {', '.join(differ[:10])}")
                return f"counts equal in {len(tables)} tables"

            def sequences() -> str:
                report.sequences_set = _sequences(cfg, source)
                source.rollback()
                return f"{report.sequences_set} sequences"

            step("catch_up", catch_up)
            step("preflight", preflight)
            step("freeze", freeze)
            step("drain", drain)
            step("verify", verify)
            step("sequences", sequences)
            step("switch", lambda: _switch(cfg))
            report.freeze_seconds = time.monotonic() - freeze_started
            report.ok = True
            state.mark(target, "cutover_at")
            state.finish_attempt(target, report.attempt, "done", freeze_seconds=report.freeze_seconds)
            log.info("cutover.done", freeze_seconds=round(report.freeze_seconds, 3))
            return report
        except BaseException as exc:
            report.failed_step = current
            report.error = redact(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            released = ""
            if frozen:
                try:
                    source.rollback()
                    capture.release(source)
                    state.mark(target, "frozen", False)
                    released = "; the legacy database is writable again"
                except psycopg.Error as rel_exc:  # the freeze holds: say so loudly, never claim otherwise
                    released = (f"; RELEASING THE FREEZE FAILED ({rel_exc.__class__.__name__}): run "
                                "`migrator release --yes` once the source is reachable")
            try:
                state.step_finished(target, report.attempt, current, "failed", report.error)
                state.finish_attempt(target, report.attempt, "failed", failed_step=current, error=report.error)
            except psycopg.Error:
                pass
            log.error("cutover.failed", step=current, error=report.error)
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise CutoverFailed(f"cutover stopped at step {current}: {report.error}{released}",
                                hint="Fix the cause and run `migrator cutover` again; `migrator status` shows the "
                                     "recorded steps.") from exc


def release(cfg: Config) -> None:
    """Make the legacy database writable again after a cutover (explicit release; capture stays on)."""
    with db.session(cfg.source_dsn, role="source") as source, \
            db.session(cfg.target_dsn, role="target", autocommit=True) as target:
        if not capture.is_frozen(source):
            raise NotReady("the legacy database is not frozen; nothing to release")
        source.rollback()
        capture.release(source)
        state.mark(target, "frozen", False)
        state.clear(target, "cutover_at")
        get(phase="release").info("release.done")
