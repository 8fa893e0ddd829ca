"""Reading the delta log outside a batch: what is pending (sync's lag, rollback's), whether a log exists, the
events of one table in a window (verify's rows in flight), and the keys of the rows changed since a snapshot
(`objects sync --follow`). Each composes its SQL from snapshot.window, as batches do.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg import sql

from migrator.catalog import Table
from migrator.config import CAPTURE_SCHEMA
from migrator.deltalog import snapshot
from migrator.deltalog.apply import LOG
from migrator.deltalog.snapshot import Snapshot


def pending(conn: psycopg.Connection[Any], applied: str | None) -> tuple[int, float | None]:
    """The count of events committed since `applied` (a snapshot; None: everything logged) and the age in seconds of
    the oldest (None when there is none), in the connection's current transaction."""
    with conn.cursor() as cur:
        # Everything logged, before the first batch; after, the window from the applied position to now.
        where = sql.SQL("true") if applied is None else snapshot.window(Snapshot.parse(applied))
        cur.execute(sql.SQL("SELECT count(*), extract(epoch FROM now() - min(e.captured_at))::float8 "
                            "FROM {} AS e WHERE {}").format(LOG, where))
        row = cur.fetchone()
    assert row is not None
    return int(row[0]), None if row[1] is None else float(row[1])


def pending_by_table(conn: psycopg.Connection[Any], applied: str | None) -> tuple[dict[int, int], float | None]:
    """The events committed since `applied` per table (its oid) and the age in seconds of the oldest, as `pending`
    counts them, in one statement."""
    with conn.cursor() as cur:
        where = sql.SQL("true") if applied is None else snapshot.window(Snapshot.parse(applied))
        cur.execute(sql.SQL("SELECT e.rel::bigint, count(*), extract(epoch FROM now() - min(e.captured_at))::float8 "
                            "FROM {} AS e WHERE {} GROUP BY e.rel").format(LOG, where))
        rows = cur.fetchall()
    ages = [float(r[2]) for r in rows if r[2] is not None]
    return {int(r[0]): int(r[1]) for r in rows}, max(max(ages), 0.0) if ages else None


def overview(conn: psycopg.Connection[Any], applied: str | None, *,
             pending: bool = True) -> tuple[bool, dict[int, int], float | None, int]:
    """In one statement (the console's look at the legacy database): whether it is frozen, the events committed
    since `applied` per table (its oid) and the age of the oldest (as `pending_by_table`; left out, as empty, unless
    `pending`), and the delta log's size in bytes. Needs the capture installed (raises UndefinedTable otherwise)."""
    window = sql.SQL("true") if applied is None else snapshot.window(Snapshot.parse(applied))
    per_table = sql.SQL(
        "(SELECT coalesce(json_agg(json_build_array(p.rel, p.n, p.age)), '[]'::json) FROM "
        " (SELECT e.rel::bigint AS rel, count(*) AS n, extract(epoch FROM now() - min(e.captured_at))::float8 AS age "
        "  FROM {log} AS e WHERE {window} GROUP BY e.rel) AS p)").format(log=LOG, window=window)
    with conn.cursor() as cur:
        cur.execute(sql.SQL(
            "SELECT (SELECT frozen FROM {schema}.freeze_state WHERE id = 1), {per_table}, "
            "       (SELECT coalesce(sum(pg_total_relation_size(i.inhrelid)), 0) FROM pg_inherits AS i "
            "        WHERE i.inhparent = to_regclass(%s))").format(
            schema=sql.Identifier(CAPTURE_SCHEMA), per_table=per_table if pending else sql.SQL("'[]'::json")),
            (f"{CAPTURE_SCHEMA}.delta_log",))
        row = cur.fetchone()
    assert row is not None
    rows = row[1] or []
    ages = [float(r[2]) for r in rows if r[2] is not None]
    return (bool(row[0]), {int(r[0]): int(r[1]) for r in rows}, max(max(ages), 0.0) if ages else None,
            int(row[2] or 0))


def has_log(conn: psycopg.Connection[Any]) -> bool:
    """Whether the database has a delta log (a capture is installed). Leaves the transaction open."""
    with conn.cursor() as cur:
        row = cur.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{CAPTURE_SCHEMA}.delta_log",)).fetchone()
    return bool(row and row[0])


def lock_log(cur: psycopg.Cursor[Any]) -> None:
    """Lock the log ACCESS SHARE for the transaction: no child of it is truncated (rotation) until it ends."""
    cur.execute(sql.SQL("LOCK TABLE {} IN ACCESS SHARE MODE").format(LOG))


def _in_table(table: Table, applied: Snapshot, current: Snapshot) -> sql.Composed:
    return sql.SQL("e.rel = {rel}::oid AND {window}").format(rel=sql.Literal(table.oid),
                                                             window=snapshot.window(applied, current))


def truncated(cur: psycopg.Cursor[Any], table: Table, applied: Snapshot, current: Snapshot) -> bool:
    """Whether a TRUNCATE of `table` committed in the window from `applied` to `current`."""
    row = cur.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {} AS e WHERE {} AND e.op = 'T')").format(
        LOG, _in_table(table, applied, current))).fetchone()
    return bool(row and row[0])


def touched_keys(table: Table, applied: Snapshot, current: Snapshot) -> sql.Composed:
    """A query of the keys (columns named after the key columns, typed) that changes of `table` (with a key)
    committed in the window touched, one row per event."""
    return sql.SQL("SELECT {} FROM {} AS e WHERE {} AND e.key IS NOT NULL").format(
        snapshot.decode_key(table, named=True), LOG, _in_table(table, applied, current))


def row_images(table: Table, applied: Snapshot, current: Snapshot) -> sql.Composed:
    """A query of the row images (column `r`, of the table's row type) that changes of `table` (without a key)
    committed in the window logged, before and after."""
    return sql.SQL(
        "SELECT e.old_row::{t} AS r FROM {log} AS e WHERE {w} AND e.old_row IS NOT NULL UNION ALL "
        "SELECT e.new_row::{t} FROM {log} AS e WHERE {w} AND e.new_row IS NOT NULL"
    ).format(t=table.ident, log=LOG, w=_in_table(table, applied, current))


def _in_tables(rels: list[int], applied: Snapshot) -> sql.Composed:
    return sql.SQL("e.rel = ANY({}::oid[]) AND {}").format(sql.Literal(rels), snapshot.window(applied))


def changed_keys(conn: psycopg.Connection[Any], rels: list[int], applied: Snapshot, *,
                 batch: int = 1000) -> Iterator[list[str]]:
    """The keys of the rows of these tables (oids) that changes committed since `applied` touched, up to the
    reading transaction's own snapshot: distinct, as text (a one-column key as its text, several joined by '/'), in
    lists of at most `batch`. The caller locks the log (lock_log) before its transaction's snapshot."""
    with conn.cursor(name="migrator_changed_keys") as cur:
        cur.execute(sql.SQL(
            "SELECT DISTINCT CASE WHEN cardinality(e.key) = 1 THEN e.key[1] ELSE array_to_string(e.key, '/') END "
            "FROM {} AS e WHERE {} AND e.key IS NOT NULL").format(LOG, _in_tables(rels, applied)))
        while rows := cur.fetchmany(batch):
            yield [str(r[0]) for r in rows]


def changed_without_key(conn: psycopg.Connection[Any], rels: list[int], applied: Snapshot) -> bool:
    """Whether changes committed since `applied` to these tables name no row by key (a TRUNCATE, a table without a
    key): only a full listing tells what they did."""
    row = conn.execute(sql.SQL("SELECT EXISTS (SELECT FROM {} AS e WHERE {} AND (e.key IS NULL OR e.op = 'T'))")
                       .format(LOG, _in_tables(rels, applied))).fetchone()
    return bool(row and row[0])
