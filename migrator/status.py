"""Status: what the control schema says about the migration, with the sync lag read from the source."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import psycopg

from migrator import db, postdata, state, sync
from migrator.config import Config
from migrator.deltalog import freeze, rotation
from migrator.deltalog import read as read_log
from migrator.errors import ConnectionFailed
from migrator.redaction import scrub
from migrator.state.lock import action_lock_held


@dataclass
class Status:
    target: str
    source: str
    prepared: bool = False
    phase: str = "not prepared"
    tables: list[dict[str, Any]] = field(default_factory=list)
    copy: dict[str, Any] = field(default_factory=dict)
    sync: dict[str, Any] = field(default_factory=dict)
    cutover: list[dict[str, Any]] = field(default_factory=list)
    frozen: bool | None = None
    target_frozen: bool = False
    """The target rejects client writes (after a rollback, until the next cutover or `migrator release --target`)."""
    overrides: list[dict[str, Any]] = field(default_factory=list)
    """Blockers accepted by name at prepare (`prepare --override`): name, detail, os_user, db_role, overridden_at."""
    cleaned_up_at: dt.datetime | None = None
    """When `migrator cleanup` removed capture from the legacy database (the migration is over)."""
    warnings: list[str] = field(default_factory=list)
    interrupted: list[dict[str, Any]] = field(default_factory=list)
    """Cutover or rollback attempts whose process died and that nothing has resolved yet: kind, attempt, step and
    the command that resolves them."""

    def to_dict(self) -> dict[str, Any]:
        def conv(v: Any) -> Any:
            if isinstance(v, dt.datetime):
                return v.isoformat()
            if isinstance(v, dict):
                return {k: conv(x) for k, x in v.items()}
            if isinstance(v, list):
                return [conv(x) for x in v]
            return v
        return conv(self.__dict__)

    def render_text(self) -> str:
        from migrator.terminal import render_status  # the terminal's page, drawn with rich

        return render_status(self)


@dataclass
class TargetReading:
    """What the control schema said, that the legacy database's part of the status needs."""

    migration: state.Migration
    position: state.Position | None
    now: dt.datetime | None
    tables: dict[int, str] = field(default_factory=dict)
    """Source oid -> schema.table, to name the pending events of each table."""


@dataclass
class SourceReading:
    """What the legacy database said: frozen or not, the events pending (per table) and their age, the delta log."""

    frozen: bool | None = None
    pending_events: int | None = None
    lag_seconds: float | None = None
    pending_by_table: dict[str, int] = field(default_factory=dict)
    delta_log: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)

    def apply(self, st: Status) -> None:
        st.frozen = self.frozen
        if self.pending_events is not None:
            st.sync.update(pending_events=self.pending_events, lag_seconds=self.lag_seconds,
                           pending_by_table=self.pending_by_table)
        if self.delta_log is not None:
            st.sync["delta_log"] = self.delta_log
        st.warnings += self.warnings


def read(cfg: Config) -> Status:
    with db.session(cfg.target_dsn, role="target", autocommit=True) as target:
        st, reading = read_target(cfg, target)
    if reading is None or st.cleaned_up_at is not None:
        return st
    try:
        with db.session(cfg.source_dsn, role="source", autocommit=True) as source:
            found = read_source(cfg, source, reading)
    except ConnectionFailed as exc:
        found = SourceReading(warnings=[_unreadable(exc)])
    found.apply(st)
    return st


def read_target(cfg: Config, target: psycopg.Connection[Any]) -> tuple[Status, TargetReading | None]:
    """The status as far as the control schema tells it (an autocommit session); the reading the source's part
    needs, or None before `prepare`."""
    st = Status(target=db.describe_dsn(cfg.target_dsn), source=db.describe_dsn(cfg.source_dsn))
    m = state.migration(target)
    if m is None:
        return st, None
    st.prepared = m.prepared_at is not None
    st.overrides = [o.to_dict() for o in state.overrides(target).values()]
    tables = state.tables(target)
    copied = [t for t in tables if t.status == "copied"]
    st.tables = [{"table": t.display, "status": t.status, "rows": t.rows_copied, "bytes": t.bytes_copied,
                  "key": t.key_columns} for t in tables]
    st.copy = {"tables": len(tables), "copied": len(copied), "rows": sum(t.rows_copied or 0 for t in copied),
               "bytes": sum(t.bytes_copied or 0 for t in copied), "started_at": m.copy_started_at,
               "finished_at": m.copy_finished_at, "snapshot": m.copy_snapshot}
    st.copy.update(_copy_progress(target))
    owed = state.post_data_deferred(target)
    st.copy["post_data_deferred"] = owed.objects if owed else []
    if owed is not None:
        st.warnings.append(f"post-data: {postdata.describe(owed)} wait for sync (the copy read its chunks under "
                           "different snapshots); `migrator sync` restores them after its next batch, and the "
                           "go/no-go refuses a cutover until it has")
    pos = state.position(target)
    st.target_frozen = freeze.is_frozen(target)
    st.cutover = [{k: v for k, v in a.items() if k != "steps"} | {"steps": a["steps"]}
                  for a in state.attempts(target)]
    st.interrupted = _interrupted(target, st.cutover)
    st.warnings += [i["message"] for i in st.interrupted]
    if m.cutover_at is not None:
        st.phase = "cut over"
    elif m.copy_finished_at is not None:
        st.phase = "syncing"
    elif m.copy_started_at is not None:
        st.phase = "copying"
    elif m.prepared_at is not None:
        st.phase = "prepared"
    if pos is not None:
        st.sync = {"applied_snapshot": pos.applied_snapshot, "events_applied": pos.events_applied,
                   "batches": pos.batches, "updated_at": pos.updated_at}
    cleaned = state.cleaned_up(target)
    now = target.execute("SELECT now()").fetchone()
    if cleaned is not None:
        # The legacy database holds no capture any more: nothing to read there but an error.
        st.phase, st.cleaned_up_at = "cleaned up", cleaned
    return st, TargetReading(m, pos, now[0] if now else None, {t.source_oid: t.display for t in tables})


def read_source(cfg: Config, source: psycopg.Connection[Any], reading: TargetReading) -> SourceReading:
    """The legacy database's part of the status, on an autocommit session: four short statements. A source that
    cannot be read is a warning, not an error (status must show what it can)."""
    found = SourceReading()
    pos, m = reading.position, reading.migration
    try:
        found.frozen = freeze.is_frozen(source)
        by_rel, age = read_log.pending_by_table(source, pos.applied_snapshot if pos else None)
        found.pending_events, found.lag_seconds = sum(by_rel.values()), age
        found.pending_by_table = {reading.tables.get(oid, f"oid {oid}"): n for oid, n in sorted(by_rel.items())}
        if age and age > 60 and m.copy_finished_at is not None:
            found.warnings.append(f"sync is {age:.0f}s behind: is `migrator sync --follow` running?")
        children = rotation.log_children(source)
        found.delta_log = {"rows": sum(c.rows for c in children), "bytes": sum(c.bytes for c in children),
                           "children": [c.to_dict() for c in children]}
        lag = sync.Lag(found.pending_events, age, pos.applied_snapshot if pos else None)
        found.warnings += _log_warnings(cfg, children, lag, pos, reading.now)
    except (psycopg.Error, Exception) as exc:  # status must show what it can even when the source is down
        found.warnings.append(_unreadable(exc))
    return found


def _unreadable(exc: BaseException) -> str:
    return f"source not readable: {scrub(str(exc)).splitlines()[0] if str(exc) else type(exc).__name__}"


def _interrupted(target: psycopg.Connection[Any], attempts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Attempts recorded as running while no process holds the action lock: their process died, and neither a
    guardian nor a re-run has resolved them (a guardian that cannot reach the target records its outcome later)."""
    running = [a for a in attempts if a["finished_at"] is None]
    if not running:
        return []
    target.commit()
    if action_lock_held(target):
        return []
    found = []
    for a in running:
        kind = a.get("kind") or "cutover"
        step = a["steps"][-1]["step"] if a["steps"] else "none"
        command = f"migrator {kind} --yes"
        found.append({"kind": kind, "attempt": a["id"], "step": step, "command": command,
                      "message": f"{kind} attempt {a['id']} was interrupted at step {step}: its process is gone and "
                                 f"nothing has resolved it yet (a guardian may still be recording it); `{command}` "
                                 "resolves it (finishes or undoes it) before anything else"})
    return found


def require_prepared(cfg: Config, *, after_cleanup: bool = False) -> None:
    """NotReady unless `prepare` has run on this target (and, unless `after_cleanup`, no `cleanup` since): for
    commands that have no target session of their own yet. A target that cannot be reached is left to the command,
    whose own error or checklist names it."""
    try:
        with db.session(cfg.target_dsn, role="target", autocommit=True) as target:
            state.require_prepared(target, after_cleanup=after_cleanup)
    except ConnectionFailed:
        return


def _log_warnings(cfg: Config, children: list[rotation.LogChild], lag: sync.Lag, pos: state.Position | None,
                  now: dt.datetime | None) -> list[str]:
    """The delta log grows on the legacy server, or sync stopped moving while changes wait."""
    warnings = []
    size = sum(c.bytes for c in children)
    if size > cfg.sync.warn_log_mb * 1e6:
        draining = [c for c in children if c.state == "draining"]
        why = (f"child {draining[0].child} has drained for {draining[0].age_seconds:.0f}s: a long transaction on the "
               "source, or sync not applying, keeps it" if draining else "no child drains: is sync running?")
        warnings.append(f"the delta log holds {size / 1e6:.0f} MB on the legacy database "
                        f"(bound [sync] warn_log_mb = {cfg.sync.warn_log_mb:g}); {why}")
    if pos is not None and now is not None and lag.pending_events:
        idle = (now - pos.updated_at).total_seconds()
        if idle > cfg.sync.warn_stalled_seconds:
            warnings.append(f"sync has not advanced for {idle:.0f}s with {lag.pending_events} events pending "
                            f"(bound [sync] warn_stalled_seconds = {cfg.sync.warn_stalled_seconds:g}): "
                            "is `migrator sync --follow` running, or stopped on an error?")
    return warnings


def _copy_progress(target: psycopg.Connection[Any]) -> dict[str, Any]:
    """Chunks done and in flight, from the control schema, while a copy runs (on any number of hosts)."""
    chunks = state.chunks(target)
    if not chunks:
        return {}
    done = [c for c in chunks if c.status == "copied"]
    workers = state.copy_workers(target)
    run = state.copy_run(target)
    in_flight = sum(int(w["bytes_done"]) for w in workers)
    total = sum(c.est_bytes for c in chunks)
    return {"chunks": len(chunks), "chunks_copied": len(done),
            "rows": sum(c.rows_copied or 0 for c in done) + sum(int(w["rows_done"]) for w in workers),
            "bytes": sum(c.bytes_copied or 0 for c in done) + in_flight,
            "estimated_bytes": total,
            "running": run is not None and run.finished_at is None and run.snapshot_id is not None,
            "paused": state.copy_paused(target),
            "workers": [{"worker": w["worker"], "chunk": f"{w['schema_name']}.{w['table_name']}#{w['chunk_no']}"
                         if w["table_name"] else None, "bytes": int(w["bytes_done"])} for w in workers]}
