"""`migrator release`: the operator's explicit end of a freeze: the legacy database's after a cutover, or (`--target`)
the target's after a rollback.

After a cutover the legacy database rejects every write until a rollback or this release (no split brain). Release
makes it writable again and keeps capture installed; it refuses a freeze that belongs to another migration
(`ownership.check`), since lifting that one would let two sites' clients write two databases.

After a rollback the target rejects every write the same way, until the next cutover lifts it or `release --target`.
That release removes the rollback's capture from the target (rollback.remove_capture: nothing reads it outside a
rollback window, and the next cutover installs it again). It refuses while a rollback has not completed (the target
frozen with a cutover still in effect: the rollback's own undo or a re-run decides, never a release half-way), and
while a cutover or rollback runs (the action lock).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from migrator import db, ownership, rollback, state
from migrator.config import Config
from migrator.deltalog import freeze as freezer
from migrator.errors import Blocked, NotReady
from migrator.log import get
from migrator.state.lock import action_lock


@dataclass(frozen=True)
class ReleaseResult:
    released: bool = True
    side: str = "legacy"
    """"legacy" or "target"."""

    def to_dict(self) -> dict[str, Any]:
        return {"released": self.released, "side": self.side}

    def render_text(self) -> str:
        if self.side == "target":
            return ("released: the target takes writes again (the rollback's capture is removed from it; writes "
                    "there are not carried to the legacy database)")
        return "released: the legacy database takes writes again"


def run(cfg: Config) -> ReleaseResult:
    """Make the legacy database writable again after a cutover (capture stays on)."""
    with db.session(cfg.source_dsn, role="source") as source, \
            db.session(cfg.target_dsn, role="target", autocommit=True) as target:
        if not freezer.is_frozen(source):
            raise NotReady("the legacy database is not frozen; nothing to release")
        ownership.check(source, state.migration(target), "release")  # another migration's freeze: split brain
        source.rollback()
        freezer.release(source)
        state.mark(target, "frozen", False)
        state.clear(target, "cutover_at")
        get(phase="release").info("release.done")
    return ReleaseResult()


def run_target(cfg: Config) -> ReleaseResult:
    """Make the target writable again after a completed rollback (its rollback capture removed). NotReady when it is
    not frozen; Blocked while a cutover or rollback runs, or while a rollback has not completed."""
    with db.session(cfg.target_dsn, role="target", autocommit=True) as target:
        state.require_prepared(target)
        if not freezer.is_frozen(target):
            raise NotReady("the target is not frozen; nothing to release",
                           hint="`migrator status` says which database rejects writes.")
        with action_lock(cfg, target, "release --target"):
            m = state.require_prepared(target)
            if m.cutover_at is not None:
                raise Blocked("release --target refused: the target is frozen by a rollback that has not completed "
                              "(the cutover is still in effect); nothing was released",
                              hint="Run `migrator rollback --yes`: it completes the rollback, or undoes it and leaves "
                                   "the clients on a writable target.")
            removed = rollback.remove_capture(cfg)
    get(phase="release").info("release.target_done", triggers=removed)
    return ReleaseResult(side="target")
