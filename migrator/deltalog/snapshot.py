"""Snapshots and the window of a batch: which events of a delta log a batch holds, and how a logged key is read.

Every event carries its writer's 64-bit transaction id (`txid`, xid8). A position is a pg_snapshot: the changes it
holds are those of the transactions visible in it. A batch from position `applied` to a new snapshot `current`
holds the events whose transaction is visible in `current` and not in `applied`; the two conditions on `txid`'s
range only let the server use the log's index, they change nothing (a transaction below `applied`'s xmin is visible
in it; one from `current`'s xmax on is not visible in it). Visibility, not event order, decides membership, so a
transaction that began early and commits late is applied once, by the first batch whose snapshot sees it.

Sync reads the legacy database's log forward, rollback the target's backward, verify the same window to know which
rows are in flight: each composes its SQL from `window` and `decode_key`, here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from psycopg import sql

from migrator.catalog import Table

TXID = sql.SQL("e.txid")
"""The transaction id of an event, in a query that reads the delta log as `e`."""
KEY = sql.SQL("e.key")
"""The logged key of an event (text forms of the key columns, in key order), read as `e`."""


@dataclass(frozen=True)
class Snapshot:
    """A pg_snapshot: transactions below xmin are finished, from xmax on not yet started, xip in progress."""

    xmin: int
    xmax: int
    xip: frozenset[int]
    text: str

    @classmethod
    def parse(cls, text: str) -> Snapshot:
        xmin, xmax, xip = text.split(":")
        return cls(int(xmin), int(xmax), frozenset(int(x) for x in xip.split(",") if x), text)

    def visible(self, txid: int) -> bool:
        """Whether the changes of transaction `txid`, if it committed, are visible here (pg_visible_in_snapshot)."""
        return txid < self.xmin or (txid < self.xmax and txid not in self.xip)

    def surely_contains(self, other: Snapshot) -> bool:
        """True when everything visible in `other` is visible here (everything it saw finished before our xmin)."""
        return other.xmax <= self.xmin

    def includes(self, other: Snapshot) -> bool:
        """True when every transaction visible in `other` is visible here (this one was not taken before it)."""
        return self.xmax >= other.xmax and all(x in other.xip or x >= other.xmax for x in self.xip)

    def literal(self) -> sql.Composed:
        """The snapshot as a SQL value."""
        return sql.SQL("{}::pg_snapshot").format(sql.Literal(self.text))


CURRENT = sql.SQL("pg_current_snapshot()")
"""The reading transaction's own snapshot, as a `current` of `window`."""


def in_window(applied: Snapshot, current: Snapshot, txid: int) -> bool:
    """Whether a batch from `applied` to `current` holds the events of transaction `txid` (`window`, in Python)."""
    return current.visible(txid) and not applied.visible(txid)


def window(applied: Snapshot, current: Snapshot | sql.Composable = CURRENT,
           txid: sql.Composable = TXID) -> sql.Composed:
    """The SQL condition on an event's `txid` that it belongs to the batch from `applied` to `current`: committed
    visibly in `current` and not in `applied`. `current` is a snapshot, or SQL naming one (by default the reading
    transaction's own)."""
    cur = current.literal() if isinstance(current, Snapshot) else current
    return sql.SQL("{txid} >= pg_snapshot_xmin({prev}) AND {txid} < pg_snapshot_xmax({cur}) "
                   "AND pg_visible_in_snapshot({txid}, {cur}) AND NOT pg_visible_in_snapshot({txid}, {prev})"
                   ).format(txid=txid, prev=applied.literal(), cur=cur)


def not_in(snapshot: Snapshot, txid: sql.Composable = TXID) -> sql.Composed:
    """The SQL condition that an event's transaction is not visible in `snapshot` (e.g. a table's copy snapshot)."""
    return sql.SQL("NOT pg_visible_in_snapshot({}, {})").format(txid, snapshot.literal())


def decode_key(table: Table, key: sql.Composable = KEY, named: bool = False) -> sql.Composed:
    """The key columns of `table` read from a logged key, comma-separated, each cast to its column's type (and
    named after its column with `named`): logged keys are the text forms of the key columns, in key order."""
    types = {c.name: c.type for c in table.columns}
    return sql.SQL(", ").join(_key_part(key, i, types[k], k if named else None) for i, k in enumerate(table.key))


def _key_part(key: sql.Composable, i: int, type_name: str, name: str | None) -> sql.Composed:
    part = sql.SQL("{}[{}]::{}").format(key, sql.Literal(i + 1), sql.SQL(type_name))
    return sql.SQL("{} AS {}").format(part, sql.Identifier(name)) if name else part


def key_equals(table: Table, values: Sequence[str]) -> sql.Composed:
    """The condition that `table`'s key equals these text forms (a row named by its logged key)."""
    types = {c.name: c.type for c in table.columns}
    return sql.SQL(" AND ").join(sql.SQL("{} = {}::{}").format(sql.Identifier(k), sql.Literal(v), sql.SQL(types[k]))
                                 for k, v in zip(table.key, values, strict=True))
