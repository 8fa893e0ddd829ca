"""The operator's ordinary mistakes, made safe at the command line: Ctrl-C, commands run too early or too late, raw
database errors, and exit codes a script can tell apart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

from migrator import copy, copyplan, prepare, sync
from migrator.cli import exit_code_table, exit_codes, main
from migrator.config import Config
from migrator.errors import ExitCode
from migrator.redaction import database_hint
from tests.helpers import fetch, run_sql
from tests.test_cli import MIGRATOR, migrator, write_config

ROOT = Path(__file__).resolve().parent.parent
REACHABLE_HINT = "check that both servers are reachable"


def environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MIGRATOR_")}


def _as_from_a_terminal() -> None:
    """In the child before exec: SIGINT delivered and handled by default, as a shell's foreground job has it. A test
    process that ran other tests before (pytest-xdist's workers run several files) may hand its children SIGINT
    ignored or blocked; both survive exec, and then no Ctrl-C reaches the command (seen in CI: copy ran on)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


class Command:
    """A `migrator` process running in the background, its stdout and stderr in files (read while it runs)."""

    def __init__(self, config: Path, *args: str) -> None:
        self.out = config.parent / f"out-{uuid.uuid4().hex[:6]}"
        self.err = config.parent / f"err-{uuid.uuid4().hex[:6]}"
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.proc = subprocess.Popen([MIGRATOR, "--config", str(config), "--log-json", *args], stdout=out,
                                         stderr=err, stdin=subprocess.DEVNULL, env=environment(),
                                         preexec_fn=_as_from_a_terminal)

    @property
    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def events(self) -> list[dict[str, Any]]:
        found = []
        for line in self.stderr.splitlines():
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
        return found

    def wait_until(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, f"migrator exited {self.proc.returncode} before {what}:\n{self.stderr}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{self.stderr[-3000:]}"
            time.sleep(0.05)

    def interrupt(self, sig: int = signal.SIGINT, within: float = 15.0) -> tuple[int, float]:
        """Send `sig`; the exit code and how long the process took to end."""
        sent = time.monotonic()
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=within)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"migrator did not exit within {within}s of {signal.Signals(sig).name}:\n"
                                 f"{self.stderr[-3000:]}") from None
        return code, time.monotonic() - sent

    def kill(self) -> None:
        if self.proc.poll() is None:
            for pid in children(self.proc.pid):
                os.kill(pid, signal.SIGKILL)
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def commands() -> Iterator[list[Command]]:
    started: list[Command] = []
    yield started
    for c in started:
        c.kill()


def children(pid: int) -> set[int]:
    """Live processes whose parent is `pid` (from /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found.add(int(entry.name))
    return found


def alive(pids: set[int]) -> set[int]:
    running = set()
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat[stat.rindex(")") + 2:].split()[0] != "Z":
            running.add(pid)
    return running


def migrator_sessions(dsn: str) -> int:
    """Sessions of migrator processes (copy workers, sync) still connected to a database."""
    return int(fetch(dsn, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                          "AND application_name LIKE 'migrator-%%' AND pid <> pg_backend_pid()")[0][0])


def settle(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


IMAGE_ROWS = 40_000


def image_table(source_dsn: str) -> None:
    """About 5 MB in one table with a key: ten chunks of [copy] chunk_mb = 0.5."""
    run_sql(source_dsn,
            "CREATE TABLE public.image (id int PRIMARY KEY, uid text NOT NULL, payload text NOT NULL)",
            f"INSERT INTO public.image SELECT g, '1.2.840.' || g, repeat(md5(g::text), 3) "
            f"FROM generate_series(1, {IMAGE_ROWS}) g",
            "VACUUM ANALYZE public.image")


COPY_SETTINGS = {"workers": 2, "chunk_mb": 0.5, "max_rate": 1.0}
COPY_TOML = "[copy]\nworkers = 2\nchunk_mb = 0.5\nmax_rate = 1.0\n"


def copied_chunks(target_dsn: str) -> tuple[int, int]:
    ((copied, total),) = fetch(target_dsn, "SELECT count(*) FILTER (WHERE status = 'copied'), count(*) "
                                           "FROM migrator_control.copy_chunk")
    return int(copied), int(total)


def registered_workers(target_dsn: str) -> int:
    return int(fetch(target_dsn, "SELECT count(*) FROM migrator_control.copy_worker")[0][0])


# --- point 12: Ctrl-C ---------------------------------------------------------------------------------------------

def test_ctrl_c_during_copy_exits_130_stops_the_workers_and_the_next_copy_finishes(
        make_config: Callable[..., Config], source_dsn: str, target_dsn: str, tmp_path: Path,
        commands: list[Command]) -> None:
    image_table(source_dsn)
    cfg = make_config(copy=COPY_SETTINGS)
    prepare.prepare(cfg)
    config = write_config(tmp_path / "migration.toml", source_dsn, target_dsn, COPY_TOML)
    running = Command(config, "copy")
    commands.append(running)
    running.wait_until(lambda: copied_chunks(target_dsn)[0] >= 1, 30, "a first chunk copied")
    workers = children(running.proc.pid)
    assert workers, "the coordinator runs its workers as processes"

    code, seconds = running.interrupt(signal.SIGINT)

    assert code == ExitCode.INTERRUPTED == 130, running.stderr
    assert "interrupted; run the same command again" in running.stderr
    assert "Traceback" not in running.stderr and "aborted" not in running.stderr
    assert seconds < 10
    assert settle(lambda: not alive(workers), 5), f"workers left running: {alive(workers)}"
    assert settle(lambda: migrator_sessions(source_dsn) == migrator_sessions(target_dsn) == 0, 5)
    done, total = copied_chunks(target_dsn)
    assert 1 <= done < total, "interrupted part way: the chunks copied are kept, the rest waits"

    result = copy.run(make_config(copy={"workers": 2, "chunk_mb": 0.5}))

    assert copied_chunks(target_dsn) == (total, total)
    assert sum(t.chunks for t in result.copied) == total - done  # only what the first run had not copied
    assert fetch(target_dsn, "SELECT count(*), sum(hashtext(t::text)::bigint) FROM public.image t") == \
        fetch(source_dsn, "SELECT count(*), sum(hashtext(t::text)::bigint) FROM public.image t")


def test_max_rate_bounds_the_whole_copy_not_only_each_workers_first_chunk(
        make_config: Callable[..., Config], source_dsn: str) -> None:
    """--max-rate spares the legacy server: its bound holds over every chunk a worker copies (it bounded only the
    first, then each chunk's count started at zero: 5 MB copied in 1.8 s at 1 MB/s)."""
    image_table(source_dsn)
    cfg = make_config(copy={"workers": 2, "chunk_mb": 0.5, "max_rate": 2.0})
    prepare.prepare(cfg)
    started = time.monotonic()
    result = copy.run(cfg)
    seconds = time.monotonic() - started

    megabytes = result.bytes / 1e6
    assert megabytes > 4
    assert seconds >= 0.8 * megabytes / 2.0, (megabytes, seconds)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_paused_copy_still_stops_on_a_signal_and_resumes_afterwards(
        make_config: Callable[..., Config], source_dsn: str, target_dsn: str, tmp_path: Path,
        commands: list[Command], sig: int, code: int) -> None:
    image_table(source_dsn)
    cfg = make_config(copy=COPY_SETTINGS)
    prepare.prepare(cfg)
    copy.pause(cfg)  # `migrator copy --pause` from another terminal, before or while the copy runs
    config = write_config(tmp_path / "migration.toml", source_dsn, target_dsn, COPY_TOML)
    running = Command(config, "copy")
    commands.append(running)
    running.wait_until(lambda: registered_workers(target_dsn) == 2, 30, "two paused workers")
    assert any(e["event"] == "copy.paused" for e in running.events()) or settle(
        lambda: any(e["event"] == "copy.paused" for e in running.events()), 5)
    workers = children(running.proc.pid)

    exit_code, seconds = running.interrupt(sig)

    assert exit_code == code, running.stderr
    assert "interrupted; run the same command again" in running.stderr
    assert seconds < 10
    assert settle(lambda: not alive(workers), 5), f"workers left running: {alive(workers)}"
    copy.resume(cfg)
    copy.run(make_config(copy={"workers": 2, "chunk_mb": 0.5}))
    assert fetch(target_dsn, "SELECT count(*) FROM public.image") == [(IMAGE_ROWS,)]


def test_sigint_cancels_a_sync_batch_blocked_by_a_lock_names_the_wait_and_keeps_the_position(
        cfg: Config, source_dsn: str, target_dsn: str, tmp_path: Path, commands: list[Command]) -> None:
    run_sql(source_dsn, "CREATE TABLE public.patient (id int PRIMARY KEY, mrn text)",
            "INSERT INTO public.patient SELECT g, 'MRN' || g FROM generate_series(1, 100) g")
    prepare.prepare(cfg)
    copy.run(cfg)
    run_sql(source_dsn, "INSERT INTO public.patient SELECT g, 'MRN' || g FROM generate_series(101, 200) g")
    before = fetch(target_dsn, "SELECT applied_snapshot, events_applied FROM migrator_control.sync_position")
    config = write_config(tmp_path / "migration.toml", source_dsn, target_dsn)
    with psycopg.connect(target_dsn) as holder:
        holder.execute("LOCK TABLE public.patient IN ACCESS EXCLUSIVE MODE")  # e.g. a REINDEX or VACUUM FULL
        holder_pid = holder.info.backend_pid
        running = Command(config, "sync")
        commands.append(running)
        running.wait_until(lambda: any(e["event"] == "sync.waiting" for e in running.events()), 20,
                           "sync to report what it waits for")
        waiting = next(e for e in running.events() if e["event"] == "sync.waiting")

        code, seconds = running.interrupt(signal.SIGINT, within=10)

        after = fetch(target_dsn, "SELECT applied_snapshot, events_applied FROM migrator_control.sync_position")
    assert waiting["side"] == "target"
    assert "public.patient" in waiting["waits_for"] and f"pid {holder_pid}" in waiting["waits_for"]
    assert code == ExitCode.INTERRUPTED, running.stderr
    assert seconds < 5
    message = running.stderr
    assert "interrupted: sync stopped during a batch" in message
    assert f"a lock on public.patient (to take RowExclusiveLock), blocked by pid {holder_pid}" in message
    assert "position is unchanged" in message and "run the same command again" in message.lower()
    assert "Traceback" not in message and "MRN" not in message
    assert after == before
    assert fetch(target_dsn, "SELECT count(*) FROM public.patient") == [(100,)]

    assert sync.sync(cfg).caught_up  # the lock is gone: everything is applied, once
    assert fetch(target_dsn, "SELECT count(*), count(DISTINCT id) FROM public.patient") == [(200, 200)]


# --- point 13: right message, right hint --------------------------------------------------------------------------

NEEDS_PREPARE = [["sync"], ["sync", "--check-lag", "5"], ["copy"], ["copy", "--worker", "--wait", "0"],
                 ["copy", "--pause"], ["copy", "--resume"], ["verify"], ["cutover", "--check"],
                 ["cutover", "--hold"], ["cutover", "--yes"], ["rollback", "--yes"]]


def run_all(config: Path, runs: list[list[str]]) -> list[tuple[int, str, str]]:
    """Run commands at once (each starts a Python interpreter); their exit codes, stdout and stderr."""
    procs = [subprocess.Popen([MIGRATOR, "--config", str(config), *args], env=environment(), text=True,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for args in runs]
    outputs = [p.communicate(timeout=60) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs, strict=True)]


def message(stderr: str) -> str:
    """What the command says, without its log lines (JSON, when not on a terminal)."""
    return "\n".join(line for line in stderr.splitlines() if not line.startswith("{"))


def test_commands_before_prepare_say_not_prepared_instead_of_a_raw_sql_error(
        source_dsn: str, target_dsn: str, tmp_path: Path) -> None:
    run_sql(source_dsn, "CREATE TABLE public.patient (id int PRIMARY KEY, mrn text)")
    config = write_config(tmp_path / "migration.toml", source_dsn, target_dsn)

    for args, (code, _, stderr) in zip(NEEDS_PREPARE, run_all(config, NEEDS_PREPARE), strict=True):
        assert code == ExitCode.ERROR, (args, stderr)
        said = message(stderr)
        assert said.startswith("error: not prepared") and "Run `migrator prepare --yes` first" in said, (args, said)
        assert "does not exist" not in said and REACHABLE_HINT not in said, (args, said)
        assert "Traceback" not in stderr, (args, stderr)


def test_after_cleanup_commands_say_the_migration_was_cleaned_up(
        cfg: Config, source_dsn: str, target_dsn: str, tmp_path: Path) -> None:
    run_sql(source_dsn, "CREATE TABLE public.patient (id int PRIMARY KEY, mrn text)",
            "INSERT INTO public.patient SELECT g, 'MRN' || g FROM generate_series(1, 100) g")
    prepare.prepare(cfg)
    copy.run(cfg)
    config = write_config(tmp_path / "migration.toml", source_dsn, target_dsn)
    cleaned = migrator("--config", str(config), "cleanup", "--yes")
    assert cleaned.returncode == 0, cleaned.stderr
    run_sql(source_dsn, "INSERT INTO public.patient VALUES (101, 'MRN101')")  # no longer recorded

    refused = [["sync"], ["sync", "--check-lag", "5"], ["copy"], ["copy", "--pause"], ["cutover", "--check"],
               ["prepare", "--yes"]]
    results = run_all(config, [*refused, ["status", "--json"], ["verify"]])

    for args, (code, _, stderr) in zip(refused, results[:-2], strict=True):
        assert code == ExitCode.ERROR, (args, stderr)
        said = message(stderr)
        assert "cleaned up" in said and "`migrator cleanup` at 20" in said, (args, said)
        assert "by hand" not in stderr and "does not exist" not in said and "Traceback" not in stderr, args
    code, stdout, stderr = results[-2]
    assert code == ExitCode.OK and json.loads(stdout)["phase"] == "cleaned up", stderr
    assert json.loads(stdout)["cleaned_up_at"].startswith("20") and "not readable" not in stdout
    # Comparing both sides still makes sense: verify runs, and finds the row written after cleanup missing.
    code, stdout, stderr = results[-1]
    assert code == ExitCode.FINDING, stderr
    assert "public.patient" in stdout and "not prepared" not in stderr
    assert fetch(source_dsn, "SELECT count(*) FROM pg_namespace WHERE nspname = '_migrator'") == [(0,)]


def test_a_missing_privilege_names_the_grant_instead_of_blaming_the_network(
        make_config: Callable[..., Config], source_dsn: str, target_dsn: str, admin_dsn: str,
        tmp_path: Path) -> None:
    role = f"mt_weak_{uuid.uuid4().hex[:8]}"
    run_sql(source_dsn, "CREATE TABLE public.patient (id int PRIMARY KEY, mrn text)")
    run_sql(admin_dsn, f'CREATE ROLE "{role}" LOGIN')
    try:
        run_sql(source_dsn, f'GRANT SELECT ON public.patient TO "{role}"')  # may read, may not create a schema
        weak = psycopg.conninfo.make_conninfo(source_dsn, user=role)
        config = write_config(tmp_path / "migration.toml", weak, target_dsn)

        proc = migrator("--config", str(config), "prepare", "--yes")
    finally:
        run_sql(source_dsn, f'REVOKE ALL ON public.patient FROM "{role}"')
        run_sql(admin_dsn, f'DROP ROLE "{role}"')

    # prepare checks every right it needs before it creates anything (test_safety_prepare), so the missing ones
    # come as a refusal naming the GRANTs; database errors met later are hinted by their SQLSTATE
    # (test_database_hints_follow_the_sqlstate).
    assert proc.returncode == ExitCode.FINDING, proc.stderr
    assert f'TO "{role}"' in proc.stderr and "GRANT" in proc.stderr
    assert REACHABLE_HINT not in proc.stderr and "Traceback" not in proc.stderr


def test_a_capture_schema_dropped_by_hand_is_answered_with_prepare_not_reachability(
        cfg: Config, source_dsn: str, target_dsn: str, tmp_path: Path) -> None:
    run_sql(source_dsn, "CREATE TABLE public.patient (id int PRIMARY KEY, mrn text)")
    prepare.prepare(cfg)
    copy.run(cfg)
    run_sql(source_dsn, "DROP SCHEMA _migrator CASCADE")
    config = write_config(tmp_path / "migration.toml", source_dsn, target_dsn)

    proc = migrator("--config", str(config), "sync", "--check-lag", "5")

    assert proc.returncode == ExitCode.ERROR
    assert "SQLSTATE 42P01" in proc.stderr and "_migrator.delta_log" in proc.stderr
    assert "no capture (schema _migrator): run `migrator prepare --yes`" in proc.stderr
    assert REACHABLE_HINT not in proc.stderr and "Traceback" not in proc.stderr


def test_database_hints_follow_the_sqlstate(target_dsn: str) -> None:
    def error_of(query: str) -> psycopg.Error:
        with psycopg.connect(target_dsn, autocommit=True) as conn:
            try:
                conn.execute(query)  # type: ignore[arg-type]
            except psycopg.Error as exc:
                return exc
        raise AssertionError(f"{query} did not fail")

    assert "run `migrator prepare --yes`" in database_hint(error_of("SELECT * FROM migrator_control.flag"))
    assert "dropped or renamed" in database_hint(error_of("SELECT * FROM public.study"))
    assert "concurrent transaction" in database_hint(error_of(
        "DO $$BEGIN RAISE EXCEPTION USING ERRCODE = 'deadlock_detected'; END$$"))
    assert "lacks resources" in database_hint(error_of(
        "DO $$BEGIN RAISE EXCEPTION USING ERRCODE = 'disk_full'; END$$"))
    assert "statement_timeout" in database_hint(error_of("SET statement_timeout = 10; SELECT pg_sleep(1)"))


# --- point 14: exit codes -----------------------------------------------------------------------------------------

def test_every_command_help_ends_with_its_exit_codes() -> None:
    runner = CliRunner()
    commands = exit_codes()
    assert {"inspect", "prepare", "copy", "sync", "verify", "objects sync", "status", "cutover", "release",
            "cleanup", "rollback", "rehearse"} <= set(commands)
    for name, codes in [("", {c: c.meaning for c in ExitCode}), *commands.items()]:
        result = runner.invoke(main, [*name.split(), "--help"])
        assert result.exit_code == 0, name
        tail = result.output[result.output.index("Exit codes:"):]
        for code, meaning in codes.items():
            assert f"  {int(code):<4} {meaning}" in tail, (name, code)
    assert commands["verify"][ExitCode.ERROR].startswith("could not verify")
    assert ExitCode.CUTOVER_STOPPED in commands["cutover"]


def test_usage_errors_findings_and_errors_have_codes_of_their_own(tmp_path: Path) -> None:
    assert len({int(c) for c in ExitCode}) == len(ExitCode)
    assert ExitCode.USAGE not in (ExitCode.FINDING, ExitCode.ERROR)
    runs = [["copy", "--bogus"], ["sync", "--check-lag", "soon"], ["cutover", "--hold", "--check"], ["nope"]]
    for args, (code, _, stderr) in zip(runs, run_all(tmp_path / "none.toml", runs), strict=True):
        assert code == ExitCode.USAGE == 64, (args, stderr)
        assert "Traceback" not in stderr
    # And a missing configuration is still an error (2), not a usage error.
    missing = migrator("--config", str(tmp_path / "none.toml"), "status")
    assert missing.returncode == ExitCode.ERROR


def test_the_readme_table_of_exit_codes_is_the_declared_one() -> None:
    readme = (ROOT / "README.md").read_text()
    assert exit_code_table() in readme, "regenerate it: python -c 'from migrator.cli import exit_code_table; " \
                                        "print(exit_code_table())'"


# --- found on the way: the copy's key ranges ----------------------------------------------------------------------

def test_the_key_ranges_of_an_integer_key_follow_its_order_not_its_text(cfg: Config, source_dsn: str) -> None:
    from migrator import catalog

    image_table(source_dsn)  # ids 1..40000: as text '11533' < '2540'
    with psycopg.connect(source_dsn) as conn, conn.cursor() as cur:
        (table,) = catalog.list_tables(conn, cfg.tables)
        ranges = copyplan.plan(cur, table, 500_000)

    cuts = [int(upper[0]) for _, upper, _ in ranges[:-1] if upper is not None]
    assert len(ranges) > 5 and cuts == sorted(cuts) and len(set(cuts)) == len(cuts)
