"""Row parity between the legacy (source) and the new (target) database: `migrator verify`.

Per table, both servers digest buckets of rows at the same time (key ranges, or buckets of a key hash: `buckets`),
buckets whose digests differ are split again, and once they are small the two sides stream one short record per row
of just those buckets through server-side cursors, merged by Python in the same order (`narrowing`, `rows`), so
memory stays bounded whatever the size of the table. This module runs the tables on worker threads, each with its
own pair of sessions (`window.Pair`), reads again the tables that had rows in flight while sync followed (`window`),
marks what the row comparison cannot see (and post-data a copy left for sync), and records a whole-database verify
for go/no-go.

The package:

* `report`: the result types (`ParityReport`, `TableParity`, `RowDifference`, `NotCompared`) and their text;
* `planning`: how a table is compared (row form, key columns, kind of bucket);
* `buckets`: key ranges and key-hash buckets: digests, splits, leaves;
* `narrowing`: digesting both sides and splitting differing buckets down to leaves, then merging their rows;
* `rows`: one side's row stream and the merge of two;
* `window`: the in-flight window of a live verify and a worker's pair of sessions;
* `compare`: one table, from its plan to its `TableParity`.

Values enter these queries as literals (`sql.Literal`), never as parameters: psycopg reads every `%s` of a query
that has parameters as a placeholder, including one inside a quoted table or column name (`"pct%s"`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import queue
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import psycopg

from migrator import catalog, db, log, postdata, state
from migrator.catalog import Table
from migrator.config import Config
from migrator.errors import MigratorError
from migrator.redaction import KeyMask, database_error, scrub
from migrator.verify import compare
from migrator.verify.compare import Options, Recheck, verify_table
from migrator.verify.planning import Buckets
from migrator.verify.report import (
    MAX_LISTED,
    Kind,
    NotCompared,
    ParityReport,
    RowDifference,
    Status,
    TableParity,
)
from migrator.verify.window import Pair, has_delta_log, wait_for_sync

__all__ = [
    "LIVE_WAIT", "MAX_LISTED", "Buckets", "Kind", "NotCompared", "ParityReport", "RowDifference", "Status",
    "TableParity", "verify",
]

LIVE_WAIT = 120.0
"""How long a live verify waits for sync to pass the first pass's snapshot before it reports rows still in flight."""


def verify(cfg: Config, *, tables: list[str] | None = None, show_values: bool = False,
           progress: Callable[[str, int], None] | None = None, live_wait: float = LIVE_WAIT,
           buckets: Buckets = "auto") -> ParityReport:
    """Compare every row of the migrating tables (or of `tables`, "schema.table" names) on source and target.

    While sync is following (the target has an applied position and the source a delta log), rows that differ only
    because of changes not yet applied are counted as in flight, and their ranges are read again once sync has
    passed the first pass's snapshot (waiting at most `live_wait` seconds).
    `progress(table, rows)` is called now and then from the worker threads with the rows compared so far.
    `buckets`: "auto" chooses key ranges or key-hash buckets per table (see `buckets`); "hashes" reads every table
    by sequential scans (for a cold legacy server); "ranges" uses key ranges wherever the collations allow.
    Raises ConnectionFailed if either database cannot be reached; any other failure is reported per table.
    """
    db.refuse_same_database(cfg.source_dsn, cfg.target_dsn)
    with db.session(cfg.source_dsn, role="source") as conn:
        source_tables = catalog.list_tables(conn, cfg.tables)
        live = has_delta_log(conn)
        unseen = _unseen(conn, cfg, source_tables)
        source_encoding = _encoding(conn)
    with db.session(cfg.target_dsn, role="target") as conn:
        target_tables = {(t.schema, t.name): t for t in catalog.list_tables(conn, cfg.tables)}
        controlled = state.exists(conn)
        live = live and controlled and state.position(conn) is not None
        owed = state.post_data_deferred(conn) if controlled else None
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
    rechecks: list[Recheck] = []
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="verify") as pool:
        futures = [pool.submit(_work, cfg, jobs, results, show_values, progress, live, rechecks,
                               Options(same_encoding, buckets))
                   for _ in range(workers)]
        for f in futures:
            f.result()
    if rechecks:
        _second_pass(cfg, rechecks, results, show_values, live_wait)
    done = tuple(unseen.mark(r) for r in results if r is not None)
    assert len(done) == len(results)
    waiting = () if owed is None else (NotCompared(
        "post-data", "post-data", f"{postdata.describe(owed)} are not on the target yet: the copy read its chunks "
        "under different snapshots, and `migrator sync` restores them after its next batch (the go/no-go refuses a "
        "cutover until then); the rows are compared all the same", False),)
    report = ParityReport(db.describe_dsn(cfg.source_dsn), db.describe_dsn(cfg.target_dsn), done, show_values,
                          not_compared=unseen.listed + waiting if tables is None else (), mask=mask)
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



def _work(cfg: Config, jobs: queue.SimpleQueue[tuple[int, Table, Table | None]],
          results: list[TableParity | None], show_values: bool,
          progress: Callable[[str, int], None] | None, live: bool, rechecks: list[Recheck],
          options: Options) -> None:
    pair = Pair(cfg)
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
                result, recheck = verify_table(source_conn, target_conn, table, target, show_values, progress,
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
                logger.warning("verify.table_not_verified", error=result.error)
            else:
                logger.info(
                    "verify.table", status=result.status, source_rows=result.source_rows,
                    target_rows=result.target_rows, differences=result.difference_count, in_flight=result.in_flight,
                )
            results[index] = result
    finally:
        pair.close()


def _message(exc: BaseException) -> str:
    if isinstance(exc, psycopg.Error):
        return database_error(exc)
    return scrub(str(exc).strip()) or type(exc).__name__



def _second_pass(cfg: Config, rechecks: list[Recheck], results: list[TableParity | None], show_values: bool,
                 live_wait: float) -> None:
    """Once sync has applied everything the first pass's source snapshots contained, read the ranges with rows in
    flight again under a new window; what still differs and is not in flight again is a difference."""
    if not wait_for_sync(cfg, [r.snapshot for r in rechecks], live_wait):
        return
    pair = Pair(cfg)
    try:
        for r in rechecks:
            try:
                source_conn, target_conn = pair.open()
                results[r.index] = compare.recheck(source_conn, target_conn, pair.window(), r, show_values)
                pair.end_table()
            except (psycopg.Error, MigratorError) as exc:
                pair.close()
                results[r.index] = TableParity(r.plan.table.display, "error", key_columns=r.plan.table.key,
                                               error=_message(exc))
    finally:
        pair.close()
