"""`migrator release`: the operator's explicit end of a cutover's freeze on the legacy database.

After a cutover the legacy database rejects every write until a rollback or this release (no split brain). Release
makes it writable again and keeps capture installed; it refuses a freeze that belongs to another migration
(`ownership.check`), since lifting that one would let two sites' clients write two databases.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from migrator import db, ownership, state
from migrator.config import Config
from migrator.deltalog import freeze as freezer
from migrator.errors import NotReady
from migrator.log import get


@dataclass(frozen=True)
class ReleaseResult:
    released: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"released": self.released}

    def render_text(self) -> str:
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
