"""What the generic workload may write, derived from the legacy database's catalog (any schema).

For every migrating table the plan says how a writer makes a copy of an existing row under a new key, and which
columns it may update:

- a copy takes every column of the row it copies, except the key columns (and the columns of other unique indexes),
  which get new values: left to their default when they have one (a sequence, an identity), otherwise made by the
  writer for integer, uuid and text types (integers above the column's largest value when the workload started, a
  stride apart per writer; UUIDs; DICOM-like UIDs `2.25.<uuid as integer>`, or a short token for a short column).
  A column that references another table keeps the copied value, so the copy references the same parent as the
  original and every foreign key holds. A table whose key cannot be made new (all of it foreign keys, or of other
  types) gets no copies, and the plan says why. A table without a key gets exact copies (a duplicate row), and
  none when it has an identity column GENERATED ALWAYS (a copy would not be one).
- an update sets one column that is neither part of the key nor of a unique index nor referenced by another table
  (nor part of a foreign key of several columns):
  text columns get a new value that fits their declared length (a UID, or a short token for a short column; columns
  shorter than SHORT_TEXT get another row's value), other columns the value another existing row holds (a value of
  the column's type, valid for its foreign key if it has one). Tables without a key are not updated: their rows cannot be
  told apart.

Column types are read as the catalog prints them (`format_type`); identifiers are only ever composed with
psycopg.sql by the writers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from migrator.catalog import Table

INT_TYPES = frozenset({"smallint", "integer", "bigint"})
_TEXT = re.compile(r"^(?:text|character varying|character|(?:[\w\"]+\.)?citext)(?:\((\d+)\))?$")
SHORT_TEXT = 8
"""Text columns shorter than this are updated with another row's value (a code, a flag: a new value would rarely
satisfy their checks)."""
UID_LENGTH = 44
"""Length of the `2.25.<uuid>` UIDs made for new text keys; a shorter column gets a short token instead."""


@dataclass(frozen=True)
class Fresh:
    """A column a copy gets a new value for, or an update sets."""

    column: str
    kind: str
    """"int", "uuid", "text" (a new value), or "copy" (updates only: another row's value)."""
    base: int = 0
    """"int": the column's largest value when the workload started."""
    limit: int | None = None
    """"text": the column's declared length."""


@dataclass(frozen=True)
class TablePlan:
    index: int
    schema: str
    name: str
    key: tuple[str, ...]
    """The table's key (empty: none; rows are copied whole)."""
    copied: tuple[str, ...]
    """Columns a copy takes from the row it copies."""
    fresh: tuple[Fresh, ...]
    """Columns a copy gets new values for (the rest of the writable columns are left to their defaults)."""
    updates: tuple[Fresh, ...]
    """Columns an update may set."""
    no_insert: str = ""
    """Why the workload makes no copies here ("" when it does)."""
    no_update: str = ""
    est_rows: int = 0

    @property
    def display(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def ident(self) -> sql.Composed:
        return sql.SQL("{}.{}").format(sql.Identifier(self.schema), sql.Identifier(self.name))


# Per table: columns that reference another table (and those of them in a foreign key of several columns), columns
# other tables reference, columns of unique indexes, and columns with a default.
_MARKS = """
SELECT c.conrelid::bigint, a.attname, 'references' FROM pg_constraint c CROSS JOIN unnest(c.conkey) AS k(n)
  JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n WHERE c.contype = 'f' AND c.conrelid = ANY(%(t)s)
UNION ALL
SELECT c.conrelid::bigint, a.attname, 'composite' FROM pg_constraint c CROSS JOIN unnest(c.conkey) AS k(n)
  JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n
 WHERE c.contype = 'f' AND cardinality(c.conkey) > 1 AND c.conrelid = ANY(%(t)s)
UNION ALL
SELECT c.confrelid::bigint, a.attname, 'referenced' FROM pg_constraint c CROSS JOIN unnest(c.confkey) AS k(n)
  JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.n WHERE c.contype = 'f' AND c.confrelid = ANY(%(t)s)
UNION ALL
SELECT i.indrelid::bigint, a.attname, 'unique' FROM pg_index i CROSS JOIN unnest(i.indkey::int2[]) AS k(n)
  JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n WHERE i.indisunique AND i.indrelid = ANY(%(t)s)
UNION ALL
SELECT d.adrelid::bigint, a.attname, 'default' FROM pg_attrdef d
  JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum WHERE d.adrelid = ANY(%(t)s)
"""


def _kind(type_: str) -> tuple[str, int | None]:
    """("int" | "uuid" | "text" | "", declared length) of a column type as format_type prints it."""
    if type_ in INT_TYPES:
        return "int", None
    if type_ == "uuid":
        return "uuid", None
    m = _TEXT.match(type_)
    if m:
        return "text", int(m.group(1)) if m.group(1) else None
    return "", None


def plan(conn: psycopg.Connection[Any], tables: list[Table], *, max_seconds: float = 30.0) -> list[TablePlan]:
    """The plan for `tables` (as `catalog.list_tables` read them), reading the catalog and, for integer columns it
    must make new values for, the largest value (each bounded by `max_seconds`)."""
    marks: dict[int, dict[str, set[str]]] = {t.oid: {} for t in tables}
    for oid, column, mark in conn.execute(_MARKS, {"t": [t.oid for t in tables]}).fetchall():
        marks[oid].setdefault(mark, set()).add(column)
    conn.commit()
    return [_table_plan(conn, i, t, marks[t.oid], max_seconds) for i, t in enumerate(tables)]


def _table_plan(conn: psycopg.Connection[Any], index: int, t: Table, marks: dict[str, set[str]],
                max_seconds: float) -> TablePlan:
    references, referenced = marks.get("references", set()), marks.get("referenced", set())
    unique, defaults = marks.get("unique", set()) - set(t.key), marks.get("default", set())
    composite = marks.get("composite", set())
    writable = [c for c in t.columns if not c.generated and c.identity != "a"]
    if not t.key:
        whole = tuple(c.name for c in writable)
        why = "no key, and an identity column GENERATED ALWAYS: a copy would not be one" if t.has_identity_always else ""
        return TablePlan(index, t.schema, t.name, (), whole, (), (), no_insert=why,
                         no_update="no key: its rows cannot be told apart", est_rows=t.est_rows)
    copied: list[str] = []
    fresh: list[Fresh] = []
    made_new: list[str] = []  # key columns that get a new value (made here, or by their default)
    for c in writable:
        if c.name not in t.key and c.name not in unique:
            copied.append(c.name)
            continue
        kind, limit = _kind(c.type)
        if c.name in references or (not kind and c.name not in defaults and not c.identity):
            copied.append(c.name)
        elif c.name in defaults or c.identity:
            made_new.append(c.name)  # left out of the copy: the sequence or identity makes the value
        else:
            fresh.append(Fresh(c.name, kind, limit=limit))
            made_new.append(c.name)
    made_new += [c.name for c in t.columns if c.identity == "a"]
    no_insert = ""
    if not set(made_new) & set(t.key):
        no_insert = ("its key columns are foreign keys or of types the workload makes no new values for "
                     f"({', '.join(c.type for c in t.columns if c.name in t.key)})")
    try:
        fresh = [_with_base(conn, t, f, max_seconds) for f in fresh]
    except psycopg.errors.QueryCanceled:
        conn.rollback()
        no_insert = no_insert or f"the largest key value took longer than {max_seconds:g} s to read"
    updates = []
    for c in writable:
        if c.name in t.key or c.name in unique or c.name in referenced or c.name in composite or c.identity:
            continue  # (a column of a foreign key of several columns cannot take another row's value alone)
        kind, limit = _kind(c.type)
        text = kind == "text" and c.name not in references and (limit is None or limit >= SHORT_TEXT)
        updates.append(Fresh(c.name, "text", limit=limit) if text else Fresh(c.name, "copy"))
    no_update = "" if updates else "every column is part of a key, of a unique index, or referenced"
    return TablePlan(index, t.schema, t.name, t.key, tuple(copied), tuple(fresh), tuple(updates),
                     no_insert=no_insert, no_update=no_update, est_rows=t.est_rows)


def _with_base(conn: psycopg.Connection[Any], t: Table, f: Fresh, max_seconds: float) -> Fresh:
    if f.kind != "int":
        return f
    conn.execute("SELECT set_config('statement_timeout', %s, true)", (f"{int(max_seconds * 1000)}",))
    row = conn.execute(sql.SQL("SELECT coalesce(max({}), 0)::bigint FROM {}").format(
        sql.Identifier(f.column), t.ident)).fetchone()
    conn.commit()
    return Fresh(f.column, f.kind, base=int(row[0]) if row else 0)
