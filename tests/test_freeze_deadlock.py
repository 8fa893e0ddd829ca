"""The freeze under writers whose transactions span several tables: it never takes part in a deadlock, so neither
the cutover nor any clinical writer ever meets "deadlock detected"; it succeeds within [cutover] freeze_lock_timeout
or stops cleanly with the legacy database writable.

The writers are the application: each its own connection with default settings (no lock_timeout), updating its own
row in two tables, some in one order and some in the other, and one holding a row of the second table for longer
than the server's deadlock_timeout before it writes the first (the freeze's SHARE locks are taken in one order, so
any such writer can close a cycle with it). Writers never conflict with each other (each has its own rows), so any
deadlock involves the freeze.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from psycopg import sql
from structlog.testing import capture_logs

from migrator import catalog, copy, cutover, prepare, sync
from migrator.config import Config
from migrator.deltalog import freeze
from migrator.errors import Blocked, CutoverFailed
from tests.helpers import fetch, run_sql

READ_ONLY = "25006"  # what a frozen database answers: the only error a writer may see
DEADLOCK = "40P01"
SCHEMA = (
    "CREATE TABLE public.alpha (id int PRIMARY KEY, n bigint NOT NULL DEFAULT 0)",
    "CREATE TABLE public.beta (id int PRIMARY KEY, n bigint NOT NULL DEFAULT 0)",
    "INSERT INTO public.alpha (id) SELECT g FROM generate_series(1, 20) g",
    "INSERT INTO public.beta (id) SELECT g FROM generate_series(1, 20) g",
)
BUDGET = 5.0


class Writers:
    """Writer threads updating alpha and beta in one transaction each, until stopped; errors counted by SQLSTATE."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        with psycopg.connect(dsn) as conn:  # the server's setting: the writer below must outwait it
            row = conn.execute("SELECT setting::float8 / 1000 FROM pg_settings WHERE name = 'deadlock_timeout'")
            deadlock_timeout = row.fetchone()[0]  # type: ignore[index]
        self.stopping = threading.Event()
        self.errors: Counter[str] = Counter()
        self.commits = 0
        self.lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._loop, args=(1, ("alpha", "beta"), 0.002, 0.01), daemon=True),
            threading.Thread(target=self._loop, args=(2, ("beta", "alpha"), 0.002, 0.01), daemon=True),
            threading.Thread(target=self._loop, args=(3, ("beta", "alpha"), 0.005, 0.01), daemon=True),
            # Holds its beta row past deadlock_timeout before writing alpha: with a freeze waiting for beta while
            # holding alpha, its own deadlock check finds the cycle and PostgreSQL cancels the writer.
            threading.Thread(target=self._loop, args=(4, ("beta", "alpha"), deadlock_timeout + 0.3, 0.2),
                             daemon=True),
        ]

    def __enter__(self) -> Writers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=10)

    def _loop(self, row: int, order: tuple[str, str], hold: float, pause: float) -> None:
        with psycopg.connect(self.dsn) as conn:
            while not self.stopping.is_set():
                try:
                    first, second = (sql.SQL("UPDATE {} SET n = n + 1 WHERE id = %s").format(sql.Identifier(t))
                                     for t in order)
                    conn.execute(first, (row,))
                    time.sleep(hold)
                    conn.execute(second, (row,))
                    conn.commit()
                    with self.lock:
                        self.commits += 1
                except psycopg.Error as exc:
                    conn.rollback()
                    with self.lock:
                        self.errors[exc.sqlstate or type(exc).__name__] += 1
                    time.sleep(0.02)
                time.sleep(pause)


def _writable(dsn: str) -> bool:
    with psycopg.connect(dsn) as conn:
        try:
            conn.execute("UPDATE public.alpha SET n = n WHERE id = 20")
        except psycopg.errors.ReadOnlySqlTransaction:
            return False
        conn.rollback()
    return True


def test_freeze_under_writers_spanning_two_tables_in_both_orders_never_deadlocks_them_or_itself(
        cfg: Config, source_dsn: str) -> None:
    run_sql(source_dsn, *SCHEMA)
    prepare.prepare(cfg)
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        tables = catalog.list_tables(conn, cfg.tables)
    outcomes: list[str] = []
    with capture_logs() as logs, Writers(source_dsn) as writers:
        with psycopg.connect(source_dsn) as conn:
            for _ in range(4):
                time.sleep(0.4)  # writers in full flow, the slow one holding beta most of the time
                started = time.monotonic()
                try:
                    frozen = freeze.freeze(conn, tables, BUDGET)
                except Blocked as exc:  # a clean stop: nothing frozen, writers carry on
                    assert "could not freeze" in str(exc) and exc.hint
                    assert not freeze.is_frozen(conn) and _writable(source_dsn)
                    conn.rollback()
                    outcomes.append("blocked")
                else:
                    assert freeze.is_frozen(conn) and not _writable(source_dsn)
                    assert frozen.attempts >= 1 and 0 <= frozen.waited < BUDGET
                    conn.rollback()
                    time.sleep(0.2)  # writers meet the frozen database
                    freeze.release(conn)
                    outcomes.append("frozen")
                finally:
                    elapsed = time.monotonic() - started
                assert elapsed < BUDGET + 1.0, f"freeze took {elapsed:.1f}s for a {BUDGET}s bound"
        time.sleep(0.3)
    print(f"{sum(e['event'] == 'freeze.retry' for e in logs)} retries; outcomes {outcomes}; "
          f"writers: {writers.commits} commits, errors {dict(writers.errors)}")
    assert DEADLOCK not in writers.errors, "a writer was cancelled by a deadlock with the freeze"
    assert set(writers.errors) <= {READ_ONLY}, writers.errors
    assert writers.errors[READ_ONLY] > 0, "the writers never met a freeze"
    assert "frozen" in outcomes
    retries = [e for e in logs if e["event"] == "freeze.retry"]
    assert retries, "the slow writer held beta while a freeze waited: the freeze should have retried"
    assert {k for e in retries for k in e} <= {"event", "log_level", "phase", "attempt", "table", "reason"}
    assert {e["table"] for e in retries} <= {t.display for t in tables} | {None}
    assert _writable(source_dsn)


def test_cutover_under_writers_spanning_two_tables_finishes_or_stops_cleanly_without_a_deadlock(
        make_config: Callable[..., Config], source_dsn: str, target_dsn: str) -> None:
    cfg = make_config(cutover={"switch_command": "true", "freeze_lock_timeout": 2 * BUDGET})  # slack for a busy CI
    run_sql(source_dsn, *SCHEMA)
    prepare.prepare(cfg)
    copy.run(cfg)
    sync.sync(cfg)
    results: list[Any] = []
    with Writers(source_dsn) as writers:
        time.sleep(0.5)
        started = time.monotonic()
        try:
            results.append(cutover.run(cfg))
        except CutoverFailed as exc:
            results.append(exc)
        elapsed = time.monotonic() - started
        time.sleep(0.3)
    print(f"cutover {'ok' if not isinstance(results[0], Exception) else results[0]} in {elapsed:.1f}s; "
          f"writers: {writers.commits} commits, "
          f"errors {dict(writers.errors)}")
    assert DEADLOCK not in writers.errors, "a writer was cancelled by a deadlock with the freeze"
    assert set(writers.errors) <= {READ_ONLY}, writers.errors
    [result] = results
    if isinstance(result, CutoverFailed):
        assert "deadlock" not in str(result), str(result)
        assert "could not freeze" in str(result)
        assert _writable(source_dsn)
        assert fetch(target_dsn, "SELECT frozen FROM migrator_control.migration") == [(False,)]
        pytest.fail(f"the freeze gave up within {2 * BUDGET}s although every writer's transaction is short: {result}")
    assert result.ok and not _writable(source_dsn)
    # Every committed write reached the target: the freeze let in-flight writers finish first.
    assert fetch(source_dsn, "SELECT sum(n) FROM public.alpha UNION ALL SELECT sum(n) FROM public.beta") == \
        fetch(target_dsn, "SELECT sum(n) FROM public.alpha UNION ALL SELECT sum(n) FROM public.beta")


def test_freeze_gives_up_within_its_bound_naming_the_table_and_leaves_the_database_writable(
        cfg: Config, source_dsn: str) -> None:
    run_sql(source_dsn, *SCHEMA)
    prepare.prepare(cfg)
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        tables = catalog.list_tables(conn, cfg.tables)
    with psycopg.connect(source_dsn) as writer, psycopg.connect(source_dsn) as conn, capture_logs() as logs:
        writer.execute("UPDATE public.beta SET n = n + 1 WHERE id = 1")  # in flight past the bound
        started = time.monotonic()
        with pytest.raises(Blocked) as caught:
            freeze.freeze(conn, tables, 1.0, side="the target")
        elapsed = time.monotonic() - started
        writer.execute("UPDATE public.alpha SET n = n + 1 WHERE id = 1")  # the writer never noticed
        writer.commit()
        assert not freeze.is_frozen(conn)
    assert 1.0 <= elapsed < 1.5
    assert str(caught.value).startswith("could not freeze the target: writers held locks")
    assert "stopped at public.beta" in str(caught.value) and "the target was left writable" in str(caught.value)
    assert caught.value.hint and caught.value.exit_code == 1
    retries = [e for e in logs if e["event"] == "freeze.retry"]
    assert retries and {e["table"] for e in retries} == {"public.beta"}
    assert _writable(source_dsn)
