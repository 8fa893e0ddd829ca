"""The quarantine: files of the target store whose row left the source. Clinical files are never deleted by a
sync: each is recorded in the control schema first (key, location, its name in the quarantine folder, the time),
then moved there by a rename on the same filesystem, then marked moved. A crash between the record and the rename
leaves a 'moving' entry that the next run finishes (`recover`). Only the operator empties the quarantine
(`migrator objects quarantine --empty`), audited: each emptied entry names the audit row of the action. The folder is
flat: `<target_root>/.migrator-quarantine/<id>-<file name>`; the entry keeps the location to put it back.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from migrator import db, log, state
from migrator.config import Config
from migrator.objects.listing import message, settings
from migrator.store import BadLocation, Store, open_store

_BATCH = 100


@dataclass(frozen=True)
class Moved:
    entry: state.QuarantineEntry
    outcome: str
    """'quarantined', 'absent' (no file there), or 'moving' when the rename failed (`error` says why)."""
    error: str | None = None


def _finish(conn: state.Conn, store: Store, entry: state.QuarantineEntry) -> Moved:
    """Move the recorded file (unless the quarantine holds it already: the rename was done) and record it, in the
    caller's transaction."""
    try:
        if store.quarantined(entry.name):
            outcome = "quarantined"
        else:
            outcome = "quarantined" if store.quarantine(entry.location, entry.name) else "absent"
    except (BadLocation, OSError) as exc:
        return Moved(entry, "moving", f"{message(exc)} ({type(exc).__name__})")
    state.quarantine_done(conn, entry.id, outcome)
    log.get(phase="objects").info("objects.quarantined", key=entry.key, entry=entry.id, outcome=outcome)
    return Moved(entry, outcome)


def _finish_all(conn: state.Conn, store: Store, entries: list[state.QuarantineEntry]) -> list[Moved]:
    done = [_finish(conn, store, e) for e in entries]
    conn.commit()
    return done


def move(conn: state.Conn, store: Store, copies: list[state.ObjectCopy], before: dt.datetime) -> list[Moved]:
    """Quarantine the files of these copies, whose rows left the source, _BATCH at a time: each recorded (and its
    copy forgotten) and committed before its rename, each rename durable before it is marked done. A copy recorded
    again after `before` (another run copied it since) stays."""
    done = []
    for at in range(0, len(copies), _BATCH):
        entries = [e for c in copies[at:at + _BATCH]
                   if (e := state.record_quarantine(conn, c, store.quarantine_root(), before)) is not None]
        conn.commit()
        done += _finish_all(conn, store, entries)
    return done


def recover(conn: state.Conn, store: Store) -> list[Moved]:
    """Finish the moves a run recorded and did not complete (it crashed, or the rename failed)."""
    return _finish_all(conn, store, state.quarantine_entries(conn, ("moving",)))


@dataclass
class QuarantineReport:
    root: str
    entries: list[state.QuarantineEntry] = field(default_factory=list)
    emptied: int = 0
    failed: list[tuple[int, str]] = field(default_factory=list)
    """(entry id, why) of files that could not be moved, or removed when emptying."""

    def to_dict(self) -> dict[str, Any]:
        return {"root": self.root, "count": len(self.entries), "emptied": self.emptied,
                "entries": [e.to_dict() for e in self.entries],
                "failed": [{"id": i, "reason": r} for i, r in self.failed]}

    def render_text(self) -> str:
        lines = [f"quarantine {self.root}: {len(self.entries):,} file(s)"
                 + (f", {self.emptied:,} emptied" if self.emptied else "")]
        for e in self.entries:
            lines.append(f"  {e.id:>6}  key={e.key}  {e.location} -> {e.name}  "
                         f"{e.recorded_at:%Y-%m-%d %H:%M:%S}{'  (moving)' if e.outcome == 'moving' else ''}")
        lines += [f"  FAILED  entry {i}: {r}" for i, r in self.failed]
        return "\n".join(lines)


def listing(cfg: Config, *, empty: bool = False, audit_id: int | None = None,
            progress: Callable[[int], None] | None = None) -> QuarantineReport:
    """The quarantine (moves left unfinished are finished first); with `empty`, delete its files (the operator's
    word; `audit_id`: the audit row of the action, recorded with each entry emptied)."""
    target = open_store(settings(cfg).target_root, "target")
    report = QuarantineReport(target.quarantine_root())
    with db.session(cfg.target_dsn, role="target", application_name="migrator-objects") as conn:
        state.upgrade(conn)
        report.failed += [(m.entry.id, m.error or "") for m in recover(conn, target) if m.error]
        entries = state.quarantine_entries(conn)
        conn.commit()
        if not empty:
            report.entries = entries
            return report
        for e in entries:
            if e.outcome != "quarantined":
                report.entries.append(e)  # its move failed: it stays listed
                continue
            try:
                target.purge(e.name)
            except OSError as exc:
                report.failed.append((e.id, message(exc)))
                report.entries.append(e)
                continue
            state.quarantine_emptied(conn, e.id, audit_id)
            conn.commit()
            report.emptied += 1
            if progress is not None:
                progress(report.emptied)
    log.get(phase="objects").info("objects.quarantine_emptied", files=report.emptied, failed=len(report.failed))
    return report
