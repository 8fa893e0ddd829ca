"""How the copy splits a table into chunks (migrator/copy.py plans them, migrator/copyworker.py reads them): heap
block ranges where the source scans them as such, key ranges at sampled key values otherwise, one chunk for a table
without a key or too small to split."""

from __future__ import annotations

import math
from typing import Any

import psycopg
from psycopg import sql

from migrator import state
from migrator.catalog import Table

Ranges = list[tuple[list[str] | None, list[str] | None, int]]
"""[lower, upper) bounds (None: unbounded) with each range's estimated bytes."""

BLOCK_RANGES_FROM = 140000
"""The first source version (server_version_num) that scans a block range as such (TID range scan); before it, a
table with a key is split at sampled key values."""


def _key_text(table: Table) -> sql.Composable:
    return sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(k)) for k in table.key)


def plan(cur: psycopg.Cursor[Any], table: Table, chunk_bytes: int) -> Ranges:
    """Key ranges [lower, upper) of about `chunk_bytes` each, at key values sampled from the table (any key type:
    the bounds are the keys' text forms, compared on the source as the key's own type and collation)."""
    if not table.key or table.bytes < 2 * chunk_bytes or table.est_rows < 1000:
        return [(None, None, table.bytes)]
    n = min(math.ceil(table.bytes / chunk_bytes), 256)
    # About 200 sampled keys per chunk; SYSTEM sampling reads whole pages, so it costs a fraction of a scan.
    percent = min(100.0, max(0.01, 100.0 * 200 * n / table.est_rows))
    # ORDER BY names the columns through the table's alias: unqualified, "id" would be the output column, the key's
    # text form, and integer bounds sorted as text ('11533' < '2540') would make chunks overlap.
    cur.execute(sql.SQL("SELECT {} FROM ONLY {} AS t TABLESAMPLE SYSTEM ({}) ORDER BY {}").format(
        _key_text(table), table.ident, sql.Literal(percent),
        sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(k)) for k in table.key)))
    sample = [list(r) for r in cur.fetchall()]
    bounds: list[list[str]] = []
    for i in range(1, n):
        b = sample[len(sample) * i // n] if sample else None
        if b is not None and (not bounds or b != bounds[-1]):
            bounds.append(b)
    if not bounds:
        return [(None, None, table.bytes)]
    edges: list[list[str] | None] = [None, *bounds, None]
    size = table.bytes // (len(edges) - 1)
    return [(edges[i], edges[i + 1], size) for i in range(len(edges) - 1)]


def plan_blocks(cur: psycopg.Cursor[Any], table: Table, chunk_bytes: int) -> tuple[Ranges, int] | None:
    """Heap block ranges [lower, upper) of about `chunk_bytes` each and the table's file they divide, or None when
    the table is not split by blocks: it has no key (a table without one is a multiset, copied under one snapshot
    whole), it is unlogged (a crash of its server empties it without a trigger firing), it is small, or the source
    scans block ranges as a sequential scan (before PostgreSQL 14).

    Each chunk reads its own pages once, whatever the key's order (a DICOM UID's has nothing to do with where the row
    lies, and key-range chunks read pages all over the table). Chunks read under different snapshots (a copy resumed
    after a kill) still hold every row once replay has run: a row moves to another block only by a change the
    capture records (replay then replaces its key's rows on the target, however many the copy put there), or by a
    rewrite of the table (VACUUM FULL, CLUSTER, pg_repack), which gives it a new file: the workers compare it with
    the one planned, and a rewritten table is copied again from its start."""
    if not table.key or table.unlogged or table.bytes < 2 * chunk_bytes \
            or cur.connection.info.server_version < BLOCK_RANGES_FROM:
        return None
    # The file as the copy's snapshot sees it (pg_class read under it), which the workers compare with the table's.
    cur.execute("SELECT c.relfilenode, pg_relation_size(c.oid) / current_setting('block_size')::bigint "
                "FROM pg_class c WHERE c.oid = %s", (table.oid,))
    row = cur.fetchone()
    if row is None or row[0] is None or row[1] < 2:
        return None
    filenode, pages = int(row[0]), int(row[1])
    n = min(math.ceil(table.bytes / chunk_bytes), 256, pages)
    # The last range is open: pages the table grows by after planning are read by the last chunk.
    edges: list[list[str] | None] = [None, *[[str(pages * i // n)] for i in range(1, n)], None]
    size = table.bytes // n
    return [(edges[i], edges[i + 1], size) for i in range(n)], filenode


def chunks(cur: psycopg.Cursor[Any], table: Table, chunk_bytes: int) -> tuple[Ranges, int | None]:
    """A table's chunks and, for block ranges, the file they divide (None for key ranges or one chunk)."""
    blocks = plan_blocks(cur, table, chunk_bytes)
    return blocks if blocks else (plan(cur, table, chunk_bytes), None)


def rewritten(cur: psycopg.Cursor[Any], chunks: list[state.Chunk], tables: dict[str, Table]) -> set[tuple[str, str]]:
    """Tables whose block chunks no longer divide their file: rewritten on the source between the snapshot they were
    planned under and this cursor's."""
    planned = {(c.schema_name, c.table_name): c.relfilenode for c in chunks if c.blocks}
    moved: set[tuple[str, str]] = set()
    for (schema_name, table_name), filenode in planned.items():
        table = tables.get(f"{schema_name}.{table_name}")
        if table is None:
            continue
        cur.execute("SELECT relfilenode FROM pg_class WHERE oid = %s", (table.oid,))
        row = cur.fetchone()
        if row is None or row[0] is None or int(row[0]) != filenode:
            moved.add((schema_name, table_name))
    return moved
