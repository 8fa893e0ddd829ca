"""The row streams of a leaf: one side's rows as (key, value) through a server-side cursor, read ahead by a thread
and checked to arrive in key order (`Stream`), and the merge of the two sides' streams (`merge`).

A table with a key sends `(key, md5 of the row form)` ordered by key; a key on one side only is a row missing on, or
extra on, the target, and a key whose hashes differ is a row that differs. A table without a key sends `(md5 of the
row form, count)` grouped and ordered by hash, and is compared as a multiset, so that duplicate rows count. The merge
is only correct if both streams arrive in an order Python can reproduce (see `planning.KeyColumn`): each stream
checks the order as it goes and refuses to report on one that breaks it.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any

import psycopg
from psycopg import sql

from migrator.errors import MigratorError

_PROGRESS_EVERY = 50_000
_BATCH = 10_000
_PREFETCH = 2


class Stream:
    """One side's rows as (key, value), counted and checked to arrive in strictly ascending key order.

    `value` is the row hash (a table with a key) or the number of copies of the row (`weighted`, no key). Rows come
    through a binary server-side cursor in batches (far less client CPU than COPY, which hands rows over one by one),
    fetched ahead by a reader thread so that both servers keep working while Python merges; at most _PREFETCH batches
    wait in memory.
    """

    def __init__(self, conn: psycopg.Connection[Any], query: sql.Composed, width: int, weighted: bool, side: str,
                 progress: Callable[[int], None] | None = None) -> None:
        self._conn, self._query = conn, query
        self._width, self._weighted, self._side = width, weighted, side
        self._progress = progress
        self._rows: Generator[tuple[tuple[Any, ...], Any], None, None] | None = None
        self.rows = 0

    def __iter__(self) -> Iterator[tuple[tuple[Any, ...], Any]]:
        self._rows = self._stream()
        return self._rows

    def close(self) -> None:
        """Stop reading (if a comparison failed half-way): returns once the reader has let go of the connection."""
        if self._rows is not None:
            self._rows.close()

    def _stream(self) -> Generator[tuple[tuple[Any, ...], Any], None, None]:
        width, weighted, progress = self._width, self._weighted, self._progress
        previous: tuple[Any, ...] | None = None
        next_report = _PROGRESS_EVERY
        batches: queue.Queue[list[Any] | BaseException | None] = queue.Queue(maxsize=_PREFETCH)
        stop = threading.Event()
        reader = threading.Thread(target=self._read, args=(batches, stop), name=f"verify-{self._side}", daemon=True)
        reader.start()
        try:
            while (batch := batches.get()) is not None:
                if isinstance(batch, BaseException):
                    raise batch
                for record in batch:
                    key, value = record[:width], record[width]
                    if None in key:
                        raise MigratorError(
                            f"the {self._side} has a row whose key is NULL, so rows cannot be told apart by key: "
                            "restore the table's primary key (or unique index) there, then verify again"
                        )
                    if previous is not None and not previous < key:
                        raise MigratorError(
                            f"the {self._side} sent rows out of key order; the comparison would be wrong, so it "
                            "stopped"
                        )
                    previous = key
                    self.rows += value if weighted else 1
                    yield key, value
                if progress is not None and self.rows >= next_report:
                    progress(self.rows)
                    next_report = self.rows + _PROGRESS_EVERY
        finally:
            # Stopped early or done: let the reader finish with the connection before anyone else uses it.
            stop.set()
            while reader.is_alive():
                with contextlib.suppress(queue.Empty):
                    batches.get(timeout=0.1)
            reader.join()

    def _read(self, batches: queue.Queue[list[Any] | BaseException | None], stop: threading.Event) -> None:
        try:
            with self._conn.cursor() as cur:
                # Every row is read: plan for the whole result, not for the first rows as a cursor otherwise would.
                cur.execute("SET LOCAL cursor_tuple_fraction = 1.0")
            with self._conn.cursor(name=f"migrator_verify_{self._side}", binary=True) as cur:
                cur.execute(self._query)
                while not stop.is_set() and (batch := cur.fetchmany(_BATCH)):
                    batches.put(batch)
            batches.put(None)
        except BaseException as exc:  # handed to the consuming thread, which raises it
            batches.put(exc)


def merge(source: Iterable[tuple[Any, Any]], target: Iterable[tuple[Any, Any]]) -> Iterator[tuple[Any, Any, Any]]:
    """Merge two streams ascending by key; yield (key, source value, target value) where they differ (None: absent)."""
    end = object()
    src, tgt = iter(source), iter(target)
    s: Any = next(src, end)
    t: Any = next(tgt, end)
    while s is not end or t is not end:
        if t is end or (s is not end and s[0] < t[0]):
            yield s[0], s[1], None
            s = next(src, end)
        elif s is end or t[0] < s[0]:
            yield t[0], None, t[1]
            t = next(tgt, end)
        else:
            if s[1] != t[1]:
                yield s[0], s[1], t[1]
            s, t = next(src, end), next(tgt, end)


