"""Go/no-go: the checklist a cutover must pass before anything is paused or frozen. Reads only; decides.

Items: `lag` (the oldest change not yet applied is younger than [cutover] max_lag_seconds), `verify` (the last
recorded verify found the two sides identical; a warning when none was recorded), `sessions` (no transaction on the
legacy database, running or idle in transaction, older than [cutover] max_session_seconds: it would hold PAUSE or the
freeze), `target` (reachable, control schema present), `sequences` (readable on both sides), `blockers` (no
blocker of inspect's stands on the legacy database, unless it was overridden at prepare: then it is shown as
overridden, by whom and when), and with a pooler `pooler` (admin console reachable, every pooler database served
and not paused, its entry found in a writable [databases] file). The operator may accept a failing item by name
(`--override ITEM`); it is then shown as such.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import psycopg
from psycopg import sql

from migrator import catalog, db, inspect, pooler, replay, state, status
from migrator.config import Config
from migrator.redaction import scrub

ITEMS = ("lag", "verify", "sessions", "target", "sequences", "blockers", "pooler")
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
    lag = replay.lag(cfg)
    age = lag.oldest_pending_seconds or 0.0
    text = f"{lag.pending_events} events pending, oldest {age:.1f}s (bound {cfg.cutover.max_lag_seconds:g}s)"
    return ("pass" if age <= cfg.cutover.max_lag_seconds else "fail"), text


def _verify(cfg: Config) -> tuple[State, str]:
    with db.session(cfg.target_dsn, role="target", autocommit=True) as target:
        last = state.last_verify(target)
    if last is None:
        return "warn", "no verify recorded; run `migrator verify` before the night for an exact answer"
    found, at = last
    if found.get("identical"):
        return "pass", f"last verify identical ({at:%Y-%m-%d %H:%M} UTC)"
    if found.get("not_verified"):
        return "fail", (f"last verify ({at:%Y-%m-%d %H:%M} UTC) could not verify {found['not_verified']} table(s); "
                        "fix what it reported and verify again")
    return "fail", f"last verify ({at:%Y-%m-%d %H:%M} UTC) found {found.get('differences', '?')} differences"


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
    problems = [f"{n} not served" for n in c.pooler_databases if n not in served]
    problems += [f"{n} already paused" for n in c.pooler_databases if n in served and served[n].paused]
    problems += [f"{n} in session pooling (PAUSE would wait for clients to disconnect)"
                 for n in c.pooler_databases if n in served and served[n].pool_mode == "session"]
    entries = pooler.read_entries(c.pgbouncer_ini, c.pooler_databases)
    ini = Path(c.pgbouncer_ini)
    if not os.access(ini, os.W_OK) or not os.access(ini.parent, os.W_OK):
        problems.append(f"{ini} (or its directory) is not writable")
    if problems:
        return "fail", "; ".join(problems)
    where = ", ".join(f"{n} -> {served[n].host}:{served[n].port}/{served[n].database}" for n in entries)
    return "pass", f"{where}; entries in {ini}"


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


_CHECKS: dict[str, Callable[[Config], tuple[State, str]]] = {
    "lag": _lag, "verify": _verify, "sessions": _sessions, "target": _target, "sequences": _sequences,
    "blockers": _blockers, "pooler": _pooler,
}


def run(cfg: Config, *, overrides: Iterable[str] = ()) -> Checklist:
    """Every item's state; an item that raises fails with the error as its detail. NotReady before `prepare` or
    after `cleanup` (a target that cannot be reached fails its item instead)."""
    status.require_prepared(cfg)
    accepted = set(overrides)
    checks = []
    for item in ITEMS:
        if item == "pooler" and not cfg.cutover.uses_pooler:
            continue
        try:
            st, detail = _CHECKS[item](cfg)
        except Exception as exc:  # noqa: BLE001 - a check that cannot run is a failed check, named
            st, detail = "fail", scrub(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        if st == "fail" and item in accepted:
            st, detail = "overridden", f"{detail} (overridden by the operator)"
        checks.append(Check(item, st, detail))
    return Checklist(tuple(checks))
