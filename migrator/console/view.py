"""The page's view: what the poller read, shaped for the browser. Table names, counts, sizes and times only: no row
values (chunk bounds are key values, and are left out), no DSN passwords (databases are named host:port/dbname)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from migrator import audit, db, gonogo, state
from migrator.config import Config
from migrator.console.actions import SPECS, Runner, confirmation, database_name
from migrator.status import Status


@dataclass
class Extras:
    """What the poller read from the control schema beyond `status`."""

    samples: list[state.SyncSample] = field(default_factory=list)
    audit: list[state.AuditRow] = field(default_factory=list)
    hold: tuple[str, dt.datetime] | None = None
    lock_held: bool = False
    last_verify: tuple[dict[str, Any], dt.datetime] | None = None
    chunks: list[state.Chunk] = field(default_factory=list)
    tables: list[state.TableState] = field(default_factory=list)
    now: dt.datetime | None = None


def unreadable(cfg: Config, message: str) -> dict[str, Any]:
    return {"migration": _names(cfg), "error": message, "phase": {"name": "unknown", "next": message}}


def _names(cfg: Config) -> dict[str, str]:
    return {"source": db.describe_dsn(cfg.source_dsn), "target": db.describe_dsn(cfg.target_dsn),
            "database": database_name(cfg)}


def build(cfg: Config, st: Status, x: Extras, checklist: dict[str, Any] | None, runner: Runner) -> dict[str, Any]:
    attempts = [_attempt(a) for a in st.cutover]
    running = next((a for a in attempts if a["finished_at"] is None), None)
    phase = _phase(st, x, running)
    view: dict[str, Any] = {
        "migration": _names(cfg),
        "phase": phase,
        "frozen": st.frozen,
        "copy": {k: v for k, v in st.copy.items() if k not in ("workers", "snapshot")},
        "tables": _tables(st, x),
        "lag": _lag(st, x),
        "checklist": checklist,
        "hold": {"reason": x.hold[0], "since": x.hold[1]} if x.hold else None,
        "verify": ({"since": x.last_verify[1]} | {k: x.last_verify[0].get(k) for k in
                                                  ("identical", "differences", "not_verified")})
        if x.last_verify else None,
        "attempts": attempts[-5:],
        "interrupted": st.interrupted,
        "warnings": st.warnings,
        "audit": [a.to_dict() for a in audit.actions(x.audit)][-60:],
    }
    view["intents"] = _intents(view, x, running, runner)
    view["actions"] = _actions(cfg, st, x, phase["name"], running, runner)
    return view


def _attempt(a: dict[str, Any]) -> dict[str, Any]:
    steps = [{k: s[k] for k in ("step", "status", "started_at", "finished_at", "detail")} for s in a["steps"]]
    at = {s["step"]: s for s in steps}
    freeze = at.get("freeze")
    pause = at.get("pause")
    return {"id": a["id"], "kind": a.get("kind") or "cutover", "status": a["status"], "started_at": a["started_at"],
            "finished_at": a["finished_at"], "failed_step": a.get("failed_step"),
            "freeze_seconds": a.get("freeze_seconds"), "pause_seconds": a.get("pause_seconds"),
            "freeze_started_at": freeze["started_at"] if freeze else None,
            "pause_started_at": pause["started_at"] if pause else None,
            "checklist": a.get("checklist"), "error": a.get("error"), "steps": steps}


def _phase(st: Status, x: Extras, running: dict[str, Any] | None) -> dict[str, Any]:
    """Where the migration stands, since when, and the next step with the command or button that takes it."""
    c = st.copy
    last = st.cutover[-1] if st.cutover else None
    if st.interrupted:
        i = st.interrupted[0]
        return {"name": "interrupted", "since": None, "next": i["message"], "command": i["command"]}
    if running is not None:
        frozen = running["freeze_started_at"] is not None
        name = ("frozen" if frozen else "cutting over") if running["kind"] == "cutover" else "rolling back"
        step = running["steps"][-1]["step"] if running["steps"] else "starting"
        held = x.hold is not None and step == "preflight"
        return {"name": "held" if held else name, "since": running["started_at"],
                "next": (f"the {running['kind']} waits at the go/no-go point until the hold is released"
                         if held else f"{running['kind']} attempt {running['id']} at step {step}"),
                "command": "migrator cutover --release-hold" if held else "migrator status",
                "button": "release-hold" if held else None}
    if st.phase == "cleaned up":
        return {"name": "cleaned up", "since": st.cleaned_up_at, "next": "the migration is over",
                "command": "migrator audit"}
    if st.phase == "cut over":
        return {"name": "cut over", "since": last["finished_at"] if last else None,
                "next": "clients work on the new database; roll back if they must go back, or end the rollback "
                        "window with cleanup", "command": "migrator cleanup --yes", "button": "rollback"}
    if last is not None and last.get("kind") == "rollback" and last["status"] == "done":
        return {"name": "rolled back", "since": last["finished_at"],
                "next": "clients are back on the legacy database; sync again before the next cutover",
                "command": "migrator sync --follow"}
    if st.frozen:
        return {"name": "frozen", "since": None, "next": "the legacy database is frozen without a completed "
                "cutover: release it", "command": "migrator release --yes", "button": "release"}
    if x.hold is not None:
        return {"name": "held", "since": x.hold[1], "next": f"{x.hold[0]}: a cutover waits until it is released",
                "command": "migrator cutover --release-hold", "button": "release-hold"}
    if st.phase == "syncing":
        fresh = x.samples and x.now and (x.now - x.samples[-1].at).total_seconds() < 60
        return {"name": "syncing", "since": c.get("finished_at"),
                "next": "verify, then cut over when the checklist says go" if fresh
                else "no sync sample in the last minute: start `migrator sync --follow`",
                "command": "migrator cutover --yes" if fresh else "migrator sync --follow", "button": "cutover"}
    if st.phase == "copying":
        return {"name": "copying", "since": c.get("started_at"), "next": "the copy runs; sync follows it",
                "command": "migrator copy", "button": "copy-resume" if c.get("paused") else "copy-pause"}
    if st.phase == "prepared":
        return {"name": "prepared", "since": None, "next": "copy the tables", "command": "migrator copy"}
    return {"name": st.phase, "since": None, "next": "prepare the migration", "command": "migrator prepare --yes"}


def _tables(st: Status, x: Extras) -> list[dict[str, Any]]:
    """Per table: its copy (chunks, bytes, time left at the copy's rate so far), pending events, rows copied."""
    pending = st.sync.get("pending_by_table") or {}
    started = st.copy.get("started_at")
    rate = None
    if started and x.now and not st.copy.get("finished_at"):
        elapsed = (x.now - started).total_seconds()
        rate = (st.copy.get("bytes") or 0) / elapsed if elapsed > 0 else None
    rows = []
    for t in x.tables:
        chunks = [c for c in x.chunks if c.schema_name == t.schema_name and c.table_name == t.table_name]
        done = [c for c in chunks if c.status == "copied"]
        left = sum(c.est_bytes for c in chunks if c.status != "copied")
        rows.append({"table": t.display, "status": t.status, "rows": t.rows_copied,
                     "bytes": t.bytes_copied if t.status == "copied" else sum(c.bytes_copied or 0 for c in done),
                     "chunks": len(chunks), "chunks_done": len(done),
                     "seconds_left": round(left / rate) if rate and left and t.status != "copied" else None,
                     "pending": int(pending.get(t.display, 0))})
    return rows


def _lag(st: Status, x: Extras) -> dict[str, Any]:
    log = st.sync.get("delta_log") or {}
    return {"seconds": st.sync.get("lag_seconds"), "pending": st.sync.get("pending_events"),
            "log_bytes": log.get("bytes"), "applied": st.sync.get("events_applied"),
            "samples": [[s.at, s.lag_seconds or 0.0, s.pending_events] for s in x.samples]}


def _intents(view: dict[str, Any], x: Extras, running: dict[str, Any] | None, runner: Runner) -> list[dict[str, Any]]:
    """Pending intents and how to cancel them: a cutover waiting on a hold, a hold that will stop the next one,
    actions still running."""
    found = []
    if running is not None and view["phase"]["name"] == "held":
        found.append({"what": f"cutover attempt {running['id']} waits at the go/no-go point for the hold",
                      "since": running["started_at"], "cancel": "cancel",
                      "how": "Cancel the waiting cutover (nothing is paused or frozen yet), or release the hold to "
                             "let it go on"})
    elif x.hold is not None:
        found.append({"what": f"a hold is set ({x.hold[0]}): a cutover started now waits at the go/no-go point",
                      "since": x.hold[1], "cancel": "release-hold", "how": "Release the hold"})
    for a in view["audit"]:
        if a["outcome"] == "started" and a["via"] in ("console", "cli") and a["action"] in (
                "cutover", "rollback", "verify") and not (running and a["action"] == running["kind"] and found):
            mine = a["id"] in runner.pids()
            if mine or (a["via"] == "cli" and running is not None and a["action"] == running["kind"]):
                found.append({"what": f"{a['action']} started by {a['actor']} ({a['via']})", "since": a["at"],
                              "cancel": None, "how": "it runs detached under its own guardian; `migrator status` "
                                                     "shows its steps"})
    return found


def _actions(cfg: Config, st: Status, x: Extras, phase: str, running: dict[str, Any] | None,
             runner: Runner) -> list[dict[str, Any]]:
    """Each action, the text that confirms it, and whether it makes sense now (the server checks again)."""
    busy = x.lock_held or running is not None or any(s.spec.exclusive for s in runner.running())
    paused = bool(st.copy.get("paused"))
    can = {
        "copy-pause": (phase == "copying" and not paused, "only while the copy runs and is not paused"),
        "copy-resume": (paused, "the copy is not paused"),
        "hold": (x.hold is None and phase in ("prepared", "copying", "syncing", "cutting over"),
                 "already held, or past the cutover"),
        "release-hold": (x.hold is not None, "no hold is set"),
        "verify": (phase in ("syncing", "held", "cut over", "rolled back") and not any(
            s.spec.name == "verify" for s in runner.running()), "needs a finished copy; one verify at a time"),
        "cutover": (phase in ("syncing", "held") and not busy, "needs a finished copy and no cutover or rollback "
                                                               "running"),
        "release": (bool(st.frozen) and not busy, "the legacy database is not frozen, or a cutover or rollback "
                                                  "runs"),
        "rollback": (phase == "cut over" and not busy, "only after a cutover, with nothing else running"),
        "cancel": (phase == "held" and running is not None, "no cutover waits at its hold"),
    }
    return [{"name": s.name, "label": s.label, "confirm": confirmation(cfg, s.name), "enabled": can[s.name][0],
             "why_not": None if can[s.name][0] else can[s.name][1],
             "overrides": list(gonogo.OVERRIDES) if s.name == "cutover"
             else [gonogo.NO_SWITCH] if s.name == "rollback" else []} for s in SPECS.values()]
