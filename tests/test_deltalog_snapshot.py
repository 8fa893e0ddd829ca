"""The arithmetic exactly-once rests on: which transactions a snapshot sees, which events a batch holds, and when a
position surely contains another — in Python (Snapshot) and in the SQL the batches run (snapshot.window), which must
agree. Transaction ids are 64-bit (xid8: the epoch in the high 32 bits), so the cases cross epoch boundaries where
the 32-bit ids wrap. The SQL is run on literals only (no table, no database created)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from migrator.catalog import Column, Table
from migrator.deltalog import snapshot
from migrator.deltalog.snapshot import Snapshot, in_window

EPOCH = 2**32
"""The first transaction id of epoch 1: the 32-bit id wrapped once."""

# Snapshots as the server writes them (xmin:xmax:xip), in the order they could be taken on one server, each around
# an epoch boundary or far above it.
SNAPSHOTS = [
    "100:105:100,102",
    f"{EPOCH - 3}:{EPOCH + 2}:{EPOCH - 3},{EPOCH - 1},{EPOCH + 1}",
    f"{EPOCH - 1}:{EPOCH + 4}:{EPOCH - 1},{EPOCH + 2}",
    f"{EPOCH + 2}:{EPOCH + 6}:{EPOCH + 2},{EPOCH + 5}",
    f"{EPOCH + 6}:{EPOCH + 6}:",
    f"{5 * EPOCH + 7}:{5 * EPOCH + 12}:{5 * EPOCH + 9}",
]


def _txids(*snaps: Snapshot) -> list[int]:
    """Every transaction id where visibility can change for these snapshots, and one on each side."""
    edges = {x for s in snaps for x in (s.xmin, s.xmax, *s.xip)}
    return sorted({x + d for x in edges for d in (-2, -1, 0, 1, 2) if x + d > 2})


@pytest.fixture(scope="module")
def server(admin_dsn: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        yield conn


def _visible_on_server(conn: psycopg.Connection[tuple[object, ...]], snap: str, txids: list[int]) -> set[int]:
    rows = conn.execute("SELECT x::text FROM unnest(%s::text[]) AS x WHERE pg_visible_in_snapshot(x::xid8, "
                        "%s::pg_snapshot)", ([str(t) for t in txids], snap)).fetchall()
    return {int(r[0]) for r in rows}


def _in_window_on_server(conn: psycopg.Connection[tuple[object, ...]], applied: Snapshot,
                         current: Snapshot | sql.Composable, txids: list[int]) -> set[int]:
    query = sql.SQL("SELECT e.txid::text FROM (SELECT x::xid8 AS txid FROM unnest({}::text[]) AS x) AS e "
                    "WHERE {}").format(sql.Literal([str(t) for t in txids]), snapshot.window(applied, current))
    return {int(r[0]) for r in conn.execute(query).fetchall()}


def test_parse_keeps_64_bit_ids_as_numbers() -> None:
    s = Snapshot.parse(f"{EPOCH - 1}:{3 * EPOCH + 10}:{EPOCH - 1},{2 * EPOCH}")
    assert (s.xmin, s.xmax, s.xip) == (EPOCH - 1, 3 * EPOCH + 10, frozenset({EPOCH - 1, 2 * EPOCH}))
    assert Snapshot.parse("10:10:").xip == frozenset()


@pytest.mark.parametrize("text", SNAPSHOTS)
def test_visibility_agrees_with_the_server(server: psycopg.Connection[tuple[object, ...]], text: str) -> None:
    s = Snapshot.parse(text)
    txids = _txids(s)
    assert {t for t in txids if s.visible(t)} == _visible_on_server(server, text, txids)


def test_visibility_across_an_epoch_boundary() -> None:
    s = Snapshot.parse(f"{EPOCH - 1}:{EPOCH + 4}:{EPOCH - 1},{EPOCH + 2}")
    assert s.visible(EPOCH - 2)
    assert not s.visible(EPOCH - 1), "in progress"
    assert s.visible(EPOCH) and s.visible(EPOCH + 1) and s.visible(EPOCH + 3)
    assert not s.visible(EPOCH + 2), "in progress"
    assert not s.visible(EPOCH + 4), "not started"
    # The same 32-bit ids one epoch later are later transactions, not the same ones.
    assert not s.visible(2 * EPOCH - 2)
    assert not s.visible(2 * EPOCH + 1)


@pytest.mark.parametrize(("applied", "current"), list(itertools.combinations(SNAPSHOTS, 2)))
def test_window_sql_agrees_with_the_arithmetic(server: psycopg.Connection[tuple[object, ...]], applied: str,
                                               current: str) -> None:
    a, c = Snapshot.parse(applied), Snapshot.parse(current)
    txids = _txids(a, c)
    expected = {t for t in txids if c.visible(t) and not a.visible(t)}
    assert {t for t in txids if in_window(a, c, t)} == expected
    assert _in_window_on_server(server, a, c, txids) == expected


def test_consecutive_windows_hold_each_transaction_exactly_once(
        server: psycopg.Connection[tuple[object, ...]]) -> None:
    """Batches from each position to the next: every transaction the last position sees and the first does not is
    in exactly one batch, including the ones that were in progress across several positions and across epochs."""
    snaps = [Snapshot.parse(t) for t in SNAPSHOTS]
    txids = _txids(*snaps)
    counts = dict.fromkeys(txids, 0)
    for a, c in itertools.pairwise(snaps):
        assert c.includes(a)
        for t in _in_window_on_server(server, a, c, txids):
            counts[t] += 1
    first, last = snaps[0], snaps[-1]
    assert {t for t, n in counts.items() if n == 1} == {t for t in txids if last.visible(t) and not first.visible(t)}
    assert set(counts.values()) <= {0, 1}


def test_a_transaction_in_progress_at_the_applied_position_is_in_the_window_that_sees_it() -> None:
    # Began before the epoch wrapped, committed after: the batch that first sees it applies it, once.
    late = EPOCH - 1
    applied = Snapshot.parse(SNAPSHOTS[1])
    assert late in applied.xip and not applied.visible(late)
    assert not in_window(applied, Snapshot.parse(SNAPSHOTS[2]), late), "still in progress"
    assert in_window(applied, Snapshot.parse(SNAPSHOTS[3]), late)
    assert not in_window(Snapshot.parse(SNAPSHOTS[3]), Snapshot.parse(SNAPSHOTS[4]), late), "applied already"


def test_window_from_a_position_to_the_reading_transaction(server: psycopg.Connection[tuple[object, ...]]) -> None:
    """By default the window ends at the reading transaction's snapshot (what `pending` counts)."""
    applied = Snapshot.parse("10:10:")
    now = Snapshot.parse(str(server.execute("SELECT pg_current_snapshot()::text").fetchone()[0]))  # type: ignore[index]
    txids = [5, 10, 11, now.xmin - 1, now.xmax + EPOCH]
    # 5 is visible in the position; the one from the far epoch has not begun.
    assert _in_window_on_server(server, applied, snapshot.CURRENT, txids) == {10, 11, now.xmin - 1}


@pytest.mark.parametrize(("self_text", "other_text", "surely"), [
    ("105:110:", "100:105:100,102", True),  # everything the other saw finished before our xmin
    ("104:110:104", "100:105:100,102", False),  # 104 may have been in progress in neither, visible in other
    (f"{EPOCH + 5}:{EPOCH + 5}:", f"{EPOCH}:{EPOCH + 5}:{EPOCH + 1}", True),
    # Equal in their low 32 bits, one epoch apart: a 32-bit comparison would call it contained.
    ("5:5:", f"{EPOCH}:{EPOCH + 5}:{EPOCH + 1}", False),
    (f"{2 * EPOCH}:{2 * EPOCH}:", f"{EPOCH - 3}:{EPOCH + 2}:{EPOCH - 3}", True),
])
def test_surely_contains(self_text: str, other_text: str, surely: bool) -> None:
    s, other = Snapshot.parse(self_text), Snapshot.parse(other_text)
    assert s.surely_contains(other) is surely
    if surely:
        # Whatever committed and was visible to `other` is visible here.
        txids = _txids(s, other)
        assert all(s.visible(t) for t in txids if other.visible(t))


def test_includes_is_false_for_a_snapshot_taken_before() -> None:
    """A batch whose snapshot was taken before the applied position (another sync moved it meanwhile) must not
    move the position back: events between the two would be applied a second time."""
    earlier, later = Snapshot.parse(SNAPSHOTS[2]), Snapshot.parse(SNAPSHOTS[3])
    assert later.includes(earlier)
    assert not earlier.includes(later)
    assert later.includes(later)
    # Same xmax, but an id the applied position saw committed is in progress here: not taken after it.
    assert not Snapshot.parse(f"{EPOCH}:{EPOCH + 4}:{EPOCH},{EPOCH + 3}").includes(
        Snapshot.parse(f"{EPOCH + 3}:{EPOCH + 4}:"))


@pytest.mark.parametrize(("a_text", "b_text"), list(itertools.permutations(SNAPSHOTS, 2)))
def test_includes_means_every_visible_transaction_stays_visible(a_text: str, b_text: str) -> None:
    a, b = Snapshot.parse(a_text), Snapshot.parse(b_text)
    if a.includes(b):
        assert all(a.visible(t) for t in _txids(a, b) if b.visible(t))


STUDY = Table(oid=1, schema="public", name="study", key=("site", "day"), key_source="primary key",
              partition_of=None, est_rows=0, bytes=0,
              columns=(Column("note", "text", False, False, ""), Column("day", "date", True, False, ""),
                       Column("site", "integer", True, False, "")))


def test_decode_key_reads_the_logged_text_forms_in_key_order(server: psycopg.Connection[tuple[object, ...]]) -> None:
    query = sql.SQL("SELECT {} FROM (SELECT ARRAY['42', '2024-02-29']::text[] AS key) AS e").format(
        snapshot.decode_key(STUDY))
    row = server.execute(query).fetchone()
    assert row is not None and row[0] == 42 and str(row[1]) == "2024-02-29"
    named = sql.SQL("SELECT site, day FROM (SELECT {} FROM (SELECT ARRAY['7', '2024-01-01']::text[] AS k) AS x) AS y")
    row = server.execute(named.format(snapshot.decode_key(STUDY, sql.SQL("x.k"), named=True))).fetchone()
    assert row is not None and row[0] == 7 and str(row[1]) == "2024-01-01"


def test_key_equals_names_a_row_by_its_logged_key(server: psycopg.Connection[tuple[object, ...]]) -> None:
    rows = sql.SQL("SELECT count(*) FROM (VALUES (42, '2024-02-29'::date), (42, '2024-03-01'::date)) AS t(site, day) "
                   "WHERE {}")
    row = server.execute(rows.format(snapshot.key_equals(STUDY, ["42", "2024-02-29"]))).fetchone()
    assert row is not None and row[0] == 1
