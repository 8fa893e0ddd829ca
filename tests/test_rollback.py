"""Rollback after a cutover, against a real server: every change written on the target in the rollback window
(inserts, updates, deletes, a key update, rows without a key, writes from a replica-role session) reaches the legacy
database, which takes writes again with its sequences past the target's; clients end on the legacy side (by
rollback_command, or through a real PgBouncer with clients writing throughout and none failing); a failed step
leaves clients on a writable target; a completed rollback leaves the target frozen (it rejects every client's write,
while sync goes on writing it) until the next cutover lifts the freeze (and a later rollback puts it back) or the
operator releases it (`release --target`, audited; `cleanup` refuses without `--release-target`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from migrator import cleanup, copy, cutover, prepare, rollback, sync
from migrator.config import Config
from migrator.errors import Blocked, CutoverFailed
from tests.helpers import fetch, run_sql
from tests.test_cutover import READ_ONLY, cli, migrated, sqlstate_of_write, write_config
from tests.test_pgbouncer import POOL_DB, Bouncer, Clients, bouncer, pooler_config, uids  # noqa: F401

TABLES = ("public.study", "public.series", "public.audit")


def rows(dsn: str, table: str) -> list[tuple[Any, ...]]:
    return fetch(dsn, f"SELECT t::text FROM {table} AS t ORDER BY t::text")


def assert_target_frozen(target_dsn: str) -> None:
    """The target rejects every client's write, a replica-role session's too, and its rollback log is empty."""
    assert sqlstate_of_write(target_dsn, "INSERT INTO public.study (id, uid) VALUES (-1, 'direct')") == READ_ONLY
    assert sqlstate_of_write(target_dsn, "UPDATE public.study SET note = 'x' WHERE id = 1") == READ_ONLY
    assert sqlstate_of_write(target_dsn, "TRUNCATE public.audit") == READ_ONLY
    assert sqlstate_of_write(target_dsn, "INSERT INTO public.study (id, uid) VALUES (-2, 'x')",
                             "SET session_replication_role = replica") == READ_ONLY
    assert fetch(target_dsn, "SELECT count(*) FROM _migrator.delta_log") == [(0,)]


def engine_on_target(target_dsn: str) -> list[tuple[Any, ...]]:
    """The engine's objects left on the target: its schema and any trigger calling into it."""
    return fetch(target_dsn, "SELECT 'schema' FROM pg_namespace WHERE nspname = '_migrator' UNION ALL "
                             "SELECT tgname::text FROM pg_trigger WHERE tgname LIKE '\\_migrator%'")


def write_on_target(target_dsn: str) -> None:
    """What the application does on the new server during the rollback window."""
    run_sql(target_dsn,
            "INSERT INTO public.study (uid, note) VALUES ('after-1', 'new'), ('after-2', 'new'), ('after-3', 'new')",
            "INSERT INTO public.series (study_id, modality) VALUES (1, 'MR'), (2, 'US')",
            "UPDATE public.study SET note = 'changed on target' WHERE id BETWEEN 10 AND 20",
            "DELETE FROM public.series WHERE study_id = 30",
            "DELETE FROM public.study WHERE id = 30",
            # a key update: the row moves to another primary key
            "UPDATE public.study SET id = 100000 WHERE uid = 'after-2'",
            "INSERT INTO public.audit (what) VALUES ('after'), ('after')",
            "DELETE FROM public.audit WHERE what = 'a7'",
            "UPDATE public.audit SET what = 'a8 changed' WHERE what = 'a8'")
    # A session in the replica role (as replication tools run) is captured too: the triggers are ENABLE ALWAYS.
    run_sql(target_dsn, "SET session_replication_role = replica",
            "INSERT INTO public.study (uid, note) VALUES ('replica-role', 'new')")
    # A transaction that rolls back leaves nothing to replay.
    with psycopg.connect(target_dsn) as conn:
        conn.execute("INSERT INTO public.study (uid, note) VALUES ('rolled-back', 'never')")
        conn.rollback()


def assert_same(source_dsn: str, target_dsn: str) -> None:
    for table in TABLES:
        assert rows(source_dsn, table) == rows(target_dsn, table), f"{table} differs"


def test_rollback_replays_every_target_change_onto_the_legacy_database_and_leaves_the_target_frozen_until_released(
        make_config: Callable[..., Config], source_dsn: str, target_dsn: str, tmp_path: Path) -> None:
    marker = tmp_path / "switched"
    cfg = make_config(copy={"workers": 2}, cutover={
        "switch_command": "true", "rollback_command": f"echo \"$MIGRATOR_DIRECTION\" > {marker}"})
    migrated(cfg, source_dsn)
    report = cutover.run(cfg)
    assert report.ok and [s.step for s in report.steps] == list(cutover.STEPS)
    write_on_target(target_dsn)
    assert sqlstate_of_write(source_dsn, "INSERT INTO public.study (uid) VALUES ('x')") == READ_ONLY
    config = write_config(tmp_path / "migration.toml", source_dsn, target_dsn, switch_command="true",
                          rollback_command="true")

    result = rollback.run(cfg)

    assert result.ok and [s["step"] for s in result.steps] == list(rollback.STEPS)
    assert result.events_replayed > 0
    assert marker.read_text().strip() == "rollback"
    assert_same(source_dsn, target_dsn)
    assert fetch(source_dsn, "SELECT id, note FROM public.study WHERE uid = 'after-2'") == [(100000, "new")]
    assert fetch(source_dsn, "SELECT count(*) FROM public.study WHERE uid IN ('rolled-back', 'replica-role')") \
        == [(1,)]
    # The legacy database takes writes again, and its sequences are past every id handed out on the target.
    run_sql(source_dsn, "INSERT INTO public.study (uid) VALUES ('back on legacy')",
            "INSERT INTO public.series (study_id, modality) VALUES (1, 'XA')")
    assert fetch(source_dsn, "SELECT id > (SELECT max(id) FROM public.study WHERE uid IN ('after-3', 'replica-role')) "
                             "FROM public.study WHERE uid = 'back on legacy'") == [(True,)]
    # The target stays frozen, its log emptied; the legacy position is gone; the attempt is recorded as a rollback;
    # a new cutover may follow.
    assert_target_frozen(target_dsn)
    assert fetch(source_dsn, "SELECT to_regclass('_migrator.rollback_position')") == [(None,)]
    assert fetch(target_dsn, "SELECT kind, status FROM migrator_control.cutover_attempt ORDER BY id") == [
        ("cutover", "done"), ("rollback", "done")]
    assert fetch(target_dsn, "SELECT cutover_at, frozen FROM migrator_control.migration") == [(None, False)]
    again = rollback.run(cfg)  # run again: nothing to do, and it says so
    assert again.ok and again.already_done and "the rollback is done" in again.render_text()
    assert "target stays frozen" in again.render_text()
    assert_target_frozen(target_dsn)

    # Only the operator ends that freeze: cleanup refuses, removing nothing; `release --target` does it, audited.
    refused = cli(config, "cleanup", "--yes")
    assert refused.returncode == 1, refused.stderr
    assert "target is frozen after a rollback" in refused.stderr and "--release-target" in refused.stderr
    assert fetch(source_dsn, "SELECT count(*) FROM pg_namespace WHERE nspname = '_migrator'") == [(1,)]
    assert_target_frozen(target_dsn)
    released = cli(config, "release", "--target", "--yes")
    assert released.returncode == 0, released.stderr
    assert "the target takes writes again" in released.stdout
    assert sqlstate_of_write(target_dsn, "INSERT INTO public.study (uid) VALUES ('released')") is None
    assert engine_on_target(target_dsn) == []
    assert fetch(target_dsn, "SELECT outcome FROM migrator_control.audit WHERE action = 'release --target' "
                             "AND outcome <> 'started' ORDER BY id") == [("done",)]
    again = cli(config, "release", "--target", "--yes")  # nothing frozen any more: said, exit 2
    assert again.returncode == 2 and "the target is not frozen; nothing to release" in again.stderr


def test_the_frozen_target_takes_sync_and_new_tables_an_undone_cutover_keeps_it_frozen_the_next_one_lifts_it(
        make_config: Callable[..., Config], source_dsn: str, target_dsn: str, tmp_path: Path) -> None:
    cfg = make_config(copy={"workers": 2}, cutover={"switch_command": "true", "rollback_command": "true"})
    migrated(cfg, source_dsn)
    cutover.run(cfg)
    write_on_target(target_dsn)
    rollback.run(cfg)
    assert_target_frozen(target_dsn)
    # Sync (and copy) go on writing the frozen target, through their own sessions only; a table prepare creates
    # there meanwhile (with and without a key) is frozen with the rest.
    run_sql(source_dsn, "INSERT INTO public.study (uid, note) VALUES ('between', 'legacy again')",
            "UPDATE public.study SET note = 'legacy edit' WHERE id = 40", "INSERT INTO public.audit (what) VALUES ('b')",
            "TRUNCATE public.audit", "CREATE TABLE public.dose (id int PRIMARY KEY, gy numeric)",
            "INSERT INTO public.dose VALUES (1, 0.5)", "CREATE TABLE public.notes (line text)",
            "INSERT INTO public.notes VALUES ('n1'), ('n1')")
    prepare.prepare(cfg)
    copy.run(cfg)
    run_sql(source_dsn, "INSERT INTO public.dose VALUES (2, 1.5)", "INSERT INTO public.notes VALUES ('n2')")
    sync.sync(cfg)
    assert_same(source_dsn, target_dsn)
    for table in ("public.dose", "public.notes"):
        assert rows(target_dsn, table) == rows(source_dsn, table), table
    assert_target_frozen(target_dsn)
    assert sqlstate_of_write(target_dsn, "INSERT INTO public.dose VALUES (3, 2.5)") == READ_ONLY
    assert sqlstate_of_write(target_dsn, "INSERT INTO public.notes VALUES ('direct')") == READ_ONLY

    # A cutover that fails after arm_rollback lifted the target's freeze puts it back.
    failing = make_config(copy={"workers": 2}, cutover={"switch_command": "exit 7", "rollback_command": "true"})
    with pytest.raises(CutoverFailed, match="step switch"):
        cutover.run(failing)
    assert_target_frozen(target_dsn)
    assert sqlstate_of_write(source_dsn, "INSERT INTO public.study (uid) VALUES ('legacy writable')") is None

    assert cutover.run(cfg).ok

    assert_same(source_dsn, target_dsn)
    assert len(engine_on_target(target_dsn)) > 1  # armed again for this cutover
    assert sqlstate_of_write(target_dsn, "INSERT INTO public.study (uid) VALUES ('the target takes writes')") is None
    assert sqlstate_of_write(source_dsn, "INSERT INTO public.study (uid) VALUES ('x')") == READ_ONLY
    run_sql(target_dsn, "UPDATE public.study SET note = 'second window' WHERE id BETWEEN 50 AND 60",
            "INSERT INTO public.audit (what) VALUES ('second window')")
    assert rollback.run(cfg).ok  # and a later rollback freezes it again
    assert_target_frozen(target_dsn)
    assert_same(source_dsn, target_dsn)
    # cleanup ends it when told to: the target takes writes again, and nothing of the engine is left there.
    with pytest.raises(Blocked, match="target is frozen after a rollback"):
        cleanup.run(cfg)
    done = cleanup.run(cfg, release_target=True)
    assert done.target_released and "takes writes again" in done.render_text()
    assert engine_on_target(target_dsn) == []
    assert sqlstate_of_write(target_dsn, "INSERT INTO public.study (uid) VALUES ('cleaned up')") is None


def test_a_failing_rollback_command_after_the_release_goes_forward_and_says_to_move_the_clients_by_hand(
        make_config: Callable[..., Config], source_dsn: str, target_dsn: str, tmp_path: Path) -> None:
    """The rollback's point of no return is the release of the legacy database: from then on clients not behind a
    pooler may write there, so a failure after it never freezes the legacy database again (their writes would be
    stranded). The rollback stands: the legacy database holds every change made on the target and takes writes, the
    target stays frozen, and the operator is told to move the clients by hand."""
    cfg = make_config(copy={"workers": 2}, cutover={"switch_command": "true", "rollback_command": "exit 7"})
    migrated(cfg, source_dsn)
    cutover.run(cfg)
    write_on_target(target_dsn)

    with pytest.raises(CutoverFailed, match="after its point of no return") as failed:
        rollback.run(cfg)

    assert "exited 7" in str(failed.value) and "by hand" in (failed.value.hint or "")
    assert sqlstate_of_write(source_dsn, "INSERT INTO public.study (uid) VALUES ('after release')") is None
    assert sqlstate_of_write(target_dsn, "INSERT INTO public.study (uid) VALUES ('x')") == READ_ONLY
    assert fetch(source_dsn, "SELECT count(*) FROM public.study WHERE uid LIKE 'after-_'") == [(3,)]
    assert fetch(target_dsn, "SELECT kind, status, failed_step FROM migrator_control.cutover_attempt "
                             "ORDER BY id DESC LIMIT 1") == [("rollback", "failed", "switch")]
    assert fetch(target_dsn, "SELECT cutover_at IS NULL, frozen FROM migrator_control.migration") == [(True, False)]


def target_capture_states(target_dsn: str) -> set[str]:
    return {r[0] for r in fetch(target_dsn, "SELECT DISTINCT tgenabled::text FROM pg_trigger "
                                            "WHERE tgname LIKE '\\_migrator%'")}


def test_the_rollback_capture_is_staged_disabled_before_the_pause_and_only_enabled_inside_it(
        cfg: Config, source_dsn: str, target_dsn: str) -> None:
    migrated(cfg, source_dsn)

    rollback.stage(cfg)

    assert target_capture_states(target_dsn) == {"D"}
    # Sync's drain writes the target while the staged triggers are there: they neither fire nor get in its way.
    run_sql(source_dsn, "INSERT INTO public.study (uid, note) VALUES ('late', 'x')",
            "UPDATE public.study SET note = 'late change' WHERE id <= 5")
    sync.sync(cfg)
    assert fetch(target_dsn, "SELECT count(*) FROM _migrator.delta_log") == [(0,)]
    assert fetch(target_dsn, "SELECT count(*) FROM public.study WHERE uid = 'late'") == [(1,)]

    rollback.arm(cfg)

    assert target_capture_states(target_dsn) == {"A"}
    run_sql(target_dsn, "UPDATE public.study SET note = 'on the new server' WHERE id = 7")
    assert fetch(target_dsn, "SELECT op::text, key FROM _migrator.delta_log") == [("U", ["7"])]
    rollback.disarm(cfg)  # a target no rollback froze: the window closes and capture goes
    assert engine_on_target(target_dsn) == []


def test_cleanup_ends_the_rollback_window_and_leaves_nothing_on_the_target(
        source_dsn: str, target_dsn: str, tmp_path: Path, make_config: Callable[..., Config]) -> None:
    migrated(make_config(copy={"workers": 2}), source_dsn)
    config = write_config(tmp_path / "migration.toml", source_dsn, target_dsn, switch_command="true")
    assert cli(config, "cutover", "--yes").returncode == 0
    assert engine_on_target(target_dsn) != []

    refused = cli(config, "cleanup", "--yes")  # the legacy side is frozen: nothing is removed, the window stays
    assert refused.returncode != 0 and engine_on_target(target_dsn) != []
    proc = cli(config, "cleanup", "--yes", "--release-freeze")

    assert proc.returncode == 0, proc.stderr
    assert "rollback window" in proc.stdout
    assert engine_on_target(target_dsn) == []
    assert sqlstate_of_write(target_dsn, "INSERT INTO public.study (uid) VALUES ('free')") is None
    gone = cli(config, "rollback", "--yes")
    assert gone.returncode != 0 and "cleaned up" in gone.stderr


def test_rollback_through_pgbouncer_moves_writing_clients_back_without_an_error_or_a_lost_transaction(
        make_config: Callable[..., Config], source_dsn: str, target_dsn: str,
        bouncer: Bouncer) -> None:  # noqa: F811 (the fixture imported from test_pgbouncer)
    cfg = pooler_config(make_config, bouncer)
    migrated(cfg, source_dsn)
    assert cutover.run(cfg).ok
    write_on_target(target_dsn)

    with Clients(bouncer.client_dsn, 10) as clients:
        time.sleep(1.0)  # clients write on the target
        report = rollback.run(cfg)
        time.sleep(1.0)  # and go on, now on the legacy database

    assert report.ok and report.mode == "pgbouncer"
    assert [s["step"] for s in report.steps] == list(rollback.POOLER_STEPS)
    assert not clients.failed, clients.failed[:5]
    assert report.pause_seconds is not None and report.pause_seconds < 5
    on_legacy, on_target = uids(source_dsn), uids(target_dsn)
    assert clients.uids() <= on_legacy, "a committed transaction is missing on the legacy database"
    assert len(on_legacy - on_target) >= 10, "clients did not go on writing on the legacy database"
    served = bouncer.databases()[POOL_DB]
    assert served.database == bouncer.legacy_db and not served.paused
    assert f"dbname={bouncer.legacy_db}" in bouncer.databases_ini.read_text()
    with psycopg.connect(bouncer.client_dsn, prepare_threshold=None, autocommit=True) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == (bouncer.legacy_db,)
    assert fetch(target_dsn, "SELECT pointing FROM migrator_control.pooler_entry") == [("legacy",)]
    assert_target_frozen(target_dsn)
    # Every row the target held when clients left is on the legacy side.
    for table in TABLES:
        assert set(rows(target_dsn, table)) <= set(rows(source_dsn, table)), table


@pytest.mark.parametrize("failure", ["pause_timeout", "at_sequences"])
def test_a_failed_rollback_through_pgbouncer_leaves_clients_on_the_target_and_a_second_one_succeeds(
        failure: str, make_config: Callable[..., Config], source_dsn: str, target_dsn: str,
        bouncer: Bouncer) -> None:  # noqa: F811 (the fixture imported from test_pgbouncer)
    cfg = pooler_config(make_config, bouncer, pause_timeout=1.5)
    migrated(cfg, source_dsn)
    assert cutover.run(cfg).ok
    ini_after_cutover = bouncer.databases_ini.read_text()
    write_on_target(target_dsn)
    expected_step = {"pause_timeout": "pause", "at_sequences": "sequences"}[failure]
    holder = None
    if failure == "pause_timeout":  # a client keeps a transaction open through the pooler: PAUSE cannot complete
        holder = psycopg.connect(bouncer.client_dsn, prepare_threshold=None)
        holder.execute("INSERT INTO public.study (uid, note) VALUES ('held-open', 'updated')")

    def inject(step: str, status: str) -> None:
        if failure == "at_sequences" and (step, status) == ("sequences", "running"):
            raise RuntimeError("injected before the legacy database's release")

    with Clients(bouncer.client_dsn, 5) as clients:
        with pytest.raises(CutoverFailed) as info:
            rollback.run(cfg, on_step=inject)
        time.sleep(0.5)
    if holder is not None:
        holder.commit()
        holder.close()

    assert f"step {expected_step}" in str(info.value)
    assert not clients.failed, clients.failed[:5]
    served = bouncer.databases()[POOL_DB]
    assert served.database == bouncer.target_db and not served.paused
    assert bouncer.databases_ini.read_text() == ini_after_cutover
    assert clients.uids() <= uids(target_dsn)
    assert sqlstate_of_write(target_dsn, "INSERT INTO public.study (uid) VALUES ('target writable')") is None
    assert sqlstate_of_write(source_dsn, "UPDATE public.study SET note = 'x' WHERE id = 1") == READ_ONLY
    assert fetch(target_dsn, "SELECT kind, status, failed_step FROM migrator_control.cutover_attempt "
                             "ORDER BY id DESC LIMIT 1") == [("rollback", "failed", expected_step)]

    assert rollback.run(cfg).ok
    assert clients.uids() <= uids(source_dsn)
    assert_same(source_dsn, target_dsn)
    assert bouncer.databases()[POOL_DB].database == bouncer.legacy_db


def test_a_rollback_failing_after_the_release_goes_forward_through_pgbouncer_and_never_stays_paused(
        make_config: Callable[..., Config], source_dsn: str, target_dsn: str,
        bouncer: Bouncer) -> None:  # noqa: F811 (the fixture imported from test_pgbouncer)
    cfg = pooler_config(make_config, bouncer, pause_timeout=1.5)
    migrated(cfg, source_dsn)
    assert cutover.run(cfg).ok
    write_on_target(target_dsn)

    def inject(step: str, status: str) -> None:
        if (step, status) == ("resume", "running"):
            raise RuntimeError("injected before RESUME")

    with Clients(bouncer.client_dsn, 5) as clients:
        with pytest.raises(CutoverFailed, match="after its point of no return") as info:
            rollback.run(cfg, on_step=inject)
        time.sleep(0.5)

    assert "step resume" in str(info.value)
    assert not clients.failed, clients.failed[:5]
    served = bouncer.databases()[POOL_DB]
    assert served.database == bouncer.legacy_db and not served.paused
    assert clients.uids() <= uids(source_dsn)
    assert sqlstate_of_write(source_dsn, "UPDATE public.study SET note = 'x' WHERE id = 1") is None
    assert sqlstate_of_write(target_dsn, "INSERT INTO public.study (uid) VALUES ('x')") == READ_ONLY
