"""Narrowing a table down to its differing rows: both sides digest every bucket (`buckets`) in one statement each,
at the same time; the buckets whose digests differ are split again until they are small enough to list (`narrow`);
then both sides stream one short record per row of just those buckets, merged by key (`leaf`, over `rows`), so
memory stays bounded whatever the size of the table.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from migrator.verify import buckets
from migrator.verify.buckets import Scope
from migrator.verify.planning import Plan
from migrator.verify.report import MAX_LISTED
from migrator.verify.rows import Stream, merge
from migrator.verify.window import InFlight

_MAX_PASSES = 6

Digest = tuple[Any, ...]


@dataclass
class Narrowed:
    """Where the differences are: the `differing` buckets of `scope`'s current pass (the whole table when
    `everywhere`)."""

    scope: Scope
    differing: list[Any]
    source_rows: int
    target_rows: int
    ranges: int
    ranges_different: int
    passes: int
    everywhere: bool = False


def both(source_conn: psycopg.Connection[Any], target_conn: psycopg.Connection[Any],
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


def narrow(source_conn: psycopg.Connection[Any], target_conn: psycopg.Connection[Any], plan: Plan) -> Narrowed:
    """Digest every bucket on both sides, then split the buckets that differ until each is small enough to list."""
    scope = buckets.scope_for(plan)
    if not scope.start(source_conn, target_conn):
        scope = buckets.Hashes(plan)
        scope.start(source_conn, target_conn)
    src, tgt = (_digests(r) for r in both(source_conn, target_conn, scope.digests()))
    result = Narrowed(scope, _differing(src, tgt), sum(d[0] for d in src.values()),
                       sum(d[0] for d in tgt.values()), scope.buckets, 0, 1)
    result.ranges_different = len(result.differing)
    while result.differing and result.passes < _MAX_PASSES:
        sizes = {b: max(src.get(b, (0,))[0], tgt.get(b, (0,))[0]) for b in result.differing}
        if sum(sizes.values()) * 2 > max(result.source_rows, result.target_rows):
            # Differences everywhere: listing the rows is cheaper than splitting.
            result.everywhere = len(result.differing) == result.ranges
            break
        if not any(n > buckets.LEAF_ROWS for n in sizes.values()):
            break
        # Only the buckets that differ are read again, each split finer.
        if not scope.split(source_conn, result.differing, sizes):
            break
        src, tgt = (_digests(r) for r in both(source_conn, target_conn, scope.digests()))
        result.differing = _differing(src, tgt)
        result.passes += 1
    return result


def _differing(source: dict[int, Digest], target: dict[int, Digest]) -> list[int]:
    return sorted(b for b in source.keys() | target.keys() if source.get(b) != target.get(b))


@dataclass
class Found:
    """What the leaf merge found: differences (the first MAX_LISTED listed) and rows in flight."""

    count: int = 0
    listed: list[tuple[Any, Any, Any]] = field(default_factory=list)
    in_flight: int = 0


def leaf(source_conn: psycopg.Connection[Any], target_conn: psycopg.Connection[Any], plan: Plan,
         narrowed: Narrowed, in_flight: InFlight | None = None) -> Found:
    """Stream (key, row md5) of the differing ranges from both sides and merge them: every differing row, by key.

    A row whose key (without a key: whose row hash) a change in the live window touched is in flight, not different.
    """
    query = plan.leaf_all() if narrowed.everywhere else narrowed.scope.leaf(narrowed.differing)
    width, weighted = max(1, len(plan.keys)), not plan.keys
    source = Stream(source_conn, query, width, weighted, "source")
    target_stream = Stream(target_conn, query, width, weighted, "target")
    found = Found()
    with contextlib.closing(source), contextlib.closing(target_stream):
        for difference in merge(source, target_stream):
            if in_flight is not None and (in_flight.everything or difference[0] in in_flight.keys):
                found.in_flight += 1
                continue
            found.count += 1
            if len(found.listed) < MAX_LISTED:
                found.listed.append(difference)
    return found


