"""`migrator audit`: every operator action, from the console and from the command line, and what the guardian did on
their behalf: when, who, what, with which arguments, the outcome and how long it took.

The trail is append-only in the control schema (`state.audit_*`, revision 0010). An action is recorded before it
starts (`recorded`): a row when it starts, and one when it ends with its outcome (done, refused, failed, stopped,
interrupted) and its duration. Who: the operator a console token belongs to; on the command line, the operating-system
user and host (`state.operator`). A command the console starts (a cutover, a rollback, a verify) runs as the same
`migrator` command the CLI runs, given the id of the console's row in MIGRATOR_AUDIT_ID: it records its outcome
against that row instead of starting a second one.

From the console an action whose row cannot be written does not start (`AuditUnavailable`). On the command line the
same holds, except when the target cannot be reached at all or holds no control schema: then the command runs
unaudited (logged as `audit.not_recorded`), since the trail lives there and each of these commands refuses by itself
without a prepared target, touching nothing, save `cleanup` of a migration whose target is gone, which needs none.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg

from migrator import db, state
from migrator.config import Config
from migrator.errors import AuditUnavailable, ConnectionFailed, ExitCode, MigratorError
from migrator.log import get
from migrator.redaction import scrub

ENV_AUDIT_ID = "MIGRATOR_AUDIT_ID"
"""Set by the console for the command it starts: the id of the audit row that records the action's start."""
_OUTCOME = {ExitCode.OK: "done", ExitCode.FINDING: "refused", ExitCode.ERROR: "failed",
            ExitCode.CUTOVER_STOPPED: "stopped", ExitCode.USAGE: "refused", ExitCode.INTERRUPTED: "interrupted",
            ExitCode.TERMINATED: "interrupted"}


def outcome_of(code: int) -> str:
    """The audit outcome of a command's exit code."""
    try:
        return _OUTCOME[ExitCode(code)]
    except ValueError:
        return "failed"


@dataclass
class Action:
    """One action as the trail tells it: its start row and, once it ended, its outcome row, read together."""

    id: int
    at: dt.datetime
    actor: str
    via: str
    action: str
    arguments: dict[str, Any]
    outcome: str
    """"started" while it runs (or when its process died before recording its end)."""
    detail: str | None = None
    seconds: float | None = None
    ended_at: dt.datetime | None = None
    host: str | None = None
    pid: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "at": self.at.isoformat(), "actor": self.actor, "via": self.via,
                "action": self.action, "arguments": self.arguments, "outcome": self.outcome, "detail": self.detail,
                "seconds": None if self.seconds is None else round(self.seconds, 3),
                "ended_at": self.ended_at.isoformat() if self.ended_at else None, "host": self.host,
                "pid": self.pid}

    def render_text(self) -> str:
        args = " ".join(f"{k}={json.dumps(v)}" for k, v in self.arguments.items() if v not in (None, [], False))
        took = "" if self.seconds is None else f" in {self.seconds:.1f}s"
        return (f"{self.at:%Y-%m-%d %H:%M:%S} {self.via:<8} {self.actor:<24} {self.action}{' ' + args if args else ''}"
                f": {self.outcome}{took}{f' ({self.detail})' if self.detail else ''}")


def actions(rows: list[state.AuditRow]) -> list[Action]:
    """The trail's rows as actions, in the order they started."""
    found: dict[int, Action] = {}
    for r in rows:
        if r.of_id is None:
            found[r.id] = Action(r.id, r.at, r.actor, r.via, r.action, r.arguments, r.outcome, r.detail, r.seconds,
                                 None if r.outcome == "started" else r.at, r.host, r.pid)
        elif r.of_id in found:
            a = found[r.of_id]
            a.outcome, a.detail, a.seconds, a.ended_at = r.outcome, r.detail, r.seconds, r.at
            a.pid = r.pid or a.pid
    return list(found.values())


@dataclass
class Trail:
    actions: list[Action] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"actions": [a.to_dict() for a in self.actions]}

    def render_text(self) -> str:
        if not self.actions:
            return "no operator action recorded"
        return "\n".join(a.render_text() for a in self.actions)


def read(cfg: Config) -> Trail:
    with db.session(cfg.target_dsn, role="target", autocommit=True) as target:
        state.require_prepared(target, after_cleanup=True)
        return Trail(actions(state.audit_rows(target)))


@dataclass
class Recording:
    """An action being recorded: `id` of its start row (None when the command line runs it unaudited)."""

    id: int | None
    detail: str | None = None
    """Said with the outcome (e.g. what a cutover reported); no row values."""


def _ensure_trail(target: psycopg.Connection[Any]) -> bool:
    """Whether the target has a control schema with the audit trail, upgrading a schema from before it."""
    if not state.exists(target):
        return False
    if not state.audit_present(target):
        state.upgrade(target)
    return True


def start(cfg: Config, action: str, arguments: dict[str, Any], *, actor: str, via: str,
          pid: int | None = None) -> int:
    """Record that an action starts; its id. AuditUnavailable when the row cannot be written (do not act then)."""
    try:
        with db.session(cfg.target_dsn, role="target", autocommit=True, connect_timeout=5) as target:
            if not _ensure_trail(target):
                raise AuditUnavailable(f"{action} not started: the target has no control schema to audit it in "
                                       "(not prepared)")
            return state.audit_start(target, actor=actor, via=via, action=action, arguments=arguments,
                                     host=socket.gethostname(), pid=pid or os.getpid())
    except (psycopg.Error, ConnectionFailed) as exc:
        raise AuditUnavailable(f"{action} not started: its audit row could not be written "
                               f"({scrub(str(exc)).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})"
                               ) from exc


def end(cfg: Config, of_id: int, outcome: str, *, detail: str | None = None, seconds: float | None = None,
        pid: int | None = None) -> bool:
    """Record how an action ended; whether it was recorded (a target gone by then is logged, not raised)."""
    try:
        with db.session(cfg.target_dsn, role="target", autocommit=True, connect_timeout=5) as target:
            state.audit_end(target, of_id, outcome=outcome, detail=detail and scrub(detail)[:1000],
                            seconds=seconds, pid=pid)
        return True
    except (psycopg.Error, MigratorError, LookupError) as exc:
        get(phase="audit").warning("audit.end_not_recorded", action_id=of_id, error=type(exc).__name__)
        return False


def refused(cfg: Config, action: str, arguments: dict[str, Any], *, actor: str, via: str, detail: str,
            host: str | None = None) -> int | None:
    """Record a refusal (a wrong token, a wrong confirmation, a conflicting action); its id, or None when the trail
    cannot be written (the refusal stands all the same)."""
    try:
        with db.session(cfg.target_dsn, role="target", autocommit=True, connect_timeout=5) as target:
            if not _ensure_trail(target):
                return None
            return state.audit_once(target, actor=actor, via=via, action=action, arguments=arguments,
                                    outcome="refused", detail=detail, host=host)
    except (psycopg.Error, MigratorError) as exc:
        get(phase="audit").warning("audit.refusal_not_recorded", action=action, error=type(exc).__name__)
        return None


@contextmanager
def recorded(cfg: Config, action: str, arguments: dict[str, Any], *, actor: str | None = None,
             via: str = "cli") -> Iterator[Recording]:
    """Record the action around the `with` block: its start before (or the console's row, MIGRATOR_AUDIT_ID), and
    its outcome after, from how the block ended (an exception's exit code, a SystemExit's code)."""
    given = os.environ.get(ENV_AUDIT_ID, "").strip()
    if given.isdigit():
        rec = Recording(int(given))
    else:
        try:
            rec = Recording(start(cfg, action, arguments, actor=actor or state.operator(), via=via))
        except AuditUnavailable as exc:
            if via != "cli" or not isinstance(exc.__cause__, (ConnectionFailed, type(None))):
                raise
            # The command line, and no prepared target to write to: the command refuses by itself (or, for the
            # cleanup of a migration whose target is gone, needs none).
            get(phase="audit").warning("audit.not_recorded", action=action, why=str(exc))
            rec = Recording(None)
    t0 = time.monotonic()
    outcome, detail = "done", None
    try:
        yield rec
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else ExitCode.ERROR)
        outcome = outcome_of(code)
        raise
    except KeyboardInterrupt:
        outcome = "interrupted"
        raise
    except MigratorError as exc:
        outcome, detail = outcome_of(exc.exit_code), str(exc)
        raise
    except BaseException as exc:
        outcome, detail = "failed", f"{type(exc).__name__}: {exc}"
        raise
    finally:
        if rec.id is not None:
            end(cfg, rec.id, outcome, detail=detail or rec.detail, seconds=time.monotonic() - t0)
