"""What the legacy database holds: its tables, their columns and keys, its sequences.

Read-only. Inspect, prepare, copy, sync and verify all see tables through `Table`, so they agree on which tables
migrate, which columns are written (generated columns are not), and which columns identify a row. A table's
`fingerprint` changes whenever DDL changes what a row looks like; sync compares fingerprints, and the key, to detect
DDL.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from migrator.config import TableFilter


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    not_null: bool
    generated: bool
    identity: str  # "" | "a" (ALWAYS) | "d" (BY DEFAULT)


@dataclass(frozen=True)
class Table:
    oid: int
    schema: str
    name: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]
    """Columns of the primary key, or of a unique index on NOT NULL columns; empty when rows have no identity."""
    key_source: str  # "primary key" | "unique index <name>" | ""
    partition_of: str | None
    est_rows: int
    bytes: int
    in_hierarchy: bool = False
    """A partition, or a parent or child in table inheritance: a statement may address it through another table."""
    unlogged: bool = False
    """UNLOGGED: migrated like any table, but a crash of its server empties it without firing a trigger."""

    @property
    def ident(self) -> sql.Composed:
        return sql.SQL("{}.{}").format(sql.Identifier(self.schema), sql.Identifier(self.name))

    @property
    def display(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def writable_columns(self) -> tuple[Column, ...]:
        return tuple(c for c in self.columns if not c.generated)

    @property
    def has_identity_always(self) -> bool:
        return any(c.identity == "a" for c in self.columns)

    @property
    def fingerprint(self) -> str:
        text = "|".join([self.schema, self.name] + [f"{c.name}:{c.type}:{int(c.generated)}" for c in self.columns])
        return hashlib.md5(text.encode()).hexdigest()


_TABLES = """
SELECT c.oid::bigint AS oid, n.nspname AS schema, c.relname AS name,
       coalesce(c.reltuples, -1)::bigint AS est_rows,
       pg_total_relation_size(c.oid) AS bytes, c.relpersistence = 'u' AS unlogged,
       (c.relispartition
        OR EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhparent = c.oid OR i.inhrelid = c.oid)) AS in_hierarchy,
       (SELECT pn.nspname || '.' || pc.relname FROM pg_inherits i JOIN pg_class pc ON pc.oid = i.inhparent
          JOIN pg_namespace pn ON pn.oid = pc.relnamespace WHERE i.inhrelid = c.oid AND c.relispartition) AS partition_of
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind = 'r' AND c.relpersistence IN ('p', 'u')
   AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%%'
 ORDER BY n.nspname, c.relname
"""

_COLUMNS = """
SELECT a.attrelid::bigint AS oid, a.attname AS name, format_type(a.atttypid, a.atttypmod) AS type,
       a.attnotnull AS not_null, a.attgenerated <> '' AS generated, a.attidentity AS identity
  FROM pg_attribute a
 WHERE a.attrelid = ANY(%s) AND a.attnum > 0 AND NOT a.attisdropped
 ORDER BY a.attrelid, a.attnum
"""

# Primary key first, then unique, non-partial, non-expression indexes whose columns are all NOT NULL.
_KEYS = """
SELECT i.indrelid::bigint AS oid, ic.relname AS index, i.indisprimary AS primary,
       array_agg(a.attname ORDER BY k.ord) AS columns
  FROM pg_index i
  JOIN pg_class ic ON ic.oid = i.indexrelid
  CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
  JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
 WHERE i.indrelid = ANY(%s) AND i.indisunique AND i.indisvalid AND i.indpred IS NULL AND i.indexprs IS NULL
 GROUP BY i.indrelid, ic.relname, i.indisprimary
HAVING bool_and(a.attnotnull) AND bool_and(k.attnum > 0)
 ORDER BY i.indrelid, i.indisprimary DESC, count(*), ic.relname
"""


def list_tables(conn: psycopg.Connection[Any], tables: TableFilter) -> list[Table]:
    """Every ordinary table, logged or unlogged (partition leaves included, partitioned parents not; temporary
    tables not), that the filter admits."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(_TABLES)
        rels = [r for r in cur.fetchall() if tables.matches(r["schema"], r["name"])]
        oids = [r["oid"] for r in rels]
        cur.execute(_COLUMNS, (oids,))
        columns: dict[int, list[Column]] = {}
        for r in cur.fetchall():
            columns.setdefault(r["oid"], []).append(
                Column(r["name"], r["type"], r["not_null"], r["generated"], r["identity"])
            )
        cur.execute(_KEYS, (oids,))
        keys: dict[int, tuple[tuple[str, ...], str]] = {}
        for r in cur.fetchall():
            if r["oid"] not in keys:
                label = "primary key" if r["primary"] else f"unique index {r['index']}"
                keys[r["oid"]] = (tuple(r["columns"]), label)
    result = []
    for r in rels:
        key, label = keys.get(r["oid"], ((), ""))
        result.append(
            Table(
                oid=r["oid"], schema=r["schema"], name=r["name"], columns=tuple(columns.get(r["oid"], ())),
                key=key, key_source=label, partition_of=r["partition_of"],
                est_rows=max(int(r["est_rows"]), 0), bytes=int(r["bytes"]), in_hierarchy=bool(r["in_hierarchy"]),
                unlogged=bool(r["unlogged"]),
            )
        )
    return result


# Columns that can hold a large object's OID: type oid, or a domain over it (the lo extension's `lo`).
_LARGE_OBJECT_COLUMNS = """
SELECT a.attrelid::bigint AS oid, array_agg(a.attname ORDER BY a.attnum) AS columns
  FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
 WHERE a.attrelid = ANY(%s) AND a.attnum > 0 AND NOT a.attisdropped
   AND 'oid'::regtype IN (t.oid, t.typbasetype)
 GROUP BY a.attrelid
"""


def large_object_count(conn: psycopg.Connection[Any]) -> int:
    """How many large objects (`pg_largeobject_metadata`) the database holds."""
    row = conn.execute("SELECT count(*) FROM pg_largeobject_metadata").fetchone()
    return int(row[0]) if row else 0


def large_object_columns(conn: psycopg.Connection[Any], tables: list[Table]) -> dict[str, tuple[str, ...]]:
    """Table display name -> its columns that can refer to a large object (type oid or lo), for tables with any."""
    names = {t.oid: t.display for t in tables}
    with conn.cursor() as cur:
        cur.execute(_LARGE_OBJECT_COLUMNS, (list(names),))
        return {names[r[0]]: tuple(r[1]) for r in cur.fetchall()}


@dataclass(frozen=True)
class Relation:
    """A relation whose rows are not copied as a table's: a materialized view or a foreign table."""

    schema: str
    name: str
    kind: str
    """"materialized view" or "foreign table"."""
    populated: bool
    """A materialized view: refreshed at least once (false: created WITH NO DATA, and it stays so on the target)."""

    @property
    def display(self) -> str:
        return f"{self.schema}.{self.name}"


_RELATIONS = """
SELECT n.nspname AS schema, c.relname AS name, c.relkind = 'm' AS matview, c.relispopulated AS populated
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind IN ('m', 'f')
   AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%%'
 ORDER BY 1, 2
"""


def list_relations(conn: psycopg.Connection[Any], tables: TableFilter) -> list[Relation]:
    """The materialized views and foreign tables the filter admits."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(_RELATIONS)
        return [Relation(r["schema"], r["name"], "materialized view" if r["matview"] else "foreign table",
                         bool(r["populated"]))
                for r in cur.fetchall() if tables.matches(r["schema"], r["name"])]


@dataclass(frozen=True)
class Sequence:
    schema: str
    name: str
    last_value: int | None
    is_called: bool

    @property
    def ident(self) -> sql.Composed:
        return sql.SQL("{}.{}").format(sql.Identifier(self.schema), sql.Identifier(self.name))

    @property
    def display(self) -> str:
        return f"{self.schema}.{self.name}"


def list_sequences(conn: psycopg.Connection[Any], tables: TableFilter) -> list[Sequence]:
    """Sequences in the schemas that migrate (identity and serial sequences included), with their positions."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            """
            SELECT n.nspname AS schema, c.relname AS name
              FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind = 'S' AND n.nspname NOT IN ('pg_catalog', 'information_schema')
             ORDER BY 1, 2
            """
        )
        names = [(r["schema"], r["name"]) for r in cur.fetchall() if tables.matches_schema(r["schema"])]
        result = []
        for schema, name in names:
            cur.execute(
                sql.SQL("SELECT last_value, is_called FROM {}.{}").format(sql.Identifier(schema), sql.Identifier(name))
            )
            row = cur.fetchone()
            assert row is not None
            result.append(Sequence(schema, name, row["last_value"], row["is_called"]))
    return result
