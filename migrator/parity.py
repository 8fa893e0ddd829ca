"""Row parity between the legacy (source) and the new (target) database: `migrator verify`.

Per table, both servers digest buckets of rows at the same time (key ranges, or buckets of a key hash; see "narrowing"
below), buckets whose digests differ are split again, and once they are small the two sides stream one short record
per row of just those buckets through server-side cursors, merged by Python in the same order, so memory stays
bounded whatever the size of the table:

* a table with a key sends `(key, md5 of the row form)` ordered by key; a key on one side only is a row missing on, or
  extra on, the target, and a key whose hashes differ is a row that differs;
* a table without a key sends `(md5 of the row form, count)` grouped and ordered by hash, and is compared as a
  multiset, so that duplicate rows count.

The row form (`_row_form`) is `record_send(ROW(<source columns>))`: every column in its binary send form, which is
exact (float -0, NaN and infinities, numeric scale, timestamps to the microsecond) and does not depend on any output
setting. Columns whose binary form carries a type OID or is not portable between servers (types not built in at a
fixed OID: enums, domains, composites, extension types; arrays, whose send form also records whether a null bitmap
is stored, which depends on the value's history; OID aliases such as regclass; columns typed differently on the two
sides) enter in their text form instead, under the pinned output settings of `migrator.db`.
It is built from the source's column list, so a target whose columns are in another order, or which has columns of
its own, still compares what migrated.

A merge is only correct if both streams arrive in an order Python can reproduce. Integer and uuid keys are ordered by
their typed value (Python ints and UUIDs order the same way, and the primary key index can serve the scan); every
other key column is ordered by the UTF-8 bytes of its text form, which neither side's collation nor encoding can
change. The merge checks the order as it goes and refuses to report on a stream that breaks it.

The report names rows by their key values (or, without a key, by their row hash; key values that may be patient data
as the migration's keyed hash, see `redaction.KeyMask`) and never carries other column values, unless the operator
asks for them with `show_values`.

Values enter these queries as literals (`sql.Literal`), never as parameters: psycopg reads every `%s` of a query
that has parameters as a placeholder, including one inside a quoted table or column name (`"pct%s"`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import math
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
from migrator.config import CAPTURE_SCHEMA, Config
from migrator.errors import MigratorError
from migrator.redaction import KeyMask, database_error, scrub

MAX_LISTED = 100
"""Differences listed per table; the rest are only counted."""
LIVE_WAIT = 120.0
"""How long a live verify waits for sync to pass the first pass's snapshot before it reports rows still in flight."""
_PROGRESS_EVERY = 50_000
_BATCH = 10_000
_PREFETCH = 2

Status = Literal["identical", "in_flight", "different", "error", "not_compared"]
"""not_compared: the rows are identical, but what some of them refer to (large objects) was not compared."""
Buckets = Literal["auto", "ranges", "hashes"]
Kind = Literal["missing", "extra", "different"]
_KIND_TEXT = {"missing": "missing on target", "extra": "extra on target", "different": "different"}


@dataclass(frozen=True)
class RowDifference:
    """One row (or, without a key, one distinct row) that is not the same on both sides."""

    kind: Kind
    """"missing": on the source only (or fewer copies on the target); "extra": the reverse; "different": same key,
    other values."""
    key: tuple[str, ...]
    """Text forms of the key columns; empty for a table without a key. Printed through a `KeyMask`."""
    row_md5: str | None = None
    """For a table without a key: md5 of the row's canonical form (`_row_form`), which identifies the row without
    showing it."""
    source_count: int = 1
    target_count: int = 1
    source_row: str | None = None
    """The row text on each side: only with `show_values`."""
    target_row: str | None = None

    def to_dict(self, key_columns: Sequence[str], key_types: Sequence[str], mask: KeyMask) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind}
        if self.row_md5 is None:
            d["key"] = {c: mask.value(t, v) for c, t, v in zip(key_columns, key_types, self.key, strict=True)}
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
    key_types: tuple[str, ...] = ()
    """Their types on the source, which decide how their values are printed (`redaction.KeyMask`); when not given,
    every key value is printed as a hash."""
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
    not_compared: str | None = None
    """What the rows refer to that verify did not compare, and why (large objects named by oid/lo columns)."""

    @property
    def printed_types(self) -> tuple[str, ...]:
        return self.key_types or ("",) * len(self.key_columns)

    def to_dict(self, mask: KeyMask) -> dict[str, Any]:
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
            "differences": [d.to_dict(self.key_columns, self.printed_types, mask) for d in self.differences],
            "error": self.error,
            "not_compared": self.not_compared,
        }


@dataclass(frozen=True)
class NotCompared:
    """Something of the source a whole-database verify did not compare, said plainly rather than skipped."""

    name: str
    """"schema.name" of a relation, or "large objects"."""
    kind: str
    """"materialized view", "foreign table" or "large objects"."""
    reason: str
    data: bool
    """Source data that may be missing on the target (large objects): the verify cannot say identical (exit 2).
    False for what is derived or held elsewhere (materialized views, foreign tables): listed, exit unchanged."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ParityReport:
    source: str
    """host:port/dbname of each side (never a password)."""
    target: str
    tables: tuple[TableParity, ...]
    show_values: bool = False
    not_compared: tuple[NotCompared, ...] = ()
    mask: KeyMask = field(default_factory=KeyMask.ephemeral, repr=False, compare=False)
    """How keys are printed: the migration's keyed hash for key values that may be patient data, unless
    `show_values`."""

    @property
    def _keys(self) -> KeyMask:
        return dataclasses.replace(self.mask, show_values=self.show_values)

    @property
    def identical(self) -> bool:
        return all(t.status == "identical" for t in self.tables) and not any(n.data for n in self.not_compared)

    @property
    def rows_identical(self) -> bool:
        """Every table's rows identical, though what some refer to (large objects, a blocker the operator overrode
        at prepare) was not compared: what the cutover's and rollback's full verify require."""
        return all(t.status in ("identical", "not_compared") for t in self.tables)

    @property
    def exit_code(self) -> int:
        """0 identical (rows in flight aside); 1 rows differ; 2 some table could not be verified, or source data
        (large objects) could not be compared (which outweighs differences found)."""
        if any(t.status == "error" or t.not_compared for t in self.tables) or any(n.data for n in self.not_compared):
            return 2
        return 1 if any(t.status == "different" for t in self.tables) else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "target": self.target,
            "identical": self.identical,
            "exit_code": self.exit_code,
            "tables": [t.to_dict(self._keys) for t in self.tables],
            "not_compared": [n.to_dict() for n in self.not_compared],
        }

    def render_text(self) -> str:
        lines = [f"verify {self.source} (source) against {self.target} (target)"]
        width = max((len(t.name) for t in self.tables), default=0)
        for t in self.tables:
            lines.extend(_render_table(t, width, self._keys))
        counts = {s: sum(1 for t in self.tables if t.status == s)
                  for s in ("identical", "in_flight", "different", "error", "not_compared")}
        in_flight = f"{counts['in_flight']} in flight, " if counts["in_flight"] else ""
        refs = f"{counts['not_compared']} with large objects not compared, " if counts["not_compared"] else ""
        lines.append(
            f"{len(self.tables)} table(s): {counts['identical']} identical, {in_flight}{refs}{counts['different']} "
            f"different, {counts['error']} not verified"
        )
        for n in self.not_compared:
            kind = f" ({n.kind})" if n.kind != n.name else ""
            lines.append(f"  NOT COMPARED  {n.name}{kind}: {n.reason}")
        return "\n".join(lines)


def _render_table(t: TableParity, width: int, mask: KeyMask) -> list[str]:
    head = {"identical": "identical", "in_flight": "in flight", "different": "DIFFERENT", "error": "ERROR",
            "not_compared": "NOT COMPARED"}[t.status]
    if t.status == "error":
        return [f"  {head:<9}  {t.name:<{width}}  {t.error}"]
    note = [f"      not compared: {t.not_compared}"] if t.not_compared else []
    rows = f"{t.source_rows:,} rows" if t.source_rows == t.target_rows else (
        f"{t.source_rows:,} rows on source, {t.target_rows:,} on target"
    )
    ranges = f"; {t.ranges_different:,} of {t.ranges:,} key ranges differed" if t.ranges_different else ""
    flight = f"; {t.in_flight:,} row(s) in flight (changed on the source, not yet applied)" if t.in_flight else ""
    if t.status == "not_compared":
        return [f"  {head}  {t.name:<{width}}  {rows}, rows identical{flight}", *note]
    if t.status in ("identical", "in_flight"):
        return [f"  {head:<9}  {t.name:<{width}}  {rows}{flight}", *note]
    lines = [f"  {head:<9}  {t.name:<{width}}  {rows}; {t.difference_count:,} difference(s){ranges}{flight}"]
    for d in t.differences:
        if d.row_md5 is not None:
            ident = f"row md5 {d.row_md5}: {d.source_count} on source, {d.target_count} on target"
        else:
            ident = ", ".join(f"{c}={_show_key(mask, ty, v)}"
                              for c, ty, v in zip(t.key_columns, t.printed_types, d.key, strict=True))
        lines.append(f"      {_KIND_TEXT[d.kind]:<17}  {ident}")
        if d.source_row is not None:
            lines.append(f"          source: {d.source_row}")
        if d.target_row is not None:
            lines.append(f"          target: {d.target_row}")
    if t.difference_count > len(t.differences):
        lines.append(f"      ... and {t.difference_count - len(t.differences):,} more")
    return lines + note


def _show_key(mask: KeyMask, type_: str, value: str) -> str:
    if mask.hashes(type_):
        return mask.value(type_, value)
    return value if value.lstrip("-").isdigit() else json.dumps(value, ensure_ascii=False)


def verify(cfg: Config, *, tables: list[str] | None = None, show_values: bool = False,
           progress: Callable[[str, int], None] | None = None, live_wait: float = LIVE_WAIT,
           buckets: Buckets = "auto") -> ParityReport:
    """Compare every row of the migrating tables (or of `tables`, "schema.table" names) on source and target.

    While sync is following (the target has an applied position and the source a delta log), rows that differ only
    because of changes not yet applied are counted as in flight, and their ranges are read again once sync has
    passed the first pass's snapshot (waiting at most `live_wait` seconds).
    `progress(table, rows)` is called now and then from the worker threads with the rows compared so far.
    `buckets`: "auto" chooses key ranges or key-hash buckets per table (see "narrowing"); "hashes" reads every table
    by sequential scans (for a cold legacy server); "ranges" uses key ranges wherever the collations allow.
    Raises ConnectionFailed if either database cannot be reached; any other failure is reported per table.
    """
    db.refuse_same_database(cfg.source_dsn, cfg.target_dsn)
    with db.session(cfg.source_dsn, role="source") as conn:
        source_tables = catalog.list_tables(conn, cfg.tables)
        live = _has_delta_log(conn)
        unseen = _unseen(conn, cfg, source_tables)
        source_encoding = _encoding(conn)
    with db.session(cfg.target_dsn, role="target") as conn:
        target_tables = {(t.schema, t.name): t for t in catalog.list_tables(conn, cfg.tables)}
        live = live and state.exists(conn) and state.position(conn) is not None
        row = conn.execute("SELECT now()").fetchone()  # the target's clock: the checklist compares its events with it
        started_at = row[0] if row else None
        same_encoding = _encoding(conn) == source_encoding
        mask = KeyMask.of(conn)
        conn.commit()

    results: list[TableParity | None] = []
    jobs: queue.SimpleQueue[tuple[int, Table, Table | None]] = queue.SimpleQueue()
    if tables is None:
        chosen: list[Table] = source_tables
    else:
        by_name = {t.display: t for t in source_tables}
        chosen = [by_name[name] for name in dict.fromkeys(tables) if name in by_name]
    results.extend(None for _ in chosen)
    # Largest tables first, so that the last table to finish is a small one and the workers end together.
    for index in sorted(range(len(chosen)), key=lambda i: -chosen[i].bytes):
        t = chosen[index]
        jobs.put((index, t, target_tables.get((t.schema, t.name))))
    unknown = [name for name in dict.fromkeys(tables or []) if name not in {t.display for t in chosen}]
    results.extend(
        TableParity(name, "error", error=f"{name} is not a migrating table of the source") for name in unknown
    )

    workers = max(1, min(cfg.copy.workers, len(chosen)))
    rechecks: list[_Recheck] = []
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="verify") as pool:
        futures = [pool.submit(_work, cfg, jobs, results, show_values, progress, live, rechecks,
                               _Options(same_encoding, buckets))
                   for _ in range(workers)]
        for f in futures:
            f.result()
    if rechecks:
        _second_pass(cfg, rechecks, results, show_values, live_wait)
    done = tuple(unseen.mark(r) for r in results if r is not None)
    assert len(done) == len(results)
    report = ParityReport(db.describe_dsn(cfg.source_dsn), db.describe_dsn(cfg.target_dsn), done, show_values,
                          not_compared=unseen.listed if tables is None else (), mask=mask)
    if tables is None:
        # A table that could not be verified is no proof: recorded as not identical, so go/no-go fails.
        _record(cfg, report, started_at)
    return report


@dataclass(frozen=True)
class _Unseen:
    """What the row comparison cannot see: large objects (tables referring to them by oid/lo columns), materialized
    views and foreign tables."""

    large_object_columns: dict[str, tuple[str, ...]]
    large_objects: int
    listed: tuple[NotCompared, ...]

    def mark(self, t: TableParity) -> TableParity:
        """A table whose columns can refer to large objects: say that their contents were not compared (and do not
        call its rows identical alone)."""
        columns = self.large_object_columns.get(t.name)
        if not columns or t.status == "error":
            return t
        note = (f"contents of the large objects that column(s) {', '.join(columns)} refer to: large objects are not "
                f"migrated ({self.large_objects} on the source; blocker large-objects)")
        status: Status = "not_compared" if t.status in ("identical", "in_flight") else t.status
        return dataclasses.replace(t, status=status, not_compared=note)


def _unseen(conn: psycopg.Connection[Any], cfg: Config, tables: list[Table]) -> _Unseen:
    count = catalog.large_object_count(conn)
    listed = [NotCompared("large objects", "large objects", f"{count} large object(s) on the source are not "
                          "migrated and their contents not compared (blocker large-objects)", True)] if count else []
    for r in catalog.list_relations(conn, cfg.tables):
        if r.kind == "foreign table":
            reason = "its rows live on another server; nothing of it is copied"
        elif r.populated:
            reason = ("copy populated it on the target from the copied tables (REFRESH in post-data); it holds the "
                      "result of its query as of its last refresh on each side, so REFRESH it after cutover")
        else:
            reason = "never populated on the source (WITH NO DATA); created so on the target"
        listed.append(NotCompared(r.display, r.kind, reason, False))
    columns = catalog.large_object_columns(conn, tables) if count else {}
    conn.rollback()
    return _Unseen(columns, count, tuple(listed))


def _encoding(conn: psycopg.Connection[Any]) -> str:
    with conn.cursor() as cur:
        row = cur.execute("SHOW server_encoding").fetchone()
    conn.rollback()
    return str(row[0]) if row else ""


def _record(cfg: Config, report: ParityReport, started_at: dt.datetime | None) -> None:
    """Remember a whole-database verify for the cutover's go/no-go checklist (when the control schema exists)."""
    try:
        with db.session(cfg.target_dsn, role="target") as conn:
            if state.exists(conn):
                state.record_verify(conn, report.rows_identical, sum(t.difference_count for t in report.tables),
                                    started_at, not_verified=sum(1 for t in report.tables if t.status == "error"))
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
          progress: Callable[[str, int], None] | None, live: bool, rechecks: list[_Recheck],
          options: _Options) -> None:
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
                                                window, options)
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


@dataclass(frozen=True)
class _Options:
    same_encoding: bool = True
    """The two servers' encodings are the same (key text can be hashed as each stores it)."""
    buckets: Buckets = "auto"


def _message(exc: BaseException) -> str:
    if isinstance(exc, psycopg.Error):
        return database_error(exc)
    return scrub(str(exc).strip()) or type(exc).__name__


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
                  window: _Window | None = None, options: _Options | None = None,
                  ) -> tuple[TableParity, _Recheck | None]:
    if target is None:
        return TableParity(table.display, "error", key_columns=table.key,
                           error=f"{table.display} does not exist on the target"), None
    lacking = [c.name for c in table.columns if c.name not in {tc.name for tc in target.columns}]
    if lacking:
        return TableParity(table.display, "error", key_columns=table.key,
                           error=f"the target table lacks column(s) {', '.join(lacking)}"), None
    options = options or _Options()
    friendly = options.buckets == "ranges" or (
        options.buckets == "auto" and _index_friendly(source_conn, target_conn, table, target))
    plan = _Plan(table, target, _column_facts(source_conn, table), _column_facts(target_conn, target),
                 options.same_encoding, friendly)
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
            narrowed: _Narrowed, found: _Found, show_values: bool, rechecked: bool = False,
            changing: bool = False) -> TableParity:
    """`changing`: the source changed this table in the (second) window, so its counts may differ by rows in flight
    outside the ranges that were read again."""
    table, count, listed = plan.table, found.count, found.listed
    if table.key:
        differences = [_keyed_difference(plan.keys, *d) for d in listed]
        if show_values and differences:
            differences = _with_keyed_values(source_conn, target_conn, table, differences)
    else:
        differences = [_multiset_difference(*d) for d in listed]
        if show_values and differences:
            differences = _with_multiset_values(source_conn, target_conn, plan, differences)
    status: Status = "different" if count else "in_flight" if found.in_flight else "identical"
    in_flight = found.in_flight
    if status == "identical" and narrowed.source_rows != narrowed.target_rows and rechecked and changing:
        # A recheck reads only the ranges that had rows in flight; rows changed again elsewhere in its window.
        status, in_flight = "in_flight", abs(narrowed.source_rows - narrowed.target_rows)
    elif status == "identical" and narrowed.source_rows != narrowed.target_rows:
        # Never identical with counts that differ: the differing rows escaped the listing (which would be a bug).
        return TableParity(
            table.display, "error", key_columns=table.key, source_rows=narrowed.source_rows,
            target_rows=narrowed.target_rows,
            error=f"{narrowed.source_rows:,} rows on the source, {narrowed.target_rows:,} on the target, but no row "
                  "could be named; verify this table again with --buckets hashes",
        )
    types = {c.name: c.type for c in table.columns}
    return TableParity(
        table.display, status, key_columns=table.key, key_types=tuple(types[k] for k in table.key),
        source_rows=narrowed.source_rows, target_rows=narrowed.target_rows, difference_count=count,
        differences=tuple(differences), ranges=narrowed.ranges, ranges_different=narrowed.ranges_different,
        passes=narrowed.passes, in_flight=in_flight, rechecked=rechecked,
    )


# --- narrowing -----------------------------------------------------------------------------------------------------
#
# A table's rows are split into buckets that both sides compute alike, each side digests every bucket in one
# statement, and the buckets that differ are split again until they are small enough to list by key.
#
# Each row is digested in its canonical form (`_row_form`): the binary send form of every column (what binary COPY
# moved), or the text form for columns of types that are not built in. Two kinds of bucket:
#
# * Key ranges (tables with a key whose first column sorts alike on both sides): ranges are cut at boundaries sampled
#   from the source's key and read through the key's index, one range at a time; a range's digest is the count of its
#   rows and the SHA-256 of its rows' forms concatenated in key order (a form over 1 kB is replaced by its own
#   SHA-256). One hash call per range rather than per row is what makes this the fast path.
# * Key-hash buckets (tables without a key, and keys whose collations differ between the sides, where a range would
#   hold different rows on each side): the bucket is the top bits of a 64-bit hash of the key (without a key: of the
#   row's md5). A bucket's digest is its count and two sums of its rows' md5s, each md5 folded to 64 bits by
#   `hashtextextended` with its own seed and summed exactly, so the order the server reads rows in does not matter
#   and one sequential scan digests the whole table. The subquery producing the md5 is fenced with OFFSET 0: without
#   the fence the planner inlines it and computes md5 once per sum (measured: twice the cost).
#
# Either way a changed, missing or extra row changes its bucket's count or digest; an accident would have to produce a
# SHA-256 collision, or cancel two independent 64-bit sums at once, to hide it.

RANGE_ROWS = 2_000
"""Rows per bucket aimed at in the first pass."""
MAX_RANGES = 4_096
"""At most this many key-hash buckets in the first pass."""
MAX_KEY_RANGES = 65_536
"""At most this many key ranges in the first pass: a range's digest aggregates its rows' forms in memory (at most
1 kB each), so the ranges of a billion-row table stay within some tens of MB."""
LEAF_ROWS = 20_000
"""A differing bucket with at most this many rows (on the larger side) is listed by key rather than split again."""
SPLIT_BITS = 4
"""A larger differing bucket is split into 2^SPLIT_BITS."""
_SAMPLE_ROWS = 50_000
"""Rows the first range boundaries are sampled from (TABLESAMPLE SYSTEM): enough for even ranges, far less than a
scan."""
_WIDE_FORM = 1024
"""A row form longer than this enters its range's digest as its SHA-256, so that a range's concatenation stays small."""
_MAX_PASSES = 6

Digest = tuple[Any, ...]


@dataclass(frozen=True)
class _ColumnFacts:
    type: str
    portable: bool
    """The binary send form is the same on any server: a type built in at a fixed OID (below 10000) with a send
    function, not an array (array_send writes a null-bitmap flag that depends on the value's history, not on its
    elements), not an OID alias."""
    array: bool
    collation: str | None
    """The column's effective collation: name, provider (libc before PostgreSQL 15) and locale (None: the type has
    none)."""
    collation_version: str | None
    """The collation's recorded version (None: not recorded, as before PostgreSQL 15 for the default collation)."""
    collation_name: tuple[str, str] | None
    """(schema, name) of that collation, for a COLLATE clause."""
    not_null: bool

    def sorts_like(self, other: _ColumnFacts) -> bool:
        """Same type and collation; versions too where both servers recorded one. What the versions cannot tell
        (an old server that records none) the cut-point check and, past it, the leaf merge make safe."""
        return self.type == other.type and self.collation == other.collation and (
            self.collation_version is None or other.collation_version is None
            or self.collation_version == other.collation_version)


_FACTS = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod),
       a.atttypid < 10000 AND t.typsend <> 0 AND t.typname !~ '^reg' AND t.typcategory <> 'A',
       t.typcategory = 'A',
       CASE WHEN a.attcollation = 0 THEN NULL
            WHEN c.collname = 'default' THEN (
                SELECT concat_ws(' ', 'default', coalesce(j ->> 'datlocprovider', 'c'), j ->> 'datcollate',
                                 j ->> 'daticulocale', j ->> 'datlocale')
                FROM pg_database AS d, to_jsonb(d) AS j WHERE d.datname = current_database())
            ELSE concat_ws(' ', c.collname, j ->> 'collprovider', j ->> 'collcollate', j ->> 'colliculocale',
                           j ->> 'colllocale') END,
       CASE WHEN a.attcollation = 0 THEN NULL
            WHEN c.collname = 'default' THEN (
                SELECT to_jsonb(d) ->> 'datcollversion' FROM pg_database AS d WHERE d.datname = current_database())
            ELSE j ->> 'collversion' END,
       n.nspname, c.collname, a.attnotnull
FROM pg_attribute AS a JOIN pg_type AS t ON t.oid = a.atttypid
     LEFT JOIN pg_collation AS c ON c.oid = a.attcollation LEFT JOIN pg_namespace AS n ON n.oid = c.collnamespace
     LEFT JOIN LATERAL to_jsonb(c) AS j ON true
WHERE a.attrelid = %s::oid AND a.attnum > 0 AND NOT a.attisdropped
"""


def _column_facts(conn: psycopg.Connection[Any], table: Table) -> dict[str, _ColumnFacts]:
    with conn.cursor() as cur:
        return {name: _ColumnFacts(type_, bool(portable), bool(array), collation, version,
                                   (nsp, coll) if collation is not None else None, bool(not_null))
                for name, type_, portable, array, collation, version, nsp, coll, not_null
                in cur.execute(_FACTS, (table.oid,))}


_FRIENDLY = """
SELECT coalesce((SELECT abs(correlation) FROM pg_stats WHERE schemaname = %(s)s AND tablename = %(t)s
                 AND attname = %(k)s ORDER BY inherited LIMIT 1), 0) >= %(corr)s
       OR pg_relation_size(%(oid)s::oid) * 4 <= (SELECT setting::bigint * 8192 FROM pg_settings
                                                 WHERE name = 'effective_cache_size')
"""
_KEY_INDEX = """
SELECT EXISTS (
    SELECT 1 FROM pg_index AS i JOIN pg_class AS c ON c.oid = i.indexrelid JOIN pg_am AS am ON am.oid = c.relam
         JOIN pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
         JOIN pg_opclass AS oc ON oc.oid = i.indclass[0]
    WHERE i.indrelid = %s::oid AND i.indisvalid AND am.amname = 'btree' AND a.attname = %s AND i.indpred IS NULL
          AND oc.opcdefault AND i.indcollation[0] = a.attcollation)
"""
_CORRELATED = 0.9


def _index_friendly(source_conn: psycopg.Connection[Any], target_conn: psycopg.Connection[Any], table: Table,
                    target: Table) -> bool:
    """Whether reading the table one key range at a time through its index is cheap: both sides have a btree index
    leading with the key's first column that a range scan can use (whole table, default operator class, the column's
    collation), and on the source the heap follows the key (planner statistics) or the
    table is small next to the server's cache (a quarter of effective_cache_size). Otherwise key ranges would read
    the heap in random order (or scan it once per range), and a sequential scan (key-hash buckets) is used."""
    if not table.key:
        return False
    for conn, t in ((source_conn, table), (target_conn, target)):
        with conn.cursor() as cur:
            row = cur.execute(_KEY_INDEX, (t.oid, table.key[0])).fetchone()
        if not (row and row[0]):
            return False
    with source_conn.cursor() as cur:
        row = cur.execute(_FRIENDLY, {"s": table.schema, "t": table.name, "k": table.key[0], "oid": table.oid,
                                      "corr": _CORRELATED}).fetchone()
    return bool(row and row[0])


def _row_form(table: Table, binary: frozenset[str], record: sql.Composable | None = None) -> sql.Composed:
    """The row's canonical form (bytea): `record_send` of its columns, those not in `binary` as text."""
    def column(name: str) -> sql.Composable:
        col = sql.Identifier(name) if record is None else sql.SQL("{}.{}").format(record, sql.Identifier(name))
        return col if name in binary else sql.SQL("{}::text").format(col)

    return sql.SQL("record_send(ROW({}))").format(sql.SQL(", ").join(column(c.name) for c in table.columns))


class _Plan:
    """How one table is compared: its row form, key columns and kind of bucket."""

    def __init__(self, table: Table, target: Table, source_facts: dict[str, _ColumnFacts] | None = None,
                 target_facts: dict[str, _ColumnFacts] | None = None, same_encoding: bool = True,
                 index_friendly: bool = True) -> None:
        self.table = table
        sf, tf = source_facts or {}, target_facts or {}
        self.binary = frozenset(
            c.name for c in table.columns
            if c.name in sf and c.name in tf and sf[c.name].portable and tf[c.name].portable
            and sf[c.name].type == tf[c.name].type
        )
        self.form = _row_form(table, self.binary)
        self.keys = _key_columns(table, target) if table.key else ()
        first = table.key[0] if table.key else None
        # Key ranges need the key to sort alike on both sides: the same types, the same collation (and, for text,
        # the same encoding), and no NULL possible (a target that lost its primary key); an array key is left to
        # hashing.
        self.ranged = index_friendly and first is not None and all(
            name in sf and name in tf and sf[name].sorts_like(tf[name]) and sf[name].not_null and tf[name].not_null
            for name in table.key
        ) and not sf[first].array and (same_encoding or sf[first].collation is None)
        self.range_type = sf[first].type if self.ranged and first is not None else ""
        self.target_collation = tf[first].collation_name if self.ranged and first is not None else None
        self.key_hash = _key_hash(self.keys, same_encoding) if self.keys else None

    def scope(self) -> _Scope:
        return _Ranges(self) if self.ranged else _Hashes(self)

    def leaf_all(self) -> sql.Composed:
        """Every row, as the leaf merge reads it."""
        return self.leaf_rows(sql.SQL("true"))

    def leaf_rows(self, where: sql.Composable) -> sql.Composed:
        """(key columns as the merge orders them, row md5) of the rows `where` selects, ordered by key; without a key
        (row md5, copies) ordered by md5."""
        if self.keys:
            names = [sql.Identifier(f"k{i}") for i in range(len(self.keys))]
            return sql.SQL(
                "SELECT {names}, q.h FROM (SELECT {keys}, decode(md5({form}), 'hex') AS h FROM ONLY {t} "
                "WHERE {where}) AS q ORDER BY {names}"
            ).format(names=sql.SQL(", ").join(sql.SQL("q.{}").format(n) for n in names),
                     keys=sql.SQL(", ").join(sql.SQL("{} AS {}").format(k.expression, n)
                                             for k, n in zip(self.keys, names, strict=True)),
                     form=self.form, t=self.table.ident, where=where)
        return sql.SQL("SELECT decode(md5({form}), 'hex') AS h, count(*) FROM ONLY {t} WHERE {where} GROUP BY 1 "
                       "ORDER BY 1").format(form=self.form, t=self.table.ident, where=where)


_NO_FACTS = _ColumnFacts("", False, False, None, None, None, False)


def _key_hash(keys: Sequence[_KeyColumn], same_encoding: bool) -> sql.Composable:
    """A 64-bit hash of the key that both servers compute alike: of an integer key's value, of a uuid, otherwise of
    the key's text form (under the pinned settings), taken as UTF-8 when the two servers' encodings differ. A NULL
    key (a target that lost its primary key) hashes to 0, so its row is still counted and digested."""
    if len(keys) == 1 and keys[0].mode == "integer":
        return sql.SQL("coalesce(hashint8extended({}::int8, 0), 0)").format(sql.Identifier(keys[0].name))
    if len(keys) == 1 and keys[0].mode == "uuid":
        return sql.SQL("coalesce(uuid_hash_extended({}, 0), 0)").format(sql.Identifier(keys[0].name))
    if len(keys) == 1:
        text: sql.Composable = sql.SQL("{}::text").format(sql.Identifier(keys[0].name))
    else:
        text = sql.SQL("ROW({})::text").format(sql.SQL(", ").join(sql.Identifier(k.name) for k in keys))
    if not same_encoding:
        text = sql.SQL("encode(convert_to({}, 'UTF8'), 'hex')").format(text)
    return sql.SQL("coalesce(hashtextextended({} COLLATE \"C\", 0), 0)").format(text)


class _Scope:
    """The buckets of one table at the current pass: what to digest, how to split, which rows to list."""

    buckets: int
    """Buckets digested in the current pass."""

    def start(self, source_conn: psycopg.Connection[Any], target_conn: psycopg.Connection[Any]) -> bool:
        """Set up the first pass; False if this kind of bucket does not suit the table after all."""
        raise NotImplementedError

    def digests(self) -> sql.Composed:
        """Per bucket of the current pass: (bucket id, count, digest...)."""
        raise NotImplementedError

    def split(self, source_conn: psycopg.Connection[Any], differing: list[Any], sizes: dict[Any, int]) -> bool:
        """Make the next pass digest the rows of the `differing` buckets in finer buckets; False if it cannot."""
        raise NotImplementedError

    def leaf(self, differing: list[Any]) -> sql.Composed:
        """The leaf stream over the rows of the `differing` buckets of the current pass."""
        raise NotImplementedError


def _first_count(source_conn: psycopg.Connection[Any], table: Table) -> int:
    if table.est_rows > 0:
        return table.est_rows
    with source_conn.cursor() as cur:
        row = cur.execute(sql.SQL("SELECT count(*) FROM ONLY {}").format(table.ident)).fetchone()
    return int(row[0]) if row else 0


class _Hashes(_Scope):
    """Key-hash buckets: the top `bits` bits of a 64-bit hash; a pass may be restricted to the rows of some buckets
    of the previous pass."""

    def __init__(self, plan: _Plan) -> None:
        self.plan = plan
        self.bits = 1
        self.within: tuple[int, list[int]] | None = None
        """(bits, buckets) the rows of this pass are restricted to."""

    @property
    def buckets(self) -> int:  # type: ignore[override]
        return 2 ** self.bits

    def start(self, source_conn: psycopg.Connection[Any], target_conn: psycopg.Connection[Any]) -> bool:
        ranges = max(2, min(MAX_RANGES, _first_count(source_conn, self.plan.table) // RANGE_ROWS))
        self.bits = max(1, math.ceil(math.log2(ranges)))
        return True

    def _hashed(self, within: tuple[int, list[int]] | None) -> sql.Composed:
        """The rows as (kh, h): the 64-bit bucket hash and the row md5 (hex), of the buckets `within` only."""
        plan = self.plan
        where: sql.Composable = sql.SQL("")
        kh = plan.key_hash if plan.key_hash is not None else sql.SQL("hashtextextended(r.h, 2)")
        if within is not None:
            where = sql.SQL(" WHERE {}").format(_in_buckets(kh, *within))
        if plan.key_hash is not None:
            return sql.SQL("SELECT {kh} AS kh, md5({form}) AS h FROM ONLY {t}{where} OFFSET 0").format(
                kh=kh, form=plan.form, t=plan.table.ident, where=where)
        return sql.SQL("SELECT {kh} AS kh, r.h FROM (SELECT md5({form}) AS h FROM ONLY {t} OFFSET 0) AS r{where} "
                       "OFFSET 0").format(kh=kh, form=plan.form, t=plan.table.ident, where=where)

    def digests(self) -> sql.Composed:
        return sql.SQL(
            "SELECT s.kh >> {}, count(*), sum(hashtextextended(s.h, 0)), sum(hashtextextended(s.h, 1)) "
            "FROM ({}) AS s GROUP BY 1"
        ).format(sql.Literal(64 - self.bits), self._hashed(self.within))

    def split(self, source_conn: psycopg.Connection[Any], differing: list[Any], sizes: dict[Any, int]) -> bool:
        self.within = (self.bits, differing)
        self.bits += SPLIT_BITS
        return True

    def leaf(self, differing: list[Any]) -> sql.Composed:
        plan = self.plan
        if plan.key_hash is not None:
            return plan.leaf_rows(_in_buckets(plan.key_hash, self.bits, differing))
        return sql.SQL(
            "SELECT decode(r.h, 'hex'), count(*) FROM (SELECT md5({form}) AS h FROM ONLY {t} OFFSET 0) AS r "
            "WHERE {within} GROUP BY 1 ORDER BY 1"
        ).format(form=plan.form, t=plan.table.ident,
                 within=_in_buckets(sql.SQL("hashtextextended(r.h, 2)"), self.bits, differing))


def _in_buckets(hash64: sql.Composable, bits: int, buckets: list[int]) -> sql.Composed:
    """Whether a 64-bit hash falls in one of `buckets` of its top `bits` bits."""
    return sql.SQL("({} >> {}) = ANY({}::int8[])").format(hash64, sql.Literal(64 - bits), sql.Literal(buckets))


Bound = str | None


class _Ranges(_Scope):
    """Key ranges [lo, hi) of the first key column (None: open), cut at values sampled from the source and read
    through the key's index one range at a time."""

    def __init__(self, plan: _Plan) -> None:
        self.plan = plan
        self.ranges: list[tuple[Bound, Bound]] = [(None, None)]
        self.column = sql.Identifier(plan.table.key[0])
        self.type = sql.SQL(plan.range_type)

    @property
    def buckets(self) -> int:  # type: ignore[override]
        return len(self.ranges)

    def start(self, source_conn: psycopg.Connection[Any], target_conn: psycopg.Connection[Any]) -> bool:
        rows = _first_count(source_conn, self.plan.table)
        ranges = max(1, min(MAX_KEY_RANGES, rows // RANGE_ROWS))
        if ranges == 1:
            self.ranges = [(None, None)]
            return True
        sample = sql.SQL("") if rows <= _SAMPLE_ROWS else sql.SQL(" TABLESAMPLE SYSTEM ({})").format(
            sql.Literal(max(0.01, min(100.0, 100.0 * _SAMPLE_ROWS / rows))))
        query = sql.SQL("SELECT (percentile_disc({f}::float8[]) WITHIN GROUP (ORDER BY {k}))::text[] "
                        "FROM ONLY {t}{sample}").format(f=sql.Literal([i / ranges for i in range(1, ranges)]),
                                                         k=self.column, t=self.plan.table.ident, sample=sample)
        with source_conn.cursor() as cur:
            found = cur.execute(query).fetchone()
        raw = list(found[0] or []) if found else []
        if _longest_run(raw) >= _HEAVY_RANGE:
            # A value of the first key column holds several ranges' worth of rows (a composite key's site, region or
            # tenant): its range could not be split, and its digest, one value in memory, would grow with it.
            return False
        cuts = _distinct_in_order(raw)
        if not self._sorted_on(target_conn, cuts):
            return False  # the target sorts the key otherwise (an undeclared collation difference): hash instead
        self.ranges = list(zip([None, *cuts], [*cuts, None], strict=True))
        for conn in (source_conn, target_conn):
            with conn.cursor() as cur:
                # Read each range through the key's index in key order, rather than by bitmap (heap order) and sort.
                cur.execute("SET LOCAL enable_bitmapscan = off")
        return True

    def _sorted_on(self, conn: psycopg.Connection[Any], cuts: list[str]) -> bool:
        """Whether `conn`'s server sorts the cut points (sorted on the source) the same way: otherwise a range
        would hold other rows there, and ranges could overlap."""
        if len(cuts) < 2:
            return True
        a: sql.Composable = sql.SQL("x.a")
        if self.plan.target_collation is not None:
            a = sql.SQL("x.a COLLATE {}").format(sql.Identifier(*self.plan.target_collation))
        query = sql.SQL("SELECT coalesce(bool_and({a} < x.b), true) FROM unnest({lo}::text[]::{ty}[], "
                        "{hi}::text[]::{ty}[]) AS x(a, b)").format(a=a, ty=self.type, lo=sql.Literal(cuts[:-1]),
                                                                   hi=sql.Literal(cuts[1:]))
        with conn.cursor() as cur:
            row = cur.execute(query).fetchone()
        return bool(row and row[0])

    def _per_range(self, inner: Callable[[sql.Composable], sql.Composable], which: list[int]) -> sql.Composed:
        """UNION ALL over the ranges `which` of (range index, inner(range predicate)'s columns)."""
        parts: list[sql.Composable] = []
        bounded = [i for i in which if self.ranges[i][0] is not None and self.ranges[i][1] is not None]
        if bounded:
            parts.append(sql.SQL(
                "SELECT r.i, s.* FROM unnest({lo}::text[]::{ty}[], {hi}::text[]::{ty}[], {ix}::int[]) "
                "AS r(lo, hi, i) CROSS JOIN LATERAL ({inner}) AS s"
            ).format(lo=sql.Literal([self.ranges[i][0] for i in bounded]),
                     hi=sql.Literal([self.ranges[i][1] for i in bounded]), ix=sql.Literal(bounded), ty=self.type,
                     inner=inner(sql.SQL("{k} >= r.lo AND {k} < r.hi").format(k=self.column))))
        for i in which:
            lo, hi = self.ranges[i]
            if lo is not None and hi is not None:
                continue
            conditions: list[sql.Composable] = []
            if lo is not None:
                conditions.append(sql.SQL("{} >= {}::text::{}").format(self.column, sql.Literal(lo), self.type))
            if hi is not None:
                conditions.append(sql.SQL("{} < {}::text::{}").format(self.column, sql.Literal(hi), self.type))
            where = sql.SQL(" AND ").join(conditions) if conditions else sql.SQL("true")
            parts.append(sql.SQL("SELECT {}::int, s.* FROM ({}) AS s").format(sql.Literal(i), inner(where)))
        return sql.SQL(" UNION ALL ").join(parts)

    def digests(self) -> sql.Composed:
        plan = self.plan

        def inner(where: sql.Composable) -> sql.Composable:
            # The rows reach the aggregate in key order: the subquery's ORDER BY, which the key's index satisfies
            # without a sort (bitmap scans are off for the table's transaction, see start). Both sides sort the key
            # alike (checked in start); were they not, ranges would differ and the leaf merge, which orders rows
            # itself, would clear them: an order can cost time, never a wrong answer.
            return sql.SQL(
                "SELECT count(*) AS n, sha256(string_agg(CASE WHEN length(q.f) > {wide} THEN sha256(q.f) "
                "ELSE q.f END, ''::bytea)) AS d "
                "FROM (SELECT {form} AS f FROM ONLY {t} WHERE {where} ORDER BY {keys} OFFSET 0) AS q"
            ).format(wide=sql.Literal(_WIDE_FORM), form=plan.form, t=plan.table.ident, where=where,
                     keys=sql.SQL(", ").join(sql.Identifier(name) for name in plan.table.key))

        return self._per_range(inner, list(range(len(self.ranges))))

    def split(self, source_conn: psycopg.Connection[Any], differing: list[Any], sizes: dict[Any, int]) -> bool:
        big = [i for i in differing if sizes[i] > LEAF_ROWS]
        fractions = sql.Literal([i / 2 ** SPLIT_BITS for i in range(1, 2 ** SPLIT_BITS)])
        query = self._per_range(
            lambda where: sql.SQL(
                "SELECT (percentile_disc({f}::float8[]) WITHIN GROUP (ORDER BY {k}))::text[] "
                "FROM ONLY {t} WHERE {where}").format(f=fractions, k=self.column, t=self.plan.table.ident,
                                                      where=where), big)
        with source_conn.cursor() as cur:
            cuts = {int(i): values for i, values in cur.execute(query)}
        finer: list[tuple[Bound, Bound]] = []
        for i in differing:
            lo, hi = self.ranges[i]
            inside = [v for v in _distinct_in_order(cuts.get(i)) if v != lo]
            finer.extend(zip([lo, *inside], [*inside, hi], strict=True))
        if len(finer) == len(differing):
            return False  # the first key column cannot tell these rows apart (a composite key): list them
        self.ranges = finer
        return True

    def leaf(self, differing: list[Any]) -> sql.Composed:
        plan = self.plan
        names = [sql.Identifier(f"k{i}") for i in range(len(plan.keys))]

        def inner(where: sql.Composable) -> sql.Composable:
            return sql.SQL("SELECT {keys}, decode(md5({form}), 'hex') AS h FROM ONLY {t} WHERE {where}").format(
                keys=sql.SQL(", ").join(sql.SQL("{} AS {}").format(k.expression, n)
                                        for k, n in zip(plan.keys, names, strict=True)),
                form=plan.form, t=plan.table.ident, where=where)

        rows = self._per_range(inner, differing)
        cols = sql.SQL(", ").join(sql.SQL("u.{}").format(n) for n in names)
        return sql.SQL("SELECT {cols}, u.h FROM ({rows}) AS u ORDER BY {cols}").format(cols=cols, rows=rows)


_HEAVY_RANGE = 4
"""A first-pass range that would hold this many ranges' worth of rows makes the table use key-hash buckets."""


def _longest_run(values: Sequence[Any]) -> int:
    """The most consecutive equal values (sampled cut points: one repeated value is one heavy key value)."""
    longest = run = 0
    previous: Any = object()
    for v in values:
        run = run + 1 if v == previous else 1
        previous = v
        longest = max(longest, run)
    return longest


def _distinct_in_order(values: Sequence[str | None] | None) -> list[str]:
    """Sampled cut points in the order the server sorted them, repeats and NULLs dropped."""
    result: list[str] = []
    for v in values or ():
        if v is not None and (not result or v != result[-1]):
            result.append(v)
    return result


@dataclass
class _Narrowed:
    """Where the differences are: the `differing` buckets of `scope`'s current pass (the whole table when
    `everywhere`)."""

    scope: _Scope
    differing: list[Any]
    source_rows: int
    target_rows: int
    ranges: int
    ranges_different: int
    passes: int
    everywhere: bool = False


def _both(source_conn: psycopg.Connection[Any], target_conn: psycopg.Connection[Any],
          query: sql.Composed) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Run one query on both sides at once (each on its own session) and return both results."""

    def run(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
        with conn.cursor() as cur:
            return cur.execute(query).fetchall()

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="verify-target") as pool:
        on_target = pool.submit(run, target_conn)
        on_source = run(source_conn)
        return on_source, on_target.result()


def _digests(rows: list[tuple[Any, ...]]) -> dict[Any, Digest]:
    return {b: (int(n), *rest) for b, n, *rest in rows}


def _narrow(source_conn: psycopg.Connection[Any], target_conn: psycopg.Connection[Any], plan: _Plan) -> _Narrowed:
    """Digest every bucket on both sides, then split the buckets that differ until each is small enough to list."""
    scope = plan.scope()
    if not scope.start(source_conn, target_conn):
        scope = _Hashes(plan)
        scope.start(source_conn, target_conn)
    src, tgt = (_digests(r) for r in _both(source_conn, target_conn, scope.digests()))
    result = _Narrowed(scope, _differing(src, tgt), sum(d[0] for d in src.values()),
                       sum(d[0] for d in tgt.values()), scope.buckets, 0, 1)
    result.ranges_different = len(result.differing)
    while result.differing and result.passes < _MAX_PASSES:
        sizes = {b: max(src.get(b, (0,))[0], tgt.get(b, (0,))[0]) for b in result.differing}
        if sum(sizes.values()) * 2 > max(result.source_rows, result.target_rows):
            # Differences everywhere: listing the rows is cheaper than splitting.
            result.everywhere = len(result.differing) == result.ranges
            break
        if not any(n > LEAF_ROWS for n in sizes.values()):
            break
        # Only the buckets that differ are read again, each split finer.
        if not scope.split(source_conn, result.differing, sizes):
            break
        src, tgt = (_digests(r) for r in _both(source_conn, target_conn, scope.digests()))
        result.differing = _differing(src, tgt)
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
    query = plan.leaf_all() if narrowed.everywhere else narrowed.scope.leaf(narrowed.differing)
    width, weighted = max(1, len(plan.keys)), not plan.keys
    source = _Stream(source_conn, query, width, weighted, "source")
    target_stream = _Stream(target_conn, query, width, weighted, "target")
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
        "e.rel = {rel}::oid AND e.txid >= pg_snapshot_xmin({a}::pg_snapshot) "
        "AND NOT pg_visible_in_snapshot(e.txid, {a}::pg_snapshot) "
        "AND pg_visible_in_snapshot(e.txid, {s}::pg_snapshot)"
    ).format(rel=sql.Literal(plan.table.oid), a=sql.Literal(window.applied), s=sql.Literal(window.snapshot))
    with source_conn.cursor() as cur:
        truncated = cur.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {} AS e WHERE {} AND e.op = 'T')").format(
            log_table, where)).fetchone()
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
            rows = cur.execute(sql.SQL("SELECT DISTINCT {} FROM ({}) AS x").format(keys, touched)).fetchall()
            return _InFlight(frozenset(tuple(r) for r in rows))
        images = sql.SQL(
            "SELECT e.old_row::{t} AS r FROM {log} AS e WHERE {w} AND e.old_row IS NOT NULL UNION ALL "
            "SELECT e.new_row::{t} FROM {log} AS e WHERE {w} AND e.new_row IS NOT NULL"
        ).format(t=plan.table.ident, log=log_table, w=where)
        keys = sql.SQL("decode(md5({}), 'hex')").format(_row_form(plan.table, plan.binary, sql.SQL("(x.r)")))
        rows = cur.execute(sql.SQL("SELECT DISTINCT {} FROM ({}) AS x").format(keys, images)).fetchall()
    return _InFlight(frozenset(tuple(r) for r in rows))


def _second_pass(cfg: Config, rechecks: list[_Recheck], results: list[TableParity | None], show_values: bool,
                 live_wait: float) -> None:
    """Once sync has applied everything the first pass's source snapshots contained, read the ranges with rows in
    flight again under a new window; what still differs and is not in flight again is a difference."""
    from migrator.deltalog.snapshot import Snapshot

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
                in_flight = _in_flight(source_conn, r.plan, window)
                found = _leaf(source_conn, target_conn, r.plan, r.narrowed, in_flight)
                # The table's row counts in this window, not the first pass's (taken while rows were in flight).
                counts = sql.SQL("SELECT count(*) FROM ONLY {}").format(r.plan.table.ident)
                on_source, on_target = _both(source_conn, target_conn, counts)
                narrowed = dataclasses.replace(r.narrowed, source_rows=int(on_source[0][0]),
                                               target_rows=int(on_target[0][0]))
                changing = in_flight is not None and (in_flight.everything or bool(in_flight.keys))
                results[r.index] = _result(source_conn, target_conn, r.plan, narrowed, found, show_values,
                                           rechecked=True, changing=changing)
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
    # The key's text form is an untyped literal, so each server reads it as its own column's type and can use its
    # index.
    def lookup(conn: psycopg.Connection[Any], key: tuple[str, ...]) -> str | None:
        query = sql.SQL("SELECT {row} FROM ONLY {table} WHERE {match}").format(
            row=_row_text(table), table=table.ident,
            match=sql.SQL(" AND ").join(sql.SQL("{} = {}").format(sql.Identifier(c), sql.Literal(v))
                                        for c, v in zip(table.key, key, strict=True)))
        with conn.cursor() as cur:
            found = cur.execute(query).fetchone()
        return None if found is None else str(found[0])

    return [
        RowDifference(d.kind, d.key, source_count=d.source_count, target_count=d.target_count,
                      source_row=lookup(source_conn, d.key) if d.source_count else None,
                      target_row=lookup(target_conn, d.key) if d.target_count else None)
        for d in differences
    ]


def _with_multiset_values(source_conn: psycopg.Connection[Any], target_conn: psycopg.Connection[Any],
                          plan: _Plan, differences: list[RowDifference]) -> list[RowDifference]:
    """Fetch the row text behind each listed row hash (operator asked): one scan per side."""
    def rows(conn: psycopg.Connection[Any], side: str) -> dict[str, str]:
        wanted = [d.row_md5 for d in differences if getattr(d, f"{side}_count")]
        if not wanted:
            return {}
        query = sql.SQL(
            "SELECT DISTINCT ON (h) h, r FROM (SELECT md5({form}) AS h, {row} AS r FROM ONLY {table}) AS hashed "
            "WHERE h = ANY({wanted}::text[])"
        ).format(form=plan.form, row=_row_text(plan.table), table=plan.table.ident, wanted=sql.Literal(wanted))
        with conn.cursor() as cur:
            return {h: r for h, r in cur.execute(query)}

    on_source, on_target = rows(source_conn, "source"), rows(target_conn, "target")
    return [
        RowDifference(d.kind, d.key, row_md5=d.row_md5, source_count=d.source_count, target_count=d.target_count,
                      source_row=on_source.get(d.row_md5 or ""), target_row=on_target.get(d.row_md5 or ""))
        for d in differences
    ]
