"""One table's comparison, from its plan to its `TableParity`: plan it (`planning`), narrow it (`narrowing`), list
the differing rows by key (with their values only when the operator asks), and, for a live verify, read the ranges
with rows in flight again once sync has passed the first pass (`recheck`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from migrator.catalog import Table
from migrator.verify import planning
from migrator.verify.narrowing import Found, Narrowed, both, leaf, narrow
from migrator.verify.planning import Buckets, KeyColumn, Plan, column_facts, row_text
from migrator.verify.report import Kind, RowDifference, Status, TableParity
from migrator.verify.window import Window, in_flight


@dataclass(frozen=True)
class Options:
    same_encoding: bool = True
    """The two servers' encodings are the same (key text can be hashed as each stores it)."""
    buckets: Buckets = "auto"


@dataclass
class Recheck:
    """A table with rows in flight in the first pass: its ranges are read again once sync has passed `snapshot`."""

    plan: Plan
    narrowed: Narrowed
    snapshot: str
    index: int = -1


def verify_table(source_conn: psycopg.Connection[Any], target_conn: psycopg.Connection[Any], table: Table,
                 target: Table | None, show_values: bool, progress: Callable[[str, int], None] | None,
                 window: Window | None = None, options: Options | None = None,
                 ) -> tuple[TableParity, Recheck | None]:
    """Compare one table in its worker's snapshots (in `window` while sync follows): its result, and what to read
    again once sync has passed the window when rows were in flight."""
    if target is None:
        return TableParity(table.display, "error", key_columns=table.key,
                           error=f"{table.display} does not exist on the target"), None
    lacking = [c.name for c in table.columns if c.name not in {tc.name for tc in target.columns}]
    if lacking:
        return TableParity(table.display, "error", key_columns=table.key,
                           error=f"the target table lacks column(s) {', '.join(lacking)}"), None
    options = options or Options()
    friendly = options.buckets == "ranges" or (
        options.buckets == "auto" and planning.index_friendly(source_conn, target_conn, table, target))
    plan = Plan(table, target, column_facts(source_conn, table), column_facts(target_conn, target),
                options.same_encoding, friendly)
    narrowed = narrow(source_conn, target_conn, plan)
    if progress is not None:
        progress(table.display, narrowed.source_rows)
    found = Found()
    if narrowed.differing:
        found = leaf(source_conn, target_conn, plan, narrowed, in_flight(source_conn, plan, window))
    result = table_parity(source_conn, target_conn, plan, narrowed, found, show_values)
    again = None
    if found.in_flight and window is not None:
        again = Recheck(plan, narrowed, window.snapshot)
    return result, again


def table_parity(source_conn: psycopg.Connection[Any], target_conn: psycopg.Connection[Any], plan: Plan,
                 narrowed: Narrowed, found: Found, show_values: bool, rechecked: bool = False,
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
    flight = found.in_flight
    if status == "identical" and narrowed.source_rows != narrowed.target_rows and rechecked and changing:
        # A recheck reads only the ranges that had rows in flight; rows changed again elsewhere in its window.
        status, flight = "in_flight", abs(narrowed.source_rows - narrowed.target_rows)
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
        passes=narrowed.passes, in_flight=flight, rechecked=rechecked,
    )


def recheck(source_conn: psycopg.Connection[Any], target_conn: psycopg.Connection[Any], window: Window,
            r: Recheck, show_values: bool) -> TableParity:
    """Read the ranges of `r` that had rows in flight again, in a new `window`; what still differs and is not in
    flight again is a difference."""
    moving = in_flight(source_conn, r.plan, window)
    found = leaf(source_conn, target_conn, r.plan, r.narrowed, moving)
    # The table's row counts in this window, not the first pass's (taken while rows were in flight).
    counts = sql.SQL("SELECT count(*) FROM ONLY {}").format(r.plan.table.ident)
    on_source, on_target = both(source_conn, target_conn, counts)
    narrowed = dataclasses.replace(r.narrowed, source_rows=int(on_source[0][0]), target_rows=int(on_target[0][0]))
    changing = moving is not None and (moving.everything or bool(moving.keys))
    return table_parity(source_conn, target_conn, r.plan, narrowed, found, show_values, rechecked=True,
                        changing=changing)


def _keyed_difference(keys: Sequence[KeyColumn], key: tuple[Any, ...], source_hash: bytes | None,
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
            row=row_text(table), table=table.ident,
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
                          plan: Plan, differences: list[RowDifference]) -> list[RowDifference]:
    """Fetch the row text behind each listed row hash (operator asked): one scan per side."""
    def rows(conn: psycopg.Connection[Any], side: str) -> dict[str, str]:
        wanted = [d.row_md5 for d in differences if getattr(d, f"{side}_count")]
        if not wanted:
            return {}
        query = sql.SQL(
            "SELECT DISTINCT ON (h) h, r FROM (SELECT md5({form}) AS h, {row} AS r FROM ONLY {table}) AS hashed "
            "WHERE h = ANY({wanted}::text[])"
        ).format(form=plan.form, row=row_text(plan.table), table=plan.table.ident, wanted=sql.Literal(wanted))
        with conn.cursor() as cur:
            return {h: r for h, r in cur.execute(query)}

    on_source, on_target = rows(source_conn, "source"), rows(target_conn, "target")
    return [
        RowDifference(d.kind, d.key, row_md5=d.row_md5, source_count=d.source_count, target_count=d.target_count,
                      source_row=on_source.get(d.row_md5 or ""), target_row=on_target.get(d.row_md5 or ""))
        for d in differences
    ]
