"""Row parity between the legacy (source) and the new (target) database: `migrator verify`.

For every migrating table both servers send one short record per row through a server-side cursor, in the same
order, and Python merges the two streams, so memory stays bounded whatever the size of the table:

* a table with a key sends `(key, md5 of the row text)` ordered by key; a key on one side only is a row missing on, or
  extra on, the target, and a key whose hashes differ is a row that differs;
* a table without a key sends `(md5 of the row text, count)` grouped and ordered by hash, and is compared as a
  multiset, so that duplicate rows count.

The row text is `ROW(<source columns>)::text` under the pinned output settings of `migrator.db`, identical on both
sides for equal values (float -0, NaN and infinities, bytea, jsonb included). It is built from the source's column
list, so a target whose columns are in another order, or which has columns of its own, still compares what migrated.

A merge is only correct if both streams arrive in an order Python can reproduce. Integer and uuid keys are ordered by
their typed value (Python ints and UUIDs order the same way, and the primary key index can serve the scan); every
other key column is ordered by the UTF-8 bytes of its text form, which neither side's collation nor encoding can
change. The merge checks the order as it goes and refuses to report on a stream that breaks it.

The report names rows by their key values (or, without a key, by their row hash) and never carries other column
values, unless the operator asks for them with `show_values`.
"""

from __future__ import annotations

import contextlib
import json
import queue
import threading
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import psycopg
from psycopg import sql

from migrator import catalog, db, log
from migrator.catalog import Table
from migrator.config import Config, redact
from migrator.errors import MigratorError

MAX_LISTED = 100
"""Differences listed per table; the rest are only counted."""
_PROGRESS_EVERY = 50_000
_BATCH = 10_000
_PREFETCH = 2

Status = Literal["identical", "different", "error"]
Kind = Literal["missing", "extra", "different"]
_KIND_TEXT = {"missing": "missing on target", "extra": "extra on target", "different": "different"}


@dataclass(frozen=True)
class RowDifference:
    """One row (or, without a key, one distinct row) that is not the same on both sides."""

    kind: Kind
    """"missing": on the source only (or fewer copies on the target); "extra": the reverse; "different": same key,
    other values."""
    key: tuple[str, ...]
    """Text forms of the key columns; empty for a table without a key."""
    row_md5: str | None = None
    """For a table without a key: md5 of the row text, which identifies the row without showing it."""
    source_count: int = 1
    target_count: int = 1
    source_row: str | None = None
    """The row text on each side: only with `show_values`."""
    target_row: str | None = None

    def to_dict(self, key_columns: Sequence[str]) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind}
        if self.row_md5 is None:
            d["key"] = dict(zip(key_columns, self.key, strict=True))
        else:
            d["row_md5"] = self.row_md5
            d["source_count"] = self.source_count
            d["target_count"] = self.target_count
        if self.source_row is not None or self.target_row is not None:
            d["source_row"] = self.source_row
            d["target_row"] = self.target_row
        return d


@dataclass(frozen=True)
class TableParity:
    name: str
    status: Status
    key_columns: tuple[str, ...] = ()
    """Columns that identify a row; empty when the table was compared as a multiset of rows."""
    source_rows: int | None = None
    target_rows: int | None = None
    difference_count: int = 0
    """All differences found; at most MAX_LISTED of them are in `differences`."""
    differences: tuple[RowDifference, ...] = ()
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "key_columns": list(self.key_columns),
            "source_rows": self.source_rows,
            "target_rows": self.target_rows,
            "difference_count": self.difference_count,
            "differences": [d.to_dict(self.key_columns) for d in self.differences],
            "error": self.error,
        }


@dataclass(frozen=True)
class ParityReport:
    source: str
    """host:port/dbname of each side (never a password)."""
    target: str
    tables: tuple[TableParity, ...]
    show_values: bool = False

    @property
    def identical(self) -> bool:
        return all(t.status == "identical" for t in self.tables)

    @property
    def exit_code(self) -> int:
        """0 identical; 1 rows differ; 2 some table could not be verified (which outweighs differences found)."""
        if any(t.status == "error" for t in self.tables):
            return 2
        return 0 if self.identical else 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "target": self.target,
            "identical": self.identical,
            "exit_code": self.exit_code,
            "tables": [t.to_dict() for t in self.tables],
        }

    def render_text(self) -> str:
        lines = [f"verify {self.source} (source) against {self.target} (target)"]
        width = max((len(t.name) for t in self.tables), default=0)
        for t in self.tables:
            lines.extend(_render_table(t, width))
        counts = {s: sum(1 for t in self.tables if t.status == s) for s in ("identical", "different", "error")}
        lines.append(
            f"{len(self.tables)} table(s): {counts['identical']} identical, {counts['different']} different, "
            f"{counts['error']} not verified"
        )
        return "\n".join(lines)


def _render_table(t: TableParity, width: int) -> list[str]:
    head = {"identical": "identical", "different": "DIFFERENT", "error": "ERROR"}[t.status]
    if t.status == "error":
        return [f"  {head:<9}  {t.name:<{width}}  {t.error}"]
    rows = f"{t.source_rows:,} rows" if t.source_rows == t.target_rows else (
        f"{t.source_rows:,} rows on source, {t.target_rows:,} on target"
    )
    if t.status == "identical":
        return [f"  {head:<9}  {t.name:<{width}}  {rows}"]
    lines = [f"  {head:<9}  {t.name:<{width}}  {rows}; {t.difference_count:,} difference(s)"]
    for d in t.differences:
        if d.row_md5 is not None:
            ident = f"row md5 {d.row_md5}: {d.source_count} on source, {d.target_count} on target"
        else:
            ident = ", ".join(f"{c}={_show_key(v)}" for c, v in zip(t.key_columns, d.key, strict=True))
        lines.append(f"      {_KIND_TEXT[d.kind]:<17}  {ident}")
        if d.source_row is not None:
            lines.append(f"          source: {d.source_row}")
        if d.target_row is not None:
            lines.append(f"          target: {d.target_row}")
    if t.difference_count > len(t.differences):
        lines.append(f"      ... and {t.difference_count - len(t.differences):,} more")
    return lines


def _show_key(value: str) -> str:
    return value if value.lstrip("-").isdigit() else json.dumps(value, ensure_ascii=False)


def verify(cfg: Config, *, tables: list[str] | None = None, show_values: bool = False,
           progress: Callable[[str, int], None] | None = None) -> ParityReport:
    """Compare every row of the migrating tables (or of `tables`, "schema.table" names) on source and target.

    `progress(table, rows)` is called now and then from the worker threads with the rows compared so far.
    Raises ConnectionFailed if either database cannot be reached; any other failure is reported per table.
    """
    with db.session(cfg.source_dsn, role="source") as conn:
        source_tables = catalog.list_tables(conn, cfg.tables)
    with db.session(cfg.target_dsn, role="target") as conn:
        target_tables = {(t.schema, t.name): t for t in catalog.list_tables(conn, cfg.tables)}

    results: list[TableParity | None] = []
    jobs: queue.SimpleQueue[tuple[int, Table, Table | None]] = queue.SimpleQueue()
    if tables is None:
        chosen: list[Table] = source_tables
    else:
        by_name = {t.display: t for t in source_tables}
        chosen = [by_name[name] for name in dict.fromkeys(tables) if name in by_name]
    for t in chosen:
        jobs.put((len(results), t, target_tables.get((t.schema, t.name))))
        results.append(None)
    unknown = [name for name in dict.fromkeys(tables or []) if name not in {t.display for t in chosen}]
    results.extend(
        TableParity(name, "error", error=f"{name} is not a migrating table of the source") for name in unknown
    )

    workers = max(1, min(cfg.copy.workers, len(chosen)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="verify") as pool:
        futures = [pool.submit(_work, cfg, jobs, results, show_values, progress) for _ in range(workers)]
        for f in futures:
            f.result()
    done = tuple(r for r in results if r is not None)
    assert len(done) == len(results)
    return ParityReport(db.describe_dsn(cfg.source_dsn), db.describe_dsn(cfg.target_dsn), done, show_values)


class _Pair:
    """A worker's own source and target sessions: read-only, one repeatable-read snapshot per table."""

    def __init__(self, cfg: Config) -> None:
        self._cfg = cfg
        self._conns: tuple[psycopg.Connection[Any], psycopg.Connection[Any]] | None = None

    def open(self) -> tuple[psycopg.Connection[Any], psycopg.Connection[Any]]:
        if self._conns is None:
            source = db.connect(self._cfg.source_dsn, role="source", application_name="migrator-verify")
            try:
                target = db.connect(self._cfg.target_dsn, role="target", application_name="migrator-verify")
            except BaseException:
                source.close()
                raise
            for conn in (source, target):
                conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
                conn.read_only = True
            self._conns = (source, target)
        return self._conns

    def end_table(self) -> None:
        if self._conns is not None:
            for conn in self._conns:
                conn.rollback()

    def close(self) -> None:
        if self._conns is not None:
            for conn in self._conns:
                conn.close()
            self._conns = None


def _work(cfg: Config, jobs: queue.SimpleQueue[tuple[int, Table, Table | None]],
          results: list[TableParity | None], show_values: bool,
          progress: Callable[[str, int], None] | None) -> None:
    pair = _Pair(cfg)
    try:
        while True:
            try:
                index, table, target = jobs.get_nowait()
            except queue.Empty:
                return
            logger = log.get(phase="verify", table=table.display)
            try:
                source_conn, target_conn = pair.open()
                result = _verify_table(source_conn, target_conn, table, target, show_values, progress)
                pair.end_table()
            except (psycopg.Error, MigratorError) as exc:
                # After a failure mid-stream the sessions' state is unknown: start the next table on fresh ones.
                pair.close()
                result = TableParity(table.display, "error", key_columns=table.key, error=_message(exc))
            if result.status == "error":
                logger.warning("table not verified", error=result.error)
            else:
                logger.info(
                    "table verified", status=result.status, source_rows=result.source_rows,
                    target_rows=result.target_rows, differences=result.difference_count,
                )
            results[index] = result
    finally:
        pair.close()


def _message(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, psycopg.Error) and exc.sqlstate:
        text = f"{text} (SQLSTATE {exc.sqlstate})"
    return redact(text)


@dataclass(frozen=True)
class _KeyColumn:
    """How one key column is streamed: ordered by its typed value ("integer", "uuid") or by its text's UTF-8 bytes."""

    name: str
    mode: Literal["integer", "uuid", "text"]

    @property
    def expression(self) -> sql.Composable:
        """What is selected and ordered by; a typed column keeps its index usable for the ordered scan."""
        col = sql.Identifier(self.name)
        return col if self.mode != "text" else sql.SQL("convert_to({}::text, 'UTF8')").format(col)

    def text(self, value: Any) -> str:
        return value.decode("utf-8", "replace") if self.mode == "text" else str(value)


_INTEGER_TYPES = frozenset({"smallint", "integer", "bigint"})


def _key_columns(source: Table, target: Table) -> tuple[_KeyColumn, ...]:
    target_types = {c.name: c.type for c in target.columns}
    source_types = {c.name: c.type for c in source.columns}
    result = []
    for name in source.key:
        s, t = source_types[name], target_types[name]
        if s in _INTEGER_TYPES and t in _INTEGER_TYPES:
            result.append(_KeyColumn(name, "integer"))
        elif s == t == "uuid":
            result.append(_KeyColumn(name, "uuid"))
        else:
            result.append(_KeyColumn(name, "text"))
    return tuple(result)


def _row_text(table: Table) -> sql.Composed:
    return sql.SQL("ROW({})::text").format(sql.SQL(", ").join(sql.Identifier(c.name) for c in table.columns))


def _verify_table(source_conn: psycopg.Connection[Any], target_conn: psycopg.Connection[Any], table: Table,
                  target: Table | None, show_values: bool,
                  progress: Callable[[str, int], None] | None) -> TableParity:
    if target is None:
        return TableParity(table.display, "error", key_columns=table.key,
                           error=f"{table.display} does not exist on the target")
    lacking = [c.name for c in table.columns if c.name not in {tc.name for tc in target.columns}]
    if lacking:
        return TableParity(table.display, "error", key_columns=table.key,
                           error=f"the target table lacks column(s) {', '.join(lacking)}")
    row = _row_text(table)
    if table.key:
        keys = _key_columns(table, target)
        key_list = sql.SQL(", ").join(k.expression for k in keys)
        query = sql.SQL("SELECT {keys}, decode(md5({row}), 'hex') FROM ONLY {table} ORDER BY {keys}").format(
            keys=key_list, row=row, table=table.ident,
        )
        width, weighted = len(keys), False
    else:
        query = sql.SQL(
            "SELECT decode(md5({row}), 'hex') AS h, count(*) FROM ONLY {table} GROUP BY 1 ORDER BY 1"
        ).format(row=row, table=table.ident)
        width, weighted = 1, True

    report = None if progress is None else (lambda rows: progress(table.display, rows))
    source = _Stream(source_conn, query, width, weighted, "source", report)
    target_stream = _Stream(target_conn, query, width, weighted, "target")
    listed: list[tuple[Any, Any, Any]] = []
    count = 0
    with contextlib.closing(source), contextlib.closing(target_stream):
        for difference in _merge(source, target_stream):
            count += 1
            if len(listed) < MAX_LISTED:
                listed.append(difference)
    if report is not None:
        report(source.rows)

    if table.key:
        differences = [_keyed_difference(keys, *d) for d in listed]
        if show_values and differences:
            differences = _with_keyed_values(source_conn, target_conn, table, differences)
    else:
        differences = [_multiset_difference(*d) for d in listed]
        if show_values and differences:
            differences = _with_multiset_values(source_conn, target_conn, table, differences)
    return TableParity(
        table.display, "identical" if count == 0 else "different", key_columns=table.key,
        source_rows=source.rows, target_rows=target_stream.rows, difference_count=count,
        differences=tuple(differences),
    )


class _Stream:
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


def _merge(source: Iterable[tuple[Any, Any]], target: Iterable[tuple[Any, Any]]) -> Iterator[tuple[Any, Any, Any]]:
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


def _keyed_difference(keys: Sequence[_KeyColumn], key: tuple[Any, ...], source_hash: bytes | None,
                      target_hash: bytes | None) -> RowDifference:
    kind: Kind = "missing" if target_hash is None else "extra" if source_hash is None else "different"
    return RowDifference(
        kind, tuple(k.text(v) for k, v in zip(keys, key, strict=True)),
        source_count=int(source_hash is not None), target_count=int(target_hash is not None),
    )


def _multiset_difference(key: tuple[bytes], source_count: int | None, target_count: int | None) -> RowDifference:
    s, t = source_count or 0, target_count or 0
    return RowDifference("missing" if s > t else "extra", (), row_md5=key[0].hex(), source_count=s, target_count=t)


def _with_keyed_values(source_conn: psycopg.Connection[Any], target_conn: psycopg.Connection[Any], table: Table,
                       differences: list[RowDifference]) -> list[RowDifference]:
    """Fetch the row text on each side for the listed keys (operator asked), one index lookup per key and side."""
    # The key's text form is sent untyped, so each server reads it as its own column's type and can use its index.
    query = sql.SQL("SELECT {row} FROM ONLY {table} WHERE {match}").format(
        row=_row_text(table), table=table.ident,
        match=sql.SQL(" AND ").join(sql.SQL("{} = %s").format(sql.Identifier(c)) for c in table.key),
    )

    def lookup(conn: psycopg.Connection[Any], key: tuple[str, ...]) -> str | None:
        with conn.cursor() as cur:
            found = cur.execute(query, key).fetchone()
        return None if found is None else str(found[0])

    return [
        RowDifference(d.kind, d.key, source_count=d.source_count, target_count=d.target_count,
                      source_row=lookup(source_conn, d.key) if d.source_count else None,
                      target_row=lookup(target_conn, d.key) if d.target_count else None)
        for d in differences
    ]


def _with_multiset_values(source_conn: psycopg.Connection[Any], target_conn: psycopg.Connection[Any],
                          table: Table, differences: list[RowDifference]) -> list[RowDifference]:
    """Fetch the row text behind each listed row hash (operator asked): one scan per side."""
    query = sql.SQL(
        "SELECT DISTINCT ON (h) h, r FROM (SELECT md5(r) AS h, r FROM (SELECT {row} AS r FROM ONLY {table}) AS rows)"
        " AS hashed WHERE h = ANY(%s)"
    ).format(row=_row_text(table), table=table.ident)

    def rows(conn: psycopg.Connection[Any], side: str) -> dict[str, str]:
        wanted = [d.row_md5 for d in differences if getattr(d, f"{side}_count")]
        if not wanted:
            return {}
        with conn.cursor() as cur:
            return {h: r for h, r in cur.execute(query, (wanted,))}

    on_source, on_target = rows(source_conn, "source"), rows(target_conn, "target")
    return [
        RowDifference(d.kind, d.key, row_md5=d.row_md5, source_count=d.source_count, target_count=d.target_count,
                      source_row=on_source.get(d.row_md5 or ""), target_row=on_target.get(d.row_md5 or ""))
        for d in differences
    ]
