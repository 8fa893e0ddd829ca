"""Which files `objects sync` has written (or found identical) in the target store: the SHA-256 it proved, and the
size and modification time the file had then, so that a resumed run skips it without reading it again."""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql

from migrator.state.control import Conn, relation


@dataclass(frozen=True)
class ObjectCopy:
    location: str
    size: int
    sha256: bytes
    mtime_ns: int


def objects_copied(conn: Conn) -> dict[str, ObjectCopy]:
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT location, size, sha256, mtime_ns FROM {}").format(relation("object_copy")))
        return {r[0]: ObjectCopy(r[0], int(r[1]), bytes(r[2]), int(r[3])) for r in cur.fetchall()}


def record_objects(conn: Conn, copies: list[ObjectCopy]) -> None:
    if not copies:
        return
    with conn.cursor() as cur:
        cur.executemany(
            sql.SQL("INSERT INTO {} (location, size, sha256, mtime_ns) VALUES (%s, %s, %s, %s) "
                    "ON CONFLICT (location) DO UPDATE SET size = excluded.size, sha256 = excluded.sha256, "
                    "mtime_ns = excluded.mtime_ns, copied_at = now()").format(relation("object_copy")),
            [(c.location, c.size, c.sha256, c.mtime_ns) for c in copies],
        )
