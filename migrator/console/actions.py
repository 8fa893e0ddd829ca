"""The console's named actions: each needs an operator's token (checked by the app) and the typed confirmation of what
it acts on (`confirmation`: the action's verb and the legacy database's name, e.g. "cutover pacs"), is refused while a
conflicting one runs, and is audited before it starts: if its audit row cannot be written, it does not start.

Quick ones run in the console (pause and resume the copy, hold and release the cutover, release a freeze, cancel a
cutover waiting at its hold). A verify, a cutover and a rollback run as the same `migrator` command the CLI runs,
detached (a session of its own, `start_new_session`, given the configuration file and the audit row's id in
MIGRATOR_AUDIT_ID): it takes the action lock itself, starts its guardian, records its steps and its outcome in the
control schema, and outlives the browser tab and the console. Its output goes to a log file in the local directory.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from migrator import audit, db, gonogo, state
from migrator.config import Config
from migrator.errors import AuditUnavailable, MigratorError, NotReady
from migrator.state.lock import action_lock_held

REAP_GRACE = 3.0
"""Seconds after a started command exits before the console records its outcome for it (when it could not)."""


@dataclass(frozen=True)
class Spec:
    name: str
    label: str
    verb: str
    """What the operator types, followed by the legacy database's name."""
    audit_name: str
    """As the CLI records it (`copy --pause`, `cutover --hold`, ...)."""
    command: tuple[str, ...] = ()
    """The `migrator` command run detached; empty: the action runs in the console."""
    exclusive: bool = False
    """Refused while a cutover or rollback runs (the action lock), or one the console started is starting."""


SPECS = {s.name: s for s in (
    Spec("copy-pause", "Pause the copy", "pause copy", "copy --pause"),
    Spec("copy-resume", "Resume the copy", "resume copy", "copy --resume"),
    Spec("hold", "Hold the cutover", "hold", "cutover --hold"),
    Spec("release-hold", "Release the hold", "release hold", "cutover --release-hold"),
    Spec("verify", "Run a verify", "verify", "verify", ("verify", "--json")),
    Spec("cutover", "Cut over", "cutover", "cutover", ("cutover", "--yes", "--json"), exclusive=True),
    Spec("release", "Release the freeze", "release", "release", exclusive=True),
    Spec("rollback", "Roll back", "rollback", "rollback", ("rollback", "--yes", "--json"), exclusive=True),
    Spec("cancel", "Cancel the waiting cutover", "cancel cutover", "cancel"),
)}
"""Every action, by the name the page posts to (/api/actions/NAME)."""


def database_name(cfg: Config) -> str:
    return str(psycopg.conninfo.conninfo_to_dict(cfg.source_dsn).get("dbname") or db.describe_dsn(cfg.source_dsn))


def confirmation(cfg: Config, name: str) -> str:
    return f"{SPECS[name].verb} {database_name(cfg)}"


@dataclass
class Outcome:
    """What the page is answered: an HTTP status and a JSON body (message, hint, the audit row's id)."""

    code: int
    body: dict[str, Any]


@dataclass
class Started:
    spec: Spec
    audit_id: int
    proc: subprocess.Popen[bytes]
    log: Path
    began: float
    exited_at: float | None = None


class Runner:
    """Runs the actions; keeps the commands it started until they exit (and records an outcome they could not)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._lock = threading.Lock()
        self.started: dict[int, Started] = {}

    # --- what runs ----------------------------------------------------------------------------------------------

    def running(self) -> list[Started]:
        with self._lock:
            return [s for s in self.started.values() if s.proc.poll() is None]

    def pids(self) -> dict[int, int]:
        """Audit id -> process id of the commands this console started that still run."""
        return {s.audit_id: s.proc.pid for s in self.running()}

    def reap(self) -> None:
        """Forget commands that exited; for one that exited without recording its outcome (it failed before it
        could: a bad configuration, an import error), record it from its exit code."""
        with self._lock:
            items = list(self.started.items())
        for audit_id, s in items:
            code = s.proc.poll()
            if code is None:
                continue
            if s.exited_at is None:
                s.exited_at = time.monotonic()
                continue
            if time.monotonic() - s.exited_at < REAP_GRACE:
                continue
            with self._lock:
                self.started.pop(audit_id, None)
            try:
                with db.session(self.cfg.target_dsn, role="target", autocommit=True, connect_timeout=5) as t:
                    ended = [a for a in audit.actions(state.audit_rows(t, after=audit_id - 1, limit=None))
                             if a.id == audit_id and a.outcome != "started"]
                if not ended:
                    outcome, detail = _exited(s, code)
                    audit.end(self.cfg, audit_id, outcome, detail=detail, seconds=s.exited_at - s.began)
            except (psycopg.Error, MigratorError):
                continue

    # --- acting -------------------------------------------------------------------------------------------------

    def perform(self, name: str, operator: str, body: dict[str, Any]) -> Outcome:
        """Check the confirmation and conflicts, audit, act. Blocking (database and process calls)."""
        spec = SPECS[name]
        arguments = self._arguments(spec, body)
        if isinstance(arguments, Outcome):
            return arguments
        expected = confirmation(self.cfg, name)
        if body.get("confirm") != expected:
            return self._refuse(spec, operator, arguments, 400, f"the confirmation typed is not '{expected}'")
        conflict = self._conflict(spec)
        if conflict:
            return self._refuse(spec, operator, arguments, 409, conflict)
        try:
            audit_id = audit.start(self.cfg, spec.audit_name, arguments, actor=operator, via="console")
        except AuditUnavailable as exc:
            return Outcome(503, {"error": str(exc), "hint": exc.hint})
        if spec.command:
            return self._spawn(spec, arguments, audit_id)
        return self._here(spec, operator, audit_id)

    def _arguments(self, spec: Spec, body: dict[str, Any]) -> dict[str, Any] | Outcome:
        overrides = body.get("overrides") or []
        allowed = {"cutover": gonogo.OVERRIDES, "rollback": (gonogo.NO_SWITCH,)}.get(spec.name, ())
        if not isinstance(overrides, list) or any(o not in allowed for o in overrides):
            return Outcome(400, {"error": f"overrides must be a list of: {', '.join(allowed) or 'none'}"})
        return {"overrides": sorted(set(overrides))} if allowed else {}

    def _refuse(self, spec: Spec, operator: str, arguments: dict[str, Any], code: int, why: str) -> Outcome:
        audit.refused(self.cfg, spec.audit_name, arguments, actor=operator, via="console", detail=why,
                      host=socket.gethostname())
        return Outcome(code, {"error": f"{spec.label}: refused: {why}"})

    def _conflict(self, spec: Spec) -> str | None:
        mine = [s for s in self.running() if s.spec.exclusive or s.spec.name == spec.name]
        if spec.name == "cancel":
            return None if waiting_cutover(self.cfg, self.pids()) else "no cutover waits at its hold on this host"
        if spec.exclusive or spec.name == "verify":
            if any(s.spec.name == spec.name or (spec.exclusive and s.spec.exclusive) for s in mine):
                return f"a {mine[0].spec.name} started from this console is still running (pid {mine[0].proc.pid})"
        if spec.exclusive:
            with db.session(self.cfg.target_dsn, role="target", autocommit=True, connect_timeout=5) as target:
                if action_lock_held(target):
                    return ("another cutover or rollback is running on this target (it holds the action lock); "
                            "wait for it to finish")
        return None

    def _spawn(self, spec: Spec, arguments: dict[str, Any], audit_id: int) -> Outcome:
        args = list(spec.command) + [x for o in arguments.get("overrides", []) for x in ("--override", o)]
        base = [sys.executable, "-m", "migrator", "--log-json"]
        if self.cfg.path is not None:
            base += ["--config", str(self.cfg.path.resolve())]
        logs = self.cfg.local_dir / "console"
        logs.mkdir(mode=0o700, parents=True, exist_ok=True)
        log = logs / f"{audit_id}-{spec.name}.log"
        env = dict(os.environ, **{audit.ENV_AUDIT_ID: str(audit_id)})
        with os.fdopen(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out:
            proc = subprocess.Popen(base + args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=env, start_new_session=True, cwd=self.cfg.local_dir.parent)
        with self._lock:
            self.started[audit_id] = Started(spec, audit_id, proc, log, time.monotonic())
        return Outcome(202, {"started": spec.audit_name, "audit_id": audit_id, "pid": proc.pid, "log": str(log)})

    def _here(self, spec: Spec, operator: str, audit_id: int) -> Outcome:
        from migrator import copy, cutover, release

        t0 = time.monotonic()
        try:
            if spec.name == "copy-pause":
                said = copy.pause(self.cfg).render_text()
            elif spec.name == "copy-resume":
                said = copy.resume(self.cfg).render_text()
            elif spec.name == "hold":
                cutover.hold(self.cfg, f"held by {operator} (console)")
                said = "held: a cutover waits at the go/no-go point"
            elif spec.name == "release-hold":
                said = "hold released" if cutover.release_hold(self.cfg) else "there was no hold"
            elif spec.name == "release":
                said = release.run(self.cfg).render_text()
            else:
                said = self._cancel()
        except MigratorError as exc:
            audit.end(self.cfg, audit_id, audit.outcome_of(exc.exit_code), detail=str(exc),
                      seconds=time.monotonic() - t0)
            refused = exc.exit_code == 1 or isinstance(exc, NotReady)
            return Outcome(409 if refused else 500, {"error": str(exc), "hint": exc.hint, "audit_id": audit_id})
        audit.end(self.cfg, audit_id, "done", detail=said, seconds=time.monotonic() - t0)
        return Outcome(200, {"done": spec.audit_name, "said": said, "audit_id": audit_id})

    def _cancel(self) -> str:
        found = waiting_cutover(self.cfg, self.pids())
        if found is None:
            raise MigratorError("no cutover waits at its hold on this host any more")
        attempt, pid = found
        os.kill(pid, signal.SIGTERM)  # the cutover stops before anything is paused or frozen (SIGTERM undoes)
        return f"cutover attempt {attempt} (pid {pid}) stopped before anything was paused or frozen"


def _exited(s: Started, code: int) -> tuple[str, str]:
    """The outcome of a command the console started, from its exit code, when it did not record one itself (the
    verify command does not: its three exit codes are the answer)."""
    if s.spec.name == "verify" and code in (0, 1):
        return "done", ("both sides identical" if code == 0 else
                        f"differences found (by key in its log, {s.log}; `migrator verify` lists them)")
    return audit.outcome_of(code), f"the command exited {code} without recording its outcome; its log: {s.log}"


EARLY_STEPS = ("catch_up", "preflight", "stage_rollback")
"""A cutover's steps before its guardian starts: nothing is paused or frozen yet, so stopping it costs nothing."""


def waiting_cutover(cfg: Config, started: dict[int, int] | None = None) -> tuple[int, int] | None:
    """The cutover attempt that runs on this host and has not reached its guard step (waiting on the hold, say), and
    its process id; None when there is none. `started`: audit id -> process id of the commands this console started
    (their start rows name the console's process)."""
    with db.session(cfg.target_dsn, role="target", autocommit=True, connect_timeout=5) as target:
        running = [a for a in state.attempts(target) if a["finished_at"] is None and a.get("kind") == "cutover"]
        if not running or not all(s["step"] in EARLY_STEPS for s in running[-1]["steps"]):
            return None
        starts = [a for a in audit.actions(state.audit_rows(target))
                  if a.action == "cutover" and a.outcome == "started" and a.host == socket.gethostname() and a.pid]
    for a in reversed(starts):
        pid = (started or {}).get(a.id, a.pid if a.via == "cli" else None)
        if pid is None:
            continue
        try:
            os.kill(pid, 0)
        except OSError:
            continue
        return int(running[-1]["id"]), pid
    return None
