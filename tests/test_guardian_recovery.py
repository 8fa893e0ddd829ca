"""The guardian's harder nights: the target (which holds the control schema) is the server that failed, and the
guardian itself is killed with the cutover, so that only a re-run can resolve the attempt.

Real processes, a real PgBouncer, real signals: the cutover runs as the `migrator` console script in a session of its
own and is stopped (SIGSTOP) or killed (SIGKILL) at a step it has printed.
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

from migrator.config import Config
from tests.helpers import fetch, run_sql
from tests.test_cutover import READ_ONLY, cli, migrated, sqlstate_of_write, write_config
from tests.test_pgbouncer import POOL_DB, Bouncer, Clients, bouncer, pooler_config, uids  # noqa: F401

BOUND = 2.0 + 10.0
"""guardian_timeout (2 s in these tests) and a generous margin: what the tests hold the guardian to."""


def start_cutover(config: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIGRATOR_")}
    exe = Path(sys.executable).with_name("migrator")
    return subprocess.Popen([str(exe), "--config", str(config), "cutover", "--yes"], env=env, text=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)


def stop_after(proc: subprocess.Popen[str], step: str, journals: Path) -> int:
    """SIGSTOP the cutover once it logs that `step` is done; returns its guardian's pid (from its journal)."""
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == "cutover.step" and event.get("step") == step:
                os.kill(proc.pid, signal.SIGSTOP)
                [journal] = [json.loads(p.read_text()) for p in journals.glob("cutover-*.json")]
                assert journal["guardian"], "the guard step ran before " + step
                return int(journal["guardian"])
    raise AssertionError(f"the cutover ended before step {step}")


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
    proc = start_cutover(config)
    with Clients(bouncer.client_dsn, 10) as clients:
        stop_after(proc, "freeze", tmp_path / ".migrator")  # clients paused, the legacy database frozen, the process hung
        try:
            # The target fails: no new session reaches it, and the hung process's sessions are gone.
            t0 = time.monotonic()
            run_sql(admin_dsn, f'ALTER DATABASE "{tgt}" ALLOW_CONNECTIONS false',
                    f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{tgt}'")
            assert time.monotonic() - t0 < 3, "the target went down before the guardian acted"
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
            assert "REMOVING THE ROLLBACK'S CAPTURE FROM THE TARGET" in str(journal()["detail"])
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
    proc = start_cutover(config)
    with Clients(bouncer.client_dsn, 10) as clients:
        guardian = stop_after(proc, "drain", tmp_path / ".migrator")
        os.kill(guardian, signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
        time.sleep(0.5)
        assert bouncer.databases()[POOL_DB].paused, "nothing resolved it: clients wait"

        status = cli(config, "status", "--json")
        [interrupted] = json.loads(status.stdout)["interrupted"]
        assert (interrupted["kind"], interrupted["command"]) == ("cutover", "migrator cutover --yes")
        step = interrupted["step"]
        assert step in ("drain", "verify", "sequences"), step  # SIGSTOP lands a little after the line

        rerun = cli(config, "cutover", "--yes")
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        assert f"stopped at step {step} (its process died) and was undone by this re-run" in rerun.stdout
        assert "cutover done" in rerun.stdout
    assert not clients.failed, clients.failed[:5]
    assert bouncer.databases()[POOL_DB].database == bouncer.target_db
    assert not bouncer.databases()[POOL_DB].paused
    assert clients.uids() <= uids(target_dsn)
    assert json.loads(cli(config, "status", "--json").stdout)["interrupted"] == []
