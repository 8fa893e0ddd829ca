"""Moving clients between the two databases, shared by cutover and rollback.

The pooler side of a switch (PAUSE, rewrite the [databases] entries and RELOAD, restore, RESUME), the client command
for sites without a pooler, and the two checks made at the moment of switching: row counts equal on both sides,
and the sequences of the database clients move to at least where the other side's are.

And the step runner both flows are written with (`StepRunner`): a list of `Step`s, each timed and recorded as it
starts and ends (through a `Recorder`: the control schema, or a fake in unit tests). A step may declare its undo; when
a step fails, the undos of the steps already done run in reverse order (and the failing step's own, when it may have
half happened), with SIGINT/SIGTERM held, and the run stops with `CutoverFailed`. One step per flow is the point of
no return: for a cutover the switch, for a rollback the release of the legacy database. A failure after it undoes
nothing, since undoing then could split the clients between the two databases: the steps not done go forward as far
as their `forward` can (RESUME, at least), and the error is raised as it came. A process that dies instead of
failing is seen through the same way by its guardian (migrator/guardian.py, migrator/recovery.py).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import psycopg
from psycopg import sql

from migrator import catalog, db, faults, pooler, state
from migrator.config import Config
from migrator.errors import CutoverFailed, MigratorError
from migrator.guardian import Journal, Watch
from migrator.log import get
from migrator.redaction import scrub

COMMAND_TIMEOUT = 300
"""Longest run of the site's switch or rollback command."""
CONFIRM_SECONDS = 5.0
"""A second Ctrl-C within this many seconds of the first stops a guarded cutover or rollback (and undoes it)."""


@contextmanager
def signals_deferred(phase: str) -> Iterator[None]:
    """Hold SIGINT and SIGTERM while a switchover undoes what it began (pooler entries back, freeze released or put
    back, RESUME): a second Ctrl-C, or a service manager's stop, must not cut the undo short and leave the pooler
    paused or a database frozen. A signal that came is delivered again once the undo is done, unless an exception is
    already on its way out (the undo ends by raising one, which stops the command anyway). Main thread only, where
    Python runs signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []

    def hold(signum: int, _: Any) -> None:
        held.append(signum)
        get(phase=phase).warning(f"{phase}.signal_held", signal=signal.Signals(signum).name)

    previous = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if held and sys.exc_info()[1] is None:
            signal.raise_signal(held[0])


@contextmanager
def interrupts_confirmed(phase: str) -> Iterator[None]:
    """While clients are paused or a database frozen, one Ctrl-C only asks: a second within CONFIRM_SECONDS stops the
    run (KeyboardInterrupt, and the step runner undoes). A stray key must not turn a cutover that is seconds from done
    into an undo, nor should the operator's wish to stop be ignored. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    first: list[float] = []

    def ask(signum: int, frame: Any) -> None:
        now = time.monotonic()
        if first and now - first[-1] <= CONFIRM_SECONDS:
            raise KeyboardInterrupt
        first.append(now)
        get(phase=phase).warning(f"{phase}.interrupt_asked", seconds=CONFIRM_SECONDS)
        try:
            print(f"\n{phase}: Ctrl-C. Press Ctrl-C again within {CONFIRM_SECONDS:.0f}s to stop the {phase} and undo "
                  f"it; otherwise it goes on.", file=sys.stderr, flush=True)
        except OSError:
            pass

    previous = signal.signal(signal.SIGINT, ask)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclass(frozen=True)
class TableCount:
    """A table's row count on both sides and the seconds counting took (both sides): the report models the verify
    inside the freeze as a cost per table plus one per row from these."""

    table: str
    rows: int
    other_rows: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"table": self.table, "rows": self.rows, "other_rows": self.other_rows,
                "seconds": round(self.seconds, 4)}


def count_tables(a: psycopg.Connection[Any], b: psycopg.Connection[Any], tables: list[catalog.Table]) -> list[TableCount]:
    """Each table's row count on the two connections' databases, timed."""
    out = []
    for table in tables:
        q = sql.SQL("SELECT count(*) FROM ONLY {}").format(table.ident)
        t0 = time.monotonic()
        ra, rb = a.execute(q).fetchone(), b.execute(q).fetchone()
        out.append(TableCount(table.display, int(ra[0]) if ra else 0, int(rb[0]) if rb else 0, time.monotonic() - t0))
    return out


def count_differences(a: psycopg.Connection[Any], b: psycopg.Connection[Any], tables: list[catalog.Table]) -> list[str]:
    """Tables whose row counts differ between the two connections' databases."""
    return [c.table for c in count_tables(a, b, tables) if c.rows != c.other_rows]


def carry_sequences(seqs: list[catalog.Sequence], into: psycopg.Connection[Any]) -> list[str]:
    """Set each sequence on `into` at least to the position read on the other side (never backwards), in the
    caller's transaction, and read it back; returns the sequences still behind (none, unless something raced)."""
    behind = []
    for seq in seqs:
        if seq.last_value is None:
            continue
        read = sql.SQL("SELECT last_value, is_called FROM {}").format(seq.ident)
        row = into.execute(read).fetchone()
        if row is not None and (row[0], row[1]) >= (seq.last_value, seq.is_called):
            continue
        into.execute("SELECT setval(%s::regclass, %s, %s)", (seq.ident.as_string(into), seq.last_value, seq.is_called))
        row = into.execute(read).fetchone()
        if row is None or (row[0], row[1]) < (seq.last_value, seq.is_called):
            behind.append(seq.display)
    return behind


NOT_MOVED = "clients were not moved: no switch configured, overridden by the operator"
"""What a cutover or rollback run with `--override no-switch` and neither a pooler nor a command says it did."""


def run_command(cfg: Config, command: str | None, setting: str, *, on_start: Callable[[int], None] | None = None,
                **env: str) -> str:
    """Run the site's own command that moves clients (`switch_command`, `rollback_command`); non-zero exit fails.
    Without a command there is nothing to run: the go/no-go `switch` item refused, or the operator overrode it.

    It runs in a session of its own: a Ctrl-C or hang-up meant for migrator does not cut it short half-way, and a
    migrator that dies leaves it to finish while its guardian waits for it (`on_start` gets its pid)."""
    if not command:
        return NOT_MOVED
    full_env = dict(os.environ, MIGRATOR_TARGET=db.describe_dsn(cfg.target_dsn),
                    MIGRATOR_SOURCE=db.describe_dsn(cfg.source_dsn), **env)
    proc = subprocess.Popen(command, shell=True, env=full_env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    if on_start is not None:
        on_start(proc.pid)
    try:
        _, stderr = proc.communicate(timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise MigratorError(f"{setting} did not finish within {COMMAND_TIMEOUT}s and was stopped") from None
    if proc.returncode != 0:
        raise MigratorError(f"{setting} exited {proc.returncode}: {scrub(stderr.strip())[-500:]}")
    return f"{setting} exited 0"


class PoolerSession:
    """The pooler side of one switch (cutover or rollback): what it paused and rewrote, so that every exit can undo
    exactly that."""

    def __init__(self, cfg: Config, phase: str) -> None:
        c = cfg.cutover
        assert c.pgbouncer_admin_dsn and c.pgbouncer_ini
        self.phase = phase
        self.admin_dsn = c.pgbouncer_admin_dsn
        self.names = list(c.pooler_databases)
        self.ini = c.pgbouncer_ini
        self.where = pooler.target_location(cfg.target_dsn, c.pooler_target)
        self.admin: pooler.Admin | None = None
        self.paused: list[str] = []
        self.former_text: str | None = None
        self.pause_started: float | None = None
        self.pause_seconds: float | None = None
        self.reconnect_clients = False
        """`resume` drops every client connection first (KILL), so that clients reconnect: for clients whose
        session state (prepared statements) did not survive a switch of server connections."""

    def pause(self, timeout: float) -> str:
        self.admin = pooler.Admin(self.admin_dsn)
        self.pause_started = time.monotonic()
        deadline = self.pause_started + timeout
        for name in self.names:
            # Marked first: a PAUSE cut short by an interrupt may still have paused it.
            self.paused.append(name)
            self.admin.pause(name, max(deadline - time.monotonic(), 0.1))
        return f"paused {', '.join(self.names)} in {time.monotonic() - self.pause_started:.3f}s"

    def entries(self) -> dict[str, state.PoolerEntry]:
        legacy = pooler.read_entries(self.ini, self.names)
        return {n: state.PoolerEntry(n, self.ini, e, pooler.repoint(e, self.where), "target")
                for n, e in legacy.items()}

    def point(self, entries: dict[str, str]) -> None:
        assert self.admin is not None
        former = pooler.rewrite_entries(self.ini, entries)
        if self.former_text is None:
            self.former_text = former
        faults.reached(f"{self.phase}.switch.rewritten")
        self.admin.reload()

    def restore(self) -> str:
        """Put the [databases] file back as it was and RELOAD, when this switch rewrote it. Never raises."""
        if self.former_text is None:
            return ""
        try:
            pooler.write_text(Path(self.ini), self.former_text)
            self.former_text = None
            with pooler.Admin(self.admin_dsn) as a:
                a.reload()
            return "the pooler points at the legacy database again"
        except (MigratorError, OSError, psycopg.Error) as exc:
            return (f"RESTORING THE POOLER'S ENTRIES FAILED ({scrub(str(exc).strip())}): put back {self.ini} and "
                    "RELOAD by hand")

    def resume(self) -> str:
        """RESUME every database this switch paused (each on a fresh admin connection). Never raises."""
        if not self.paused:
            return ""
        failed = []
        for name in list(self.paused):
            try:
                with pooler.Admin(self.admin_dsn) as a:
                    if self.reconnect_clients:
                        a.kill(name)
                    a.resume(name)
                self.paused.remove(name)
            except MigratorError:
                failed.append(name)
        if self.pause_started is not None:
            self.pause_seconds = time.monotonic() - self.pause_started
        if failed:
            return f"RESUME FAILED for {', '.join(failed)}: run `RESUME <db>` on the PgBouncer admin console NOW"
        return "the pooler was resumed" + (" (client connections dropped first)" if self.reconnect_clients else "")

    def close(self) -> None:
        if self.admin is not None:
            self.admin.close()


# --- the step runner ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Step:
    """One step of a cutover or rollback: `run` does it and returns the detail recorded with it."""

    name: str
    run: Callable[[], str]
    undo: Callable[[], str] | None = None
    """Puts back what `run` did, when a later step fails; returns what it did ("" for nothing to say). Never raises:
    a failed undo says so in its message, which the operator reads."""
    undo_partial: bool = False
    """The step may have half happened when it fails (some databases paused, the file rewritten but not reloaded):
    its own undo runs too, first. The undo then puts back only what it finds done."""
    point_of_no_return: bool = False
    """The clients are on the other side once `run` returns: from then on nothing is undone."""
    forward: Callable[[], str] | None = None
    """Completes the step when the run stops after the point of no return (this step failing, or one before it):
    the run goes forward, never back (RESUME, at least). Never raises."""
    then: Callable[[], None] | None = None
    """Records what `run` made true; runs after it returned, timed with the step. The step counts as done from the
    moment `run` returns: if `then` fails, the step's undo runs (or, past the point of no return, nothing)."""


@dataclass
class StepTiming:
    step: str
    seconds: float
    detail: str | None = None


class Recorder(Protocol):
    """Where a run's steps are recorded (the attempt's rows in the control schema)."""

    def started(self, step: str) -> None: ...

    def finished(self, step: str, detail: str) -> None: ...

    def stopped(self, step: str, error: str) -> None:
        """The run stopped at `step` with `error` and the undo has run: record the step and the attempt as failed.
        Never raises (the undo's message matters more than the record)."""
        ...


class AttemptRecorder:
    """The `Recorder` of a cutover or rollback attempt: its steps' rows in the control schema, and in the guardian's
    journal once the guardian watches (`guard`). A flow sets `kind` ("cutover" or "rollback"), `cfg`, `target` (the
    control schema's connection), `report` (with `attempt`, `failed_step`, `error`, `pause_seconds`) and `log`, and
    sets `recorded` once the attempt's outcome is in the control schema."""

    kind: str
    cfg: Config
    target: psycopg.Connection[Any]
    report: Any
    log: Any
    watch: Watch | None = None
    recorded: bool = False
    _confirming: Any = None

    def started(self, step: str) -> None:
        if self.watch is not None:
            self.watch.step(step, "started")
        state.step_started(self.target, self.report.attempt, step)

    def finished(self, step: str, detail: str) -> None:
        if self.watch is not None:
            self.watch.step(step, "done")
        state.step_finished(self.target, self.report.attempt, step, "done", detail)

    def stopped(self, step: str, error: str) -> None:
        self.report.failed_step = step
        self.report.error = error
        try:
            if step:  # a rollback may stop before its first step
                state.step_finished(self.target, self.report.attempt, step, "failed", error)
            state.finish_attempt(self.target, self.report.attempt, "failed", failed_step=step or None, error=error)
            state.record_attempt_pooler(self.target, self.report.attempt, kind=self.kind,
                                        pause_seconds=self.report.pause_seconds)
            self.recorded = True
        except psycopg.Error:
            pass
        self.log.error(f"{self.kind}.failed", step=step, error=error, pause_seconds=self.report.pause_seconds)

    def guard(self, home: dict[str, str], away: dict[str, str]) -> str:
        """Start the guardian (migrator/guardian.py) before anything is paused or frozen; `home` and `away` are the
        pooler entries clients are served from now and after the switch."""
        migration = state.require_prepared(self.target).migration_id
        journal = Journal.create(self.cfg, self.kind, self.report.attempt, str(migration),
                                 db.describe_dsn(self.cfg.target_dsn))
        journal.home, journal.away = home, away
        journal.steps["guard"] = "started"
        journal.save()
        self.watch = Watch(self.cfg, journal)
        self._confirming = interrupts_confirmed(self.kind)
        self._confirming.__enter__()
        return (f"guardian {self.watch.proc.pid} watching on {socket.gethostname()}; it takes over if this process "
                f"dies, or after {self.cfg.cutover.guardian_timeout:g}s of silence")

    def command_started(self, pid: int) -> None:
        """The site's switch or rollback command runs as `pid`: the guardian waits for it before deciding."""
        if self.watch is not None:
            self.watch.journal.command = pid
            self.watch.journal.save(durable=False)

    def unguard(self) -> None:
        """The run is over (done, or stopped and undone): the guardian goes, and Ctrl-C is Ctrl-C again."""
        if self._confirming is not None:
            self._confirming.__exit__(None, None, None)
            self._confirming = None
        if self.watch is not None:
            self.watch.end(recorded=self.recorded)
            self.watch = None


def first_line(exc: BaseException) -> str:
    """An exception as the one line recorded and reported, scrubbed of passwords."""
    return scrub(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


class StepRunner:
    """Runs one flow's steps in order (see the module docstring); `timings` holds the steps done, `current` the one
    running or last run."""

    def __init__(self, phase: str, recorder: Recorder, on_step: Callable[[str, str], None] | None = None) -> None:
        self.phase = phase
        self.recorder = recorder
        self.on_step = on_step
        self.timings: list[StepTiming] = []
        self.current = ""
        self.moved = False
        """The point of no return is passed: the clients are on the other side."""
        self.log = get(phase=phase)

    def run(self, steps: Sequence[Step], *, hint: str, after_move_hint: str = "",
            passthrough: tuple[type[BaseException], ...] = (KeyboardInterrupt,)) -> None:
        """Run `steps`; on a failure before the point of no return, undo and raise `CutoverFailed` with `hint` (or the
        exception itself when it is one of `passthrough`, after the same undo); after it, go forward and raise
        `CutoverFailed` with `after_move_hint` (`moved` tells the caller which)."""
        done: list[Step] = []
        running: Step | None = None
        try:
            for running in steps:
                self._one(running, done)
        except BaseException as exc:
            with signals_deferred(self.phase):
                error = first_line(exc)
                if self.moved:
                    self.log.error(f"{self.phase}.after_move_failed", step=self.current, error=error)
                    said = "; ".join(s for s in self._forward(steps, done) if s)
                    self.recorder.stopped(self.current, error)
                    raise CutoverFailed(f"{self.phase} failed at step {self.current}, after its point of no return "
                                        f"(it went forward): {error}{'; ' + said if said else ''}",
                                        hint=after_move_hint or hint) from exc
                half_done = None if done and done[-1] is running else running
                undone = self._undo(done, half_done)
                self.recorder.stopped(self.current, error)
                if isinstance(exc, passthrough):
                    raise
                said = "; ".join(u for u in undone if u)
                raise CutoverFailed(f"{self.phase} stopped at step {self.current}: {error}{'; ' + said if said else ''}",
                                    hint=hint) from exc

    def _one(self, step: Step, done: list[Step]) -> None:
        self.current = step.name
        self.recorder.started(step.name)
        faults.reached(f"{self.phase}.{step.name}.started")
        if self.on_step:
            self.on_step(step.name, "running")
        t0 = time.monotonic()
        detail = step.run()
        done.append(step)
        faults.reached(f"{self.phase}.{step.name}.ran")
        if step.point_of_no_return:
            self.moved = True
        if step.then:
            step.then()
        seconds = time.monotonic() - t0
        self.timings.append(StepTiming(step.name, seconds, detail))
        self.recorder.finished(step.name, detail)
        self.log.info(f"{self.phase}.step", step=step.name, seconds=round(seconds, 3))
        if self.on_step:
            self.on_step(step.name, "done")

    def _forward(self, steps: Sequence[Step], done: list[Step]) -> list[str]:
        """Past the point of no return: complete every step not done, as far as its `forward` can."""
        said = []
        for step in steps:
            if step not in done and step.forward is not None:
                said.append(step.forward())
                self.log.warning(f"{self.phase}.forward", step=step.name, said=said[-1])
        return said

    def _undo(self, done: list[Step], failed: Step | None) -> list[str]:
        """The undos of the steps done, last first, after the failing step's own when it may have half happened."""
        undos = [s.undo for s in reversed(done) if s.undo]
        if failed is not None and failed.undo_partial and failed.undo:
            undos.insert(0, failed.undo)
        return [undo() for undo in undos]
