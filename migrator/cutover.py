"""Cutover: move the clients to the target in one short window, or stop and leave everything as it was.

With a pooler ([cutover] pgbouncer_admin_dsn) the clients never reconnect:

    catch_up → preflight (go/no-go, hold) → stage_rollback (the rollback's capture installed on the target,
    disabled; see migrator/rollback.py) → pause (PgBouncer PAUSE, bounded) → freeze (the legacy database rejects
    writes from clients not behind the pooler) → drain → verify (counts, every event applied) → sequences →
    arm_rollback (the target's capture enabled, its snapshot recorded) → switch (the pooler's [databases] entries
    rewritten to the target, RELOAD) → resume (RESUME)

Clients see one slow query: the pause, from PAUSE to RESUME, reported in seconds. Without a pooler the switch is
`switch_command` and there is no pause/resume; with neither, the go/no-go `switch` item refuses before anything is
frozen unless the operator accepts a cutover that moves nobody (`--override no-switch`, recorded and reported). Either the cutover completes, leaving the legacy database frozen (it
rejects writes until `migrator release`, even after migrator exits), or it stops: the pooler's entries are put back
and reloaded, the legacy database is writable again, and RESUME is sent, in that order, so that a client let through
never meets a frozen database. Every step is timed and recorded in the control schema.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from migrator import catalog, db, gonogo, ownership, parity, rollback, state, sync
from migrator.config import Config
from migrator.deltalog import freeze as freezer
from migrator.errors import Blocked, ConnectionFailed, CutoverFailed, MigratorError, NoGo, NotReady
from migrator.log import get
from migrator.redaction import scrub
from migrator.switch import (
    NOT_MOVED,
    PoolerSession,
    carry_sequences,
    count_differences,
    run_command,
    signals_deferred,
)

STEPS = ("catch_up", "preflight", "stage_rollback", "freeze", "drain", "verify", "sequences", "arm_rollback", "switch")
"""The steps without a pooler (`switch_command`)."""
POOLER_STEPS = ("catch_up", "preflight", "stage_rollback", "pause", "freeze", "drain", "verify", "sequences", "arm_rollback", "switch",
                "resume")
"""The steps through PgBouncer."""
HOLD_POLL = 1.0


@dataclass
class StepTiming:
    step: str
    seconds: float
    detail: str | None = None


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

    def to_dict(self) -> dict[str, Any]:
        return {"attempt": self.attempt, "ok": self.ok, "mode": self.mode, "clients_moved": self.clients_moved,
                "clients": None if self.clients_moved else NOT_MOVED, "freeze_seconds": self.freeze_seconds,
                "pause_seconds": self.pause_seconds, "events_drained": self.events_drained,
                "sequences_set": self.sequences_set, "failed_step": self.failed_step, "error": self.error,
                "already_done": self.already_done, "checklist": self.checklist,
                "steps": [{"step": s.step, "seconds": round(s.seconds, 3), "detail": s.detail} for s in self.steps]}

    def render_text(self) -> str:
        if self.already_done:
            return ("nothing to do: the cutover is done and the legacy database is frozen "
                    "(`migrator release --yes` would make it writable again)")
        head = f"cutover done; write freeze {self.freeze_seconds or 0:.2f}s"
        if self.pause_seconds is not None:
            head += f"; clients paused {self.pause_seconds:.2f}s"
        if not self.clients_moved:
            head += f"\n{NOT_MOVED}"
        return head + "\n" + "\n".join(f"  {s.step:<10} {s.seconds:8.3f}s  {s.detail or ''}" for s in self.steps)


def run(cfg: Config, *, overrides: Iterable[str] = (), on_step: Callable[[str, str], None] | None = None,
        on_checklist: Callable[[gonogo.Checklist], None] | None = None) -> CutoverReport:
    """Run the cutover. Returns the report; raises NoGo when the go/no-go checklist refuses (nothing touched),
    CutoverFailed when a later step fails (pooler resumed on the legacy database, legacy writable again)."""
    log = get(phase="cutover")
    overrides = tuple(overrides)
    unknown = set(overrides) - set(gonogo.OVERRIDES)
    if unknown:
        raise Blocked(f"unknown go/no-go item(s): {', '.join(sorted(unknown))}; items: {', '.join(gonogo.OVERRIDES)}")
    try:
        db.connect(cfg.target_dsn, role="target", connect_timeout=5).close()
    except ConnectionFailed as exc:
        # The attempt cannot be recorded (the control schema lives on the target), but the operator still gets
        # the checklist, with the target item failing, and nothing is touched.
        checklist = gonogo.run(cfg, overrides=overrides)
        if on_checklist:
            on_checklist(checklist)
        raise NoGo(f"go/no-go refused: {', '.join(checklist.failing) or 'target'}; nothing was paused or frozen "
                   "(not recorded: the target holds the control schema)", checklist=checklist.render_text()) from exc
    with db.session(cfg.target_dsn, role="target", autocommit=True) as target, \
            db.session(cfg.source_dsn, role="source") as source:
        m = state.require_prepared(target)
        if m.copy_finished_at is None:
            raise NotReady("copy has not finished", hint="Run `migrator copy` and `migrator sync` first.")
        if m.cutover_at is not None and m.frozen:
            log.info("cutover.nothing_to_do")
            return CutoverReport(attempt=0, ok=True, already_done=True)
        report = CutoverReport(attempt=state.start_attempt(target), ok=False)
        pool = PoolerSession(cfg) if cfg.cutover.uses_pooler else None
        report.mode = "pgbouncer" if pool else "switch_command"
        frozen = False
        armed = False
        moved = False
        freeze_started = 0.0
        current = ""

        def step(name: str, fn: Callable[[], str | None]) -> None:
            nonlocal current
            current = name
            state.step_started(target, report.attempt, name)
            if on_step:
                on_step(name, "running")
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
                r = sync.sync(cfg)
                return f"{r.events} events applied"

            def preflight() -> str:
                nonlocal tables
                held = 0.0
                while True:
                    checklist = gonogo.run(cfg, overrides=overrides)
                    report.checklist = gonogo.recorded(checklist)
                    state.record_attempt_pooler(target, report.attempt, checklist=report.checklist)
                    if on_checklist:
                        on_checklist(checklist)
                    if not checklist.go:
                        raise NoGo(f"go/no-go refused: {', '.join(checklist.failing)}; nothing was paused or frozen",
                                   checklist=checklist.render_text())
                    if state.flag(target, state.HOLD_FLAG) is None:
                        break
                    # Held by the operator: wait, then catch up again and re-check, since time has passed.
                    log.info("cutover.held")
                    if on_step:
                        on_step("preflight", "held (`migrator cutover --release-hold` lets it go on)")
                    t0 = time.monotonic()
                    while state.flag(target, state.HOLD_FLAG) is not None:
                        time.sleep(HOLD_POLL)
                    held += time.monotonic() - t0
                    sync.sync(cfg)
                source.autocommit = True
                tables = catalog.list_tables(source, cfg.tables)
                source.autocommit = False
                return "go" + (f" after a hold of {held:.1f}s" if held else "") + "".join(
                    f"; {c['item']} {c['state']}" for c in report.checklist if c["state"] != "pass")

            def pause() -> str:
                assert pool is not None
                return pool.pause(cfg.cutover.pause_timeout)

            def freeze() -> str:
                nonlocal frozen, freeze_started
                freeze_started = time.monotonic()
                r = freezer.freeze(source, tables, cfg.cutover.freeze_lock_timeout)
                freeze_started += r.waited  # before the attempt that froze, writers were not held
                frozen = True
                state.mark(target, "frozen", True)
                return f"{len(tables)} tables frozen" + (
                    f" (attempt {r.attempts}, after {r.waited:.2f}s of writers in flight)" if r.attempts > 1 else "")

            def drain() -> str:
                r = sync.sync(cfg)
                report.events_drained = r.events
                left = sync.lag(cfg)
                if left.pending_events:
                    raise MigratorError(f"{left.pending_events} events still pending after the drain")
                return f"{r.events} events applied"

            def verify() -> str:
                left = sync.lag(cfg)
                if left.pending_events:
                    raise MigratorError(f"{left.pending_events} events not applied on the target")
                mode = cfg.cutover.verify
                if mode == "none":
                    return "every event applied; rows not compared"
                if mode == "full":
                    rep = parity.verify(cfg)
                    if not rep.rows_identical:
                        raise MigratorError("parity check found differences; run `migrator verify` for the keys")
                    return "every event applied; rows identical"
                with db.session(cfg.source_dsn, role="source", autocommit=True) as s, \
                        db.session(cfg.target_dsn, role="target", autocommit=True) as t:
                    differ = count_differences(s, t, tables)
                if differ:
                    raise MigratorError(f"row counts differ: {', '.join(differ[:10])}")
                return f"every event applied; counts equal in {len(tables)} tables"

            def sequences() -> str:
                seqs = catalog.list_sequences(source, cfg.tables)
                with db.session(cfg.target_dsn, role="target") as t:
                    behind = carry_sequences(seqs, t)
                    t.commit()
                if behind:
                    raise MigratorError(f"sequences still behind the source on the target: {', '.join(behind[:10])}")
                report.sequences_set = len(seqs)
                source.rollback()
                return f"{report.sequences_set} sequences at or past the source's"

            def stage_rollback() -> str:
                nonlocal armed
                armed = True  # marked first: a failure half way still leaves triggers to remove
                return rollback.stage(cfg)

            def arm_rollback() -> str:
                return rollback.arm(cfg)  # `armed` is already set by stage_rollback

            def switch() -> str:
                nonlocal moved
                if pool is None:
                    detail = run_command(cfg, cfg.cutover.switch_command, "switch_command")
                    moved = True
                    report.clients_moved = bool(cfg.cutover.switch_command)
                    return detail
                entries = pool.entries()
                for e in entries.values():  # recorded before the file changes, for a rollback days later
                    state.save_pooler_entry(target, report.attempt, e)
                pool.point({n: e.target_entry for n, e in entries.items()})
                return f"{', '.join(entries)} -> {db.describe_dsn(cfg.target_dsn)}; reloaded"

            def resume() -> str:
                nonlocal moved
                assert pool is not None
                said = pool.resume()
                if pool.paused:
                    raise MigratorError(said)
                moved = True
                pool.former_text = None
                state.set_pointing(target, pool.names, "target")
                return f"clients paused {pool.pause_seconds or 0:.3f}s"

            step("catch_up", catch_up)
            step("preflight", preflight)
            step("stage_rollback", stage_rollback)
            if pool is not None:
                step("pause", pause)
            step("freeze", freeze)
            step("drain", drain)
            step("verify", verify)
            step("sequences", sequences)
            step("arm_rollback", arm_rollback)
            step("switch", switch)
            if pool is not None:
                step("resume", resume)
        except BaseException as exc:
            with signals_deferred("cutover"):
                if moved:  # clients are on the target: undoing the freeze now would split them; say so, keep it
                    log.error("cutover.after_move_failed", error=str(exc))
                    raise
                report.failed_step = current
                report.error = scrub(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                undone = []
                if pool is not None:
                    undone.append(pool.restore())  # entries back first, RESUME only after the release below
                if frozen:
                    try:
                        source.rollback()
                        freezer.release(source)
                        state.mark(target, "frozen", False)
                        undone.append("the legacy database is writable again")
                    except psycopg.Error as rel_exc:  # the freeze holds: say so loudly, never claim otherwise
                        undone.append(f"RELEASING THE FREEZE FAILED ({rel_exc.__class__.__name__}): run "
                                      "`migrator release --yes` once the source is reachable")
                if pool is not None:
                    undone.append(pool.resume())
                    report.pause_seconds = pool.pause_seconds
                    pool.close()
                if armed:  # after RESUME: nobody but migrator writes the target, and the clients wait no longer
                    try:
                        rollback.disarm(cfg)
                    except (MigratorError, psycopg.Error) as dis_exc:
                        undone.append(f"removing capture from the target failed ({dis_exc.__class__.__name__}): "
                                      "`migrator cleanup` removes it")
                try:
                    state.step_finished(target, report.attempt, current, "failed", report.error)
                    state.finish_attempt(target, report.attempt, "failed", failed_step=current, error=report.error)
                    state.record_attempt_pooler(target, report.attempt, pause_seconds=report.pause_seconds)
                except psycopg.Error:
                    pass
                log.error("cutover.failed", step=current, error=report.error, pause_seconds=report.pause_seconds)
                if isinstance(exc, KeyboardInterrupt | NoGo):
                    raise
                said = "; ".join(u for u in undone if u)
                raise CutoverFailed(f"cutover stopped at step {current}: {report.error}{'; ' + said if said else ''}",
                                    hint="Fix the cause and run `migrator cutover` again; `migrator status` shows the "
                                         "recorded steps.") from exc
        report.freeze_seconds = time.monotonic() - freeze_started
        report.ok = True
        if pool is not None:
            report.pause_seconds = pool.pause_seconds
            pool.close()
        state.mark(target, "cutover_at")
        state.finish_attempt(target, report.attempt, "done", freeze_seconds=report.freeze_seconds)
        state.record_attempt_pooler(target, report.attempt, pause_seconds=report.pause_seconds)
        log.info("cutover.done", freeze_seconds=round(report.freeze_seconds, 3),
                 pause_seconds=None if report.pause_seconds is None else round(report.pause_seconds, 3))
        return report


def hold(cfg: Config, reason: str = "held by the operator") -> None:
    """Postpone: a cutover (running or to come) waits at the go/no-go point until `release_hold`."""
    with db.session(cfg.target_dsn, role="target", autocommit=True) as target:
        state.require_prepared(target)
        state.set_flag(target, state.HOLD_FLAG, reason)


def release_hold(cfg: Config) -> bool:
    """Clear the hold; returns whether one was set."""
    with db.session(cfg.target_dsn, role="target", autocommit=True) as target:
        if not state.exists(target) or state.flag(target, state.HOLD_FLAG) is None:
            return False
        state.clear_flag(target, state.HOLD_FLAG)
        return True


def release(cfg: Config) -> None:
    """Make the legacy database writable again after a cutover (explicit release; capture stays on)."""
    with db.session(cfg.source_dsn, role="source") as source, \
            db.session(cfg.target_dsn, role="target", autocommit=True) as target:
        if not freezer.is_frozen(source):
            raise NotReady("the legacy database is not frozen; nothing to release")
        ownership.check(source, state.migration(target), "release")  # another migration's freeze: split brain
        source.rollback()
        freezer.release(source)
        state.mark(target, "frozen", False)
        state.clear(target, "cutover_at")
        get(phase="release").info("release.done")
