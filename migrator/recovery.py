"""Resolving a cutover or rollback whose process died: forward or back, never half-way.

One function decides and acts for both who may do it: the guardian (migrator/guardian.py), at once, and a re-run of
`migrator cutover` or `migrator rollback` (`recover`), for what no guardian resolved. The decision rests on the real
state, the journal's steps only where the real state cannot tell:

- **cutover** (point of no return: the switch). Through a pooler: when `SHOW DATABASES` shows every entry at the
  target, forward (RESUME there; the legacy database stays frozen); otherwise back, even when the file was rewritten
  and never reloaded. Without a pooler: forward once `switch_command` has finished; killed inside it, the
  `switch_check_command` says where the clients are, or, without one, the (idempotent) command runs again and forward
  is taken when it succeeds; otherwise back.
- **rollback** (point of no return: the release of the legacy database, after which clients not behind the pooler
  may have written there): when the legacy database is no longer frozen, or its release was recorded done, forward
  (the entries at the legacy database, RELOAD, RESUME; the target stays frozen); otherwise back.

Back puts the pooler's entries where they were (RELOAD), makes the frozen side writable again, RESUMEs, and removes
the rollback's capture a cutover had staged; forward completes the switch and RESUMEs. Every action finds what is
already done and leaves it, so running one twice is harmless; the pooler is resumed whatever else fails. The outcome
goes to the journal first (local disk), then to the control schema (`write_back`) when the target answers.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from typing import Any

import psycopg

from migrator import db, pooler, state
from migrator.config import Config
from migrator.deltalog import freeze as freezer
from migrator.errors import Blocked, MigratorError
from migrator.guardian import Journal, journal_path, journals
from migrator.log import get
from migrator.redaction import scrub
from migrator.switchover import run_command

POINT_OF_NO_RETURN = {"cutover": "switch", "rollback": "release"}
CHECK_TIMEOUT = 60


def resolve(cfg: Config, j: Journal, *, by: str) -> Journal:
    """Bring an attempt whose process is gone to one side, and record it in the journal (not yet in the control
    schema: `write_back`). Never raises: what could not be done is said in `j.detail`."""
    log = get(phase="guardian")
    t0 = time.monotonic()
    direction, why = _decide(cfg, j)
    said = _forward(cfg, j) if direction == "forward" else _back(cfg, j)
    j.outcome, j.by, j.resolved_at = direction, by, time.time()
    seconds = time.monotonic() - t0
    verb = "completed" if direction == "forward" else "undone"
    j.detail = (f"{j.kind} attempt {j.attempt} stopped at step {j.last_step or 'none'} (its process died) and was "
                f"{verb} by {by} in {seconds:.2f}s: {why}; " + "; ".join(s for s in said if s))
    j.save()
    log.warning(f"{j.kind}.resolved", attempt=j.attempt, direction=direction, by=by, step=j.last_step,
                seconds=round(seconds, 3), detail=j.detail)
    return j


# --- the decision ---------------------------------------------------------------------------------------------------

def _decide(cfg: Config, j: Journal) -> tuple[str, str]:
    if j.kind == "cutover":
        return _decide_cutover(cfg, j)
    released = _frozen(cfg.source_dsn, "source")
    if released is False and "release" in j.steps:
        return "forward", "the legacy database had been released"
    if j.steps.get("release") == "done":
        return "forward", "the legacy database's release was recorded"
    return "back", "the legacy database had not been released"


def _decide_cutover(cfg: Config, j: Journal) -> tuple[str, str]:
    if cfg.cutover.uses_pooler:
        at = _pooler_at(cfg, j.away)
        if at is True:
            return "forward", "the pooler served the target"
        if at is False:
            return "back", "the pooler still served the legacy database"
        if j.steps.get("switch") == "done":
            return "forward", "the pooler did not answer; the switch was recorded done"
        return "back", "the pooler did not answer; the switch was not recorded done"
    how = j.steps.get("switch")
    if how == "done":
        return "forward", "switch_command had finished"
    if how is None:
        return "back", "switch_command had not run"
    return _check_switch(cfg, "switch_command", cfg.cutover.switch_command, moved_code=0)


def _check_switch(cfg: Config, setting: str, command: str | None, *, moved_code: int) -> tuple[str, str]:
    """Killed inside the site's switch command: ask `switch_check_command`, else run the command again."""
    check = cfg.cutover.switch_check_command
    if check:
        code = _run(cfg, check)
        if code in (0, 1):
            where = "the target" if code == 0 else "the legacy database"
            return ("forward" if code == moved_code else "back"), f"switch_check_command said clients are on {where}"
    try:
        run_command(cfg, command, setting, MIGRATOR_DIRECTION="rollback" if setting == "rollback_command" else "cutover")
    except (MigratorError, subprocess.SubprocessError, OSError) as exc:
        return "back", f"{setting}, run again, failed ({scrub(str(exc))[:200]})"
    return "forward", f"{setting}, run again, exited 0"


def _run(cfg: Config, command: str) -> int | None:
    try:
        proc = subprocess.run(command, shell=True, capture_output=True, timeout=CHECK_TIMEOUT,
                              env=dict(os.environ, MIGRATOR_TARGET=db.describe_dsn(cfg.target_dsn),
                                       MIGRATOR_SOURCE=db.describe_dsn(cfg.source_dsn)))
    except (subprocess.SubprocessError, OSError):
        return None
    return proc.returncode


def _pooler_at(cfg: Config, entries: dict[str, str]) -> bool | None:
    """Whether `SHOW DATABASES` shows every entry of `entries` where they point (None: the pooler did not answer, or
    nothing is known of the entries)."""
    if not entries or not cfg.cutover.pgbouncer_admin_dsn:
        return None
    try:
        with pooler.Admin(cfg.cutover.pgbouncer_admin_dsn, connect_timeout=3) as admin:
            shown = admin.databases()
    except MigratorError:
        return None
    return all(name in shown and pooler.serves(shown[name], entry) for name, entry in entries.items())


def _frozen(dsn: str, role: str) -> bool | None:
    try:
        with db.session(dsn, role=role, autocommit=True, connect_timeout=5) as conn:
            return freezer.is_frozen(conn)
    except (MigratorError, psycopg.Error):
        return None


# --- the actions ----------------------------------------------------------------------------------------------------

def _forward(cfg: Config, j: Journal) -> list[str]:
    said: list[str] = []
    if cfg.cutover.uses_pooler:
        said.append(_point(cfg, j.away))
        said.append(_resume(cfg))
    elif j.kind == "rollback" and j.steps.get("switch") != "done":
        direction, why = _check_switch(cfg, "rollback_command", cfg.cutover.rollback_command, moved_code=1)
        said.append(why if direction == "forward" else f"CLIENTS MAY NOT HAVE MOVED BACK: {why}")
    return said


def _back(cfg: Config, j: Journal) -> list[str]:
    """Entries back (RELOAD), the frozen side writable, RESUME: in that order, so that no client let through meets a
    frozen database; then the capture a cutover staged on the target is removed."""
    said: list[str] = []
    if cfg.cutover.uses_pooler and j.home:
        said.append(_point(cfg, j.home))
    side = ("source", cfg.source_dsn) if j.kind == "cutover" else ("target", cfg.target_dsn)
    said.append(_attempt(lambda: _release(*side), "releasing the freeze"))
    if cfg.cutover.uses_pooler:
        said.append(_resume(cfg))
    if j.kind == "cutover" and j.steps:
        said.append(_back_on_target(cfg))
    return said


def _release(role: str, dsn: str) -> str:
    with db.session(dsn, role=role, autocommit=True, connect_timeout=5) as conn:
        if not freezer.is_frozen(conn):
            return ""
        freezer.release(conn)
    return f"{db.describe_dsn(dsn)} takes writes again"


def _point(cfg: Config, entries: dict[str, str]) -> str:
    """The pooler's file holding `entries`, and RELOAD; nothing when the file already says so."""
    ini = cfg.cutover.pgbouncer_ini
    admin_dsn = cfg.cutover.pgbouncer_admin_dsn
    if not entries or not ini or not admin_dsn:
        return ""

    def point() -> str:
        if pooler.read_entries(ini, list(entries)) != entries:
            pooler.rewrite_entries(ini, entries)
        with pooler.Admin(admin_dsn, connect_timeout=3) as admin:
            admin.reload()
        return ""
    return _attempt(point, f"pointing the pooler's entries in {ini}")


def _resume(cfg: Config) -> str:
    """RESUME every pooled database (one that is not paused is left as it is)."""
    admin_dsn = cfg.cutover.pgbouncer_admin_dsn
    assert admin_dsn is not None
    failed = []
    for name in cfg.cutover.pooler_databases:
        for _ in range(5):
            try:
                with pooler.Admin(admin_dsn, connect_timeout=3) as admin:
                    admin.resume(name)
                break
            except MigratorError:
                time.sleep(0.5)
        else:
            failed.append(name)
    if failed:
        return f"RESUME FAILED for {', '.join(failed)}: run `RESUME <db>` on the PgBouncer admin console NOW"
    return "the pooler was resumed"


def _attempt(action: Callable[[], str], what: str) -> str:
    try:
        return action()
    except (MigratorError, psycopg.Error, OSError) as exc:
        return f"{what.upper()} FAILED ({scrub(str(exc).strip())[:300]})"


# --- the record -----------------------------------------------------------------------------------------------------

def write_back(cfg: Config, j: Journal) -> bool:
    """Record a resolved attempt in the control schema; whether it is recorded (False: the target did not answer)."""
    if j.written_back or j.outcome in (None, "ended"):
        return True
    try:
        with db.session(cfg.target_dsn, role="target", autocommit=True, connect_timeout=5) as target:
            with target.transaction():
                _record(target, j)
    except (MigratorError, psycopg.Error):
        return False
    j.written_back = True
    j.save()
    return True


def _record(target: psycopg.Connection[Any], j: Journal) -> None:
    for step, how in j.steps.items():
        if how != "done":
            state.step_finished(target, j.attempt, step, "failed", j.detail[:500])
    if j.outcome == "forward":
        state.finish_attempt(target, j.attempt, "done", error=j.detail)
        if j.kind == "cutover":
            state.mark(target, "frozen", True)
            state.mark(target, "cutover_at")
        else:
            state.mark(target, "frozen", False)
            state.clear(target, "cutover_at")
        pointing = "target" if j.kind == "cutover" else "legacy"
        if j.away:
            state.set_pointing(target, list(j.away), pointing)
    else:
        state.finish_attempt(target, j.attempt, "failed", failed_step=j.last_step or None, error=j.detail)
        if j.kind == "cutover":
            state.mark(target, "frozen", False)
    if state.audit_present(target):  # the audit trail (migrator/audit.py) says what was done on the operator's behalf
        by_guardian = j.by == "the guardian"
        state.audit_once(target, actor="guardian" if by_guardian else state.operator(),
                         via="guardian" if by_guardian else "cli", action=f"{j.kind} resolved {j.outcome}",
                         arguments={"attempt": j.attempt, "step": j.last_step or None}, outcome="done",
                         detail=j.detail[:1000], pid=j.guardian or None)


# --- a re-run -------------------------------------------------------------------------------------------------------

def recover(cfg: Config, target: psycopg.Connection[Any], kind: str) -> list[Journal]:
    """Resolve, at the start of a re-run (holding the action lock), every attempt whose process died and that no
    guardian resolved, and record what a guardian could not; returns the attempts resolved after their process died
    and not yet reported by a re-run, oldest first."""
    where = db.describe_dsn(cfg.target_dsn)
    local = {j.attempt: j for j in journals(cfg, where)}
    for a in state.attempts(target):
        if a["finished_at"] is None and a["id"] not in local:
            # Started on another host or before journals existed: what the control schema recorded.
            local[a["id"]] = _journal_from_record(cfg, target, a, where)
    unfinished = {a["id"] for a in state.attempts(target) if a["finished_at"] is None}
    found = []
    for j in sorted(local.values(), key=lambda j: j.attempt):
        if j.outcome is None:
            resolve(cfg, j, by="this re-run")
        if j.outcome == "ended":
            if j.attempt in unfinished:  # its process ended it while the target did not answer
                state.finish_attempt(target, j.attempt, "failed", failed_step=j.last_step or None,
                                     error="its process ended without recording the outcome")
            continue
        if not write_back(cfg, j):
            raise Blocked(f"{j.kind} attempt {j.attempt} was resolved ({j.detail}) but recording it in the control "
                          "schema failed; nothing new was started",
                          hint=f"Run the command again; the journal is {j.path}.")
        if not j.reported:
            if j.kind == "cutover" and j.outcome == "back" and j.steps:
                _back_on_target(cfg)
            j.reported = True
            j.save()
            found.append(j)
    return found


def _back_on_target(cfg: Config) -> str:
    """What a back outcome does on the target, done again now that the target answers (a guardian that could not
    reach it left the rollback's capture there)."""
    from migrator import rollback  # the rollback owns its capture on the target (it imports this module)

    return _attempt(lambda: f"{rollback.disarm(cfg)} rollback triggers removed from the target",
                    "removing the rollback's capture from the target (the next cutover or `migrator cleanup` does)")


def _journal_from_record(cfg: Config, target: psycopg.Connection[Any], attempt: dict[str, Any],
                         where: str) -> Journal:
    kind = attempt.get("kind") or "cutover"
    j = Journal(kind=kind, attempt=attempt["id"], target=where, pid=0,
                path=str(journal_path(cfg.local_dir, kind, attempt["id"], where)))
    cfg.local_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    j.steps = {s["step"]: ("done" if s["status"] == "done" else "started") for s in attempt["steps"]}
    entries = state.pooler_entries(target)
    names = [n for n in cfg.cutover.pooler_databases if n in entries]
    legacy = {n: entries[n].legacy_entry for n in names}
    new = {n: entries[n].target_entry for n in names}
    j.home, j.away = (legacy, new) if kind == "cutover" else (new, legacy)
    j.save()
    return j
