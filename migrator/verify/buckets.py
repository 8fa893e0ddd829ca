"""The two kinds of bucket a table's rows are digested in (`Scope`): what each side digests per bucket, how a
differing bucket is split finer, and which rows a leaf lists.

Each row is digested in its canonical form (`planning.row_form`): the binary send form of every column (what binary
COPY moved), or the text form for columns of types that are not built in. Two kinds of bucket:

* Key ranges (`Ranges`; tables with a key whose first column sorts alike on both sides): ranges are cut at
  boundaries sampled from the source's key and read through the key's index, one range at a time; a range's digest
  is the count of its rows and the SHA-256 of its rows' forms concatenated in key order (a form over 1 kB is replaced
  by its own SHA-256). One hash call per range rather than per row is what makes this the fast path.
* Key-hash buckets (`Hashes`; tables without a key, and keys whose collations differ between the sides, where a range
  would hold different rows on each side): the bucket is the top bits of a 64-bit hash of the key (without a key: of
  the row's md5). A bucket's digest is its count and two sums of its rows' md5s, each md5 folded to 64 bits by
  `hashtextextended` with its own seed and summed exactly, so the order the server reads rows in does not matter
  and one sequential scan digests the whole table. The subquery producing the md5 is fenced with OFFSET 0: without
  the fence the planner inlines it and computes md5 once per sum (measured: twice the cost).

Either way a changed, missing or extra row changes its bucket's count or digest; an accident would have to produce a
SHA-256 collision, or cancel two independent 64-bit sums at once, to hide it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from psycopg import sql

from migrator.catalog import Table
from migrator.verify.planning import Plan

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


class Scope:
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


class Hashes(Scope):
    """Key-hash buckets: the top `bits` bits of a 64-bit hash; a pass may be restricted to the rows of some buckets
    of the previous pass."""

    def __init__(self, plan: Plan) -> None:
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


class Ranges(Scope):
    """Key ranges [lo, hi) of the first key column (None: open), cut at values sampled from the source and read
    through the key's index one range at a time."""

    def __init__(self, plan: Plan) -> None:
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


def scope_for(plan: Plan) -> Scope:
    """The buckets `plan` asks for: key ranges where its key sorts alike on both sides, key-hash buckets otherwise."""
    return Ranges(plan) if plan.ranged else Hashes(plan)
