"""The guardian's harder nights: the target (which holds the control schema) is the server that failed, and the
guardian itself is killed with the cutover, so that only a re-run can resolve the attempt.

Real processes, a real PgBouncer, real signals: the cutover runs as the `migrator` console script in a session of its
own and stops itself (SIGSTOP) at a fault point (migrator/faults.py), as a hung process would; the test kills it
there, or lets its guardian do so.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from migrator import faults
from migrator.config import Config
from tests.helpers import fetch, run_sql
from tests.test_cutover import READ_ONLY, cli, migrated, sqlstate_of_write, write_config
from tests.test_pgbouncer import POOL_DB, Bouncer, Clients, bouncer, pooler_config, uids  # noqa: F401


def start_cutover(config: Path, stop_at: str) -> subprocess.Popen[str]:
    """`migrator cutover --yes` in a session of its own, stopping itself (SIGSTOP) at the fault point `stop_at`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIGRATOR_")}
    env[faults.STOP_ENV] = stop_at
    exe = Path(sys.executable).with_name("migrator")
    return subprocess.Popen([str(exe), "--config", str(config), "cutover", "--yes"], env=env, text=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def stopped(proc: subprocess.Popen[str], journals: Path) -> int:
    """Wait until the cutover has stopped itself; returns its guardian's pid (from its journal)."""
    wait_until(lambda: open(f"/proc/{proc.pid}/stat").read().split(") ", 1)[1][:1] == "T", 60, "the fault point")
    [journal] = [json.loads(p.read_text()) for p in journals.glob("cutover-*.json")]
    assert journal["guardian"]
    return int(journal["guardian"])


def wait_until(check: Callable[[], bool], within: float, what: str) -> float:
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < within, f"not within {within}s: {what}"
        time.sleep(0.05)
    return time.monotonic() - t0


def test_the_guardian_undoes_a_hung_cutover_while_the_target_is_down_and_records_it_when_it_is_back(
        make_config: Callable[..., Config], source_dsn: str, target_dsn: str, admin_dsn: str,
        bouncer: Bouncer, tmp_path: Path) -> None:  # noqa: F811 (the fixture imported from test_pgbouncer)
    cfg = pooler_config(make_config, bouncer)
    migrated(cfg, source_dsn)
    # Silence of 4 s before the guardian acts: time for this test to take the target down first.
    config = write_config(tmp_path / "migration.toml", source_dsn, target_dsn, guardian_timeout=4,
                          **bouncer.settings())
    tgt = fetch(target_dsn, "SELECT current_database()")[0][0]
    proc = start_cutover(config, "cutover.freeze.ran")
    with Clients(bouncer.client_dsn, 10) as clients:
        stopped(proc, tmp_path / ".migrator")  # clients paused, the legacy database frozen, the process hung
        try:
            # The target fails: no new session reaches it, and the hung process's sessions are gone.
            run_sql(admin_dsn, f'ALTER DATABASE "{tgt}" ALLOW_CONNECTIONS false',
                    f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{tgt}'")
            wait_until(lambda: not bouncer.databases()[POOL_DB].paused, 4 + 10, "clients go on")
            count = len(clients.committed)
            wait_until(lambda: len(clients.committed) > count + 10, 10, "clients commit on the legacy database")
            assert proc.wait(10) == -signal.SIGKILL, "the guardian killed the silent process first"
            assert sqlstate_of_write(source_dsn, "INSERT INTO public.study (uid) VALUES ('direct')") is None

            def journal() -> dict[str, object]:
                [found] = [json.loads(p.read_text()) for p in (tmp_path / ".migrator").glob("cutover-1-*.json")]
                return found
            wait_until(lambda: journal()["outcome"] is not None, 10, "the guardian's journal says what it did")
            assert journal()["outcome"] == "back" and journal()["written_back"] is False
            assert "CLOSING THE ROLLBACK WINDOW ON THE TARGET" in str(journal()["detail"])
        finally:
            run_sql(admin_dsn, f'ALTER DATABASE "{tgt}" ALLOW_CONNECTIONS true')
        # The target is back: the guardian records what it did (it retries every 2 s).
        wait_until(lambda: fetch(target_dsn, "SELECT status FROM migrator_control.cutover_attempt WHERE id = 1")
                   == [("failed",)], 15, "the guardian's outcome recorded")
        [(error,)] = fetch(target_dsn, "SELECT error FROM migrator_control.cutover_attempt WHERE id = 1")
        assert "undone by the guardian" in error and "step freeze" in error
        assert not clients.failed, clients.failed[:5]
        assert clients.uids() <= uids(source_dsn)

        rerun = cli(config, "cutover", "--yes")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert bouncer.databases()[POOL_DB].database == bouncer.target_db
    assert clients.uids() <= uids(target_dsn)
    assert sqlstate_of_write(source_dsn, "INSERT INTO public.study (uid) VALUES ('x')") == READ_ONLY


def test_with_its_guardian_killed_too_status_names_the_interrupted_cutover_and_a_rerun_resolves_it(
        make_config: Callable[..., Config], source_dsn: str, target_dsn: str,
        bouncer: Bouncer, tmp_path: Path) -> None:  # noqa: F811 (the fixture imported from test_pgbouncer)
    cfg = pooler_config(make_config, bouncer)
    migrated(cfg, source_dsn)
    config = write_config(tmp_path / "migration.toml", source_dsn, target_dsn, guardian_timeout=2,
                          **bouncer.settings())
    proc = start_cutover(config, "cutover.verify.started")
    with Clients(bouncer.client_dsn, 10) as clients:
        guardian = stopped(proc, tmp_path / ".migrator")
        os.kill(guardian, signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
        time.sleep(0.5)
        assert bouncer.databases()[POOL_DB].paused, "nothing resolved it: clients wait"

        status = cli(config, "status", "--json")
        [interrupted] = json.loads(status.stdout)["interrupted"]
        assert (interrupted["kind"], interrupted["step"], interrupted["command"]) == \
            ("cutover", "verify", "migrator cutover --yes")

        rerun = cli(config, "cutover", "--yes")
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        assert "stopped at step verify (its process died) and was undone by this re-run" in rerun.stdout
        assert "cutover done" in rerun.stdout
    assert not clients.failed, clients.failed[:5]
    assert bouncer.databases()[POOL_DB].database == bouncer.target_db
    assert not bouncer.databases()[POOL_DB].paused
    assert clients.uids() <= uids(target_dsn)
    assert json.loads(cli(config, "status", "--json").stdout)["interrupted"] == []


def run_killed(config: Path, command: str, point: str) -> int:
    """`migrator <command> --yes` killed (its whole process group, SIGKILL) at the fault point `point`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIGRATOR_")}
    env[faults.ENV] = point
    exe = Path(sys.executable).with_name("migrator")
    return subprocess.run([str(exe), "--config", str(config), command, "--yes"], env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, start_new_session=True, timeout=120).returncode


def test_without_a_pooler_a_switch_command_left_running_is_waited_for_and_the_check_decides(
        make_config: Callable[..., Config], source_dsn: str, target_dsn: str, tmp_path: Path) -> None:
    """Killed while the site's switch command runs: the command (in a session of its own) finishes; the guardian
    waits for it, asks switch_check_command, and completes the cutover instead of releasing a legacy database whose
    clients have moved."""
    migrated(make_config(copy={"workers": 2}), source_dsn)
    started, moved = tmp_path / "started", tmp_path / "moved"
    config = write_config(tmp_path / "migration.toml", source_dsn, target_dsn, guardian_timeout=2,
                          switch_command=f"touch {started}; sleep 2; touch {moved}",
                          switch_check_command=f"test -f {moved}", rollback_command="true")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIGRATOR_")}
    exe = Path(sys.executable).with_name("migrator")
    proc = subprocess.Popen([str(exe), "--config", str(config), "cutover", "--yes"], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_until(started.exists, 60, "the switch command started")
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(10) == -signal.SIGKILL

    wait_until(lambda: fetch(target_dsn, "SELECT status FROM migrator_control.cutover_attempt") == [("done",)], 30,
               "the guardian completes the cutover")
    assert moved.exists()
    assert sqlstate_of_write(source_dsn, "UPDATE public.study SET note = 'x' WHERE id = 1") == READ_ONLY
    [(error,)] = fetch(target_dsn, "SELECT error FROM migrator_control.cutover_attempt")
    assert "completed by the guardian" in error and "switch_check_command said clients are on the target" in error
    rerun = cli(config, "cutover", "--yes")
    assert rerun.returncode == 0 and "the cutover is done" in rerun.stdout, rerun.stderr[-2000:]


def test_without_a_pooler_a_rollback_killed_after_the_release_is_completed_with_its_rollback_command(
        make_config: Callable[..., Config], source_dsn: str, target_dsn: str, tmp_path: Path) -> None:
    migrated(make_config(copy={"workers": 2}), source_dsn)
    back = tmp_path / "back"
    config = write_config(tmp_path / "migration.toml", source_dsn, target_dsn, guardian_timeout=2,
                          switch_command="true", rollback_command=f"touch {back}")
    assert cli(config, "cutover", "--yes").returncode == 0
    run_sql(target_dsn, "INSERT INTO public.study (uid, note) VALUES ('on target', 'updated')")

    assert run_killed(config, "rollback", "rollback.release.ran") == -signal.SIGKILL

    wait_until(back.exists, 30, "the guardian runs rollback_command")
    wait_until(lambda: fetch(target_dsn, "SELECT kind, status FROM migrator_control.cutover_attempt "
                                         "ORDER BY id DESC LIMIT 1") == [("rollback", "done")], 30, "recorded")
    assert sqlstate_of_write(source_dsn, "UPDATE public.study SET note = 'x' WHERE id = 1") is None
    assert sqlstate_of_write(target_dsn, "UPDATE public.study SET note = 'x' WHERE id = 1") == READ_ONLY
    assert fetch(source_dsn, "SELECT count(*) FROM public.study WHERE uid = 'on target'") == [(1,)]
    rerun = cli(config, "rollback", "--yes")
    assert rerun.returncode == 0 and "the rollback is done" in rerun.stdout, rerun.stderr[-2000:]
    # The re-run closes the rollback window (its last step, `disarm`): the legacy position goes, the target's log is
    # emptied, and the target stays frozen, whoever completed the rollback.
    assert fetch(source_dsn, "SELECT to_regclass('_migrator.rollback_position')") == [(None,)]
    assert fetch(target_dsn, "SELECT count(*) FROM _migrator.delta_log") == [(0,)]
    assert sqlstate_of_write(target_dsn, "UPDATE public.study SET note = 'x' WHERE id = 1") == READ_ONLY
