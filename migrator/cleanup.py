"""Cleanup: end the migration's capture. Removes the capture triggers and the `_migrator` schema from the legacy
database (deltalog/triggers.py), and from the target, whose capture recorded writes for a rollback (that window
ends: rollback.disarm).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from migrator import db, ownership, rollback, state
from migrator.config import Config
from migrator.deltalog.freeze import is_frozen
from migrator.deltalog.triggers import remove
from migrator.errors import ConnectionFailed, NotReady
from migrator.log import get


@dataclass(frozen=True)
class CleanupResult:
    triggers_removed: int
    """On the legacy database."""
    schema_dropped: bool
    target_triggers_removed: int = 0
    """On the target, where they recorded writes for a rollback."""

    def to_dict(self) -> dict[str, Any]:
        return {"triggers_removed": self.triggers_removed, "schema_dropped": self.schema_dropped,
                "target_triggers_removed": self.target_triggers_removed}

    def render_text(self) -> str:
        on_target = self.target_triggers_removed
        return (f"removed {self.triggers_removed} triggers and the _migrator schema"
                + (f"; {on_target} triggers on the target (the rollback window is over)" if on_target else ""))


def run(cfg: Config, *, release_freeze: bool = False, migration: str | None = None) -> CleanupResult:
    """Remove the capture triggers and the `_migrator` schema from the legacy database, leaving no trace; only the
    target's migration's capture, or that of the migration the operator names (`migration`, its id). Then, for the
    target's own migration, the capture on the target (the rollback window ends)."""
    log = get(phase="cleanup")
    with db.session(cfg.source_dsn, role="source", autocommit=True) as source:
        ownership.check_cleanup(source, cfg.target_dsn, named=migration)
        if is_frozen(source) and not release_freeze:
            raise NotReady(
                "the legacy database is frozen after cutover; removing capture would make it writable again",
                hint="If clients have moved and writes to the legacy database are acceptable again, run "
                     "`migrator cleanup --release-freeze --yes`; otherwise leave it frozen.",
            )
        if migration is None:
            # A named migration is another one, abandoned: the configured target's migration goes on.
            _record_cleanup(cfg)
        removed = remove(source, cfg.sync.lock_timeout)
        log.info("cleanup.capture_removed", triggers=removed)
    # A named migration's target is gone, and the configured target's capture is not its own.
    on_target = 0 if migration else rollback.disarm(cfg)
    return CleanupResult(removed, True, on_target)


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
