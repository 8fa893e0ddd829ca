"""Rollback: move the clients back to the legacy database after a cutover, losing nothing they wrote on the target.

The cutover arms the rollback (`arm`) once the target holds everything and before clients move: it installs the same
capture on the target (triggers/capture.sql and a key function per table, enabled ALWAYS), and records in the legacy
database the target snapshot of that moment (triggers/rollback.sql). From then on every change written on the target
is in the target's delta log. `run` replays that log onto the legacy database with the forward algorithm, roles
swapped: batches cut by target snapshots, each applied by the delta log's Applier in one legacy transaction that also
advances the recorded position. With a pooler the clients never reconnect (unless the cutover's health gate found
them unhealthy because their prepared statements were lost at the switch: then `run_held` has the pooler drop their
connections before RESUME, so that they reconnect and prepare them again on the legacy database):

    preflight → catch_up (reverse batches while clients still write) → guard (the guardian started, as in the
    cutover) → pause (PgBouncer PAUSE) → freeze (the target
    rejects writes) → drain → verify (counts) → sequences (legacy at least at the target's) → release (the legacy
    database takes writes again) → switch (the pooler's entries back to the legacy ones, RELOAD) → resume → disarm
    (the rollback window closes: the target's delta log emptied, the legacy position dropped; the target stays frozen)

A completed rollback leaves the target frozen (no split brain: a client connecting to it directly could otherwise
write where nobody reads), even after migrator exits, until the next cutover lifts the freeze at its `arm_rollback`
(just before clients move there) or the operator releases it (`migrator release --target`, `migrator cleanup
--release-target`). Sync goes on writing the frozen target as it writes any table with ALWAYS triggers (the
triggers silenced inside its own transactions: migrator/deltalog/freeze.py). A cutover that is undone puts back the
freeze its `arm_rollback` lifted (`disarm`).

Without a pooler the switch is `[cutover] rollback_command`; with neither, the rollback is refused before anything is
touched unless the operator accepts one that moves nobody (`--override no-switch`, recorded and reported): after it
the legacy database takes writes and the target stays frozen. The frozen capture triggers of the legacy database do
not stop the reverse replay: like the application's ALWAYS triggers during sync, they are disabled inside the replay
transaction and enabled again before it commits, so no other session ever sees them off, and no client can open
that door (no session setting lets a write through the freeze). Either the rollback completes, or it stops before
the legacy database is released and leaves the clients on the target: pooler entries as they were, target writable,
RESUME.
`migrator cleanup` ends the rollback window (`remove_capture`). The steps and their undos are `_Rollback.steps`, run by
migrator/switchover.py's StepRunner; the point of no return is the release of the legacy database (from then on
clients not behind the pooler may write there, so it is never frozen again by an undo): a later failure goes forward
(entries at the legacy database, RESUME). A rollback whose process dies is seen through by its guardian the same way
(migrator/guardian.py, migrator/recovery.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from migrator import catalog, db, gonogo, pooler, prepare, recovery, state, sync
from migrator import verify as verify_mod
from migrator.catalog import Table
from migrator.config import Config
from migrator.deltalog import freeze as freezer
from migrator.deltalog import rollback_position as position
from migrator.deltalog import rotation, snapshot, triggers
from migrator.deltalog.apply import Applier
from migrator.deltalog.snapshot import Snapshot
from migrator.errors import Blocked, CutoverFailed, MigratorError, NoGo, NotReady, SchemaChanged
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
    count_differences,
    run_command,
)

STEPS = ("preflight", "catch_up", "guard", "freeze", "drain", "verify", "sequences", "release", "switch", "disarm")
"""The steps without a pooler (`rollback_command`)."""
POOLER_STEPS = ("preflight", "catch_up", "guard", "pause", "freeze", "drain", "verify", "sequences", "release", "switch",
                "resume", "disarm")
"""The steps through PgBouncer."""
CATCH_UP_BATCHES = 20


# --- arming (at cutover), disarming (a finished rollback, an undone cutover) and removing (cleanup, release) ----------

def stage(cfg: Config) -> str:
    """Install the rollback's capture on the target with its triggers disabled, before the cutover's pause.

    Creating a trigger function and five triggers per table costs a transaction per table (about 3.5 ms each: 1.0 s for
    300 tables, `python -m bench.arm`); done here it stays out of the client-visible window, and `arm` only enables the triggers. Disabled
    triggers neither fire nor are switched off and on by sync's drain. A target frozen by the last rollback keeps its
    freeze (and its enabled triggers) until `arm`; its log, which nothing writes, is emptied of that rollback's events.
    """
    with db.session(cfg.target_dsn, role="target", autocommit=True) as target:
        tables = catalog.list_tables(target, cfg.tables)
        installed = triggers.install(target, tables, lock_timeout=cfg.sync.lock_timeout, enabled=False)
        frozen = freezer.is_frozen(target)
        if frozen:
            rotation.empty_log(target, cfg.sync.lock_timeout)
    get(phase="cutover").info("rollback.staged", tables=len(tables), triggers_installed=installed, target_frozen=frozen)
    return f"capture staged (disabled) on {len(tables)} target tables" + (
        "; the target stays frozen (the last rollback's freeze) until arm_rollback" if frozen else "")


def arm(cfg: Config) -> str:
    """Capture every change written on the target from now on, and record where the reverse replay starts.

    Called by the cutover after the drain and before clients move: nobody writes the target, so every later change
    is a transaction the recorded snapshot does not contain. Enables what `stage` installed (and installs what it
    did not: a table staged by nobody is still captured), and lifts the freeze the last rollback left on the target
    (recorded as lifted by this cutover, so that an undo puts it back); the snapshot is taken after that has
    committed.
    """
    with db.session(cfg.target_dsn, role="target", autocommit=True) as target, \
            db.session(cfg.source_dsn, role="source", autocommit=True) as legacy:
        tables = catalog.list_tables(target, cfg.tables)
        # Staged tables are skipped (present, disabled); any other is installed, disabled, and enabled with them.
        installed = triggers.install(target, tables, lock_timeout=cfg.sync.lock_timeout, enabled=False)
        enabled = triggers.enable_triggers(target, tables, lock_timeout=cfg.sync.lock_timeout)
        lifted = freezer.is_frozen(target)
        if lifted:
            freezer.release(target, reason=freezer.LIFTED_BY_CUTOVER)
        row = target.execute("SELECT pg_current_snapshot()::text").fetchone()
        assert row is not None
        position.record(legacy, row[0])
    get(phase="cutover").info("rollback.armed", tables=len(tables), triggers_installed=installed, enabled=enabled,
                              target_freeze_lifted=lifted)
    return f"capture on {len(tables)} target tables from snapshot {row[0]}" + (
        "; the target's freeze (from the last rollback) lifted" if lifted else "")


def disarm(cfg: Config) -> str:
    """Close the rollback window: the last step of a completed rollback, and the undo of a cutover that staged it.

    The legacy side's position goes. A target the last rollback froze keeps that freeze (or gets it back, when this
    undoes a cutover whose `arm` had lifted it), with its delta log emptied; any other target loses its capture
    (triggers and `_migrator` schema), and with it nothing that made it reject writes. Returns what it did."""
    with db.session(cfg.target_dsn, role="target", autocommit=True) as target:
        keep = triggers.has_capture(target) and (
            freezer.is_frozen(target) or freezer.freeze_reason(target) == freezer.LIFTED_BY_CUTOVER)
        removed = 0
        if keep:
            if not freezer.is_frozen(target):
                freezer.freeze(target, catalog.list_tables(target, cfg.tables), cfg.cutover.freeze_lock_timeout,
                               side="the target", reason=freezer.BY_ROLLBACK)
            rotation.empty_log(target, cfg.sync.lock_timeout)
        elif triggers.has_capture(target):
            removed = triggers.remove(target, cfg.sync.lock_timeout, where="target ")
    _drop_position(cfg)
    get(phase="rollback").info("rollback.disarmed", target_frozen=keep, triggers=removed)
    if keep:
        return "the target stays frozen (until the next cutover or `migrator release --target`); its log emptied"
    return f"{removed} target triggers removed"


def remove_capture(cfg: Config) -> int:
    """Remove capture from the target (its triggers and `_migrator` schema, and with them a freeze: the target takes
    writes) and the legacy side's position; returns the number of triggers removed. Writes on the target are no
    longer recorded afterwards (`migrator cleanup`, `migrator release --target`)."""
    removed = 0
    with db.session(cfg.target_dsn, role="target", autocommit=True) as target:
        if triggers.has_capture(target):
            removed = triggers.remove(target, cfg.sync.lock_timeout, where="target ")
    _drop_position(cfg)
    get(phase="rollback").info("rollback.capture_removed", triggers=removed)
    return removed


def _drop_position(cfg: Config) -> None:
    with db.session(cfg.source_dsn, role="source", autocommit=True) as legacy:
        if triggers.has_capture(legacy):
            position.drop(legacy)


# --- the reverse replay -------------------------------------------------------------------------------------------

class _Reverse:
    """Replays the target's delta log onto the legacy database: the delta log's Applier with the roles swapped."""

    def __init__(self, cfg: Config, tables: dict[int, Table]) -> None:
        self.cfg = cfg
        self.tables = tables
        self.reader = db.connect(cfg.target_dsn, role="target")
        self.reader.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        self.reader.read_only = True
        self.legacy = db.connect(cfg.source_dsn, role="source")
        self.applier = Applier(self.legacy, tables)

    def close(self) -> None:
        for conn in (self.reader, self.legacy):
            try:
                conn.close()
            except psycopg.Error:
                pass

    def batch(self) -> int:
        """Apply everything committed on the target since the recorded position; returns the events applied."""
        reader, legacy = self.reader, self.legacy
        try:
            with reader.cursor() as scur, legacy.cursor() as lcur:
                scur.execute(sql.SQL("SET LOCAL statement_timeout = {}").format(
                    sql.Literal(f"{int(self.cfg.sync.statement_timeout * 1000)}ms")))
                row = scur.execute("SELECT pg_current_snapshot()::text").fetchone()
                assert row is not None
                cur_snap = Snapshot.parse(row[0])
                lcur.execute("SET LOCAL session_replication_role = replica")
                recorded = position.lock(lcur)
                if recorded is None:
                    raise NotReady("the rollback position vanished from the legacy database (cleanup ran?)")
                applied = Snapshot.parse(recorded)
                if not cur_snap.includes(applied):
                    legacy.rollback()  # another rollback run applied a newer snapshot meanwhile
                    return 0
                window = snapshot.window(applied, cur_snap)
                changed = self.applier.changed(scur, window)
                events = sum(n for _, n, _ in changed)
                if changed:
                    # Tables without a key have no copy boundary here: the position was taken with nothing in flight.
                    self.applier.apply(scur, lcur, window, changed, {})
                position.advance(lcur, cur_snap.text, events)
            legacy.commit()
        except BaseException:
            legacy.rollback()
            raise
        finally:
            reader.rollback()
        if events:
            get(phase="rollback").info("rollback.batch", events=events)
        return events

    def pending(self) -> int:
        """Events committed on the target that the legacy database does not hold yet."""
        recorded = position.read(self.legacy)
        self.legacy.rollback()
        assert recorded is not None
        try:
            return sync.pending(self.reader, recorded).pending_events
        finally:
            self.reader.rollback()


def _target_tables(cfg: Config, target: psycopg.Connection[Any], legacy: psycopg.Connection[Any]) -> dict[int, Table]:
    """The captured target tables by oid; SchemaChanged when DDL changed one since cutover or the legacy side differs."""
    tables = catalog.list_tables(target, cfg.tables)
    captured = triggers.installed_tables(target)
    changed = [t.display for t in tables
               if t.oid not in captured or captured[t.oid][2] != t.fingerprint or captured[t.oid][3] != t.key]
    if changed:
        raise SchemaChanged(f"DDL on the target since cutover: {', '.join(changed[:20])}",
                            hint="Undo the schema change on the target (or apply it to the legacy database and run "
                                 "`migrator cleanup` to end the rollback window); rollback replays rows only.")
    try:
        prepare.check_target_columns(legacy, tables)
    except MigratorError as exc:
        raise SchemaChanged(f"the legacy database's tables differ from the target's: {exc}") from exc
    return {t.oid: t for t in tables}


# --- the rollback -------------------------------------------------------------------------------------------------

@dataclass
class RollbackReport:
    attempt: int
    ok: bool
    mode: str = "rollback_command"
    pause_seconds: float | None = None
    """Client-visible pause through the pooler: PAUSE sent until RESUME returned (None without a pooler)."""
    events_replayed: int = 0
    sequences_set: int = 0
    steps: list[dict[str, Any]] = field(default_factory=list)
    failed_step: str | None = None
    error: str | None = None
    clients_moved: bool = True
    """False when neither a pooler nor rollback_command moved them (`--override no-switch`)."""
    checklist: list[dict[str, Any]] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)
    """Earlier attempts whose process died, and how they were resolved (by the guardian or by this run)."""
    already_done: bool = False
    """An interrupted rollback had been completed (by its guardian or by this run); nothing more was done."""

    def to_dict(self) -> dict[str, Any]:
        return {"attempt": self.attempt, "ok": self.ok, "mode": self.mode, "clients_moved": self.clients_moved,
                "recovered": self.recovered, "already_done": self.already_done,
                "clients": None if self.clients_moved else NOT_MOVED, "pause_seconds": self.pause_seconds,
                "events_replayed": self.events_replayed, "sequences_set": self.sequences_set,
                "failed_step": self.failed_step, "error": self.error, "checklist": self.checklist,
                "steps": self.steps}

    def render_text(self) -> str:
        before = "".join(f"{r}\n" for r in self.recovered)
        if self.already_done:
            return before + ("nothing more to do: the rollback is done; clients are on the legacy database, and the "
                             "target stays frozen until the next cutover or `migrator release --target`")
        head = before + f"rollback done: {self.events_replayed} events written on the target replayed onto the legacy database"
        head += ("\nthe target stays frozen: it rejects writes until the next cutover or `migrator release --target`")
        if self.pause_seconds is not None:
            head += f"; clients paused {self.pause_seconds:.2f}s"
        if not self.clients_moved:
            head += f"\n{NOT_MOVED}"
        return head + "\n" + "\n".join(f"  {s['step']:<10} {s['seconds']:8.3f}s  {s['detail'] or ''}"
                                       for s in self.steps)


def run(cfg: Config, *, overrides: Iterable[str] = (), on_step: Callable[[str, str], None] | None = None,
        reconnect_clients: bool = False) -> RollbackReport:
    """Roll back a completed cutover. Returns the report; raises NotReady when there is nothing to roll back, NoGo
    when nothing would move the clients back and `overrides` lacks "no-switch" (nothing touched in either case),
    CutoverFailed when a step fails before clients move (they stay on the target, which takes writes).
    `reconnect_clients`: see `run_held`."""
    overrides = tuple(overrides)
    unknown = set(overrides) - {gonogo.NO_SWITCH}
    if unknown:
        raise Blocked(f"unknown override(s) for a rollback: {', '.join(sorted(unknown))}; only {gonogo.NO_SWITCH}")
    with db.session(cfg.target_dsn, role="target", autocommit=True) as target:
        state.require_prepared(target)  # "not prepared" before "another rollback is running": it says what to do
        with action_lock(cfg, target, "rollback"), db.session(cfg.source_dsn, role="source", autocommit=True) as legacy:
            return _run_locked(cfg, target, legacy, overrides, on_step, reconnect_clients=reconnect_clients)


def run_held(cfg: Config, target: psycopg.Connection[Any], *, on_step: Callable[[str, str], None] | None = None,
             reconnect_clients: bool = False) -> RollbackReport:
    """The rollback for a caller that holds the action lock on `target` (a cutover whose health gate found the
    clients unhealthy: migrator/health.py). `reconnect_clients`: the pooler drops the clients' connections before
    RESUME, so that clients whose session state did not survive the switch (prepared statements) reconnect."""
    with db.session(cfg.source_dsn, role="source", autocommit=True) as legacy:
        return _run_locked(cfg, target, legacy, (), on_step, reconnect_clients=reconnect_clients)


def _run_locked(cfg: Config, target: psycopg.Connection[Any], legacy: psycopg.Connection[Any],
                overrides: tuple[str, ...], on_step: Callable[[str, str], None] | None, *,
                reconnect_clients: bool = False) -> RollbackReport:
    """The rollback, under the action lock: first what an earlier attempt's death left (migrator/recovery.py)."""
    recovered = [j.detail for j in recovery.recover(cfg, target)]
    if _rolled_back(target):
        if triggers.has_capture(target):
            disarm(cfg)  # the step the completed rollback's process did not reach (the target stays frozen)
        return RollbackReport(attempt=0, ok=True, recovered=recovered, already_done=True)
    checklist = _ready(cfg, target, legacy, overrides)
    flow = _Rollback(cfg, target, legacy, checklist)
    flow.report.recovered = recovered
    if flow.pool is not None:
        flow.pool.reconnect_clients = reconnect_clients
    runner = StepRunner("rollback", flow, on_step)
    try:
        try:
            runner.run(flow.steps(), hint="Clients stay on the target. Fix the cause and run `migrator rollback` "
                                          "again; `migrator status` shows the recorded steps.",
                       after_move_hint="The legacy database takes writes and holds every change made on the target, "
                                       "which stays frozen: the rollback stands. Move the clients to the legacy "
                                       "database by hand (the pooler's entries, or rollback_command).")
        except CutoverFailed:
            if runner.moved:
                flow.finish(status=None)
            raise
        flow.finish()
    finally:
        flow.close_reverse()
        flow.unguard()
    # Clients are on the legacy database: this step never fails (it says what it left behind).
    runner.run([Step("disarm", flow.disarm)], hint="")
    return flow.done(runner.timings)


def _rolled_back(target: psycopg.Connection[Any]) -> bool:
    """The last attempt is a completed rollback (recorded done by its process, a guardian or a re-run): run again,
    the rollback only finishes its last step if its process died before it (`disarm`), and says it is done."""
    if state.require_prepared(target).cutover_at is not None:
        return False
    done = [a for a in state.attempts(target) if a["finished_at"] is not None]
    return bool(done) and done[-1].get("kind") == "rollback" and done[-1]["status"] == "done"


def _ready(cfg: Config, target: psycopg.Connection[Any], legacy: psycopg.Connection[Any],
           overrides: tuple[str, ...]) -> gonogo.Checklist:
    """The rollback's checks before anything is recorded or touched: a completed, armed cutover, and something that
    moves the clients back (or the operator's override)."""
    m = state.require_prepared(target)
    if m.cutover_at is None:
        raise NotReady("there is no completed cutover to roll back",
                       hint="`migrator status` shows the recorded cutover attempts.")
    if position.armed(legacy) is None or not triggers.has_capture(target):
        raise NotReady("the rollback is not armed: the target's changes since cutover were not captured",
                       hint="Only a cutover that armed the rollback (and no `migrator cleanup` since) can be "
                            "rolled back without losing the target's writes.")
    checklist = gonogo.rollback_checklist(cfg, overrides=overrides)
    if not checklist.go:
        raise NoGo(f"rollback refused: {', '.join(checklist.failing)}; nothing was frozen or replayed",
                   checklist=checklist.render_text(),
                   hint="Configure [cutover] rollback_command (or the pooler) and run `migrator rollback` again, "
                        f"or accept a rollback that moves no client with `--override {gonogo.NO_SWITCH}`.")
    return checklist


class _Rollback(AttemptRecorder):
    """One rollback attempt: its steps, their undos, and the values they pass on (the `Recorder` of its runner)."""

    def __init__(self, cfg: Config, target: psycopg.Connection[Any], legacy: psycopg.Connection[Any],
                 checklist: gonogo.Checklist) -> None:
        self.cfg = cfg
        self.target = target
        self.legacy = legacy
        self.kind = "rollback"
        self.log = get(phase="rollback")
        self.report = RollbackReport(attempt=state.start_attempt(target), ok=False,
                                     checklist=gonogo.recorded(checklist))
        state.record_attempt_pooler(target, self.report.attempt, kind="rollback", checklist=self.report.checklist)
        self.pool = PoolerSession(cfg, "rollback") if cfg.cutover.uses_pooler else None
        self.report.mode = "pgbouncer" if self.pool else "rollback_command"
        self.reverse: _Reverse | None = None
        self.tables: dict[int, Table] = {}

    def steps(self) -> list[Step]:
        pooled = self.pool is not None
        return [
            Step("preflight", self.preflight),
            Step("catch_up", self.catch_up),
            Step("guard", self.start_guardian),
            *([Step("pause", self.pause, undo=self.resume_after_failure, undo_partial=True)] if pooled else []),
            Step("freeze", self.freeze, undo=self.release_target),
            Step("drain", self.drain),
            Step("verify", self.verify),
            Step("sequences", self.sequences),
            Step("release", self.release, point_of_no_return=True),
            Step("switch", self.switch, forward=self.switch_forward),
            *([Step("resume", self.resume, then=self.record_pointing, forward=self.resume_forward)] if pooled else []),
        ]

    def close_reverse(self) -> None:
        if self.reverse is not None:
            self.reverse.close()

    def finish(self, status: str | None = "done") -> None:
        """The legacy database holds everything and takes writes: record the rollback done (`status` None: the
        attempt is already recorded, as failed after its point of no return)."""
        if self.pool is not None:
            self.report.pause_seconds = self.pool.pause_seconds
            self.pool.close()
        state.mark(self.target, "frozen", False)
        state.clear(self.target, "cutover_at")
        if status is not None:
            state.finish_attempt(self.target, self.report.attempt, status)
        state.record_attempt_pooler(self.target, self.report.attempt, kind="rollback",
                                    pause_seconds=self.report.pause_seconds)
        self.recorded = True

    def done(self, timings: list[StepTiming]) -> RollbackReport:
        report = self.report
        report.steps = [{"step": t.step, "seconds": round(t.seconds, 3), "detail": t.detail} for t in timings]
        self.log.info("rollback.done", events=report.events_replayed, pause_seconds=report.pause_seconds)
        report.ok = True
        return report

    # --- the steps ----------------------------------------------------------------------------------------------

    def preflight(self) -> str:
        self.tables = _target_tables(self.cfg, self.target, self.legacy)
        if not freezer.is_frozen(self.legacy):
            raise Blocked("the legacy database is not frozen: it may have taken writes since cutover, and "
                          "replaying the target's changes over them could lose some",
                          hint="Compare both sides with `migrator verify` and decide by hand.")
        if self.pool is not None:
            missing = set(self.pool.names) - set(state.pooler_entries(self.target))
            if missing:
                raise Blocked(f"no recorded legacy pooler entry for {', '.join(sorted(missing))}")
        self.reverse = _Reverse(self.cfg, self.tables)
        return f"{len(self.tables)} tables; legacy frozen; rollback armed"

    def catch_up(self) -> str:
        assert self.reverse is not None
        n = 0
        for _ in range(CATCH_UP_BATCHES):
            t0 = time.monotonic()
            events = self.reverse.batch()
            n += events
            if events == 0 or time.monotonic() - t0 < self.cfg.sync.poll_interval:
                break
        self.report.events_replayed += n
        return f"{n} events replayed while clients still wrote to the target"

    def start_guardian(self) -> str:
        if self.pool is None:
            return self.guard({}, {})
        recorded = state.pooler_entries(self.target)
        return self.guard(pooler.read_entries(self.pool.ini, self.pool.names),
                          {n: recorded[n].legacy_entry for n in self.pool.names})

    def pause(self) -> str:
        assert self.pool is not None
        return self.pool.pause(self.cfg.cutover.pause_timeout)

    def resume_after_failure(self) -> str:
        assert self.pool is not None
        said = self.pool.resume()
        self.report.pause_seconds = self.pool.pause_seconds
        self.pool.close()
        return said

    def freeze(self) -> str:
        r = freezer.freeze(self.target, list(self.tables.values()), self.cfg.cutover.freeze_lock_timeout,
                           side="the target", reason=freezer.BY_ROLLBACK)
        return f"{len(self.tables)} target tables frozen" + (f" (attempt {r.attempts})" if r.attempts > 1 else "")

    def release_target(self) -> str:
        try:
            freezer.release(self.target)
        except psycopg.Error as exc:
            return (f"RELEASING THE TARGET FAILED ({exc.__class__.__name__}): the target rejects writes; run "
                    "`migrator rollback --yes` again or release it by hand")
        return "the target takes writes again"

    def drain(self) -> str:
        assert self.reverse is not None
        n = 0
        while (events := self.reverse.batch()) != 0:
            n += events
        self.report.events_replayed += n
        left = self.reverse.pending()
        if left:
            raise MigratorError(f"{left} target events still pending after the drain")
        return f"{n} events replayed"

    def verify(self) -> str:
        if self.cfg.cutover.verify == "none":
            return "every event replayed; rows not compared"
        if self.cfg.cutover.verify == "full":
            if not verify_mod.verify(self.cfg).rows_identical:
                raise MigratorError("parity check found differences; run `migrator verify` for the keys")
            return "every event replayed; rows identical"
        differ = count_differences(self.legacy, self.target, list(self.tables.values()))
        if differ:
            raise MigratorError(f"row counts differ: {', '.join(differ[:10])}")
        return f"every event replayed; counts equal in {len(self.tables)} tables"

    def sequences(self) -> str:
        # Every legacy sequence at least at the target's position: the first insert after the rollback is free.
        seqs = catalog.list_sequences(self.target, self.cfg.tables)
        behind = carry_sequences(seqs, self.legacy)
        if behind:
            raise MigratorError(f"sequences still behind the target on the legacy database: {', '.join(behind[:10])}")
        self.report.sequences_set = len(seqs)
        return f"{self.report.sequences_set} legacy sequences at or past the target's"

    def release(self) -> str:
        freezer.release(self.legacy)
        return "the legacy database takes writes again (capture on)"

    def switch(self) -> str:
        if self.pool is None:
            detail = run_command(self.cfg, self.cfg.cutover.rollback_command, "rollback_command",
                                 on_start=self.command_started, MIGRATOR_DIRECTION="rollback")
            self.report.clients_moved = bool(self.cfg.cutover.rollback_command)
            return detail
        entries = state.pooler_entries(self.target)
        self.pool.point({n: entries[n].legacy_entry for n in self.pool.names})
        return f"{', '.join(self.pool.names)} -> the legacy entries; reloaded"

    def switch_forward(self) -> str:
        try:
            return self.switch()
        except (MigratorError, psycopg.Error, OSError) as exc:
            return (f"MOVING THE CLIENTS BACK FAILED ({exc.__class__.__name__}): the legacy database takes writes; "
                    "point the clients at it by hand")

    def resume_forward(self) -> str:
        assert self.pool is not None
        return self.pool.resume()

    def resume(self) -> str:
        assert self.pool is not None
        said = self.pool.resume()
        if self.pool.paused:
            raise MigratorError(said)
        self.pool.former_text = None
        return f"clients paused {self.pool.pause_seconds or 0:.3f}s"

    def record_pointing(self) -> None:
        assert self.pool is not None
        state.set_pointing(self.target, self.pool.names, "legacy")

    def disarm(self) -> str:
        try:
            return disarm(self.cfg)
        except (MigratorError, psycopg.Error) as exc:
            return (f"the rollback window left open ({exc.__class__.__name__}): the target stays frozen; "
                    "`migrator rollback --yes` closes it")
