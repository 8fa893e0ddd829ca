"""Cutover against a real server: the freeze holds against every kind of client and outlives migrator, a writer in
flight makes it stop cleanly, a failed step releases the legacy database, and no committed row is left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from migrator import copy, cutover, prepare, sync
from migrator.config import Config
from tests.conftest import TEST_CUTOVER
from tests.helpers import fetch, run_sql

READ_ONLY = "25006"

SCHEMA = (
    "CREATE TABLE public.study (id serial PRIMARY KEY, uid text NOT NULL, note text)",
    "CREATE TABLE public.series (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
    "study_id int NOT NULL REFERENCES public.study (id), modality text)",
    "CREATE TABLE public.audit (at timestamptz DEFAULT now(), what text)",
    "INSERT INTO public.study (uid, note) SELECT '1.2.' || g, 'n' || g FROM generate_series(1, 200) g",
    "INSERT INTO public.series (study_id, modality) SELECT 1 + g % 200, 'CT' FROM generate_series(1, 300) g",
    "INSERT INTO public.audit (what) SELECT 'a' || g FROM generate_series(1, 50) g",
)


def migrated(cfg: Config, source_dsn: str) -> None:
    """A source with the schema above, prepared, copied and caught up."""
    run_sql(source_dsn, *SCHEMA)
    prepare.prepare(cfg)
    copy.run(cfg)
    sync.sync(cfg)


def write_config(path: Path, source_dsn: str, target_dsn: str, **cutover_settings: Any) -> Path:
    lines = ["[source]", f"dsn = {json.dumps(source_dsn)}", "[target]", f"dsn = {json.dumps(target_dsn)}",
             "[cutover]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in {**TEST_CUTOVER, **cutover_settings}.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the migrator console script as an operator would, without a terminal."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIGRATOR_")}
    exe = Path(sys.executable).with_name("migrator")
    return subprocess.run([str(exe), "--config", str(config), *args], env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)


def sqlstate_of_write(dsn: str, statement: str, *setup: str) -> str | None:
    """The SQLSTATE a write gets from a fresh connection (None when it succeeds)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for s in setup:
            conn.execute(s)  # type: ignore[arg-type]
        try:
            conn.execute(statement)  # type: ignore[arg-type]
        except psycopg.Error as exc:
            return exc.sqlstate
    return None


def attempts(target_dsn: str) -> list[tuple[Any, ...]]:
    return fetch(target_dsn, "SELECT id, status, failed_step, freeze_seconds FROM migrator_control.cutover_attempt "
                             "ORDER BY id")


def steps(target_dsn: str, attempt: int) -> dict[str, tuple[Any, ...]]:
    rows = fetch(target_dsn, "SELECT step, status, started_at, finished_at FROM migrator_control.cutover_step "
                             "WHERE attempt_id = %s", (attempt,))
    return {r[0]: r[1:] for r in rows}


def test_freeze_rejects_writes_from_open_transactions_replica_role_and_new_sessions_after_migrator_exits(
        cfg: Config, source_dsn: str, target_dsn: str, tmp_path: Path) -> None:
    migrated(cfg, source_dsn)
    config = write_config(tmp_path / "migration.toml", source_dsn, target_dsn, switch_command="true")
    # Clients that opened read-write transactions before the cutover and have read the tables they will write.
    early = psycopg.connect(source_dsn, autocommit=True)
    early.execute("BEGIN READ WRITE")
    early.execute("SELECT count(*) FROM public.study").fetchone()
    early_rr = psycopg.connect(source_dsn, autocommit=True)
    early_rr.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ WRITE")
    early_rr.execute("SELECT count(*) FROM public.series").fetchone()
    early_replica = psycopg.connect(source_dsn, autocommit=True)
    early_replica.execute("SET session_replication_role = replica")
    early_replica.execute("BEGIN READ WRITE")
    early_replica.execute("SELECT count(*) FROM public.audit").fetchone()
    try:
        proc = cli(config, "cutover", "--yes", "--json")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["ok"] is True

        # migrator has exited; the transactions opened before it ran now try to write.
        for conn, statement in [
            (early, "INSERT INTO public.study (uid) VALUES ('late-1')"),
            (early_rr, "INSERT INTO public.series (study_id, modality) VALUES (1, 'MR')"),
            (early_replica, "INSERT INTO public.audit (what) VALUES ('late')"),
        ]:
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction) as info:
                conn.execute(statement)  # type: ignore[arg-type]
            assert info.value.sqlstate == READ_ONLY
            assert "frozen" in str(info.value)
            conn.execute("ROLLBACK")
    finally:
        for conn in (early, early_rr, early_replica):
            conn.close()

    # New sessions, whatever they set, cannot write either: inserts, updates, deletes, truncates.
    assert sqlstate_of_write(source_dsn, "INSERT INTO public.study (uid) VALUES ('x')") == READ_ONLY
    assert sqlstate_of_write(source_dsn, "UPDATE public.study SET note = 'x' WHERE id = 1") == READ_ONLY
    assert sqlstate_of_write(source_dsn, "DELETE FROM public.audit") == READ_ONLY
    assert sqlstate_of_write(source_dsn, "TRUNCATE public.audit") == READ_ONLY
    assert sqlstate_of_write(source_dsn, "INSERT INTO public.study (uid) VALUES ('x')",
                             "SET session_replication_role = replica") == READ_ONLY
    assert sqlstate_of_write(source_dsn, "UPDATE public.series SET modality = 'PT'",
                             "SET session_replication_role = replica") == READ_ONLY
    assert sqlstate_of_write(source_dsn, "INSERT INTO public.study (uid) VALUES ('x')",
                             "SET default_transaction_read_only = off") == READ_ONLY
    assert fetch(source_dsn, "SELECT count(*) FROM public.study") == [(200,)]
    assert fetch(target_dsn, "SELECT count(*) FROM public.study") == [(200,)]
    assert fetch(target_dsn, "SELECT count(*) FROM public.series") == [(300,)]


def test_writer_in_flight_past_the_freeze_lock_timeout_stops_cutover_at_freeze_and_leaves_legacy_writable(
        cfg: Config, source_dsn: str, target_dsn: str, tmp_path: Path) -> None:
    migrated(cfg, source_dsn)
    config = write_config(tmp_path / "migration.toml", source_dsn, target_dsn, freeze_lock_timeout=1,
                          switch_command="true")
    with psycopg.connect(source_dsn) as writer:
        writer.execute("INSERT INTO public.study (uid) VALUES ('in-flight')")  # left uncommitted

        started = time.monotonic()
        proc = cli(config, "cutover", "--yes")
        assert time.monotonic() - started < 30

        assert proc.returncode == 3, proc.stderr
        assert "freeze" in proc.stderr and "what to do:" in proc.stderr
        writer.execute("INSERT INTO public.study (uid) VALUES ('in-flight-2')")
        writer.commit()  # the writer never noticed: the legacy database stayed writable
    assert sqlstate_of_write(source_dsn, "INSERT INTO public.study (uid) VALUES ('after')") is None
    assert fetch(source_dsn, "SELECT frozen FROM _migrator.freeze_state") in ([], [(False,)])
    assert fetch(target_dsn, "SELECT frozen, cutover_at FROM migrator_control.migration") == [(False, None)]
    # The rollback's capture, staged and armed on the target, was removed (after the legacy side was released).
    assert fetch(target_dsn, "SELECT count(*) FROM pg_trigger WHERE tgname LIKE '\\_migrator%'") == [(0,)]
    assert fetch(target_dsn, "SELECT count(*) FROM pg_namespace WHERE nspname = '_migrator'") == [(0,)]
    [(attempt, status, failed_step, _)] = attempts(target_dsn)
    assert (status, failed_step) == ("failed", "freeze")
    recorded = steps(target_dsn, attempt)
    assert recorded["freeze"][0] == "failed"
    assert recorded["catch_up"][0] == recorded["preflight"][0] == "done"
    assert "drain" not in recorded

    # The writer is gone now: the same cutover goes through and carries its rows.
    proc = cli(config, "cutover", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert fetch(target_dsn, "SELECT uid FROM public.study WHERE uid LIKE 'in-flight%%' OR uid = 'after' "
                             "ORDER BY uid") == [("after",), ("in-flight",), ("in-flight-2",)]


def test_writer_committing_within_the_freeze_lock_timeout_lets_cutover_finish_with_its_rows(
        make_config: Any, source_dsn: str, target_dsn: str) -> None:
    cfg = make_config(cutover={"freeze_lock_timeout": 10, "switch_command": "true"})
    migrated(cfg, source_dsn)
    writer = psycopg.connect(source_dsn)
    writer.execute("INSERT INTO public.study (uid) SELECT 'in-flight-' || g FROM generate_series(1, 25) g")
    writer.execute("UPDATE public.study SET note = 'changed in flight' WHERE id = 7")
    timer: list[threading.Timer] = []

    def on_step(name: str, status: str) -> None:
        if name == "freeze" and status == "running":  # commit only once the freeze is waiting for it
            t = threading.Timer(1.0, writer.commit)
            t.start()
            timer.append(t)

    try:
        report = cutover.run(cfg, on_step=on_step)
    finally:
        for t in timer:
            t.join()
        writer.close()

    assert report.ok
    [freeze_step] = [s for s in report.steps if s.step == "freeze"]
    assert freeze_step.seconds >= 0.9  # it waited for the writer instead of failing
    assert fetch(target_dsn, "SELECT count(*) FROM public.study WHERE uid LIKE 'in-flight-%%'") == [(25,)]
    assert fetch(target_dsn, "SELECT note FROM public.study WHERE id = 7") == [("changed in flight",)]
    assert sqlstate_of_write(source_dsn, "INSERT INTO public.study (uid) VALUES ('x')") == READ_ONLY


def test_failed_switch_releases_legacy_records_the_attempt_and_a_fixed_rerun_succeeds(
        cfg: Config, source_dsn: str, target_dsn: str, tmp_path: Path) -> None:
    migrated(cfg, source_dsn)
    config = write_config(tmp_path / "migration.toml", source_dsn, target_dsn, switch_command="exit 7")

    proc = cli(config, "cutover", "--yes")

    assert proc.returncode == 3, proc.stderr
    assert "switch" in proc.stderr and "exited 7" in proc.stderr and "writable again" in proc.stderr
    assert "what to do:" in proc.stderr
    assert sqlstate_of_write(source_dsn, "INSERT INTO public.study (uid) VALUES ('between-attempts')") is None
    assert fetch(source_dsn, "SELECT frozen FROM _migrator.freeze_state") == [(False,)]
    assert fetch(target_dsn, "SELECT frozen, cutover_at FROM migrator_control.migration") == [(False, None)]
    [(attempt, status, failed_step, _)] = attempts(target_dsn)
    assert (status, failed_step) == ("failed", "switch")
    recorded = steps(target_dsn, attempt)
    up_to_switch = cutover.STEPS[:cutover.STEPS.index("switch") + 1]
    assert set(recorded) == set(up_to_switch)
    for name in up_to_switch[:-1]:
        state, started_at, finished_at = recorded[name]
        assert state == "done", name
        assert started_at is not None and finished_at is not None and finished_at >= started_at
    assert recorded["switch"][0] == "failed"

    write_config(config, source_dsn, target_dsn, switch_command="true")
    proc = cli(config, "cutover", "--yes", "--json")

    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is True and report["failed_step"] is None
    assert isinstance(report["freeze_seconds"], float) and report["freeze_seconds"] > 0
    assert [s["step"] for s in report["steps"]] == list(cutover.STEPS)
    assert [(a[1], a[2]) for a in attempts(target_dsn)] == [("failed", "switch"), ("done", None)]
    assert attempts(target_dsn)[1][3] == pytest.approx(report["freeze_seconds"])
    assert fetch(target_dsn, "SELECT count(*) FROM public.study WHERE uid = 'between-attempts'") == [(1,)]
    assert sqlstate_of_write(source_dsn, "INSERT INTO public.study (uid) VALUES ('x')") == READ_ONLY


def test_concurrent_writer_loses_no_committed_row_and_is_refused_after_the_freeze(
        make_config: Any, source_dsn: str, target_dsn: str) -> None:
    cfg = make_config(cutover={"switch_command": "true"})
    migrated(cfg, source_dsn)
    outcomes: list[int | None] = []  # committed ids in order, None for a write refused with 25006
    other_errors: list[BaseException] = []
    stop = threading.Event()

    def writer() -> None:
        with psycopg.connect(source_dsn, autocommit=True) as conn:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    row = conn.execute("INSERT INTO public.study (uid, note) VALUES (%s, 'w') RETURNING id",
                                       (f"w-{n}",)).fetchone()
                    assert row is not None
                    outcomes.append(row[0])
                    if n % 5 == 0:
                        conn.execute("UPDATE public.study SET note = 'updated' WHERE id = %s", (row[0],))
                except psycopg.errors.ReadOnlySqlTransaction:
                    outcomes.append(None)
                    time.sleep(0.01)
                except BaseException as exc:  # reported to the test thread
                    other_errors.append(exc)
                    return

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.5)
        report = cutover.run(cfg)
        time.sleep(0.5)
    finally:
        stop.set()
        thread.join(timeout=30)

    assert report.ok
    assert not other_errors
    committed = [i for i in outcomes if i is not None]
    assert len(committed) > 10
    assert None in outcomes, "the writer was never refused after the freeze"
    first_refusal = outcomes.index(None)
    assert all(o is None for o in outcomes[first_refusal:]), "a write committed after the freeze"
    on_target = {r[0] for r in fetch(target_dsn, "SELECT id FROM public.study")}
    assert set(committed) <= on_target
    for table in ("public.study", "public.series", "public.audit"):
        assert fetch(source_dsn, f"SELECT count(*) FROM {table}") == fetch(target_dsn, f"SELECT count(*) FROM {table}")
    assert fetch(source_dsn, "SELECT id, uid, note FROM public.study ORDER BY id") == \
        fetch(target_dsn, "SELECT id, uid, note FROM public.study ORDER BY id")


def test_release_makes_the_legacy_database_writable_again(
        make_config: Any, source_dsn: str, target_dsn: str, tmp_path: Path) -> None:
    cfg = make_config(cutover={"switch_command": "true"})
    migrated(cfg, source_dsn)
    assert cutover.run(cfg).ok
    assert sqlstate_of_write(source_dsn, "INSERT INTO public.study (uid) VALUES ('x')") == READ_ONLY
    config = write_config(tmp_path / "migration.toml", source_dsn, target_dsn)

    proc = cli(config, "release", "--yes")

    assert proc.returncode == 0, proc.stderr
    assert sqlstate_of_write(source_dsn, "INSERT INTO public.study (uid) VALUES ('after-release')") is None
    assert sqlstate_of_write(source_dsn, "INSERT INTO public.study (uid) VALUES ('y')",
                             "SET session_replication_role = replica") is None
    assert fetch(source_dsn, "SELECT frozen FROM _migrator.freeze_state") == [(False,)]
    status = json.loads(cli(config, "status", "--json").stdout)
    assert status["frozen"] is False
    # Releasing twice is refused with a message, not a crash.
    again = cli(config, "release", "--yes")
    assert again.returncode != 0 and "not frozen" in again.stderr


def test_serial_identity_and_free_sequences_continue_past_the_source_after_cutover(
        make_config: Any, source_dsn: str, target_dsn: str) -> None:
    cfg = make_config(cutover={"switch_command": "true"})
    run_sql(
        source_dsn,
        "CREATE TABLE public.s (id serial PRIMARY KEY, v text)",
        "CREATE TABLE public.bs (id bigserial PRIMARY KEY, v text)",
        "CREATE TABLE public.ia (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v text)",
        "CREATE TABLE public.ib (id bigint GENERATED BY DEFAULT AS IDENTITY (START WITH 1000) PRIMARY KEY, v text)",
        "CREATE SEQUENCE public.accession_no START 5000",
        "INSERT INTO public.s (v) SELECT 'a' FROM generate_series(1, 40)",
        "INSERT INTO public.bs (v) SELECT 'a' FROM generate_series(1, 40)",
        "INSERT INTO public.ia (v) SELECT 'a' FROM generate_series(1, 40)",
        "INSERT INTO public.ib (v) SELECT 'a' FROM generate_series(1, 40)",
        "SELECT nextval('public.accession_no') FROM generate_series(1, 3)",
    )
    prepare.prepare(cfg)
    copy.run(cfg)
    # Values drawn after the copy reach the target only through replay and the sequences step.
    run_sql(
        source_dsn,
        "INSERT INTO public.s (v) SELECT 'b' FROM generate_series(1, 15)",
        "INSERT INTO public.bs (v) SELECT 'b' FROM generate_series(1, 15)",
        "INSERT INTO public.ia (v) SELECT 'b' FROM generate_series(1, 15)",
        "INSERT INTO public.ib (v) SELECT 'b' FROM generate_series(1, 15)",
        "DELETE FROM public.s WHERE id > 50",  # the highest values are gone, the sequence still moved past them
        "SELECT nextval('public.accession_no') FROM generate_series(1, 4)",
    )
    sync.sync(cfg)

    report = cutover.run(cfg)

    assert report.ok and report.sequences_set >= 5
    for table, source_max in (("s", 55), ("bs", 55), ("ia", 55), ("ib", 1054)):
        [(new_id,)] = fetch(target_dsn, f"INSERT INTO public.{table} (v) VALUES ('new') RETURNING id")
        assert new_id == source_max + 1, table
    assert fetch(target_dsn, "SELECT nextval('public.accession_no')") == [(5007,)]
