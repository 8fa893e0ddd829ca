"""Faults of the servers around sync: the target restarted while `sync --follow` applies a workload's changes.

The target is a private PostgreSQL cluster the test starts itself (initdb into a temporary directory, a free port),
so that it can be restarted — fast, and immediate, which is a crash followed by recovery — without disturbing the
shared server the source lives on. Sync must retry with backoff, resume from the position the target committed,
and lose or double nothing: every row is compared at the end.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from migrator import copy, prepare
from migrator.config import from_dict
from tests.test_crash_and_concurrency import (
    Processes,
    Writers,
    assert_same_rows,
    make_source,
    position,
    wait_for,
)

pytestmark = pytest.mark.slow


def _bindir() -> Path | None:
    """Where initdb and pg_ctl are: on PATH, or the newest /usr/lib/postgresql/*/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[-3]))
    return Path(candidates[-1]).parent if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """A throwaway PostgreSQL cluster owned by the test. As root, the server runs as the postgres user."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.port = _free_port()
        self.as_postgres = os.geteuid() == 0
        self.dir = Path(tempfile.mkdtemp(prefix="migrator-target-cluster-"))
        self.data = self.dir / "data"
        self.logfile = self.dir / "server.log"
        if self.as_postgres:
            # /tmp/pytest-of-root is closed to other users: the cluster lives in a directory of its own.
            shutil.chown(self.dir, "postgres", "postgres")

    def _run(self, *args: str, timeout: float = 60) -> None:
        done = subprocess.run([str(self.bindir / args[0]), *args[1:]], capture_output=True, text=True,
                              timeout=timeout, user="postgres" if self.as_postgres else None, cwd=self.dir)
        assert done.returncode == 0, f"{' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8",
                  "--locale", "C")

    def pg_ctl(self, action: str, *options: str) -> None:
        self._run("pg_ctl", action, "-D", str(self.data), "-w", "-t", "60", "-l", str(self.logfile), *options,
                  "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off")

    def dsn(self, dbname: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def server_log(self) -> str:
        return self.logfile.read_text(errors="replace")[-3000:] if self.logfile.exists() else ""

    def remove(self) -> None:
        if (self.data / "postmaster.pid").exists():
            try:
                self.pg_ctl("stop", "-m", "immediate")
            except AssertionError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def target_cluster() -> Iterator[Cluster]:
    bindir = _bindir()
    if bindir is None or not (bindir / "pg_ctl").exists():
        pytest.skip("initdb/pg_ctl not found (PATH or /usr/lib/postgresql/*/bin): no private target cluster")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root (initdb refuses) and there is no postgres user to run a private cluster as")
    cluster = Cluster(bindir)
    try:
        cluster.init()
        cluster.pg_ctl("start")
        with psycopg.connect(cluster.dsn("postgres"), autocommit=True) as conn:
            conn.execute("CREATE DATABASE target")
        yield cluster
    finally:
        cluster.remove()


def _changed(target_dsn: str, since: tuple[str, int]) -> bool:
    """Whether the applied position moved past `since` (the target may be down: then not yet)."""
    try:
        return position(target_dsn)[1] > since[1]
    except psycopg.OperationalError:
        return False


def test_target_restarted_fast_and_immediately_while_sync_follows_loses_nothing(
    source_dsn: str, target_cluster: Cluster, tmp_path: Path
) -> None:
    target_dsn = target_cluster.dsn("target")
    data: dict[str, Any] = {"source": {"dsn": source_dsn}, "target": {"dsn": target_dsn},
                            "sync": {"poll_interval": 0.1}}
    cfg = from_dict(data, env={})
    config = tmp_path / "migration.toml"
    config.write_text(f"[source]\ndsn = {json.dumps(source_dsn)}\n\n[target]\ndsn = {json.dumps(target_dsn)}\n\n"
                      "[sync]\npoll_interval = 0.1\n")
    processes = Processes(config)
    make_source(source_dsn, {"item": 10_000}, {"tally": 5_000})
    prepare.prepare(cfg)
    copy.run(cfg)
    writers = Writers(source_dsn, {"item": 10_000}, ["tally"], n=2, pause=0.005).start()
    restarts: list[str] = []
    try:
        proc = processes.start("sync", "--follow")
        for mode in ("fast", "immediate", "fast"):
            before = position(target_dsn)
            wait_for(lambda before=before: _changed(target_dsn, before), 30, "sync to apply a batch")
            time.sleep(0.3)  # land the restart somewhere inside the next batches
            target_cluster.pg_ctl("restart", "-m", mode)
            restarts.append(mode)
            assert proc.poll() is None, f"sync --follow died on a {mode} restart:\n{processes.output(proc)}"
        after = position(target_dsn)
        wait_for(lambda: _changed(target_dsn, after), 60, "sync to resume after the last restart")
        # Down for longer than the first backoff steps: reconnecting fails a few times before it succeeds.
        target_cluster.pg_ctl("stop", "-m", "fast")
        time.sleep(3.0)
        target_cluster.pg_ctl("start")
        restarts.append("stopped 3s")
        after = position(target_dsn)
        wait_for(lambda: _changed(target_dsn, after), 60, "sync to resume after the target came back")
        writers.stop()
        assert proc.poll() is None, f"sync --follow died:\n{processes.output(proc)}"
        assert processes.stop(proc) == 0, processes.output(proc)
    except BaseException:
        print(f"target server log:\n{target_cluster.server_log()}")
        raise
    finally:
        writers.halt()
        processes.kill_all()

    done = json.loads(processes.run("sync", "--until-caught-up", "--json").stdout)

    log = processes.output(proc, tail=10**9)
    retries = log.count('"sync.retry"')
    print(f"{writers.commits} commits, {writers.rollbacks} rollbacks; restarts {restarts}; {retries} retries; "
          f"final sync {done['events']} events")
    assert retries >= len(restarts), "every restart should have cost sync at least one retry"
    assert done["caught_up"]
    assert_same_rows(source_dsn, target_dsn)
