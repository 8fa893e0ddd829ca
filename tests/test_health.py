"""The health gate after the switch (migrator/health.py): clients that cannot work on the target are seen, and the
cutover rolls back (or stops, or is told to ignore it) instead of saying the night went well.

Real PgBouncer 1.18 in transaction pooling (which carries no prepared statement across server connections), and
clients that prepare their statements as Orthanc does: once per connection, by name, on a pool of one server
connection (so that they work before the switch).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.pq import DiagnosticField, ExecStatus

from migrator import cutover, faults, gonogo, rollback
from migrator import status as status_mod
from migrator.config import Config
from migrator.errors import ClientsUnhealthy, ExitCode
from tests.helpers import ClientThreads, fetch
from tests.test_cutover import READ_ONLY, cli, migrated, sqlstate_of_write, write_config
from tests.test_pgbouncer import POOL_DB, Bouncer, Clients, bouncer, running_bouncer, uids  # noqa: F401


@pytest.fixture
def pool_of_one(source_dsn: str, target_dsn: str) -> Iterator[Bouncer]:
    with running_bouncer(source_dsn, target_dsn, entry_extra="pool_size=1") as b:
        yield b


@dataclass
class PreparedClients(ClientThreads):
    """Clients as Orthanc's index: each connection prepares its statement once, by a fixed name, and executes it in
    explicit transactions; it prepares again only on a new connection, which it opens when its connection is lost."""

    dsn: str
    n: int = 2
    committed: list[tuple[float, str]] = field(default_factory=list)
    errors: list[tuple[float, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def _connect(self, index: int) -> psycopg.Connection[Any] | None:
        try:
            conn = psycopg.connect(self.dsn, autocommit=True, prepare_threshold=None, connect_timeout=3)
        except psycopg.Error as exc:
            self.errors.append((time.monotonic(), f"connect: {str(exc).strip()[:100]}"))
            return None
        res = conn.pgconn.prepare(f"mt_insert_{index}".encode(),
                                  b"INSERT INTO public.study (uid, note) VALUES ($1, 'prepared')")
        if res.status != ExecStatus.COMMAND_OK:
            self.errors.append((time.monotonic(), f"prepare: {self._said(res)}"))
        return conn

    @staticmethod
    def _said(res: Any) -> str:
        state = res.error_field(DiagnosticField.SQLSTATE)
        return f"{state.decode() if state else ''} {res.error_message.decode(errors='replace').strip()[:100]}"

    def client(self, index: int) -> None:
        n = 0
        conn = None
        while not self.stop.is_set():
            if conn is None or conn.closed or conn.pgconn.status != psycopg.pq.ConnStatus.OK:
                conn = self._connect(index)
                if conn is None:
                    time.sleep(0.2)
                    continue
            n += 1
            try:
                self._one(conn.pgconn, index, f"p{index}-{n}")
            except psycopg.Error as exc:  # the connection is lost: a new one, and the statement prepared again
                self.errors.append((time.monotonic(), f"connection lost: {str(exc).strip()[:100]}"))
                conn.close()
                conn = None
            time.sleep(0.02)
        if conn is not None:
            conn.close()

    def _one(self, pg: Any, index: int, uid: str) -> None:
        pg.exec_(b"BEGIN")
        res = pg.exec_prepared(f"mt_insert_{index}".encode(), [uid.encode()])
        if res.status != ExecStatus.COMMAND_OK:
            self.errors.append((time.monotonic(), self._said(res)))
            pg.exec_(b"ROLLBACK")
            time.sleep(0.03)
            return
        res = pg.exec_(b"COMMIT")
        if res.status == ExecStatus.COMMAND_OK:
            self.committed.append((time.monotonic(), uid))
        else:
            self.errors.append((time.monotonic(), self._said(res)))

    def committed_after(self, t: float) -> int:
        return sum(1 for at, _ in self.committed if at > t)

    def uids(self) -> set[str]:
        return {u for _, u in self.committed}


def study_uids(dsn: str, note: str) -> set[str]:
    return {r[0] for r in fetch(dsn, "SELECT uid FROM public.study WHERE note = %s", (note,))}


@dataclass
class ThresholdClient:
    """A psycopg client with its default prepare_threshold: after five executions of a query it prepares it on the
    server (`_pg3_0`); on `26000 prepared statement does not exist` it forgets its prepared statements and prepares
    again, so it meets one error per connection after the switch. It reconnects when its connection is lost."""

    dsn: str
    committed: list[tuple[float, str]] = field(default_factory=list)
    errors: list[tuple[float, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def _run(self) -> None:
        n, conn = 0, None
        while not self.stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.dsn, connect_timeout=3)
                n += 1
                conn.execute("INSERT INTO public.study (uid, note) VALUES (%s, 'threshold')", (f"t-{n}",))
                conn.commit()
                self.committed.append((time.monotonic(), f"t-{n}"))
            except psycopg.Error as exc:
                self.errors.append((time.monotonic(), f"{exc.sqlstate} {str(exc).strip()[:100]}"))
                if conn is not None and not conn.closed and conn.pgconn.status == psycopg.pq.ConnStatus.OK:
                    conn.rollback()
                else:
                    conn = None
                    time.sleep(0.2)
            time.sleep(0.03)
        if conn is not None:
            conn.close()

    def __enter__(self) -> ThresholdClient:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while len(self.committed) < 10 and time.monotonic() < deadline:  # prepared on the server from the 6th on
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=30)


def wait_until(check: Callable[[], bool], within: float, what: str) -> float:
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < within, f"not within {within}s: {what}"
        time.sleep(0.05)
    return time.monotonic() - t0


def health_of(target_dsn: str) -> list[tuple[Any, ...]]:
    return fetch(target_dsn, "SELECT id, kind, status, failed_step, health FROM migrator_control.cutover_attempt "
                             "ORDER BY id")


GATE = 3.0
"""The gate's window in these tests."""


def test_clients_that_lose_their_prepared_statements_at_the_switch_are_rolled_back_and_commit_again_on_legacy(
        make_config: Callable[..., Config], source_dsn: str, target_dsn: str, pool_of_one: Bouncer) -> None:
    """PgBouncer 1.18, transaction pooling, one server connection: clients that prepare by name work there until
    the switch. Before this gate the cutover exited 0 and they failed from then on (every statement: 26000); now
    the gate rolls back, the rollback has the pooler drop their connections, and they commit again on the legacy
    database; what stateless clients committed on the target meanwhile is on the legacy database too."""
    settings = {**pool_of_one.settings(), "prepared_statements": "unknown", "health_seconds": GATE}
    cfg = make_config(copy={"workers": 2}, cutover=settings)
    migrated(cfg, source_dsn)

    with PreparedClients(pool_of_one.client_dsn) as prepared, ThresholdClient(pool_of_one.client_dsn) as threshold, \
            Clients(pool_of_one.client_dsn, 2) as stateless:
        assert not prepared.errors and not threshold.errors, (prepared.errors[:3], threshold.errors[:3])
        t0 = time.monotonic()
        with pytest.raises(ClientsUnhealthy) as info:
            cutover.run(cfg)
        verdict_to_commit = wait_until(lambda: prepared.committed_after(time.monotonic() - 0.5) > 0 and
                                       threshold.committed[-1][0] > time.monotonic() - 0.5, 30,
                                       "the prepared clients commit again on the legacy database")
        took = time.monotonic() - t0
        time.sleep(0.5)
    print(f"\ncutover + gate + rollback {took:.2f}s; from the exit to clients committing again {verdict_to_commit:.2f}s")

    error = info.value
    assert error.rolled_back and error.exit_code == ExitCode.ROLLED_BACK_UNHEALTHY == 4
    assert str(error).startswith("rolled back: clients unhealthy on the target")
    assert "canary" in str(error) and "prepared statements" in error.hint
    # On the target, the prepared clients failed on every statement; the psycopg client met 26000 once.
    on_target = [e for t, e in prepared.errors if t > t0]
    assert on_target and all("26000" in e or "connect" in e for e in on_target), on_target[:5]
    assert any("26000" in e for _, e in threshold.errors)
    # Back on the legacy database, clients write there, and nothing committed on the target was lost.
    served = pool_of_one.databases()[POOL_DB]
    assert served.database == pool_of_one.legacy_db and not served.paused
    legacy = study_uids(source_dsn, "prepared") | study_uids(source_dsn, "threshold") | uids(source_dsn)
    assert prepared.uids() | {u for _, u in threshold.committed} | stateless.uids() <= legacy
    assert sqlstate_of_write(source_dsn, "INSERT INTO public.study (uid) VALUES ('after')") is None
    # Recorded: the cutover failed at its health step with the verdict, the rollback completed.
    (_, k1, s1, step1, h1), (_, k2, s2, _, _) = health_of(target_dsn)
    assert (k1, s1, step1, k2, s2) == ("cutover", "failed", "health", "rollback", "done")
    assert h1["verdict"] == "fail" and h1["canary"] == "lost" and h1["probe"] == "ok"
    assert h1["seconds"] >= GATE and h1["decided_after"] < GATE + 10


def test_stop_leaves_the_clients_paused_on_the_target_and_ignore_lets_the_cutover_stand(
        make_config: Callable[..., Config], source_dsn: str, target_dsn: str, pool_of_one: Bouncer) -> None:
    settings = {**pool_of_one.settings(), "prepared_statements": "unknown", "health_seconds": 1.0}
    cfg = make_config(copy={"workers": 2}, cutover=settings)
    migrated(cfg, source_dsn)

    with pytest.raises(ClientsUnhealthy) as info:
        cutover.run(cfg, on_unhealthy="stop")
    assert not info.value.rolled_back and info.value.exit_code == ExitCode.UNHEALTHY == 5
    assert "paused again" in str(info.value) and "migrator rollback --yes --reconnect-clients" in info.value.hint
    served = pool_of_one.databases()[POOL_DB]
    assert served.database == pool_of_one.target_db and served.paused
    # The operator decides: the rollback runs with the pooler already paused, and resumes it on the legacy side.
    rollback.run(cfg, reconnect_clients=True)
    served = pool_of_one.databases()[POOL_DB]
    assert served.database == pool_of_one.legacy_db and not served.paused

    verify_after_rollback(cfg)
    report = cutover.run(cfg, on_unhealthy="ignore")
    assert report.ok and report.health is not None and report.health["verdict"] == "fail"
    assert "ignored: --on-unhealthy=ignore" in (report.steps[-1].detail or "")
    served = pool_of_one.databases()[POOL_DB]
    assert served.database == pool_of_one.target_db and not served.paused
    [*_, (_, _, status, _, recorded)] = health_of(target_dsn)
    assert status == "done" and recorded["on_unhealthy"] == "ignore"
    shown = status_mod.read(cfg).render_text()
    assert "health gate: fail (on unhealthy: stop); probe ok, canary lost" in shown
    assert "health gate: fail (on unhealthy: ignore)" in shown


def verify_after_rollback(cfg: Config) -> None:
    """After a rollback the last verify is stale for the go/no-go: verify again (the sides are equal)."""
    from migrator import verify

    assert verify.verify(cfg).rows_identical


def test_without_a_pooler_the_probe_decides_and_rollback_command_moves_the_clients_back(
        make_config: Callable[..., Config], source_dsn: str, target_dsn: str, tmp_path: Any) -> None:
    """switch_command sites: the gate has the probe and the target's counters. A probe that cannot reach the
    target where clients do (health_probe_dsn: nothing listens there) is unhealthy; the rollback runs
    rollback_command."""
    moved = tmp_path / "moved"
    cfg = make_config(copy={"workers": 2}, cutover={
        "switch_command": f"echo target > {moved}", "rollback_command": f"echo legacy > {moved}",
        "health_probe_dsn": "postgresql://postgres@127.0.0.1:9/nowhere"})
    migrated(cfg, source_dsn)
    with pytest.raises(ClientsUnhealthy) as info:
        cutover.run(cfg)
    assert info.value.rolled_back and "the probe failed: cannot connect" in str(info.value)
    assert moved.read_text().strip() == "legacy"
    [(_, _, _, _, recorded), _] = health_of(target_dsn)
    assert recorded["mode"] == "switch_command" and recorded["canary"] == "none"
    assert sqlstate_of_write(source_dsn, "INSERT INTO public.study (uid) VALUES ('after')") is None
    # The gate's rollback, like any, leaves the target frozen.
    assert sqlstate_of_write(target_dsn, "UPDATE public.study SET note = 'x' WHERE id = 1") == READ_ONLY


def checklist_item(cfg: Config, item: str) -> tuple[str, str]:
    [check] = [c for c in gonogo.run(cfg).checks if c.item == item]
    return check.state, check.detail


def test_go_no_go_warns_of_a_pooler_that_carries_no_prepared_statement_until_declared_or_proven_by_a_rehearsal(
        make_config: Callable[..., Config], source_dsn: str, target_dsn: str,
        bouncer: Bouncer) -> None:  # noqa: F811 (the fixture imported from test_pgbouncer)
    unknown = make_config(copy={"workers": 2}, cutover={**bouncer.settings(), "prepared_statements": "unknown"})
    declared = make_config(copy={"workers": 2}, cutover=bouncer.settings())
    migrated(unknown, source_dsn)

    state_, detail = checklist_item(unknown, "prepared")
    assert state_ == "warn" and "PgBouncer 1.18.0 in transaction pooling" in detail and "JDBC" in detail
    assert gonogo.run(unknown).go, "a warning does not refuse"
    state_, detail = checklist_item(declared, "prepared")
    assert state_ == "pass" and 'prepared_statements = "unused"' in detail

    # A rehearsal: cutover with real client traffic, the gate passes; then rollback. The warning is cleared.
    with Clients(bouncer.client_dsn, 2):
        report = cutover.run(declared)
        rollback.run(declared)
    assert report.health is not None and report.health["verdict"] == "pass", report.health
    assert report.health["client_transactions"] > 0 and report.health["pooler"] == "1.18.0"
    state_, detail = checklist_item(unknown, "prepared")
    assert state_ == "pass" and "a health gate passed with" in detail and "attempt 1" in detail


def test_the_prepared_item_passes_a_pooler_that_carries_them_and_session_pooling_is_refused_by_the_pooler_item(
        make_config: Callable[..., Config], source_dsn: str, target_dsn: str) -> None:
    carries = gonogo.prepared_state((1, 22, 1), {"max_prepared_statements": "200"}, {"transaction"},
                                    declared=False, passes=[], where="m.toml")
    assert carries[0] == "pass" and "carries prepared statements" in carries[1]
    off = gonogo.prepared_state((1, 22, 1), {"max_prepared_statements": "0"}, {"transaction"},
                                declared=False, passes=[], where="m.toml")
    assert off[0] == "warn" and "max_prepared_statements = 0" in off[1]
    proven_elsewhere = gonogo.prepared_state((1, 18, 0), {}, {"transaction"}, declared=False, where="m.toml",
                                             passes=[(3, None, {"pooler": "1.17.0", "client_transactions": 9})])
    assert proven_elsewhere[0] == "warn", "a pass through another pooler version proves nothing here"

    with running_bouncer(source_dsn, target_dsn, entry_extra="pool_mode=session") as b:
        cfg = make_config(copy={"workers": 2}, cutover=b.settings())
        migrated(cfg, source_dsn)
        state_, detail = checklist_item(cfg, "pooler")
    assert state_ == "fail" and "cannot be switched without restarting them" in detail


def test_a_cutover_killed_during_its_health_gate_is_completed_by_the_guardian_and_a_rerun_says_so(
        make_config: Callable[..., Config], source_dsn: str, target_dsn: str, tmp_path: Path,
        bouncer: Bouncer) -> None:  # noqa: F811 (the fixture imported from test_pgbouncer)
    """Killed (the whole process group, as a dropped SSH session) when its health step starts, past the point of no
    return: the guardian finds the pooler serving the target and goes forward (RESUME there, already done); clients
    keep committing on the target; running the cutover again reports it and has nothing left to do."""
    cfg = make_config(copy={"workers": 2}, cutover=bouncer.settings())
    migrated(cfg, source_dsn)
    config = write_config(tmp_path / "migration.toml", source_dsn, target_dsn, guardian_timeout=2,
                          **bouncer.settings())
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIGRATOR_")}
    env[faults.ENV] = "cutover.health.started"
    with Clients(bouncer.client_dsn, 5) as clients:
        proc = subprocess.run([str(Path(sys.executable).with_name("migrator")), "--config", str(config), "cutover",
                               "--yes"], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=120, start_new_session=True)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        wait_until(lambda: fetch(target_dsn, "SELECT status FROM migrator_control.cutover_attempt WHERE id = 1")
                   == [("done",)], 20, "the guardian records the attempt completed")
        count = len(clients.committed)
        wait_until(lambda: len(clients.committed) > count + 10, 10, "clients commit on the target")
        rerun = cli(config, "cutover", "--yes")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "stopped at step health (its process died) and was completed by the guardian" in rerun.stdout
    assert "nothing to do: the cutover is done" in rerun.stdout
    served = bouncer.databases()[POOL_DB]
    assert served.database == bouncer.target_db and not served.paused
    assert not clients.failed, clients.failed[:5]
    assert clients.uids() <= uids(target_dsn)
    assert sqlstate_of_write(source_dsn, "INSERT INTO public.study (uid) VALUES ('x')") == READ_ONLY


def test_a_switch_command_that_restarts_the_application_is_judged_by_its_clients_and_the_window_reported(
        make_config: Callable[..., Config], source_dsn: str, target_dsn: str, tmp_path: Path) -> None:
    """No pooler: switch_command points the application at the target and restarts it (here: a client that reads
    its DSN from a file and reconnects when it changes). The gate's probe and the target's counters judge it; the
    first client commit the target published after the command is recorded, the client-visible window's end."""
    app_dsn = tmp_path / "app.dsn"
    app_dsn.write_text(source_dsn)
    cfg = make_config(copy={"workers": 2}, cutover={
        "switch_command": f"printf %s '{target_dsn}' > {app_dsn}", "rollback_command": f"printf %s '{source_dsn}' > "
                                                                                         f"{app_dsn}",
        "health_seconds": GATE})
    migrated(cfg, source_dsn)
    committed: list[tuple[str, str]] = []
    stop = threading.Event()

    def application() -> None:
        n, dsn, conn = 0, "", None
        while not stop.is_set():
            if app_dsn.read_text() != dsn:  # "restarted" with its new configuration
                dsn = app_dsn.read_text()
                if conn is not None:
                    conn.close()
                conn = psycopg.connect(dsn, autocommit=True)
            n += 1
            try:
                conn.execute("INSERT INTO public.study (uid, note) VALUES (%s, 'app')", (f"a-{n}",))
                committed.append((dsn, f"a-{n}"))
            except psycopg.Error:
                pass  # the frozen legacy database refuses it until the restart
            time.sleep(0.03)

    thread = threading.Thread(target=application, daemon=True)
    thread.start()
    try:
        report = cutover.run(cfg)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert report.health is not None and report.health["verdict"] == "pass", report.health
    assert report.health["mode"] == "switch_command" and report.health["probe"] == "ok"
    assert report.health["first_commit_seconds"] is not None and report.health["first_commit_seconds"] < GATE + 2
    assert "first client commit seen after" in (report.steps[-1].detail or "")
    assert {u for d, u in committed if d == target_dsn} <= study_uids(target_dsn, "app")
