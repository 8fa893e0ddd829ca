"""Which files `objects sync` has written (or found identical) in the target store: the SHA-256 it proved, the size
and modification time the file had then (a resumed run skips it without reading it again), the row's key and the
source file's modification time. The quarantine of files whose row left the source (revision 0012), and where
`objects sync --follow` stands in the legacy database's delta log."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from psycopg import sql
from psycopg.types.json import Jsonb

from migrator.config import CONTROL_SCHEMA
from migrator.state.control import Conn, relation


@dataclass(frozen=True)
class ObjectCopy:
    location: str
    size: int
    sha256: bytes
    mtime_ns: int
    key: str | None = None
    source_size: int | None = None
    source_mtime_ns: int | None = None


_COPY_COLUMNS = sql.SQL("location, size, sha256, mtime_ns, key, source_size, source_mtime_ns")
_C_COPY_COLUMNS = sql.SQL("c.location, c.size, c.sha256, c.mtime_ns, c.key, c.source_size, c.source_mtime_ns")


def _copy(r: tuple[Any, ...]) -> ObjectCopy:
    return ObjectCopy(r[0], int(r[1]), bytes(r[2]), int(r[3]), r[4], None if r[5] is None else int(r[5]),
                      None if r[6] is None else int(r[6]))


def objects_copied(conn: Conn, locations: Iterable[str] | None = None) -> dict[str, ObjectCopy]:
    """The recorded copies (of these locations only, when given) by location."""
    with conn.cursor() as cur:
        if locations is None:
            cur.execute(sql.SQL("SELECT {} FROM {}").format(_COPY_COLUMNS, relation("object_copy")))
        else:
            cur.execute(sql.SQL("SELECT {} FROM {} WHERE location = ANY(%s)").format(
                _COPY_COLUMNS, relation("object_copy")), (list(locations),))
        return {r[0]: _copy(r) for r in cur.fetchall()}


def record_objects(conn: Conn, copies: list[ObjectCopy]) -> None:
    if not copies:
        return
    with conn.cursor() as cur:
        cur.executemany(
            sql.SQL("INSERT INTO {} ({}, copied_at) VALUES (%s, %s, %s, %s, %s, %s, %s, clock_timestamp()) "
                    "ON CONFLICT (location) DO UPDATE SET size = excluded.size, sha256 = excluded.sha256, "
                    "mtime_ns = excluded.mtime_ns, key = excluded.key, source_size = excluded.source_size, "
                    "source_mtime_ns = excluded.source_mtime_ns, copied_at = clock_timestamp()").format(
                relation("object_copy"), _COPY_COLUMNS),
            [(c.location, c.size, c.sha256, c.mtime_ns, c.key, c.source_size, c.source_mtime_ns) for c in copies],
        )


def clock(conn: Conn) -> dt.datetime:
    """The target's clock now: a pass that starts here leaves alone the copies recorded after (by another run)."""
    row = conn.execute("SELECT clock_timestamp()").fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


def copies_of_keys(conn: Conn, keys: list[str], before: dt.datetime) -> list[ObjectCopy]:
    """The copies recorded before `before` for rows with these keys."""
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT {} FROM {} WHERE key = ANY(%s) AND copied_at < %s").format(
            _COPY_COLUMNS, relation("object_copy")), (keys, before))
        return [_copy(r) for r in cur.fetchall()]


def copies_not_listed(conn: Conn, listed: sql.Composable, before: dt.datetime) -> list[ObjectCopy]:
    """The copies recorded before `before` whose location is not in the table `listed` (a column `location`)."""
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT {} FROM {} AS c WHERE c.copied_at < %s AND NOT EXISTS "
                            "(SELECT FROM {} AS l WHERE l.location = c.location)").format(
            _C_COPY_COLUMNS, relation("object_copy"), listed), (before,))
        return [_copy(r) for r in cur.fetchall()]


# --- the quarantine -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class QuarantineEntry:
    id: int
    key: str | None
    location: str
    name: str
    """Its name in the quarantine folder: `<id>-<the location's file name>`."""
    root: str
    """The quarantine folder when it was moved."""
    recorded_at: dt.datetime
    moved_at: dt.datetime | None
    outcome: str
    """'moving' (recorded, not yet renamed), 'quarantined', 'absent' (the file was gone), 'emptied'."""
    emptied_at: dt.datetime | None = None
    emptied_by: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "key": self.key, "location": self.location, "name": self.name, "root": self.root,
                "recorded_at": self.recorded_at.isoformat(),
                "moved_at": self.moved_at.isoformat() if self.moved_at else None, "outcome": self.outcome,
                "emptied_at": self.emptied_at.isoformat() if self.emptied_at else None,
                "emptied_by": self.emptied_by}


_Q_COLUMNS = sql.SQL("id, key, location, name, root, recorded_at, moved_at, outcome, emptied_at, emptied_by")


def record_quarantine(conn: Conn, copy: ObjectCopy, root: str, before: dt.datetime) -> QuarantineEntry | None:
    """Record that the file of `copy` goes to the quarantine (as `<id>-<file name>`), and forget the copy, in one
    statement the caller commits before it moves the file. None when the copy is no longer recorded as it was before `before` (another
    run quarantined it, or copied it again since): nothing to move then."""
    row = conn.execute(sql.SQL(
        "WITH gone AS (DELETE FROM {copy} WHERE location = %(location)s AND copied_at < %(before)s "
        "              RETURNING location, key), "
        "     n AS (SELECT nextval(pg_get_serial_sequence(%(q)s, 'id')) AS id) "
        "INSERT INTO {q} (id, key, location, name, root) "
        "SELECT n.id, gone.key, gone.location, n.id::text || '-' || regexp_replace(gone.location, '^.*/', ''), "
        "       %(root)s FROM gone, n "
        "RETURNING {cols}").format(copy=relation("object_copy"), q=relation("object_quarantine"), cols=_Q_COLUMNS),
        {"location": copy.location, "before": before, "root": root,
         "q": relation("object_quarantine").as_string()}).fetchone()
    return None if row is None else QuarantineEntry(*row)


def quarantine_done(conn: Conn, entry_id: int, outcome: str) -> None:
    """The move recorded as `entry_id` is over: 'quarantined', or 'absent' when there was no file to move."""
    conn.execute(sql.SQL("UPDATE {} SET outcome = %s, moved_at = clock_timestamp() WHERE id = %s").format(
        relation("object_quarantine")), (outcome, entry_id))


def quarantine_emptied(conn: Conn, entry_id: int, audit_id: int | None) -> None:
    conn.execute(sql.SQL("UPDATE {} SET outcome = 'emptied', emptied_at = clock_timestamp(), emptied_by = %s "
                         "WHERE id = %s").format(relation("object_quarantine")), (audit_id, entry_id))


def quarantine_entries(conn: Conn, outcomes: Iterable[str] = ("moving", "quarantined")) -> list[QuarantineEntry]:
    """The quarantine's entries with these outcomes, oldest first (none before revision 0012)."""
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{CONTROL_SCHEMA}.object_quarantine",))
        row = cur.fetchone()
        if not row or not row[0]:
            return []
        cur.execute(sql.SQL("SELECT {} FROM {} WHERE outcome = ANY(%s) ORDER BY id").format(
            _Q_COLUMNS, relation("object_quarantine")), (list(outcomes),))
        return [QuarantineEntry(*r) for r in cur.fetchall()]


# --- where objects sync --follow stands in the delta log ------------------------------------------------------------

@dataclass(frozen=True)
class ObjectPosition:
    snapshot: str
    """The snapshot of the last pass on the legacy database: the next reads the rows changed since."""
    log_children: dict[str, int] | None
    """The delta log's children as that pass saw them (child -> its file): one rewritten since was truncated."""
    passed_at: dt.datetime
    full_at: dt.datetime
    """When a pass last listed every object."""


def objects_position(conn: Conn) -> ObjectPosition | None:
    row = conn.execute(sql.SQL("SELECT snapshot, log_children, passed_at, full_at FROM {} WHERE id = 1").format(
        relation("object_follow"))).fetchone()
    return None if row is None else ObjectPosition(row[0], row[1], row[2], row[3])


def save_objects_position(conn: Conn, snapshot: str, log_children: dict[str, int] | None, *, full: bool) -> None:
    conn.execute(sql.SQL(
        "INSERT INTO {} AS f (id, snapshot, log_children) VALUES (1, %s, %s) ON CONFLICT (id) DO UPDATE "
        "SET snapshot = excluded.snapshot, log_children = excluded.log_children, passed_at = clock_timestamp(), "
        "full_at = CASE WHEN %s THEN clock_timestamp() ELSE f.full_at END").format(relation("object_follow")),
        (snapshot, Jsonb(log_children), full))
