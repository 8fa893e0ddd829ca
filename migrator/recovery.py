"""Resolving a cutover or rollback whose process died: forward or back, never half-way.

One function decides and acts for both who may do it: the guardian (migrator/guardian.py), at once, and a re-run of
`migrator cutover` or `migrator rollback` (`recover`), for what no guardian resolved. A site command still running
(`switch_command`, `rollback_command`, in a session of its own) is waited for, then stopped, before anything is
decided. The decision rests on the real state, the recorded steps only where the real state cannot tell:

- **cutover** (point of no return: the switch). Through a pooler: when `SHOW DATABASES` shows every entry at the
  target, forward (RESUME there; the legacy database stays frozen); when it shows them at the legacy database, back,
  even when the file was rewritten and never reloaded; when the pooler does not answer (retried for
  POOLER_RETRIES seconds), back only if the switch had not started, else undecided (nothing is released, and it is
  tried again). Without a pooler: forward once `switch_command` has finished; killed inside it, the
  `switch_check_command` says where the clients are (0: the target, 1: the legacy database), or, without one (or
  when it cannot tell), the command, which must be idempotent, runs again and forward is taken when it succeeds;
  back otherwise.
- **rollback** (point of no return: the release of the legacy database, after which clients not behind the pooler
  may have written there): when the legacy database is no longer frozen, or its release was recorded done, forward
  (the entries at the legacy database, RELOAD, RESUME; without a pooler `rollback_command` unless the check says the
  clients are on the legacy database already; the target stays frozen); otherwise back.

Back puts the pooler's entries where they were (RELOAD), makes the frozen side writable again, RESUMEs, and removes
the rollback's capture a cutover had staged (a target the last rollback froze is left frozen, or frozen again when
the cutover's arm had lifted it); forward completes the switch and RESUMEs (a rollback's target stays frozen). Every action finds what is
already done and leaves it, so running one twice is harmless; the pooler is resumed whatever else fails. The outcome
goes to the journal first (local disk), then to the control schema (`write_back`) when the target answers. Only the
latest attempt is ever acted on: an older one left unfinished is recorded as superseded, and a journal whose attempt
the control schema shows finished is stale.
"""

from __future__ import annotations

import os
import signal
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

CHECK_TIMEOUT = 60
"""Longest run of `switch_check_command`."""
COMMAND_WAIT = 60.0
"""How long a site command left running by a dead flow is waited for before it is stopped."""
POOLER_RETRIES = 10
"""Seconds (one try each) a pooler that does not answer is asked again before the decision waits."""


class Undecided(MigratorError):
    """The real state cannot tell which side the clients are on (the pooler does not answer after the switch had
    started): nothing is released; the guardian tries again, a re-run refuses."""


def resolve(cfg: Config, j: Journal, *, by: str) -> Journal:
    """Bring an attempt whose process is gone to one side, and record it in the journal (not yet in the control
    schema: `write_back`). Raises Undecided (nothing done) when it cannot tell; otherwise never raises: what could
    not be done is said in `j.detail`."""
    log = get(phase="guardian")
    t0 = time.monotonic()
    _settle_command(j)
    direction, why = _decide(cfg, j)
    said = _forward(cfg, j) if direction == "forward" else _back(cfg, j)
    j.outcome, j.by, j.resolved_at = direction, by, time.time()
    seconds = time.monotonic() - t0
    verb = "completed" if direction == "forward" else "undone"
    j.detail = (f"{j.kind} attempt {j.attempt} stopped at step {j.last_step or 'none'} (its process died) and was "
                f"{verb} by {by} in {seconds:.2f}s: {why}" + "".join(f"; {s}" for s in said if s))
    j.save()
    log.warning(f"{j.kind}.resolved", attempt=j.attempt, direction=direction, by=by, step=j.last_step,
                seconds=round(seconds, 3), detail=j.detail)
    return j


def _settle_command(j: Journal) -> None:
    """A site command the dead flow left running could still be moving clients: wait for it, then stop it."""
    if not j.command:
        return
    deadline = time.monotonic() + COMMAND_WAIT
    while _alive(j.command) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(j.command):
        try:
            os.killpg(j.command, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not reaped by its dead parent) is gone for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return True


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
        if "switch" not in j.steps:
            return "back", "the pooler did not answer, and the switch had not started"
        raise Undecided(f"{j.kind} attempt {j.attempt}: the pooler does not answer and the switch had started, so "
                        "which server its clients are on is unknown; nothing was released",
                        hint="Bring the pooler back (or look at SHOW DATABASES by hand) and run the command again.")
    how = j.steps.get("switch")
    if how == "done":
        return "forward", "switch_command had finished"
    if how is None:
        return "back", "switch_command had not run"
    where = clients_on(cfg)
    if where is not None:
        return ("forward" if where == "target" else "back"), f"switch_check_command said clients are on the {where}"
    ok, why = _run_again(cfg, "switch_command", cfg.cutover.switch_command, "cutover")
    return ("forward" if ok else "back"), why


def clients_on(cfg: Config) -> str | None:
    """Where `switch_check_command` says the clients are: "target", "legacy database", or None (no command, or it
    cannot tell)."""
    check = cfg.cutover.switch_check_command
    if not check:
        return None
    try:
        proc = subprocess.run(check, shell=True, capture_output=True, timeout=CHECK_TIMEOUT, start_new_session=True,
                              env=dict(os.environ, MIGRATOR_TARGET=db.describe_dsn(cfg.target_dsn),
                                       MIGRATOR_SOURCE=db.describe_dsn(cfg.source_dsn)))
    except (subprocess.SubprocessError, OSError):
        return None
    return {0: "target", 1: "legacy database"}.get(proc.returncode)


def _run_again(cfg: Config, setting: str, command: str | None, direction: str) -> tuple[bool, str]:
    try:
        run_command(cfg, command, setting, MIGRATOR_DIRECTION=direction)
    except MigratorError as exc:
        return False, f"{setting}, run again, failed ({scrub(str(exc))[:200]})"
    return True, f"{setting}, run again, exited 0"


def _pooler_at(cfg: Config, entries: dict[str, str]) -> bool | None:
    """Whether `SHOW DATABASES` shows every entry of `entries` where they point (None: the pooler did not answer
    within POOLER_RETRIES tries, or nothing is known of the entries)."""
    if not entries or not cfg.cutover.pgbouncer_admin_dsn:
        return None
    for _ in range(POOLER_RETRIES):
        try:
            with pooler.Admin(cfg.cutover.pgbouncer_admin_dsn, connect_timeout=1) as admin:
                shown = admin.databases()
        except MigratorError:
            time.sleep(1.0)
            continue
        return all(name in shown and pooler.serves(shown[name], entry) for name, entry in entries.items())
    return None


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
        if clients_on(cfg) == "legacy database":
            said.append("switch_check_command said the clients are on the legacy database")
        else:
            ok, why = _run_again(cfg, "rollback_command", cfg.cutover.rollback_command, "rollback")
            said.append(why if ok else f"CLIENTS MAY NOT HAVE MOVED BACK: {why}; move them to the legacy database")
    return said


def _back(cfg: Config, j: Journal) -> list[str]:
    """Entries back (RELOAD), the frozen side writable, RESUME: in that order, so that no client let through meets a
    frozen database; then the capture a cutover had staged on the target is removed."""
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


def _back_on_target(cfg: Config) -> str:
    """What a back outcome does on the target: the rollback's capture a cutover staged or armed is removed, or, on a
    target the last rollback froze, that freeze is kept (put back, when the cutover's arm had lifted it)."""
    from migrator import rollback  # the rollback owns its capture on the target (it imports this module)

    return _attempt(lambda: rollback.disarm(cfg),
                    "closing the rollback window on the target (the next cutover or `migrator cleanup` does)")


def _release(role: str, dsn: str) -> str:
    with db.session(dsn, role=role, autocommit=True, connect_timeout=5) as conn:
        if not freezer.is_frozen(conn):
            return ""
        freezer.release(conn)
    return f"{db.describe_dsn(dsn)} takes writes again"


def _point(cfg: Config, entries: dict[str, str]) -> str:
    """The pooler's file holding `entries`, and RELOAD; nothing rewritten when the file already says so."""
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
    """Record a resolved attempt in the control schema, unless the journal on disk says it is recorded already;
    whether it is recorded (False: the target did not answer). The caller holds the local lock."""
    if j.outcome in (None, "ended"):
        return True
    if Journal.load(j.path).written_back:
        j.written_back = True
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
    """The attempt's outcome; the migration's state only when no later attempt has changed it since."""
    for step, how in j.steps.items():
        if how != "done":
            state.step_finished(target, j.attempt, step, "failed", j.detail[:500])
    attempts = state.attempts(target)
    latest = max((a["id"] for a in attempts), default=j.attempt) == j.attempt
    if j.outcome == "forward":
        state.finish_attempt(target, j.attempt, "done", error=j.detail)
    else:
        state.finish_attempt(target, j.attempt, "failed", failed_step=j.last_step or None, error=j.detail)
    if state.audit_present(target):  # the audit trail (migrator/audit.py) says what was done on the operator's behalf
        by_guardian = j.by == "the guardian"
        state.audit_once(target, actor="guardian" if by_guardian else state.operator(),
                         via="guardian" if by_guardian else "cli", action=f"{j.kind} resolved {j.outcome}",
                         arguments={"attempt": j.attempt, "step": j.last_step or None}, outcome="done",
                         detail=j.detail[:1000], pid=j.guardian or None)
    if not latest:
        return
    if j.outcome == "forward" and j.kind == "cutover":
        state.mark(target, "frozen", True)
        state.mark(target, "cutover_at")
    elif j.outcome == "forward":
        state.mark(target, "frozen", False)
        state.clear(target, "cutover_at")
    elif j.kind == "cutover":
        state.mark(target, "frozen", False)
    if j.outcome == "forward" and j.away:
        state.set_pointing(target, list(j.away), "target" if j.kind == "cutover" else "legacy")


# --- a re-run -------------------------------------------------------------------------------------------------------

def recover(cfg: Config, target: psycopg.Connection[Any]) -> list[Journal]:
    """At the start of a re-run (holding the action lock and the local lock): resolve the latest attempt if its
    process died and nothing resolved it, record what a guardian could not, and mark older unfinished attempts
    superseded. Returns the attempts resolved after their process died and not yet reported by a re-run."""
    m = state.require_prepared(target)
    migration = str(m.migration_id)
    attempts = {a["id"]: a for a in state.attempts(target)}
    latest = max(attempts, default=0)
    local = {j.attempt: j for j in journals(cfg, migration)}
    for a in attempts.values():
        if a["finished_at"] is None and a["id"] not in local:
            # Started on another host or without a journal: what the control schema recorded.
            local[a["id"]] = _journal_from_record(cfg, target, a, migration)
    found = []
    for j in sorted(local.values(), key=lambda j: j.attempt):
        record = attempts.get(j.attempt)
        unfinished = record is not None and record["finished_at"] is None
        if j.outcome is None and not (unfinished and j.attempt == latest):
            _set_aside(target, j, unfinished, latest)
            continue
        if j.outcome is None:
            _merge_recorded_steps(j, record)
            try:
                resolve(cfg, j, by="this re-run")
            except Undecided as exc:
                raise Blocked(str(exc), hint=exc.hint) from exc
        if j.outcome == "ended" or j.reported:
            continue
        if not write_back(cfg, j):
            raise Blocked(f"{j.kind} attempt {j.attempt} was resolved ({j.detail}) but recording it in the control "
                          "schema failed; nothing new was started", hint=f"Run the command again; the journal is {j.path}.")
        if j.kind == "cutover" and j.outcome == "back" and j.attempt == latest:
            _back_on_target(cfg)  # a guardian that could not reach the target left it
        j.reported = True
        j.save()
        found.append(j)
    return found


def _set_aside(target: psycopg.Connection[Any], j: Journal, unfinished: bool, latest: int) -> None:
    """A journal left open of an attempt that is not the latest, or that the control schema shows finished: never
    acted on (a later attempt owns the state now); an unfinished one is recorded as superseded."""
    if unfinished:
        state.finish_attempt(target, j.attempt, "failed", failed_step=j.last_step or None,
                             error=f"its process died; superseded by attempt {latest}")
    j.outcome, j.by = "ended", "set aside by a re-run"
    j.save()


def _merge_recorded_steps(j: Journal, record: dict[str, Any] | None) -> None:
    """The furthest of the journal's steps and the control schema's (a host crash may have lost the journal's last
    notes, which are not fsynced)."""
    if record is None:
        return
    merged: dict[str, str] = {}
    for s in record["steps"]:  # in the order they started
        done = s["status"] == "done" or j.steps.get(s["step"]) == "done"
        merged[s["step"]] = "done" if done else "started"
    merged.update({step: how for step, how in j.steps.items() if step not in merged})
    j.steps = merged


def _journal_from_record(cfg: Config, target: psycopg.Connection[Any], attempt: dict[str, Any],
                         migration: str) -> Journal:
    kind = attempt.get("kind") or "cutover"
    cfg.local_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    j = Journal(kind=kind, attempt=attempt["id"], migration=migration, target=db.describe_dsn(cfg.target_dsn),
                pid=0, path=str(journal_path(cfg.local_dir, kind, attempt["id"], migration)))
    _merge_recorded_steps(j, attempt)
    entries = state.pooler_entries(target)
    names = [n for n in cfg.cutover.pooler_databases if n in entries]
    legacy = {n: entries[n].legacy_entry for n in names}
    new = {n: entries[n].target_entry for n in names}
    j.home, j.away = (legacy, new) if kind == "cutover" else (new, legacy)
    j.save()
    return j
