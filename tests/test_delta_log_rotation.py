"""The delta log rotates on the legacy database: writers move from child to child, applied children are truncated.

`sync --follow` runs as a process with a tiny rotation threshold under a concurrent workload; the tests watch the
children's states and sizes on the source, then compare every row. A transaction that writes before a switch and
commits after it holds its child back until it is applied, and reaches the target exactly once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from migrator import catalog, copy, prepare, status
from migrator.config import CAPTURE_SCHEMA, Config
from migrator.deltalog import freeze, rotation
from tests.helpers import fetch, run_sql
from tests.test_crash_and_concurrency import (
    Processes,
    Writers,
    assert_same_rows,
    make_source,
    wait_until_same,
)

ROTATION = {"poll_interval": 0.1, "rotate_rows": 300, "rotate_seconds": 2.0, "housekeeping_interval": 0.2}


@pytest.fixture
def rotating(tmp_path: Path, source_dsn: str, target_dsn: str) -> Iterator[Processes]:
    """migrator processes whose sync rotates the delta log every few hundred events."""
    config = tmp_path / "migration.toml"
    config.write_text(f"[source]\ndsn = {json.dumps(source_dsn)}\n\n[target]\ndsn = {json.dumps(target_dsn)}\n\n"
                      "[sync]\n" + "".join(f"{k} = {v}\n" for k, v in ROTATION.items()))
    procs = Processes(config)
    try:
        yield procs
    finally:
        procs.kill_all()


class LogWatch:
    """The children of the delta log as the source reports them: state and heap size, sampled in a loop.

    A truncate shows as a child leaving the draining state; it is recorded with the largest heap size seen while
    the child drained and the size seen right after (the child may already be current and written again).
    """

    def __init__(self, source_dsn: str) -> None:
        self.conn = psycopg.connect(source_dsn, autocommit=True, application_name="test-watch")
        self.currents: list[int] = []
        self.truncations: list[tuple[int, int, int]] = []  # (child, heap bytes before, heap bytes after)
        self._draining: dict[int, int] = {}

    def children(self) -> dict[int, tuple[str, int]]:
        rows = self.conn.execute(sql.SQL(
            "SELECT child, state, pg_relation_size(format('%%I.%%I', %s::text, 'delta_log_' || child)::regclass) "
            "FROM {}.delta_log_child ORDER BY child").format(sql.Identifier(CAPTURE_SCHEMA)),
            (CAPTURE_SCHEMA,)).fetchall()
        return {r[0]: (r[1], r[2]) for r in rows}

    def sample(self) -> dict[int, tuple[str, int]]:
        children = self.children()
        for child, (state, size) in children.items():
            if state == "current" and (not self.currents or self.currents[-1] != child):
                self.currents.append(child)
            if state == "draining":
                self._draining[child] = max(size, self._draining.get(child, 0))
            elif child in self._draining:
                self.truncations.append((child, self._draining.pop(child), size))
        return children

    def until(self, condition: Callable[[dict[int, tuple[str, int]]], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition(self.sample()):
            assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}: {self.children()}"
            time.sleep(0.05)

    def close(self) -> None:
        self.conn.close()


@pytest.mark.slow
def test_children_rotate_and_are_truncated_under_a_workload_and_every_row_arrives(
    cfg: Config, source_dsn: str, target_dsn: str, rotating: Processes
) -> None:
    make_source(source_dsn, {"item": 10_000}, {"tally": 5_000})
    prepare.prepare(cfg)
    copy.run(cfg)
    watch = LogWatch(source_dsn)
    writers = Writers(source_dsn, {"item": 10_000}, ["tally"], n=2, pause=0.002).start()
    try:
        proc = rotating.start("sync", "--follow")
        # Several full turns: every child written, drained and truncated at least once.
        watch.until(lambda _: len(watch.currents) >= 7 and len({t[0] for t in watch.truncations}) == 3, 60,
                    "several rotations")
        writers.stop()
        wait_until_same(source_dsn, target_dsn, timeout=30)
        assert proc.poll() is None, f"sync --follow died:\n{rotating.output(proc)}"
        assert rotating.stop(proc) == 0, rotating.output(proc)
    finally:
        writers.halt()
        watch.close()
    log = rotating.output(proc, tail=10**9)
    print(f"{writers.commits} commits; writers on children {watch.currents}; truncated (child, bytes before, "
          f"after) {watch.truncations}")
    assert log.count('"sync.log_rotated"') >= 6 and log.count('"sync.log_truncated"') >= 3
    assert all(after < before for _, before, after in watch.truncations), "pg_relation_size must drop"
    assert_same_rows(source_dsn, target_dsn)


@pytest.mark.slow
def test_long_transaction_writing_across_a_switch_holds_its_child_and_is_applied_once(
    cfg: Config, source_dsn: str, target_dsn: str, rotating: Processes
) -> None:
    make_source(source_dsn, {"item": 5_000}, {"tally": 2_000})
    # Rows of values the writers never touch (their tally rows have a < 50), so that the counts below are exact.
    run_sql(source_dsn, "INSERT INTO tally VALUES (1009, 'before')")
    prepare.prepare(cfg)
    copy.run(cfg)
    watch = LogWatch(source_dsn)
    writers = Writers(source_dsn, {"item": 5_000}, ["tally"], n=2, pause=0.002)
    with psycopg.connect(source_dsn, application_name="test-long-transaction") as long:
        try:
            proc = rotating.start("sync", "--follow")
            first = next(c for c, (state, _) in watch.sample().items() if state == "current")
            long.execute("INSERT INTO item (id, val, note) SELECT g, 1, 'long before' FROM generate_series(900001, 900010) g")
            long.execute("INSERT INTO tally (a, b) SELECT 1007, 'long before' FROM generate_series(1, 5)")
            writers.start()
            # The writers move on to the next child, and the one after; the long transaction's child is kept.
            watch.until(lambda ch: ch[first][0] == "draining", 30, "the switch away from the long transaction's child")
            watch.until(lambda _: len(watch.currents) >= 3, 30, "a second switch")
            time.sleep(1.5)  # several housekeeping rounds, each of which would truncate a child it may
            children = watch.sample()
            assert children[first][0] == "draining" and children[first][1] > 0, children
            assert not any(t[0] == first for t in watch.truncations)
            # The long transaction writes again after the switch (to whichever child its session resolves) and commits.
            long.execute("INSERT INTO item (id, val, note) SELECT g, 2, 'long after' FROM generate_series(900011, 900020) g")
            long.execute("INSERT INTO tally (a, b) SELECT 1008, 'long after' FROM generate_series(1, 5)")
            long.execute("UPDATE tally SET b = 'long upd' WHERE a = 1009")
            long.execute("UPDATE item SET note = 'long upd' WHERE id = 900001")
            long.commit()
            # Rotation resumes: the held child is applied, truncated, and written again later.
            watch.until(lambda _: any(t[0] == first for t in watch.truncations), 30, "the held child's truncate")
            watch.until(lambda _: len(watch.currents) >= 5, 30, "rotation to resume")
            writers.stop()
            wait_until_same(source_dsn, target_dsn, timeout=30)
            assert rotating.stop(proc) == 0, rotating.output(proc)
        finally:
            writers.halt()
            watch.close()
    print(f"{writers.commits} commits; writers on children {watch.currents}; truncated {watch.truncations}")
    assert fetch(target_dsn, "SELECT note, count(*) FROM item WHERE id > 900000 GROUP BY 1 ORDER BY 1") == \
        [("long after", 10), ("long before", 9), ("long upd", 1)]
    assert fetch(target_dsn, "SELECT a, b, count(*) FROM tally WHERE a > 1000 GROUP BY 1, 2 ORDER BY 1") == \
        [(1007, "long before", 5), (1008, "long after", 5), (1009, "long upd", 1)]
    assert_same_rows(source_dsn, target_dsn)


def test_rotation_keeps_a_freeze_and_release_writes_to_the_current_child(
    cfg: Config, source_dsn: str, target_dsn: str
) -> None:
    make_source(source_dsn, {"item": 100}, {"tally": 100})
    prepare.prepare(cfg)
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        tables = catalog.list_tables(conn, cfg.tables)
        assert rotation.switch_log(conn, 0, lock_timeout=1, statement_timeout=5) == 1
        assert rotation.switch_log(conn, 0, lock_timeout=1, statement_timeout=5) is None, "0 is no longer current"
        freeze.freeze(conn, tables, lock_timeout=2)
        assert rotation.switch_log(conn, 1, lock_timeout=1, statement_timeout=5) is None, "frozen"
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("INSERT INTO item (val) VALUES (1)")
        freeze.release(conn)
    run_sql(source_dsn, "INSERT INTO item (val, note) VALUES (1, 'after release')",
            "INSERT INTO tally VALUES (1, 'after release')")
    per_child = fetch(source_dsn, "SELECT tableoid::regclass::text, count(*) FROM _migrator.delta_log GROUP BY 1")
    assert per_child == [("_migrator.delta_log_1", 2)]


def _xmin(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint").fetchone()
    assert row is not None
    return int(row[0])


def test_truncate_keeps_a_child_holding_events_not_surely_applied_and_gives_up_rather_than_queue_writers(
    cfg: Config, source_dsn: str, target_dsn: str
) -> None:
    make_source(source_dsn, {"item": 100}, {"tally": 100})
    prepare.prepare(cfg)
    straggle = "INSERT INTO _migrator.delta_log_0 (rel, op, key) VALUES ('public.item'::regclass, 'I', ARRAY['1000'])"
    bounds: dict[str, Any] = {"lock_timeout": 0.3, "statement_timeout": 5}
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        run_sql(source_dsn, "INSERT INTO item (val) VALUES (1)")
        assert rotation.switch_log(conn, 0, **bounds) == 1
        applied_before = _xmin(conn)
        # A session that resolved the old function body before the switch inserts into the old child after it.
        run_sql(source_dsn, straggle)

        assert rotation.truncate_log_child(conn, 0, applied_before, **bounds) is None
        assert fetch(source_dsn, "SELECT count(*) FROM _migrator.delta_log_0") == [(2,)]

        with psycopg.connect(source_dsn) as open_writer:
            open_writer.execute(straggle)
            started = time.monotonic()
            with pytest.raises(psycopg.errors.LockNotAvailable):
                rotation.truncate_log_child(conn, 0, _xmin(conn), **bounds)
            # It gave up on lock_timeout (the error above), not after statement_timeout: a loaded machine slows the
            # retries, not the bound.
            assert time.monotonic() - started < bounds["statement_timeout"]
            open_writer.rollback()

        # Another session of the server (a test run beside this one) may hold the snapshot's xmin back a moment.
        deadline = time.monotonic() + 30
        while (freed := rotation.truncate_log_child(conn, 0, _xmin(conn), **bounds)) is None \
                and time.monotonic() < deadline:
            time.sleep(0.2)

        assert freed is not None and freed > 0
        assert fetch(source_dsn, "SELECT count(*) FROM _migrator.delta_log_0") == [(0,)]
        assert [c.state for c in rotation.log_children(conn)] == ["empty", "current", "empty"]
        assert rotation.truncate_log_child(conn, 0, _xmin(conn), **bounds) is None, "only a draining child goes"


def test_status_warns_when_the_delta_log_grows_or_sync_stalls(
    make_config: Callable[..., Config], source_dsn: str, target_dsn: str
) -> None:
    quiet = make_config()
    make_source(source_dsn, {"item": 1_000}, {"tally": 100})
    prepare.prepare(quiet)
    copy.run(quiet)
    run_sql(source_dsn, "UPDATE item SET val = val + 1", "INSERT INTO tally SELECT 1, 'x' FROM generate_series(1, 5000)")
    time.sleep(1.2)  # the statistics the row estimate comes from reach the collector

    st = status.read(quiet)
    loud = status.read(make_config(sync={"warn_log_mb": 0.1, "warn_stalled_seconds": 0}))

    log: dict[str, Any] = st.sync["delta_log"]
    assert log["rows"] > 1_000 and log["bytes"] > 100_000
    assert [c["state"] for c in log["children"]] == ["current", "empty", "empty"]
    assert not any("delta log" in w or "not advanced" in w for w in st.warnings), st.warnings
    assert any("the delta log holds" in w and "warn_log_mb" in w for w in loud.warnings), loud.warnings
    assert any("sync has not advanced" in w for w in loud.warnings), loud.warnings
