"""Go/no-go: the checklist a cutover must pass before anything is paused or frozen. Reads only; decides.

Items: `lag` (the oldest change not yet applied is younger than [cutover] max_lag_seconds), `verify` (the last
recorded verify of every table found the two sides identical, started less than [cutover] max_verify_age ago and
after anything that could make them differ since: a rollback, a completed cutover, a copy of a table (a re-copy,
or one after DDL sent it back to pending); a warning when none was recorded), `sessions` (no transaction on the
legacy database, running or idle in transaction, older than [cutover] max_session_seconds: it would hold PAUSE or
the freeze), `target` (reachable, control schema present), `post-data` (copy restored the schema's post-data and none of it
waits for sync, as the items that relate rows do after a copy whose chunks were read under different snapshots; not
overridable: the application would write without those constraints), `sequences` (readable on both sides), `blockers` (no
blocker of inspect's stands on the legacy database, unless it was overridden at prepare: then it is shown as
overridden, by whom and when), with a pooler
`pooler` (admin console reachable, every pooler database served and not paused, its entry found in a writable
[databases] file; session pooling fails it, since PAUSE would wait for every client to disconnect), `prepared` (with a
pooler, a warning only: transaction pooling on a PgBouncer that carries no prepared statement across server
connections, before 1.21 or with `max_prepared_statements = 0`, fails the clients that prepare statements by name
after the switch; cleared when the site declares that none does (`[cutover] prepared_statements = "unused"`), or by
a health gate that passed with client traffic through a switch of this pooler, at this version, in an earlier attempt
of this migration (a rehearsal: cutover, then rollback)), and `switch` (something moves the clients: the pooler or
switch_command). The operator may
accept a failing item by name (`--override ITEM`; the switch item's name is `no-switch`, for what it accepts); it
is then shown as such, and the attempt records who accepted it and when (`recorded`). A rollback has one item,
`switch` (the pooler or rollback_command): `rollback_checklist`.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import psycopg
from psycopg import sql

from migrator import catalog, db, inspect, pooler, postdata, state, status, sync
from migrator.config import Config
from migrator.redaction import scrub

ITEMS = ("lag", "verify", "sessions", "target", "post-data", "sequences", "blockers", "pooler", "prepared", "switch")
NO_SWITCH = "no-switch"
"""The override of the `switch` item: a cutover or rollback that freezes and releases but moves no client."""
_OVERRIDE_NAME = {"switch": NO_SWITCH}
_NOT_OVERRIDABLE = ("post-data",)
_WARN_ONLY = ("prepared",)
"""Items that warn and never refuse: nothing to override."""
_POOLER_ITEMS = ("pooler", "prepared")
OVERRIDES = tuple(_OVERRIDE_NAME.get(i, i) for i in ITEMS if i not in _NOT_OVERRIDABLE + _WARN_ONLY)
"""The names `--override` accepts."""
State = Literal["pass", "warn", "fail", "overridden"]
_MARK = {"pass": "[ ok ]", "warn": "[warn]", "fail": "[FAIL]", "overridden": "[over]"}


@dataclass(frozen=True)
class Check:
    item: str
    state: State
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"item": self.item, "state": self.state, "detail": self.detail}


@dataclass(frozen=True)
class Checklist:
    checks: tuple[Check, ...]

    @property
    def go(self) -> bool:
        return all(c.state != "fail" for c in self.checks)

    @property
    def failing(self) -> list[str]:
        return [c.item for c in self.checks if c.state == "fail"]

    def to_list(self) -> list[dict[str, Any]]:
        return [c.to_dict() for c in self.checks]

    def render_text(self) -> str:
        return "\n".join(f"  {_MARK[c.state]} {c.item:<10} {c.detail}" for c in self.checks)


def _lag(cfg: Config) -> tuple[State, str]:
    lag = sync.lag(cfg)
    age = lag.oldest_pending_seconds or 0.0
    text = f"{lag.pending_events} events pending, oldest {age:.1f}s (bound {cfg.cutover.max_lag_seconds:g}s)"
    return ("pass" if age <= cfg.cutover.max_lag_seconds else "fail"), text


def _verify(cfg: Config) -> tuple[State, str]:
    with db.session(cfg.target_dsn, role="target", autocommit=True) as target:
        last = state.last_verify(target)
        if last is None:
            # A warning, not a failure: the cutover still compares counts (or every row) inside the freeze, and
            # "none recorded" misleads nobody, unlike an old "identical".
            return "warn", "no verify recorded; run `migrator verify` before the night for an exact answer"
        found, at = last
        if found.get("not_verified"):
            return "fail", (f"last verify ({at:%Y-%m-%d %H:%M} UTC) could not verify {found['not_verified']} "
                            "table(s); fix what it reported and verify again")
        if not found.get("identical"):
            return "fail", f"last verify ({at:%Y-%m-%d %H:%M} UTC) found {found.get('differences', '?')} differences"
        row = target.execute("SELECT now()").fetchone()
        assert row is not None
        stale = _since(target, at)
    said = f"last verify identical, but it started {at:%Y-%m-%d %H:%M} UTC"
    again = "; run `migrator verify` again"
    if stale:
        return "fail", f"{said}, before {stale}{again}"
    age = (row[0] - at).total_seconds()
    if age > cfg.cutover.max_verify_age:
        return "fail", (f"{said}, {age / 3600:.1f}h ago (bound [cutover] max_verify_age "
                        f"{cfg.cutover.max_verify_age / 3600:.1f}h){again}")
    return "pass", f"last verify identical (started {at:%Y-%m-%d %H:%M} UTC, {age / 3600:.1f}h ago)"


def _since(target: psycopg.Connection[Any], verified_at: dt.datetime) -> str | None:
    """The newest recorded event after `verified_at` that could make the two sides differ other than through sync
    (named, with its time), or a table not copied now; None when the verify still speaks for the data."""
    tables = state.tables(target)
    # A prepare that recorded a changed definition (DDL) sends the table back to pending, as `copy --tables` does:
    # until its copy has finished the table is not what was compared, and after, its copy is newer than the verify.
    uncopied = [t.display for t in tables if t.status != "copied"]
    if uncopied:
        return f"the copy of {', '.join(uncopied[:5])} (sent back to pending; it has not finished: run `migrator copy`)"
    events: list[tuple[dt.datetime, str]] = []
    for a in state.attempts(target):
        if a["kind"] == "rollback":
            events.append((a["finished_at"] or a["started_at"], f"the rollback (attempt {a['id']})"))
        elif a["status"] == "done":  # clients may have written on the target since
            events.append((a["finished_at"] or a["started_at"], f"the completed cutover (attempt {a['id']})"))
    events += [(t.copy_finished_at, f"the copy of {t.display}") for t in tables if t.copy_finished_at]
    after = [e for e in events if e[0] > verified_at]
    if not after:
        return None
    at, what = max(after)
    return f"{what} at {at:%Y-%m-%d %H:%M} UTC"


def _sessions(cfg: Config) -> tuple[State, str]:
    with db.session(cfg.source_dsn, role="source", autocommit=True) as source:
        rows = source.execute(
            "SELECT pid, state, coalesce(application_name, ''), extract(epoch FROM now() - xact_start)::float8 "
            "FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND backend_type = 'client backend' AND xact_start IS NOT NULL "
            "AND coalesce(application_name, '') NOT LIKE 'migrator%%' "
            "AND now() - xact_start > make_interval(secs => %s) ORDER BY xact_start",
            (cfg.cutover.max_session_seconds,),
        ).fetchall()
    if not rows:
        return "pass", f"no transaction older than {cfg.cutover.max_session_seconds:g}s"
    listed = ", ".join(f"pid {pid} {st} {age:.0f}s{' ' + app if app else ''}" for pid, st, app, age in rows[:5])
    return "fail", f"{len(rows)} transaction(s) older than {cfg.cutover.max_session_seconds:g}s: {listed}"


def _target(cfg: Config) -> tuple[State, str]:
    with db.session(cfg.target_dsn, role="target", autocommit=True, connect_timeout=5) as target:
        if not state.exists(target):
            return "fail", "reachable, but without the control schema (not prepared?)"
        version = target.execute("SHOW server_version").fetchone()
    return "pass", f"reachable ({db.describe_dsn(cfg.target_dsn)}, PostgreSQL {version[0] if version else '?'})"


def _post_data(cfg: Config) -> tuple[State, str]:
    with db.session(cfg.target_dsn, role="target", autocommit=True) as target:
        m = state.require_prepared(target)
        owed = state.post_data_deferred(target)
    if m.post_data_at is None:
        return "fail", "post-data (indexes, constraints, foreign keys) not restored: run `migrator copy` to its end"
    if owed is not None:
        return "fail", (f"{postdata.describe(owed)} wait for sync, since the copy read its chunks under different "
                        "snapshots: run `migrator sync`, which restores them after its next batch")
    return "pass", "restored (indexes, constraints, foreign keys)"


def _sequences(cfg: Config) -> tuple[State, str]:
    with db.session(cfg.source_dsn, role="source", autocommit=True) as source:
        seqs = catalog.list_sequences(source, cfg.tables)
    missing = []
    with db.session(cfg.target_dsn, role="target", autocommit=True) as target:
        for seq in seqs:
            try:
                target.execute(sql.SQL("SELECT last_value FROM {}").format(seq.ident)).fetchone()
            except psycopg.Error:
                missing.append(seq.display)
    if missing:
        return "fail", f"not readable on the target: {', '.join(missing[:10])}"
    return "pass", f"{len(seqs)} sequences readable on both sides"


def _pooler(cfg: Config) -> tuple[State, str]:
    c = cfg.cutover
    assert c.pgbouncer_admin_dsn and c.pgbouncer_ini
    with pooler.Admin(c.pgbouncer_admin_dsn) as admin:
        served = admin.databases()
        default_mode = admin.settings().get("pool_mode", "session")
    problems = [f"{n} not served" for n in c.pooler_databases if n not in served]
    problems += [f"{n} already paused" for n in c.pooler_databases if n in served and served[n].paused]
    problems += [f"{n} in session pooling: PAUSE waits for every client to disconnect, so its clients cannot be "
                 "switched without restarting them (use transaction pooling, or switch_command restarting the "
                 "application: runbook 02)"
                 for n in c.pooler_databases if n in served and (served[n].pool_mode or default_mode) == "session"]
    entries = pooler.read_entries(c.pgbouncer_ini, c.pooler_databases)
    where_to = pooler.target_location(cfg.target_dsn, c.pooler_target)
    problems += [f"{n} already served by the target (`migrator status` says which attempt moved it)"
                 for n, e in entries.items() if n in served and pooler.serves(served[n], pooler.repoint(e, where_to))]
    ini = Path(c.pgbouncer_ini)
    if not os.access(ini, os.W_OK) or not os.access(ini.parent, os.W_OK):
        problems.append(f"{ini} (or its directory) is not writable")
    if problems:
        return "fail", "; ".join(problems)
    where = ", ".join(f"{n} -> {served[n].host}:{served[n].port}/{served[n].database}" for n in entries)
    return "pass", f"{where}; entries in {ini}"


CARRIES_FROM = (1, 21)
"""The first PgBouncer that carries protocol-level prepared statements across server connections (when its
max_prepared_statements is above 0)."""


def _prepared(cfg: Config) -> tuple[State, str]:
    c = cfg.cutover
    assert c.pgbouncer_admin_dsn
    with pooler.Admin(c.pgbouncer_admin_dsn) as admin:
        version, settings, served = admin.version(), admin.settings(), admin.databases()
    modes = {served[n].pool_mode or settings.get("pool_mode", "session") for n in c.pooler_databases if n in served}
    with db.session(cfg.target_dsn, role="target", autocommit=True) as target:
        passes = state.health_passes(target)
    return prepared_state(version, settings, modes, declared=c.prepared_statements == "unused",
                          passes=passes, where=str(cfg.path or "the configuration"))


def prepared_state(version: tuple[int, ...], settings: dict[str, str], modes: set[str], *, declared: bool,
                   passes: list[tuple[int, Any, dict[str, Any]]], where: str) -> tuple[State, str]:
    """The `prepared` item from what the pooler says of itself and what this migration recorded."""
    shown = ".".join(map(str, version)) or "of unknown version"
    if modes <= {"session"}:
        return "pass", "session pooling: a client keeps its server connection (the pooler item says what that means)"
    limit = settings.get("max_prepared_statements", "")
    if version >= CARRIES_FROM and limit.isdigit() and int(limit) > 0:
        return "pass", f"PgBouncer {shown} carries prepared statements across server connections " \
                       f"(max_prepared_statements = {limit})"
    if declared:
        return "pass", f'no client prepares statements by name: declared in {where} ([cutover] prepared_statements ' \
                       '= "unused")'
    proven = [p for p in passes if p[2].get("pooler") == shown]
    if proven:
        attempt, at, health = proven[-1]
        return "pass", (f"a health gate passed with {health.get('client_transactions')} client transactions through "
                        f"a switch of this pooler (PgBouncer {shown}) in attempt {attempt} "
                        f"({at:%Y-%m-%d %H:%M} UTC)")
    why = ("max_prepared_statements = 0" if limit else "before 1.21") if version else "its version unknown"
    return "warn", (f"PgBouncer {shown} in transaction pooling carries no prepared statement across server "
                    f"connections ({why}): clients that prepare statements by name (JDBC after 5 executions, Orthanc "
                    "always) fail after the switch, and the health gate's canary will say so and roll back. Options: "
                    "PgBouncer 1.21 or newer with max_prepared_statements > 0; clients that do not prepare by name "
                    "(JDBC prepareThreshold=0); switch_command restarting the application (runbook 02); if no client "
                    'prepares statements, declare [cutover] prepared_statements = "unused"; or a rehearsal (cutover '
                    "and rollback) whose health gate passed")


def _blockers(cfg: Config) -> tuple[State, str]:
    with db.session(cfg.source_dsn, role="source", autocommit=True) as source:
        found = inspect.blockers(source)
    with db.session(cfg.target_dsn, role="target", autocommit=True) as target:
        recorded = state.overrides(target)
    if not found:
        return "pass", "no blocker stands on the legacy database"
    standing = [f.name for f in found if f.name not in recorded]
    accepted = [recorded[f.name] for f in found if f.name in recorded]
    detail = "; ".join(
        [f"{n} stands, not overridden at prepare" for n in standing]
        + [f"{o.name} overridden at prepare by {o.os_user} (role {o.db_role}) at {o.overridden_at:%Y-%m-%d %H:%M} UTC"
           for o in accepted])
    return ("fail" if standing else "overridden"), detail


def _moves_clients(cfg: Config, command: str | None, setting: str, stranded: str) -> tuple[State, str]:
    if cfg.cutover.uses_pooler:
        return "pass", f"clients move through PgBouncer ({', '.join(cfg.cutover.pooler_databases)})"
    if command:
        return "pass", f"clients move by [cutover] {setting}"
    return "fail", (f"no pooler and no [cutover] {setting}: clients would not be moved ({stranded}); configure "
                    f"one, or accept it with `--override {NO_SWITCH}`")


def _switch(cfg: Config) -> tuple[State, str]:
    return _moves_clients(cfg, cfg.cutover.switch_command, "switch_command",
                          "they stay on the legacy database, which the cutover freezes")


def _switch_back(cfg: Config) -> tuple[State, str]:
    return _moves_clients(cfg, cfg.cutover.rollback_command, "rollback_command",
                          "they stay on the target, which the rollback freezes, while the legacy database takes "
                          "writes again")


_CHECKS: dict[str, Callable[[Config], tuple[State, str]]] = {
    "lag": _lag, "verify": _verify, "sessions": _sessions, "target": _target, "post-data": _post_data,
    "sequences": _sequences,
    "blockers": _blockers, "pooler": _pooler, "prepared": _prepared, "switch": _switch,
}


def _check(cfg: Config, item: str, fn: Callable[[Config], tuple[State, str]], accepted: set[str]) -> Check:
    try:
        st, detail = fn(cfg)
    except Exception as exc:  # noqa: BLE001 - a check that cannot run is a failed check, named
        st, detail = "fail", scrub(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        if item in _WARN_ONLY:
            st, detail = "warn", f"could not tell: {detail}"
    if st == "fail" and item not in _NOT_OVERRIDABLE and _OVERRIDE_NAME.get(item, item) in accepted:
        st, detail = "overridden", f"{detail} (overridden by the operator)"
    return Check(item, st, detail)


def run(cfg: Config, *, overrides: Iterable[str] = ()) -> Checklist:
    """Every item's state; an item that raises fails with the error as its detail. NotReady before `prepare` or
    after `cleanup` (a target that cannot be reached fails its item instead)."""
    status.require_prepared(cfg)
    accepted = set(overrides)
    return Checklist(tuple(_check(cfg, item, _CHECKS[item], accepted) for item in ITEMS
                           if item not in _POOLER_ITEMS or cfg.cutover.uses_pooler))


def rollback_checklist(cfg: Config, *, overrides: Iterable[str] = ()) -> Checklist:
    """The rollback's one item, `switch`: the pooler or rollback_command moves the clients back."""
    return Checklist((_check(cfg, "switch", _switch_back, set(overrides)),))


def recorded(checklist: Checklist) -> list[dict[str, Any]]:
    """The checklist as an attempt records it: each item the operator overrode says who (the operating-system user
    running migrator, on which host) and when."""
    by, at = state.operator(), dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    return [c.to_dict() | ({"by": by, "at": at} if c.state == "overridden" else {})
            for c in checklist.checks]
