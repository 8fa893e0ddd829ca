"""How one table is compared (`Plan`): the row's canonical form, how its key columns are streamed and ordered, and
which kind of bucket it gets (key ranges or key-hash buckets, see `buckets`), from facts about its columns on both
sides and whether its key's index serves range scans.

The row form (`row_form`) is `record_send(ROW(<source columns>))`: every column in its binary send form, which is
exact (float -0, NaN and infinities, numeric scale, timestamps to the microsecond) and does not depend on any output
setting. Columns whose binary form carries a type OID or is not portable between servers (types not built in at a
fixed OID: enums, domains, composites, extension types; arrays, whose send form also records whether a null bitmap
is stored, which depends on the value's history; OID aliases such as regclass; columns typed differently on the two
sides) enter in their text form instead, under the pinned output settings of `migrator.db`.
It is built from the source's column list, so a target whose columns are in another order, or which has columns of
its own, still compares what migrated.

A merge (`rows.merge`) is only correct if both streams arrive in an order Python can reproduce. Integer and uuid keys
are ordered by their typed value (Python ints and UUIDs order the same way, and the primary key index can serve the
scan); every other key column is ordered by the UTF-8 bytes of its text form, which neither side's collation nor
encoding can change (`KeyColumn`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import psycopg
from psycopg import sql

from migrator.catalog import Table

Buckets = Literal["auto", "ranges", "hashes"]
"""The kind of bucket the operator asks for: "auto" chooses per table (`Plan.ranged`)."""


@dataclass(frozen=True)
class KeyColumn:
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


def key_columns(source: Table, target: Table) -> tuple[KeyColumn, ...]:
    target_types = {c.name: c.type for c in target.columns}
    source_types = {c.name: c.type for c in source.columns}
    result = []
    for name in source.key:
        s, t = source_types[name], target_types[name]
        if s in _INTEGER_TYPES and t in _INTEGER_TYPES:
            result.append(KeyColumn(name, "integer"))
        elif s == t == "uuid":
            result.append(KeyColumn(name, "uuid"))
        else:
            result.append(KeyColumn(name, "text"))
    return tuple(result)


def row_text(table: Table, record: sql.Composable | None = None) -> sql.Composed:
    def column(name: str) -> sql.Composable:
        return sql.Identifier(name) if record is None else sql.SQL("{}.{}").format(record, sql.Identifier(name))

    return sql.SQL("ROW({})::text").format(sql.SQL(", ").join(column(c.name) for c in table.columns))


@dataclass(frozen=True)
class ColumnFacts:
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

    def sorts_like(self, other: ColumnFacts) -> bool:
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


def column_facts(conn: psycopg.Connection[Any], table: Table) -> dict[str, ColumnFacts]:
    with conn.cursor() as cur:
        return {name: ColumnFacts(type_, bool(portable), bool(array), collation, version,
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


def index_friendly(source_conn: psycopg.Connection[Any], target_conn: psycopg.Connection[Any], table: Table,
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


def row_form(table: Table, binary: frozenset[str], record: sql.Composable | None = None) -> sql.Composed:
    """The row's canonical form (bytea): `record_send` of its columns, those not in `binary` as text."""
    def column(name: str) -> sql.Composable:
        col = sql.Identifier(name) if record is None else sql.SQL("{}.{}").format(record, sql.Identifier(name))
        return col if name in binary else sql.SQL("{}::text").format(col)

    return sql.SQL("record_send(ROW({}))").format(sql.SQL(", ").join(column(c.name) for c in table.columns))


class Plan:
    """How one table is compared: its row form, key columns and kind of bucket."""

    def __init__(self, table: Table, target: Table, source_facts: dict[str, ColumnFacts] | None = None,
                 target_facts: dict[str, ColumnFacts] | None = None, same_encoding: bool = True,
                 index_friendly: bool = True) -> None:
        self.table = table
        sf, tf = source_facts or {}, target_facts or {}
        self.binary = frozenset(
            c.name for c in table.columns
            if c.name in sf and c.name in tf and sf[c.name].portable and tf[c.name].portable
            and sf[c.name].type == tf[c.name].type
        )
        self.form = row_form(table, self.binary)
        self.keys = key_columns(table, target) if table.key else ()
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


def _key_hash(keys: Sequence[KeyColumn], same_encoding: bool) -> sql.Composable:
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


