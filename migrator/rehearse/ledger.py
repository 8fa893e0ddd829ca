"""The generic workload's ledger: what one writer saw committed, kept on disk (SQLite, a file per writer) so that
memory does not grow with the length of a rehearsal, and read back in batches by the check.

A writer records, once its transaction has committed: each row it inserted (its key as text, and the md5 of the
whole row as text) and each it deleted again; for each row it updated, the md5 of the value it set, per column;
for each row image of a table without a key whose copies it inserted or deleted, how many rows carry that image.
The last record of a key wins: the writers' shares of the rows are disjoint (see `generic`), so one writer's file
holds the whole history of its keys. A commit whose outcome is unknown (the connection broke during COMMIT) marks
what it touched unknown: the check skips it. Keys and digests only; never a row value.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

PRESENT, GONE, UNKNOWN = "present", "gone", "unknown"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS inserted (tbl INTEGER, key TEXT, digest TEXT, state TEXT, PRIMARY KEY (tbl, key));
CREATE TABLE IF NOT EXISTS updated (tbl INTEGER, key TEXT, col TEXT, digest TEXT, known INTEGER,
                                    PRIMARY KEY (tbl, col, key));
CREATE TABLE IF NOT EXISTS images (tbl INTEGER, image TEXT, expected INTEGER, PRIMARY KEY (tbl, image));
"""

Key = tuple[str, ...]


class Ledger:
    """One writer's ledger file; `Ledger(path)` opens (or creates) it."""

    def __init__(self, path: Path | str) -> None:
        self.db = sqlite3.connect(str(path))
        # What matters is the file once the writer has closed it; nothing needs to survive a crash of this host.
        self.db.execute("PRAGMA synchronous = OFF")
        self.db.execute("PRAGMA journal_mode = MEMORY")
        self.db.executescript(_SCHEMA)

    def inserted(self, tbl: int, key: Key, digest: str | None) -> None:
        self.db.execute("INSERT OR REPLACE INTO inserted VALUES (?, ?, ?, ?)", (tbl, _k(key), digest, PRESENT))

    def deleted(self, tbl: int, key: Key) -> None:
        self.db.execute("INSERT OR REPLACE INTO inserted VALUES (?, ?, NULL, ?)", (tbl, _k(key), GONE))

    def updated(self, tbl: int, key: Key, column: str, digest: str | None, *, known: bool = True) -> None:
        self.db.execute("INSERT OR REPLACE INTO updated VALUES (?, ?, ?, ?, ?)",
                        (tbl, _k(key), column, digest, int(known)))

    def image(self, tbl: int, image: str, expected: int | None) -> None:
        """How many rows carry `image` once this commit is in (None: unknown from now on)."""
        self.db.execute("INSERT OR REPLACE INTO images VALUES (?, ?, ?)", (tbl, image, expected))

    def unknown(self, tbl: int, key: Key) -> None:
        self.db.execute("INSERT OR REPLACE INTO inserted VALUES (?, ?, NULL, ?)", (tbl, _k(key), UNKNOWN))

    def commit(self) -> None:
        self.db.commit()

    def close(self) -> None:
        self.db.commit()
        self.db.close()

    # Reading back, in batches --------------------------------------------------------------------------------

    def inserted_rows(self, size: int) -> Iterator[tuple[int, list[tuple[Key, str | None, str]]]]:
        """(table, [(key, digest, state), ...]) in batches of at most `size`, one table at a time."""
        rows = self.db.execute("SELECT tbl, key, digest, state FROM inserted ORDER BY tbl, key")
        return _batches(((r[0], (_key(r[1]), r[2], r[3])) for r in rows), size)

    def updated_rows(self, size: int) -> Iterator[tuple[tuple[int, str], list[tuple[Key, str | None]]]]:
        """((table, column), [(key, digest), ...]) for the updates whose commit is known, in batches."""
        rows = self.db.execute("SELECT tbl, col, key, digest FROM updated WHERE known = 1 ORDER BY tbl, col, key")
        return _batches((((r[0], r[1]), (_key(r[2]), r[3])) for r in rows), size)

    def image_rows(self, size: int) -> Iterator[tuple[int, list[tuple[str, int]]]]:
        """(table, [(image, expected count), ...]) for the images whose count is known, in batches."""
        rows = self.db.execute("SELECT tbl, image, expected FROM images WHERE expected IS NOT NULL ORDER BY tbl, image")
        return _batches(((r[0], (r[1], int(r[2]))) for r in rows), size)

    def unknown_count(self) -> int:
        row = self.db.execute(
            "SELECT (SELECT count(*) FROM inserted WHERE state = ?) + (SELECT count(*) FROM updated WHERE known = 0)"
            " + (SELECT count(*) FROM images WHERE expected IS NULL)", (UNKNOWN,)).fetchone()
        return int(row[0]) if row else 0


def _k(key: Key) -> str:
    return json.dumps(list(key), ensure_ascii=False)


def _key(text: str) -> Key:
    return tuple(json.loads(text))


G = TypeVar("G")
T = TypeVar("T")


def _batches(pairs: Iterable[tuple[G, T]], size: int) -> Iterator[tuple[G, list[T]]]:
    """Consecutive items of one group, at most `size` at a time: (group, [item, ...])."""
    group: G | None = None
    items: list[T] = []
    for g, item in pairs:
        if items and (g != group or len(items) >= size):
            assert group is not None
            yield group, items
            items = []
        group = g
        items.append(item)
    if items and group is not None:
        yield group, items
