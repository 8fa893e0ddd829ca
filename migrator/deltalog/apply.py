"""Apply a batch of the delta log: make the written side hold, for every row the batch's events touched, what the
read side holds in the batch's snapshot. Sync drives it forward (legacy database to target), rollback in reverse.

A table with a key logs only the keys its changes touched (triggers/capture_keys.sql). The batch replaces the
written side's rows for those keys with the rows the read side holds for them in its snapshot — read in the batch's
own repeatable-read transaction and streamed by binary COPY — so the written side becomes the read side as of that
snapshot for every key touched, whatever the order and number of changes in between (primary-key updates, delete and
re-insert, cascades, deferrable keys). A table without a key logs row images and is a multiset: the net count of
each distinct image is added or removed. For every table a copy boundary may be given (an event the table's copy
snapshot already contains is skipped). A TRUNCATE in the batch empties the table and copies it again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

from migrator import schema
from migrator.catalog import Table
from migrator.config import CAPTURE_SCHEMA
from migrator.deltalog.snapshot import Snapshot, decode_key, key_equals, not_in
from migrator.errors import ReplayError, SchemaChanged
from migrator.log import get
from migrator.redaction import KeyMask

BATCH_TABLE = "_migrator_batch"
KEYS_TABLE = "_migrator_keys"
LOG = sql.SQL("{}.delta_log").format(sql.Identifier(CAPTURE_SCHEMA))
"""The delta log: the parent of its children, which readers query."""


class Applier:
    """Writes one batch into the target, table by table, reading what it needs from the source's batch snapshot.

    A table with a key: the keys its changes touched come from the delta log; the target loses its rows for those
    keys, and receives the rows the source holds for them in the batch snapshot (binary COPY, bit for bit). A table
    without a key: the net count of each row image is added or removed. A TRUNCATE in the batch: the table is
    emptied and copied again from the batch snapshot.

    "Source" and "target" are the roles of one direction: sync reads the legacy database and writes the target;
    rollback reads the target and writes the legacy database.
    """

    def __init__(self, target: psycopg.Connection[Any], tables: dict[int, Table], mask: KeyMask | None = None) -> None:
        self.target = target
        self.tables = tables
        self.mask = mask or KeyMask.ephemeral()
        """How a refused row's key is named (keys that may be patient data as the migration's keyed hash)."""
        with target.cursor() as cur:
            cur.execute(sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} (key text[]) ON COMMIT DELETE ROWS")
                        .format(sql.Identifier(KEYS_TABLE)))
            cur.execute(sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} (op \"char\" NOT NULL, old_row text, new_row text) "
                                "ON COMMIT DELETE ROWS").format(sql.Identifier(BATCH_TABLE)))
        target.commit()

    @staticmethod
    def changed(scur: psycopg.Cursor[Any], window: sql.Composable) -> list[tuple[int, int, bool]]:
        """The tables the batch of `window` (snapshot.window) changes: (oid, events, whether one is a TRUNCATE)."""
        scur.execute(sql.SQL("SELECT e.rel::bigint, count(*), bool_or(e.op = 'T') FROM {} AS e "
                             "WHERE {} GROUP BY e.rel").format(LOG, window))
        return [(int(r[0]), int(r[1]), bool(r[2])) for r in scur.fetchall()]

    def apply(self, scur: psycopg.Cursor[Any], tcur: psycopg.Cursor[Any], window: sql.Composable,
              changed: list[tuple[int, int, bool]], boundaries: dict[int, str]) -> None:
        firing = schema.firing_in_replica(tcur)
        for rel, _, truncated in changed:
            table = self.tables.get(rel)
            if table is None:
                raise SchemaChanged(f"the delta log holds changes of a table that is not captured (oid {rel})")
            log = get(phase="sync", table=table.display)
            in_table = sql.SQL("{} AND e.rel = {}").format(window, sql.Literal(rel))
            boundary = boundaries.get(rel)
            if boundary is not None:
                # Events the table's copy snapshot already contains: a multiset would count them twice, and a
                # keyed table copied again after its key changed would read their keys by the new key's columns.
                in_table = sql.SQL("{} AND {}").format(in_table, not_in(Snapshot.parse(boundary)))
            try:
                with schema.silenced(tcur, table.ident, firing.get((table.schema, table.name), [])):
                    if truncated:
                        self._recopy(scur, tcur, table)
                    elif table.key:
                        self._apply_keyed(scur, tcur, table, in_table)
                    else:
                        self._apply_multiset(scur, tcur, table, in_table)
            except psycopg.OperationalError:
                raise  # a lost connection is retried by sync(), not a refused change
            except psycopg.Error as exc:
                diag = exc.diag
                key = self._failing_key(scur, table, in_table) if table.key and not truncated else None
                log.error("sync.apply_failed", sqlstate=diag.sqlstate, constraint=diag.constraint_name,
                          column=diag.column_name, key=key)
                raise ReplayError(
                    f"the target refused changes to {table.display}: SQLSTATE {diag.sqlstate}"
                    + (f", constraint {diag.constraint_name}" if diag.constraint_name else "")
                    + (f", column {diag.column_name}" if diag.column_name else "")
                    + (f", first refused row {key}" if key else "")
                    + "; the changes stay pending"
                ) from exc

    def _failing_key(self, scur: psycopg.Cursor[Any], table: Table, in_table: sql.Composable,
                     limit: int = 10_000) -> str | None:
        """The key of the first touched row the target refuses, found row by row in a throwaway transaction.

        Only the key is returned, through the mask (it identifies the row; the values are never shown). The batch's
        target transaction is already lost; the source transaction and its snapshot are still open.
        """
        self.target.rollback()
        types = {c.name: c.type for c in table.columns}
        keys = [sql.Identifier(k) for k in table.key]
        cols = [sql.Identifier(c.name) for c in table.writable_columns]
        query = sql.SQL("SELECT {keytext}, t::text FROM ONLY {t} AS t WHERE ({keys}) IN "
                        "(SELECT {parsed} FROM {log} AS e WHERE {w}) LIMIT {limit}").format(
            keytext=sql.SQL(", ").join(sql.SQL("t.{}::text").format(k) for k in keys), t=table.ident,
            keys=sql.SQL(", ").join(keys), limit=sql.Literal(limit), parsed=decode_key(table), log=LOG, w=in_table)
        # Values as literals, not parameters: a name holding "%s" would otherwise be taken for a placeholder.
        def insert(image: str) -> sql.Composed:
            return sql.SQL("INSERT INTO {} ({}) {} SELECT {} FROM (SELECT {}::{} AS r) AS s").format(
                table.ident, sql.SQL(", ").join(cols),
                sql.SQL("OVERRIDING SYSTEM VALUE") if table.has_identity_always else sql.SQL(""),
                sql.SQL(", ").join(sql.SQL("(s.r).{}").format(c) for c in cols), sql.Literal(image), table.ident)

        def delete(values: Sequence[str]) -> sql.Composed:
            return sql.SQL("DELETE FROM ONLY {} WHERE {}").format(table.ident, key_equals(table, values))
        try:
            with scur.connection.cursor(name="migrator_diagnose") as rows, self.target.cursor() as tcur:
                tcur.execute("SET LOCAL session_replication_role = replica")
                rows.execute(query)
                for row in rows:
                    key_values, image = row[:-1], row[-1]
                    try:
                        with self.target.transaction():
                            tcur.execute(delete(key_values))
                            tcur.execute(insert(image))
                    except psycopg.OperationalError:
                        raise
                    except psycopg.Error:
                        return self.mask.key(table.key, [types[k] for k in table.key], key_values)
        finally:
            self.target.rollback()
        return None

    @staticmethod
    def _stream(scur: psycopg.Cursor[Any], tcur: psycopg.Cursor[Any], out: sql.Composed,
                into: sql.Composed) -> int:
        with scur.copy(out) as src, tcur.copy(into) as dst:
            for block in src:
                dst.write(block)
        return tcur.rowcount

    def _recopy(self, scur: psycopg.Cursor[Any], tcur: psycopg.Cursor[Any], table: Table) -> None:
        try:
            with self.target.transaction():
                tcur.execute(sql.SQL("TRUNCATE ONLY {}").format(table.ident))
        except psycopg.errors.FeatureNotSupported:
            # Referenced by a foreign key: with triggers off (replica role) a DELETE empties it just the same.
            tcur.execute(sql.SQL("DELETE FROM ONLY {}").format(table.ident))
        cols = sql.SQL(", ").join(sql.Identifier(c.name) for c in table.writable_columns)
        self._stream(scur, tcur,
                     sql.SQL("COPY (SELECT {} FROM ONLY {}) TO STDOUT (FORMAT binary)").format(cols, table.ident),
                     sql.SQL("COPY {} ({}) FROM STDIN (FORMAT binary)").format(table.ident, cols))

    def _apply_keyed(self, scur: psycopg.Cursor[Any], tcur: psycopg.Cursor[Any], table: Table,
                     in_table: sql.Composable) -> None:
        keys = [sql.Identifier(k) for k in table.key]
        parsed = decode_key(table, sql.SQL("key"), named=True)
        log_table = LOG
        keys_table = sql.Identifier(KEYS_TABLE)
        # 1. The keys touched: their rows on the target go.
        self._stream(scur, tcur,
                     sql.SQL("COPY (SELECT DISTINCT e.key FROM {} AS e WHERE {}) TO STDOUT (FORMAT binary)")
                     .format(log_table, in_table),
                     sql.SQL("COPY {} (key) FROM STDIN (FORMAT binary)").format(keys_table))
        tcur.execute(sql.SQL("DELETE FROM ONLY {} AS t USING (SELECT {} FROM {}) AS k WHERE {}").format(
            table.ident, parsed, keys_table,
            sql.SQL(" AND ").join(sql.SQL("t.{k} = k.{k}").format(k=k) for k in keys)))
        tcur.execute(sql.SQL("DELETE FROM {}").format(keys_table))
        # 2. The rows the source holds for those keys in the batch snapshot come in their place.
        cols = sql.SQL(", ").join(sql.Identifier(c.name) for c in table.writable_columns)
        self._stream(scur, tcur,
                     sql.SQL("COPY (SELECT {cols} FROM ONLY {t} WHERE ({keys}) IN "
                             "(SELECT {parsed} FROM {log} AS e WHERE {w})) TO STDOUT (FORMAT binary)").format(
                         cols=cols, t=table.ident, keys=sql.SQL(", ").join(keys),
                         parsed=decode_key(table), log=log_table, w=in_table),
                     sql.SQL("COPY {} ({}) FROM STDIN (FORMAT binary)").format(table.ident, cols))

    def _apply_multiset(self, scur: psycopg.Cursor[Any], tcur: psycopg.Cursor[Any], table: Table,
                        in_table: sql.Composable) -> None:
        batch = sql.Identifier(BATCH_TABLE)
        self._stream(scur, tcur,
                     sql.SQL("COPY (SELECT e.op, e.old_row, e.new_row FROM {} AS e WHERE {}) "
                             "TO STDOUT (FORMAT binary)").format(LOG, in_table),
                     sql.SQL("COPY {} FROM STDIN (FORMAT binary)").format(batch))
        # The net count of each distinct row image; row images are the rows' text forms under pinned settings.
        tcur.execute(sql.SQL("""
            CREATE TEMP TABLE _migrator_net ON COMMIT DROP AS
            SELECT r, sum(c)::bigint AS net FROM (
                SELECT old_row AS r, -1 AS c FROM {batch} WHERE op IN ('U', 'D')
                UNION ALL
                SELECT new_row, 1 FROM {batch} WHERE op IN ('I', 'U')
            ) d GROUP BY r HAVING sum(c) <> 0
        """).format(batch=batch))
        tcur.execute(sql.SQL("""
            DELETE FROM ONLY {t} WHERE ctid = ANY (ARRAY(
                SELECT x.ctid FROM (
                    SELECT t2.ctid, n.net, row_number() OVER (PARTITION BY n.r) AS rn
                      FROM ONLY {t} AS t2 JOIN _migrator_net AS n ON t2::text = n.r WHERE n.net < 0
                ) x WHERE x.rn <= -x.net))
        """).format(t=table.ident))
        cols = [sql.Identifier(c.name) for c in table.writable_columns]
        tcur.execute(sql.SQL(
            "INSERT INTO {} ({}) {} SELECT {} FROM (SELECT r::{} AS img, net FROM _migrator_net WHERE net > 0) AS l "
            "CROSS JOIN LATERAL generate_series(1, l.net)"
        ).format(
            table.ident, sql.SQL(", ").join(cols),
            sql.SQL("OVERRIDING SYSTEM VALUE") if table.has_identity_always else sql.SQL(""),
            sql.SQL(", ").join(sql.SQL("(l.img).{}").format(c) for c in cols), table.ident,
        ))
        tcur.execute("DROP TABLE _migrator_net")
        tcur.execute(sql.SQL("DELETE FROM {}").format(batch))
