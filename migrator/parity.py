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
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import psycopg
from psycopg import sql

from migrator import catalog, db, log, state
from migrator.catalog import Table
from migrator.config import CAPTURE_SCHEMA, Config, redact
from migrator.errors import MigratorError

MAX_LISTED = 100
"""Differences listed per table; the rest are only counted."""
LIVE_WAIT = 120.0
"""How long a live verify waits for sync to pass the first pass's snapshot before it reports rows still in flight."""
_PROGRESS_EVERY = 50_000
_BATCH = 10_000
_PREFETCH = 2

Status = Literal["identical", "in_flight", "different", "error"]
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
    ranges: int = 0
    """Key ranges digested in the first pass."""
    ranges_different: int = 0
    """Of those, ranges whose digests differed (then split again and listed by key)."""
    passes: int = 0
    """Digest passes over the table: the first, plus one per bisection."""
    in_flight: int = 0
    """Rows (or distinct rows) that differed only because the source changed them after the target's sync position:
    verify ran while sync was following. Not differences."""
    rechecked: bool = False
    """The differing ranges were read again once sync had passed the first pass's source snapshot."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ranges": self.ranges,
            "ranges_different": self.ranges_different,
            "passes": self.passes,
            "in_flight": self.in_flight,
            "rechecked": self.rechecked,
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
        """0 identical (rows in flight aside); 1 rows differ; 2 some table could not be verified (which outweighs
        differences found)."""
        if any(t.status == "error" for t in self.tables):
            return 2
        return 1 if any(t.status == "different" for t in self.tables) else 0

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
        counts = {s: sum(1 for t in self.tables if t.status == s)
                  for s in ("identical", "in_flight", "different", "error")}
        in_flight = f"{counts['in_flight']} in flight, " if counts["in_flight"] else ""
        lines.append(
            f"{len(self.tables)} table(s): {counts['identical']} identical, {in_flight}{counts['different']} "
            f"different, {counts['error']} not verified"
        )
        return "\n".join(lines)


def _render_table(t: TableParity, width: int) -> list[str]:
    head = {"identical": "identical", "in_flight": "in flight", "different": "DIFFERENT", "error": "ERROR"}[t.status]
    if t.status == "error":
        return [f"  {head:<9}  {t.name:<{width}}  {t.error}"]
    rows = f"{t.source_rows:,} rows" if t.source_rows == t.target_rows else (
        f"{t.source_rows:,} rows on source, {t.target_rows:,} on target"
    )
    ranges = f"; {t.ranges_different:,} of {t.ranges:,} key ranges differed" if t.ranges_different else ""
    flight = f"; {t.in_flight:,} row(s) in flight (changed on the source, not yet applied)" if t.in_flight else ""
    if t.status in ("identical", "in_flight"):
        return [f"  {head:<9}  {t.name:<{width}}  {rows}{flight}"]
    lines = [f"  {head:<9}  {t.name:<{width}}  {rows}; {t.difference_count:,} difference(s){ranges}{flight}"]
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
           progress: Callable[[str, int], None] | None = None, live_wait: float = LIVE_WAIT) -> ParityReport:
    """Compare every row of the migrating tables (or of `tables`, "schema.table" names) on source and target.

    While sync is following (the target has an applied position and the source a delta log), rows that differ only
    because of changes not yet applied are counted as in flight, and their ranges are read again once sync has
    passed the first pass's snapshot (waiting at most `live_wait` seconds).
    `progress(table, rows)` is called now and then from the worker threads with the rows compared so far.
    Raises ConnectionFailed if either database cannot be reached; any other failure is reported per table.
    """
    with db.session(cfg.source_dsn, role="source") as conn:
        source_tables = catalog.list_tables(conn, cfg.tables)
        live = _has_delta_log(conn)
    with db.session(cfg.target_dsn, role="target") as conn:
        target_tables = {(t.schema, t.name): t for t in catalog.list_tables(conn, cfg.tables)}
        live = live and state.exists(conn) and state.position(conn) is not None

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
    rechecks: list[_Recheck] = []
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="verify") as pool:
        futures = [pool.submit(_work, cfg, jobs, results, show_values, progress, live, rechecks)
                   for _ in range(workers)]
        for f in futures:
            f.result()
    if rechecks:
        _second_pass(cfg, rechecks, results, show_values, live_wait)
    done = tuple(r for r in results if r is not None)
    assert len(done) == len(results)
    report = ParityReport(db.describe_dsn(cfg.source_dsn), db.describe_dsn(cfg.target_dsn), done, show_values)
    if tables is None and report.exit_code != 2:
        _record(cfg, report)
    return report


def _record(cfg: Config, report: ParityReport) -> None:
    """Remember a whole-database verify for the cutover's go/no-go checklist (when the control schema exists)."""
    try:
        with db.session(cfg.target_dsn, role="target") as conn:
            if state.exists(conn):
                state.record_verify(conn, report.identical, sum(t.difference_count for t in report.tables))
                conn.commit()
    except psycopg.Error as exc:
        log.get(phase="verify").warning("verify.not_recorded", error=str(exc).splitlines()[0])


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

    def window(self) -> _Window:
        """Open both snapshots for a live comparison: the target's first, with the sync position it holds, then the
        source's, which therefore contains every change the target holds.

        The changes between the two are read from the source's delta log in the source snapshot. Sync truncates
        children of the log whose events the target holds; TRUNCATE is not MVCC-safe, so the source transaction
        locks the log (ACCESS SHARE, before its snapshot) and no truncate happens while it reads. Should sync apply
        a newer batch (and maybe truncate) between the two snapshots, the window is opened again, so no event of the
        window is missing from the log the source snapshot sees.
        """
        source, target = self.open()
        with db.session(self._cfg.target_dsn, role="target", autocommit=True,
                        application_name="migrator-verify") as monitor:
            for attempt in range(_WINDOW_TRIES):
                if attempt:
                    self.end_table()
                applied = state.position(target)
                with source.cursor() as cur:
                    cur.execute(sql.SQL("LOCK TABLE {}.delta_log IN ACCESS SHARE MODE")
                                .format(sql.Identifier(CAPTURE_SCHEMA)))
                    row = cur.execute("SELECT pg_current_snapshot()::text").fetchone()
                if applied is None or row is None:
                    raise MigratorError("the target lost its sync position while verify ran")
                now = state.position(monitor)
                if now is not None and now.applied_snapshot == applied.applied_snapshot:
                    break
        assert applied is not None and row is not None
        return _Window(applied.applied_snapshot, str(row[0]))

    def close(self) -> None:
        if self._conns is not None:
            for conn in self._conns:
                conn.close()
            self._conns = None


def _work(cfg: Config, jobs: queue.SimpleQueue[tuple[int, Table, Table | None]],
          results: list[TableParity | None], show_values: bool,
          progress: Callable[[str, int], None] | None, live: bool, rechecks: list[_Recheck]) -> None:
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
                window = pair.window() if live and target is not None else None
                result, recheck = _verify_table(source_conn, target_conn, table, target, show_values, progress,
                                                window)
                pair.end_table()
                if recheck is not None:
                    recheck.index = index
                    rechecks.append(recheck)
            except (psycopg.Error, MigratorError) as exc:
                # After a failure mid-stream the sessions' state is unknown: start the next table on fresh ones.
                pair.close()
                result = TableParity(table.display, "error", key_columns=table.key, error=_message(exc))
            if result.status == "error":
                logger.warning("table not verified", error=result.error)
            else:
                logger.info(
                    "table verified", status=result.status, source_rows=result.source_rows,
                    target_rows=result.target_rows, differences=result.difference_count, in_flight=result.in_flight,
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

    def expression_of(self, record: sql.Composable) -> sql.Composable:
        """The same value taken from a record of the table's row type (a row image of the delta log)."""
        col = sql.SQL("{}.{}").format(record, sql.Identifier(self.name))
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


def _row_text(table: Table, record: sql.Composable | None = None) -> sql.Composed:
    def column(name: str) -> sql.Composable:
        return sql.Identifier(name) if record is None else sql.SQL("{}.{}").format(record, sql.Identifier(name))

    return sql.SQL("ROW({})::text").format(sql.SQL(", ").join(column(c.name) for c in table.columns))


def _verify_table(source_conn: psycopg.Connection[Any], target_conn: psycopg.Connection[Any], table: Table,
                  target: Table | None, show_values: bool, progress: Callable[[str, int], None] | None,
                  window: _Window | None = None) -> tuple[TableParity, _Recheck | None]:
    if target is None:
        return TableParity(table.display, "error", key_columns=table.key,
                           error=f"{table.display} does not exist on the target"), None
    lacking = [c.name for c in table.columns if c.name not in {tc.name for tc in target.columns}]
    if lacking:
        return TableParity(table.display, "error", key_columns=table.key,
                           error=f"the target table lacks column(s) {', '.join(lacking)}"), None
    plan = _Plan(table, target)
    narrowed = _narrow(source_conn, target_conn, plan)
    if progress is not None:
        progress(table.display, narrowed.source_rows)
    found = _Found()
    if narrowed.differing:
        found = _leaf(source_conn, target_conn, plan, narrowed, _in_flight(source_conn, plan, window))
    result = _result(source_conn, target_conn, plan, narrowed, found, show_values)
    recheck = None
    if found.in_flight and window is not None:
        recheck = _Recheck(plan, narrowed, window.snapshot)
    return result, recheck


def _result(source_conn: psycopg.Connection[Any], target_conn: psycopg.Connection[Any], plan: _Plan,
            narrowed: _Narrowed, found: _Found, show_values: bool, rechecked: bool = False) -> TableParity:
    table, count, listed = plan.table, found.count, found.listed
    if table.key:
        differences = [_keyed_difference(plan.keys, *d) for d in listed]
        if show_values and differences:
            differences = _with_keyed_values(source_conn, target_conn, table, differences)
    else:
        differences = [_multiset_difference(*d) for d in listed]
        if show_values and differences:
            differences = _with_multiset_values(source_conn, target_conn, table, differences)
    status: Status = "different" if count else "in_flight" if found.in_flight else "identical"
    return TableParity(
        table.display, status, key_columns=table.key,
        source_rows=narrowed.source_rows, target_rows=narrowed.target_rows, difference_count=count,
        differences=tuple(differences), ranges=narrowed.ranges, ranges_different=narrowed.ranges_different,
        passes=narrowed.passes, in_flight=found.in_flight, rechecked=rechecked,
    )


# --- narrowing by key ranges --------------------------------------------------------------------------------------
#
# Each side computes, per key range, the number of rows and two sums: of the first and of the last 64 bits of each
# row's md5 (as signed integers, summed exactly as numeric). Equal multisets of rows give equal sums whatever the
# order the server reads them in, so no sort is needed; one changed, missing or extra row changes the range's 128-bit
# sum by a value an accident cannot cancel. Ranges are cut at boundaries sampled from the source (the range key is
# the first key column, ordered as the merge orders it; without a key, the row's md5 itself), so that one pass
# groups the whole table at once (`width_bucket` over the sorted boundaries).

RANGE_ROWS = 2_000
"""Rows per range aimed at in the first pass."""
MAX_RANGES = 4_096
LEAF_ROWS = 20_000
"""A differing range with at most this many rows (on the larger side) is listed by key rather than split again."""
SPLIT = 16
"""Sub-ranges a larger differing range is split into."""
_SAMPLE_ROWS = 200_000
"""Rows the first boundaries are sampled from (TABLESAMPLE SYSTEM): enough for even ranges, far less than a scan."""
_MAX_PASSES = 6

Digest = tuple[int, Any, Any]


class _Plan:
    """The SQL of one table's comparison: its range key, row digest, leaf streams."""

    def __init__(self, table: Table, target: Table) -> None:
        self.table = table
        self.row = _row_text(table)
        if table.key:
            self.keys = _key_columns(table, target)
            first = self.keys[0]
            self.range_key: sql.Composable = first.expression
            self.range_type = sql.SQL({"integer": "bigint", "uuid": "uuid", "text": "bytea"}[first.mode])
        else:
            self.keys = ()
            self.range_key = sql.SQL("decode(md5({}), 'hex')").format(self.row)
            self.range_type = sql.SQL("bytea")

    def _rows(self, sample: float | None = None) -> sql.Composed:
        """The table as (rk, h): range key and row md5 (hex); optionally a block sample."""
        how = sql.SQL("") if sample is None else sql.SQL(" TABLESAMPLE SYSTEM ({})").format(sql.Literal(sample))
        if self.table.key:
            return sql.SQL("SELECT {rk} AS rk, md5({row}) AS h FROM ONLY {t}{how}").format(
                rk=self.range_key, row=self.row, t=self.table.ident, how=how)
        return sql.SQL("SELECT decode(r.h, 'hex') AS rk, r.h FROM (SELECT md5({row}) AS h FROM ONLY {t}{how}) AS r"
                       ).format(row=self.row, t=self.table.ident, how=how)

    def bucket(self, param: str) -> sql.Composed:
        return sql.SQL("width_bucket(rk, {}::{}[])").format(sql.Placeholder(param), self.range_type)

    def within(self) -> sql.Composed:
        """Rows of the ranges still differing: `b` the boundaries they were cut at, `d` the ranges."""
        return sql.SQL("WHERE {} = ANY(%(d)s::int[])").format(self.bucket("b"))

    def digests(self, narrowed: bool) -> sql.Composed:
        return sql.SQL(
            "SELECT {bucket}, count(*), sum(('x' || left(h, 16))::bit(64)::bigint), "
            "sum(('x' || right(h, 16))::bit(64)::bigint) FROM ({rows}) AS s {where} GROUP BY 1"
        ).format(bucket=self.bucket("nb"), rows=self._rows(), where=self.within() if narrowed else sql.SQL(""))

    def sample_boundaries(self, sample: float | None) -> sql.Composed:
        return sql.SQL("SELECT percentile_disc(%(f)s::float8[]) WITHIN GROUP (ORDER BY rk) FROM ({}) AS s").format(
            self._rows(sample))

    def split_boundaries(self) -> sql.Composed:
        return sql.SQL(
            "SELECT percentile_disc(%(f)s::float8[]) WITHIN GROUP (ORDER BY rk) FROM ({}) AS s {} GROUP BY {}"
        ).format(self._rows(), self.within(), self.bucket("b"))

    def leaf(self, narrowed: bool) -> tuple[sql.Composed, int, bool]:
        """The leaf stream's query, key width and whether values are counts (no key)."""
        if self.keys:
            key_list = sql.SQL(", ").join(k.expression for k in self.keys)
            where: sql.Composable = sql.SQL("")
            if narrowed:
                where = sql.SQL(" WHERE {} = ANY(%(d)s::int[])").format(
                    sql.SQL("width_bucket({}, %(b)s::{}[])").format(self.range_key, self.range_type))
            return sql.SQL("SELECT {keys}, decode(md5({row}), 'hex') FROM ONLY {t}{where} ORDER BY {keys}").format(
                keys=key_list, row=self.row, t=self.table.ident, where=where), len(self.keys), False
        where = sql.SQL("")
        if narrowed:
            where = sql.SQL(" WHERE width_bucket(h, %(b)s::bytea[]) = ANY(%(d)s::int[])")
        return sql.SQL("SELECT h, count(*) FROM (SELECT decode(md5({row}), 'hex') AS h FROM ONLY {t}) AS r{where} "
                       "GROUP BY 1 ORDER BY 1").format(row=self.row, t=self.table.ident, where=where), 1, True


@dataclass
class _Narrowed:
    """Where the differences are: `differing` ranges of the sorted `boundaries` (all ranges when `everywhere`)."""

    boundaries: list[Any]
    differing: list[int]
    source_rows: int
    target_rows: int
    ranges: int
    ranges_different: int
    passes: int
    everywhere: bool = False


def _both(source_conn: psycopg.Connection[Any], target_conn: psycopg.Connection[Any], query: sql.Composed,
          params: dict[str, Any]) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Run one query on both sides at once (each on its own session) and return both results."""

    def run(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
        with conn.cursor() as cur:
            return cur.execute(query, params).fetchall()

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="verify-target") as pool:
        on_target = pool.submit(run, target_conn)
        on_source = run(source_conn)
        return on_source, on_target.result()


def _count(conn: psycopg.Connection[Any], table: Table) -> int:
    with conn.cursor() as cur:
        row = cur.execute(sql.SQL("SELECT count(*) FROM ONLY {}").format(table.ident)).fetchone()
    assert row is not None
    return int(row[0])


def _first_boundaries(source_conn: psycopg.Connection[Any], plan: _Plan) -> list[Any]:
    rows = plan.table.est_rows if plan.table.est_rows > 0 else _count(source_conn, plan.table)
    ranges = max(1, min(MAX_RANGES, rows // RANGE_ROWS))
    if ranges == 1:
        return []
    sample = None if rows <= _SAMPLE_ROWS else max(0.01, min(100.0, 100.0 * _SAMPLE_ROWS / rows))
    with source_conn.cursor() as cur:
        found = cur.execute(plan.sample_boundaries(sample), {"f": [i / ranges for i in range(1, ranges)]}).fetchone()
    assert found is not None
    return sorted({v for v in found[0] or () if v is not None})


def _digests(rows: list[tuple[Any, ...]]) -> dict[int, Digest]:
    return {int(b): (int(n), s1, s2) for b, n, s1, s2 in rows}


def _narrow(source_conn: psycopg.Connection[Any], target_conn: psycopg.Connection[Any], plan: _Plan) -> _Narrowed:
    """Digest every range on both sides, then split the ranges that differ until each is small enough to list."""
    boundaries = _first_boundaries(source_conn, plan)
    src, tgt = (_digests(r) for r in _both(source_conn, target_conn, plan.digests(False), {"nb": boundaries}))
    result = _Narrowed(boundaries, _differing(src, tgt), sum(d[0] for d in src.values()),
                       sum(d[0] for d in tgt.values()), len(boundaries) + 1, 0, 1)
    result.ranges_different = len(result.differing)
    while result.differing and result.passes < _MAX_PASSES:
        sizes = {b: max(src.get(b, (0,))[0], tgt.get(b, (0,))[0]) for b in result.differing}
        if sum(sizes.values()) * 2 > max(result.source_rows, result.target_rows):
            result.everywhere = len(result.differing) == len(boundaries) + 1
            break  # differences everywhere: listing the rows is cheaper than splitting
        big = [b for b, n in sizes.items() if n > LEAF_ROWS]
        if not big:
            break
        params = {"b": result.boundaries, "d": big, "f": [i / SPLIT for i in range(1, SPLIT)]}
        with source_conn.cursor() as cur:
            cuts = {v for (values,) in cur.execute(plan.split_boundaries(), params) for v in values or ()}
        finer = sorted(set(result.boundaries) | {v for v in cuts if v is not None})
        if len(finer) == len(result.boundaries):
            break  # the range key cannot tell these rows apart (a composite key's first column): list them
        # Only the ranges that differ are read again, grouped by the finer cut; ranges that were small stay as
        # they are and are listed with the rest.
        params = {"b": result.boundaries, "d": result.differing, "nb": finer}
        src, tgt = (_digests(r) for r in _both(source_conn, target_conn, plan.digests(True), params))
        result.boundaries, result.differing = finer, _differing(src, tgt)
        result.passes += 1
    return result


def _differing(source: dict[int, Digest], target: dict[int, Digest]) -> list[int]:
    return sorted(b for b in source.keys() | target.keys() if source.get(b) != target.get(b))


@dataclass
class _Found:
    """What the leaf merge found: differences (the first MAX_LISTED listed) and rows in flight."""

    count: int = 0
    listed: list[tuple[Any, Any, Any]] = field(default_factory=list)
    in_flight: int = 0


def _leaf(source_conn: psycopg.Connection[Any], target_conn: psycopg.Connection[Any], plan: _Plan,
          narrowed: _Narrowed, in_flight: _InFlight | None = None) -> _Found:
    """Stream (key, row md5) of the differing ranges from both sides and merge them: every differing row, by key.

    A row whose key (without a key: whose row hash) a change in the live window touched is in flight, not different.
    """
    query, width, weighted = plan.leaf(not narrowed.everywhere)
    params = {"b": narrowed.boundaries, "d": narrowed.differing}
    source = _Stream(source_conn, query, width, weighted, "source", params=params)
    target_stream = _Stream(target_conn, query, width, weighted, "target", params=params)
    found = _Found()
    with contextlib.closing(source), contextlib.closing(target_stream):
        for difference in _merge(source, target_stream):
            if in_flight is not None and (in_flight.everything or difference[0] in in_flight.keys):
                found.in_flight += 1
                continue
            found.count += 1
            if len(found.listed) < MAX_LISTED:
                found.listed.append(difference)
    return found


# --- verifying while sync follows ---------------------------------------------------------------------------------
#
# The target holds exactly the source's state at its applied position A (data and position commit together). The
# target snapshot is opened first and reads A; the source snapshot S, opened next, contains A. A row that no change
# in S but not in A touched is the same on the source at A and at S, so if the target differs from S there, the
# difference is real. A row such a change touched is in flight: its range is read again once sync has applied
# everything S contains, under a new window.

_WINDOW_TRIES = 20


@dataclass(frozen=True)
class _Window:
    applied: str
    """The sync position (a source snapshot) the target snapshot holds."""
    snapshot: str
    """The source snapshot the comparison reads."""


@dataclass(frozen=True)
class _InFlight:
    keys: frozenset[tuple[Any, ...]]
    everything: bool = False
    """A TRUNCATE in the window: every row of the table is in flight."""


@dataclass
class _Recheck:
    plan: _Plan
    narrowed: _Narrowed
    snapshot: str
    index: int = -1


def _has_delta_log(conn: psycopg.Connection[Any]) -> bool:
    with conn.cursor() as cur:
        row = cur.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{CAPTURE_SCHEMA}.delta_log",)).fetchone()
    conn.rollback()
    return bool(row and row[0])


def _in_flight(source_conn: psycopg.Connection[Any], plan: _Plan, window: _Window | None) -> _InFlight | None:
    """Keys (or row hashes) that changes committed in the window touched, from the delta log in the source snapshot
    (locked since before that snapshot was taken: see _Pair.window)."""
    if window is None:
        return None
    log_table = sql.SQL("{}.delta_log").format(sql.Identifier(CAPTURE_SCHEMA))
    where = sql.SQL(
        "e.rel = %(rel)s::oid AND e.txid >= pg_snapshot_xmin(%(a)s::pg_snapshot) "
        "AND NOT pg_visible_in_snapshot(e.txid, %(a)s::pg_snapshot) "
        "AND pg_visible_in_snapshot(e.txid, %(s)s::pg_snapshot)"
    )
    params = {"rel": plan.table.oid, "a": window.applied, "s": window.snapshot}
    with source_conn.cursor() as cur:
        truncated = cur.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {} AS e WHERE {} AND e.op = 'T')").format(
            log_table, where), params).fetchone()
        if truncated and truncated[0]:
            return _InFlight(frozenset(), everything=True)
        if plan.keys:
            # A table with a key logs the keys its changes touched (text forms, in key order).
            types = {c.name: c.type for c in plan.table.columns}
            touched = sql.SQL("SELECT {} FROM {} AS e WHERE {} AND e.key IS NOT NULL").format(
                sql.SQL(", ").join(sql.SQL("e.key[{}]::{} AS {}").format(
                    sql.Literal(i + 1), sql.SQL(types[name]), sql.Identifier(name))
                    for i, name in enumerate(plan.table.key)), log_table, where)
            keys = sql.SQL(", ").join(k.expression_of(sql.SQL("x")) for k in plan.keys)
            rows = cur.execute(sql.SQL("SELECT DISTINCT {} FROM ({}) AS x").format(keys, touched), params).fetchall()
            return _InFlight(frozenset(tuple(r) for r in rows))
        images = sql.SQL(
            "SELECT e.old_row::{t} AS r FROM {log} AS e WHERE {w} AND e.old_row IS NOT NULL UNION ALL "
            "SELECT e.new_row::{t} FROM {log} AS e WHERE {w} AND e.new_row IS NOT NULL"
        ).format(t=plan.table.ident, log=log_table, w=where)
        keys = sql.SQL("decode(md5({}), 'hex')").format(_row_text(plan.table, sql.SQL("(x.r)")))
        rows = cur.execute(sql.SQL("SELECT DISTINCT {} FROM ({}) AS x").format(keys, images), params).fetchall()
    return _InFlight(frozenset(tuple(r) for r in rows))


def _second_pass(cfg: Config, rechecks: list[_Recheck], results: list[TableParity | None], show_values: bool,
                 live_wait: float) -> None:
    """Once sync has applied everything the first pass's source snapshots contained, read the ranges with rows in
    flight again under a new window; what still differs and is not in flight again is a difference."""
    from migrator.replay import Snapshot

    logger = log.get(phase="verify")
    wanted = [Snapshot.parse(r.snapshot) for r in rechecks]
    deadline = time.monotonic() + live_wait
    with db.session(cfg.target_dsn, role="target", autocommit=True, application_name="migrator-verify") as conn:
        while True:
            pos = state.position(conn)
            applied = Snapshot.parse(pos.applied_snapshot) if pos is not None else None
            if applied is not None and all(applied.includes(w) for w in wanted):
                break
            if time.monotonic() >= deadline:
                logger.warning("sync has not passed the first pass; rows stay in flight", waited=live_wait)
                return
            time.sleep(0.2)
    pair = _Pair(cfg)
    try:
        for r in rechecks:
            try:
                source_conn, target_conn = pair.open()
                window = pair.window()
                found = _leaf(source_conn, target_conn, r.plan, r.narrowed,
                              _in_flight(source_conn, r.plan, window))
                results[r.index] = _result(source_conn, target_conn, r.plan, r.narrowed, found, show_values,
                                           rechecked=True)
                pair.end_table()
            except (psycopg.Error, MigratorError) as exc:
                pair.close()
                results[r.index] = TableParity(r.plan.table.display, "error", key_columns=r.plan.table.key,
                                               error=_message(exc))
    finally:
        pair.close()


class _Stream:
    """One side's rows as (key, value), counted and checked to arrive in strictly ascending key order.

    `value` is the row hash (a table with a key) or the number of copies of the row (`weighted`, no key). Rows come
    through a binary server-side cursor in batches (far less client CPU than COPY, which hands rows over one by one),
    fetched ahead by a reader thread so that both servers keep working while Python merges; at most _PREFETCH batches
    wait in memory.
    """

    def __init__(self, conn: psycopg.Connection[Any], query: sql.Composed, width: int, weighted: bool, side: str,
                 progress: Callable[[int], None] | None = None, params: dict[str, Any] | None = None) -> None:
        self._conn, self._query, self._params = conn, query, params
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
                cur.execute(self._query, self._params)
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
