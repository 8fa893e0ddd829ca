"""Cutover: move the clients to the target in one short window, or stop and leave everything as it was.

With a pooler ([cutover] pgbouncer_admin_dsn) the clients never reconnect:

    catch_up → preflight (go/no-go, hold) → stage_rollback (the rollback's capture installed on the target,
    disabled; see migrator/rollback.py) → guard (the guardian started) → pause (PgBouncer PAUSE, bounded) → freeze (the legacy database rejects
    writes from clients not behind the pooler) → drain → verify (counts, every event applied) → sequences →
    arm_rollback (the target's capture enabled, a freeze the last rollback left there lifted, its snapshot recorded) →
    switch (the pooler's [databases] entries rewritten to the target, RELOAD) → resume (RESUME) → health (the clients
    watched on the target: migrator/health.py)

Clients see one slow query: the pause, from PAUSE to RESUME, reported in seconds. Without a pooler the switch is
`switch_command` and there is no pause/resume; with neither, the go/no-go `switch` item refuses before anything is
frozen unless the operator accepts a cutover that moves nobody (`--override no-switch`, recorded and reported). Either the cutover completes, leaving the legacy database frozen (it
rejects writes until `migrator release`, even after migrator exits), or it stops: the pooler's entries are put back
and reloaded, the legacy database is writable again, and RESUME is sent, in that order, so that a client let through
never meets a frozen database. Every step is timed and recorded in the control schema, and each undo is declared
with its step (`_Cutover.steps`, run by migrator/switchover.py's StepRunner); the switch is the point of no return
(after it, a failure still RESUMEs, on the target). Before anything is paused or frozen, `guard` starts the guardian
(migrator/guardian.py), which sees the attempt through if this process dies; running the command again resolves what
a death left (migrator/recovery.py). One cutover or rollback runs at a time (migrator/state/lock.py). The last
step, `health`, proves the switch by the clients: when they are unhealthy on the target, the cutover rolls back
through the armed rollback (under the same lock, with a guardian of its own), stops with clients paused, or goes on,
as `--on-unhealthy` says (`health.settle`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from migrator import catalog, db, gonogo, health, recovery, rollback, state, sync
from migrator import verify as verify_mod
from migrator.config import Config
from migrator.deltalog import freeze as freezer
from migrator.errors import Blocked, ConnectionFailed, CutoverFailed, MigratorError, NoGo, NotReady
from migrator.log import get
from migrator.state.lock import action_lock
from migrator.switchover import (
    NOT_MOVED,
    AttemptRecorder,
    PoolerSession,
    Step,
    StepRunner,
    StepTiming,
    carry_sequences,
    count_tables,
    first_line,
    run_command,
)

STEPS = ("catch_up", "preflight", "stage_rollback", "guard", "freeze", "drain", "verify", "sequences", "arm_rollback", "switch",
         "health")
"""The steps without a pooler (`switch_command`)."""
POOLER_STEPS = ("catch_up", "preflight", "stage_rollback", "guard", "pause", "freeze", "drain", "verify", "sequences", "arm_rollback", "switch",
                "resume", "health")
"""The steps through PgBouncer."""
HOLD_POLL = 1.0


@dataclass
class CutoverReport:
    attempt: int
    ok: bool
    mode: str = "switch_command"
    freeze_seconds: float | None = None
    pause_seconds: float | None = None
    """Client-visible pause through the pooler: PAUSE sent until RESUME returned (None without a pooler)."""
    steps: list[StepTiming] = field(default_factory=list)
    checklist: list[dict[str, Any]] = field(default_factory=list)
    events_drained: int = 0
    sequences_set: int = 0
    failed_step: str | None = None
    error: str | None = None
    already_done: bool = False
    """The cutover had already completed; nothing was done (the legacy database stays frozen)."""
    clients_moved: bool = True
    """False when neither a pooler nor switch_command moved them (`--override no-switch`)."""
    recovered: list[str] = field(default_factory=list)
    """Earlier attempts whose process died, and how they were resolved (by the guardian or by this run)."""
    health: dict[str, Any] | None = None
    """The health gate's verdict and figures (migrator/health.py)."""

    def to_dict(self) -> dict[str, Any]:
        return {"attempt": self.attempt, "ok": self.ok, "mode": self.mode, "clients_moved": self.clients_moved,
                "health": self.health,
                "clients": None if self.clients_moved else NOT_MOVED, "freeze_seconds": self.freeze_seconds,
                "pause_seconds": self.pause_seconds, "events_drained": self.events_drained,
                "sequences_set": self.sequences_set, "failed_step": self.failed_step, "error": self.error,
                "already_done": self.already_done, "recovered": self.recovered, "checklist": self.checklist,
                "steps": [{"step": s.step, "seconds": round(s.seconds, 3), "detail": s.detail} for s in self.steps]}

    def render_text(self) -> str:
        before = "".join(f"{r}\n" for r in self.recovered)
        if self.already_done:
            return before + ("nothing to do: the cutover is done and the legacy database is frozen "
                             "(`migrator release --yes` would make it writable again)")
        head = before + f"cutover done; write freeze {self.freeze_seconds or 0:.2f}s"
        if self.pause_seconds is not None:
            head += f"; clients paused {self.pause_seconds:.2f}s"
        if not self.clients_moved:
            head += f"\n{NOT_MOVED}"
        return head + "\n" + "\n".join(f"  {s.step:<10} {s.seconds:8.3f}s  {s.detail or ''}" for s in self.steps)


def run(cfg: Config, *, overrides: Iterable[str] = (), on_step: Callable[[str, str], None] | None = None,
        on_checklist: Callable[[gonogo.Checklist], None] | None = None,
        on_unhealthy: str = "rollback") -> CutoverReport:
    """Run the cutover. Returns the report; raises NoGo when the go/no-go checklist refuses (nothing touched),
    CutoverFailed when a later step fails (pooler resumed on the legacy database, legacy writable again),
    ClientsUnhealthy when the health gate found the clients failing on the target (`on_unhealthy`: "rollback",
    "stop" or "ignore", which returns the report)."""
    if on_unhealthy not in health.POLICIES:
        raise Blocked(f"unknown --on-unhealthy {on_unhealthy!r}; one of {', '.join(health.POLICIES)}")
    overrides = tuple(overrides)
    unknown = set(overrides) - set(gonogo.OVERRIDES)
    if unknown:
        raise Blocked(f"unknown go/no-go item(s): {', '.join(sorted(unknown))}; items: {', '.join(gonogo.OVERRIDES)}")
    _require_target(cfg, overrides, on_checklist)
    with db.session(cfg.target_dsn, role="target", autocommit=True) as target:
        state.require_prepared(target)  # "not prepared" before "another cutover is running": it says what to do
        with action_lock(cfg, target, "cutover"), db.session(cfg.source_dsn, role="source") as source:
            return _run_locked(cfg, target, source, overrides, on_step, on_checklist, on_unhealthy)


def _run_locked(cfg: Config, target: psycopg.Connection[Any], source: psycopg.Connection[Any],
                overrides: tuple[str, ...], on_step: Callable[[str, str], None] | None,
                on_checklist: Callable[[gonogo.Checklist], None] | None, on_unhealthy: str) -> CutoverReport:
    """The cutover, under the action lock: first what an earlier attempt's death left (migrator/recovery.py)."""
    recovered = [j.detail for j in recovery.recover(cfg, target)]
    m = state.require_prepared(target)
    if m.copy_finished_at is None:
        raise NotReady("copy has not finished", hint="Run `migrator copy` and `migrator sync` first.")
    if m.cutover_at is not None and m.frozen:
        get(phase="cutover").info("cutover.nothing_to_do")
        return CutoverReport(attempt=0, ok=True, already_done=True, recovered=recovered)
    flow = _Cutover(cfg, target, source, overrides, on_step, on_checklist)
    flow.report.recovered = recovered
    flow.on_unhealthy = on_unhealthy
    runner = StepRunner("cutover", flow, on_step)
    try:
        try:
            runner.run(flow.steps(), passthrough=(KeyboardInterrupt, NoGo),
                       hint="Fix the cause and run `migrator cutover` again; `migrator status` shows the recorded "
                            "steps.",
                       after_move_hint="The clients were moved and the legacy database stays frozen: the cutover "
                                       "stands. Fix what the message names (a RESUME by hand, if it says so).")
        except CutoverFailed:
            if runner.moved:
                flow.moved_anyway()
            if flow.unhealthy is None or runner.current != "health":
                raise
        else:
            return flow.done(runner.timings)
    finally:
        flow.unguard()
        if flow.canary is not None:
            flow.canary.close()
    # The health gate found the clients failing on the target: the run stopped past its point of no return (the
    # attempt is recorded failed at `health`, the cutover stands), and what follows is --on-unhealthy's.
    raise health.settle(cfg, target, flow.unhealthy, flow.paused_again, on_step)


def _require_target(cfg: Config, overrides: tuple[str, ...],
                    on_checklist: Callable[[gonogo.Checklist], None] | None) -> None:
    """Refuse with the checklist when the target is out of reach: the attempt cannot be recorded (the control schema
    lives on the target), but the operator still gets the checklist, with the target item failing, and nothing is
    touched."""
    try:
        db.connect(cfg.target_dsn, role="target", connect_timeout=5).close()
    except ConnectionFailed as exc:
        checklist = gonogo.run(cfg, overrides=overrides)
        if on_checklist:
            on_checklist(checklist)
        raise NoGo(f"go/no-go refused: {', '.join(checklist.failing) or 'target'}; nothing was paused or frozen "
                   "(not recorded: the target holds the control schema)", checklist=checklist.render_text()) from exc


class _Cutover(AttemptRecorder):
    """One cutover attempt: its steps, their undos, and the values they pass on (the `Recorder` of its runner)."""

    def __init__(self, cfg: Config, target: psycopg.Connection[Any], source: psycopg.Connection[Any],
                 overrides: tuple[str, ...], on_step: Callable[[str, str], None] | None,
                 on_checklist: Callable[[gonogo.Checklist], None] | None) -> None:
        self.cfg = cfg
        self.target = target
        self.source = source
        self.overrides = overrides
        self.on_step = on_step
        self.on_checklist = on_checklist
        self.kind = "cutover"
        self.log = get(phase="cutover")
        self.report = CutoverReport(attempt=state.start_attempt(target), ok=False)
        self.pool = PoolerSession(cfg, "cutover") if cfg.cutover.uses_pooler else None
        self.report.mode = "pgbouncer" if self.pool else "switch_command"
        self.tables: list[catalog.Table] = []
        self.freeze_started = 0.0
        self.on_unhealthy = "rollback"
        self.canary: health.Canary | None = None
        self.switched_at = 0.0
        self.unhealthy: health.Verdict | None = None
        """The health gate's verdict when the clients were unhealthy and the policy is not "ignore"."""
        self.paused_again = ""

    def steps(self) -> list[Step]:
        pooled = self.pool is not None
        return [
            Step("catch_up", self.catch_up),
            Step("preflight", self.preflight),
            # Undone even half way: a failure during staging still leaves triggers to remove.
            Step("stage_rollback", self.stage_rollback, undo=self.disarm, undo_partial=True),
            Step("guard", self.start_guardian),
            *([Step("pause", self.pause, undo=self.resume_after_failure, undo_partial=True)] if pooled else []),
            Step("freeze", self.freeze, undo=self.unfreeze, then=self.mark_frozen),
            Step("drain", self.drain),
            Step("verify", self.verify),
            Step("sequences", self.sequences),
            Step("arm_rollback", self.arm_rollback),
            Step("switch", self.switch, undo=self.restore_entries if pooled else None, undo_partial=True,
                 point_of_no_return=True),
            *([Step("resume", self.resume, then=self.record_pointing, forward=self.resume_forward)] if pooled else []),
            Step("health", self.health),
        ]

    def done(self, timings: list[StepTiming]) -> CutoverReport:
        report = self.report
        report.steps = timings
        report.freeze_seconds = time.monotonic() - self.freeze_started
        report.ok = True
        if self.pool is not None:
            report.pause_seconds = self.pool.pause_seconds
            self.pool.close()
        state.mark(self.target, "cutover_at")
        state.finish_attempt(self.target, report.attempt, "done", freeze_seconds=report.freeze_seconds)
        state.record_attempt_pooler(self.target, report.attempt, pause_seconds=report.pause_seconds)
        self.recorded = True
        self.log.info("cutover.done", freeze_seconds=round(report.freeze_seconds, 3),
                      pause_seconds=None if report.pause_seconds is None else round(report.pause_seconds, 3))
        return report

    # --- the steps ----------------------------------------------------------------------------------------------

    def catch_up(self) -> str:
        r = sync.sync(self.cfg)
        state.step_figures(self.target, self.report.attempt, "catch_up", {"events": r.events})
        return f"{r.events} events applied"

    def preflight(self) -> str:
        held = 0.0
        while not self._checked_go():
            # Held by the operator: wait, then catch up again and re-check, since time has passed.
            self.log.info("cutover.held")
            if self.on_step:
                self.on_step("preflight", "held (`migrator cutover --release-hold` lets it go on)")
            t0 = time.monotonic()
            while state.cutover_held(self.target):
                time.sleep(HOLD_POLL)
            held += time.monotonic() - t0
            sync.sync(self.cfg)
        self.source.autocommit = True
        self.tables = catalog.list_tables(self.source, self.cfg.tables)
        self.source.autocommit = False
        return "go" + (f" after a hold of {held:.1f}s" if held else "") + "".join(
            f"; {c['item']} {c['state']}" for c in self.report.checklist if c["state"] != "pass")

    def _checked_go(self) -> bool:
        """Run and record the checklist; NoGo when it refuses; whether the cutover may go on (no operator hold)."""
        checklist = gonogo.run(self.cfg, overrides=self.overrides)
        self.report.checklist = gonogo.recorded(checklist)
        state.record_attempt_pooler(self.target, self.report.attempt, checklist=self.report.checklist)
        if self.on_checklist:
            self.on_checklist(checklist)
        if not checklist.go:
            raise NoGo(f"go/no-go refused: {', '.join(checklist.failing)}; nothing was paused or frozen",
                       checklist=checklist.render_text())
        return not state.cutover_held(self.target)

    def stage_rollback(self) -> str:
        return rollback.stage(self.cfg)

    def disarm(self) -> str:
        # Last of the undos, after RESUME: nobody but migrator writes the target, and the clients wait no longer.
        # A target the last rollback froze is frozen again (arm_rollback may have lifted it); any other is clean.
        try:
            said = rollback.disarm(self.cfg)
        except (MigratorError, psycopg.Error) as exc:
            return (f"CLOSING THE ROLLBACK WINDOW ON THE TARGET FAILED ({exc.__class__.__name__}): run `migrator "
                    "cutover` again, or `migrator release --target --yes` if the target should take writes")
        return said

    def start_guardian(self) -> str:
        entries = self.pool.entries() if self.pool is not None else {}
        return self.guard({n: e.legacy_entry for n, e in entries.items()},
                          {n: e.target_entry for n, e in entries.items()})

    def pause(self) -> str:
        assert self.pool is not None
        # The health gate's canary prepares its statement before the pause (migrator/health.py).
        self.canary = health.Canary.open(health.probe_dsns(self.cfg)[0], f"migrator_canary_{self.report.attempt}",
                                         self.cfg.cutover.pause_timeout)
        return self.pool.pause(self.cfg.cutover.pause_timeout)

    def resume_after_failure(self) -> str:
        assert self.pool is not None
        said = self.pool.resume()
        self.report.pause_seconds = self.pool.pause_seconds
        self.pool.close()
        return said

    def freeze(self) -> str:
        self.freeze_started = time.monotonic()
        r = freezer.freeze(self.source, self.tables, self.cfg.cutover.freeze_lock_timeout)
        self.freeze_started += r.waited  # before the attempt that froze, writers were not held
        return f"{len(self.tables)} tables frozen" + (
            f" (attempt {r.attempts}, after {r.waited:.2f}s of writers in flight)" if r.attempts > 1 else "")

    def mark_frozen(self) -> None:
        state.mark(self.target, "frozen", True)

    def unfreeze(self) -> str:
        try:
            self.source.rollback()
            freezer.release(self.source)
            state.mark(self.target, "frozen", False)
        except psycopg.Error as exc:  # the freeze holds: say so loudly, never claim otherwise
            return (f"RELEASING THE FREEZE FAILED ({exc.__class__.__name__}): run `migrator release --yes` once the "
                    "source is reachable")
        return "the legacy database is writable again"

    def drain(self) -> str:
        r = sync.sync(self.cfg)
        self.report.events_drained = r.events
        state.step_figures(self.target, self.report.attempt, "drain", {"events": r.events})
        left = sync.lag(self.cfg)
        if left.pending_events:
            raise MigratorError(f"{left.pending_events} events still pending after the drain")
        return f"{r.events} events applied"

    def verify(self) -> str:
        left = sync.lag(self.cfg)
        if left.pending_events:
            raise MigratorError(f"{left.pending_events} events not applied on the target")
        mode = self.cfg.cutover.verify
        if mode == "none":
            return "every event applied; rows not compared"
        if mode == "full":
            rep = verify_mod.verify(self.cfg)
            if not rep.rows_identical:
                raise MigratorError("parity check found differences; run `migrator verify` for the keys")
            return "every event applied; rows identical"
        with db.session(self.cfg.source_dsn, role="source", autocommit=True) as s, \
                db.session(self.cfg.target_dsn, role="target", autocommit=True) as t:
            counted = count_tables(s, t, self.tables)
        # Counts and seconds per table, kept for the report's model of the freeze (never a row value).
        state.step_figures(self.target, self.report.attempt, "verify",
                           {"mode": "counts", "tables": [c.to_dict() for c in counted]})
        differ = [c.table for c in counted if c.rows != c.other_rows]
        if differ:
            raise MigratorError(f"row counts differ: {', '.join(differ[:10])}")
        return f"every event applied; counts equal in {len(self.tables)} tables"

    def sequences(self) -> str:
        seqs = catalog.list_sequences(self.source, self.cfg.tables)
        with db.session(self.cfg.target_dsn, role="target") as t:
            behind = carry_sequences(seqs, t)
            t.commit()
        if behind:
            raise MigratorError(f"sequences still behind the source on the target: {', '.join(behind[:10])}")
        self.report.sequences_set = len(seqs)
        self.source.rollback()
        return f"{self.report.sequences_set} sequences at or past the source's"

    def arm_rollback(self) -> str:
        return rollback.arm(self.cfg)  # undone by stage_rollback's undo

    def switch(self) -> str:
        if self.pool is None:
            self.report.clients_moved = bool(self.cfg.cutover.switch_command)
            try:
                detail = run_command(self.cfg, self.cfg.cutover.switch_command, "switch_command",
                                     on_start=self.command_started)
            except MigratorError as exc:
                # It failed, but it may have moved some clients: undoing then would split them. Ask, when we can.
                if recovery.clients_on(self.cfg) != "target":
                    raise
                detail = f"{first_line(exc)}; but switch_check_command says the clients are on the target"
            self.switched_at = time.monotonic()
            return detail
        entries = self.pool.entries()
        for e in entries.values():  # recorded before the file changes, for a rollback days later
            state.save_pooler_entry(self.target, self.report.attempt, e)
        self.pool.point({n: e.target_entry for n, e in entries.items()})
        return f"{', '.join(entries)} -> {db.describe_dsn(self.cfg.target_dsn)}; reloaded"

    def restore_entries(self) -> str:
        assert self.pool is not None
        return self.pool.restore()  # entries back first, RESUME only after the freeze's release

    def resume(self) -> str:
        assert self.pool is not None
        said = self.pool.resume()
        if self.pool.paused:
            raise MigratorError(said)
        self.pool.former_text = None
        self.switched_at = time.monotonic()
        return f"clients paused {self.pool.pause_seconds or 0:.3f}s"

    def health(self) -> str:
        """Watch the clients on the target (migrator/health.py); an unhealthy verdict fails the step unless the
        operator said --on-unhealthy=ignore (with "stop", the pooler is paused again first)."""
        verdict = health.watch(self.cfg, canary=self.canary, switched_at=self.switched_at or time.monotonic(),
                               moved=self.report.clients_moved, on_unhealthy=self.on_unhealthy)
        self.report.health = verdict.to_dict()
        state.record_health(self.target, self.report.attempt, self.report.health)
        if verdict.healthy or self.on_unhealthy == "ignore":
            return verdict.line() + ("" if verdict.healthy else " (ignored: --on-unhealthy=ignore)")
        self.unhealthy = verdict
        if self.on_unhealthy == "stop":
            self.paused_again = health.pause_again(self.cfg)
        raise MigratorError(verdict.line())

    def moved_anyway(self) -> None:
        """A step after the switch failed and the run went forward: the cutover stands; record it (the attempt is
        recorded failed at that step)."""
        state.mark(self.target, "cutover_at")
        if self.pool is not None:
            state.set_pointing(self.target, self.pool.names, "target")

    def resume_forward(self) -> str:
        assert self.pool is not None
        return self.pool.resume()

    def record_pointing(self) -> None:
        assert self.pool is not None
        state.set_pointing(self.target, self.pool.names, "target")


def hold(cfg: Config, reason: str = "held by the operator") -> None:
    """Postpone: a cutover (running or to come) waits at the go/no-go point until `release_hold`."""
    with db.session(cfg.target_dsn, role="target", autocommit=True) as target:
        state.require_prepared(target)
        state.hold_cutover(target, reason)


def release_hold(cfg: Config) -> bool:
    """Clear the hold; returns whether one was set."""
    with db.session(cfg.target_dsn, role="target", autocommit=True) as target:
        if not state.exists(target) or not state.cutover_held(target):
            return False
        state.release_cutover_hold(target)
        return True
