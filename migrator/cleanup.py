"""Cleanup: end the migration's capture. Removes the capture triggers and the `_migrator` schema from the legacy
database (deltalog/triggers.py), and from the target, whose capture recorded writes for a rollback (that window
ends: rollback.remove_capture). Either side frozen refuses, before anything is removed, unless the operator says it
may take writes again: `--release-freeze` for the legacy database after a cutover, `--release-target` for the
target after a rollback.

Then the control schema, which lives on the target: its history (phases, tables, attempts and steps, overrides, the
last verify, the audit trail, the lag by minute; no row values, no passwords) is written to a file in the local
directory (`export_history`), and only then may it be dropped (`drop_control_schema`: `--drop-control-schema`, or
yes to the question on a terminal), so that nothing of the engine stays behind unless asked for.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from migrator import db, ownership, rollback, state
from migrator.config import Config
from migrator.deltalog.freeze import is_frozen
from migrator.deltalog.triggers import remove
from migrator.errors import Blocked, ConnectionFailed, NotReady
from migrator.log import get


@dataclass(frozen=True)
class CleanupResult:
    triggers_removed: int
    """On the legacy database."""
    schema_dropped: bool
    target_triggers_removed: int = 0
    """On the target, where they recorded writes for a rollback."""
    history_file: str | None = None
    """Where the control schema's history was written (`export_history`)."""
    control_schema_dropped: bool = False
    target_released: bool = False
    """The target was frozen after a rollback and takes writes again (`--release-target`)."""

    def to_dict(self) -> dict[str, Any]:
        return {"triggers_removed": self.triggers_removed, "schema_dropped": self.schema_dropped,
                "target_triggers_removed": self.target_triggers_removed, "target_released": self.target_released,
                "history_file": self.history_file, "control_schema_dropped": self.control_schema_dropped}

    def render_text(self) -> str:
        on_target = self.target_triggers_removed
        text = (f"removed {self.triggers_removed} triggers and the _migrator schema"
                + (f"; {on_target} triggers on the target (the rollback window is over)" if on_target else "")
                + ("; the target's freeze after the rollback is released: it takes writes again"
                   if self.target_released else ""))
        if self.history_file:
            text += f"\nthe run's history and audit trail: {self.history_file}"
        if self.control_schema_dropped:
            text += "\nthe control schema was dropped from the target: nothing of migrator is left there"
        elif self.history_file:
            text += ("\nthe control schema stays on the target (`migrator cleanup --yes --drop-control-schema` "
                     "drops it)")
        return text


def run(cfg: Config, *, release_freeze: bool = False, migration: str | None = None,
        release_target: bool = False) -> CleanupResult:
    """Remove the capture triggers and the `_migrator` schema from the legacy database, leaving no trace; only the
    target's migration's capture, or that of the migration the operator names (`migration`, its id). Then, for the
    target's own migration, the capture on the target (the rollback window ends). Refuses, removing nothing, while
    the legacy database is frozen after a cutover (unless `release_freeze`) or the target after a rollback (unless
    `release_target`)."""
    log = get(phase="cleanup")
    with db.session(cfg.source_dsn, role="source", autocommit=True) as source:
        ownership.check_cleanup(source, cfg.target_dsn, named=migration)
        if is_frozen(source) and not release_freeze:
            raise NotReady(
                "the legacy database is frozen after cutover; removing capture would make it writable again",
                hint="If clients have moved and writes to the legacy database are acceptable again, run "
                     "`migrator cleanup --release-freeze --yes`; otherwise leave it frozen.",
            )
        target_frozen = migration is None and _target_frozen(cfg)
        if target_frozen and not release_target:
            raise Blocked(
                "cleanup refused: the target is frozen after a rollback, and removing its capture would make it "
                "writable again; nothing was removed",
                hint="If writes to the target are acceptable again (nobody will take them for the legacy "
                     "database's), run `migrator cleanup --release-target --yes`; otherwise leave it frozen.")
        if migration is None:
            # A named migration is another one, abandoned: the configured target's migration goes on.
            _record_cleanup(cfg)
        removed = remove(source, cfg.sync.lock_timeout)
        log.info("cleanup.capture_removed", triggers=removed)
    # A named migration's target is gone, and the configured target's capture is not its own.
    on_target = 0 if migration else rollback.remove_capture(cfg)
    if target_frozen:
        log.warning("cleanup.target_released")
    return CleanupResult(removed, True, on_target, target_released=target_frozen)


def _target_frozen(cfg: Config) -> bool:
    """Whether the target rejects writes after a rollback (False when it cannot be reached: it is gone)."""
    try:
        with db.session(cfg.target_dsn, role="target", autocommit=True) as target:
            return is_frozen(target)
    except ConnectionFailed:
        return False


def _record_cleanup(cfg: Config) -> None:
    """Record on the target, before capture goes, that the migration ends: sync, copy and cutover then say so
    instead of blaming triggers dropped by hand. A target that is gone (an abandoned migration) does not keep the
    legacy database from being cleaned."""
    try:
        with db.session(cfg.target_dsn, role="target", autocommit=True) as target:
            if state.exists(target):
                state.record_cleanup(target)
    except ConnectionFailed as exc:
        get(phase="cleanup").warning("cleanup.not_recorded", error=str(exc).splitlines()[0])


def export_history(cfg: Config) -> Path | None:
    """Write the control schema's history to `<local dir>/history-<migration id>-<time>.json` (mode 0600); its path,
    or None when the target has no control schema (or cannot be reached: logged)."""
    try:
        with db.session(cfg.target_dsn, role="target", autocommit=True, connect_timeout=5) as target:
            if not state.exists(target):
                return None
            found = state.history(target)
    except ConnectionFailed as exc:
        get(phase="cleanup").warning("cleanup.history_not_exported", error=str(exc).splitlines()[0])
        return None
    cfg.local_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")  # two cleanups may fall in one second
    path = cfg.local_dir / f"history-{found.migration.get('migration_id') or 'migration'}-{stamp}.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(found.to_dict(), out, indent=1, default=str)
        out.flush()
        os.fsync(out.fileno())
    get(phase="cleanup").info("cleanup.history_exported", path=str(path), audit_rows=len(found.audit))
    return path


def drop_control_schema(cfg: Config) -> None:
    """Drop the control schema from the target (its history was exported first)."""
    with db.session(cfg.target_dsn, role="target") as target:
        state.drop(target)
        target.commit()
    get(phase="cleanup").info("cleanup.control_schema_dropped")
