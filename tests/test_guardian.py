"""A cutover or rollback whose process dies (kill -9 of its process group) leaves no client waiting: its guardian
brings the migration to one side within its bound (back before the point of no return, forward after it), and the
same command run again ends the migration consistently.

Ten clients write through a real PgBouncer in transaction pooling, each insert with its own id, counted only once
COMMIT returned. `migrator cutover --yes` (or `rollback --yes`) kills itself at a point (MIGRATOR_FAULT_KILL, see
tests/killpoints.py). Then: every client completes a transaction again within guardian_timeout + 10 s; the pooler
serves one side, unpaused, and that side takes writes while a frozen side rejects them; the re-run exits 0 and
leaves the flow completed, the side the clients left frozen (the target, after a rollback); every committed id is on the side served at the end. A few points that differ are run
here; `python -m bench.guardian` runs every point and measures the clients' wait.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from migrator import cutover
from migrator.config import Config
from tests import killpoints
from tests.helpers import Writers, fetch
from tests.test_cutover import READ_ONLY, migrated, sqlstate_of_write, write_config
from tests.test_pgbouncer import POOL_DB, Bouncer, bouncer, pooler_config  # noqa: F401

CLIENTS = 10
INSERT = "INSERT INTO public.study (uid, note) VALUES (%s, 'writer')"

POOLER_POINTS = [
    "cutover.freeze.ran",         # paused and frozen: back (legacy unfrozen, RESUME)
    "cutover.switch.rewritten",   # the file points at the target, never reloaded: back (file restored)
    "cutover.switch.ran",         # the pooler serves the target: forward (RESUME there, legacy stays frozen)
    "rollback.drain.started",     # target frozen, legacy frozen: back (target unfrozen, RESUME)
    "rollback.release.ran",       # the legacy database takes writes: forward (entries to legacy, RESUME)
]
if os.environ.get("CI"):  # CI's time budget: one back and one forward per flow; bench/guardian.py sweeps them all
    POOLER_POINTS = ["cutover.freeze.ran", "cutover.switch.ran", "rollback.release.ran"]


def ids_on(dsn: str) -> set[str]:
    return {r[0] for r in fetch(dsn, "SELECT uid FROM public.study")}


def assert_resumed(writers: Writers, moment: float, what: str) -> list[float]:
    bound = killpoints.bound()
    waits = writers.resumed_after(moment, bound)
    stuck = [i for i, w in enumerate(waits) if w is None]
    assert not stuck, (f"{len(stuck)} of {writers.n} clients completed no transaction within {bound:.0f}s of {what} "
                       f"(last errors: {writers.errors[-3:]})")
    return [w for w in waits if w is not None]


def assert_sides(dsns: dict[str, str], served: str, frozen: str | None, probe: str) -> None:
    """`served` takes a direct write; `frozen` (if any) rejects one as read-only."""
    assert sqlstate_of_write(dsns[served], f"INSERT INTO public.study (uid, note) VALUES ('{probe}', 'probe')") \
        is None, f"the {served} database, which clients are on, rejects writes"
    if frozen is not None:
        # An update of a row both sides hold: an insert could meet a key the other side's sequence handed out first.
        assert sqlstate_of_write(dsns[frozen], "UPDATE public.study SET note = 'must fail' WHERE id = 1") == READ_ONLY, \
            f"the {frozen} database takes writes"


def assert_pooler_serves(b: Bouncer, database: str) -> None:
    served = b.databases()[POOL_DB]
    assert (served.database, served.paused) == (database, False)
    assert f"dbname={database}" in b.databases_ini.read_text()
    with psycopg.connect(b.client_dsn, prepare_threshold=None, autocommit=True) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == (database,)


def assert_flow_completed(flow: str, config: Path, target_dsn: str) -> None:
    """The control schema, and `migrator status --json`, say the flow completed and no attempt is left half-way."""
    done = flow == "cutover"
    assert fetch(target_dsn, "SELECT cutover_at IS NOT NULL, frozen FROM migrator_control.migration") == [(done, done)]
    shown = killpoints.run(config, "status", "--json")
    assert shown.returncode == 0, shown.stderr[-2000:]
    st = json.loads(shown.stdout)
    assert (st["phase"] == "cut over", st["frozen"]) == (done, done)
    assert [a for a in st["cutover"] if a["status"] == "running"] == []


@pytest.mark.parametrize("point", POOLER_POINTS)
def test_a_kill_at_a_step_leaves_no_client_waiting_and_the_rerun_completes_without_losing_a_commit(
        point: str, make_config: Callable[..., Config], source_dsn: str, target_dsn: str,
        bouncer: Bouncer, tmp_path: Path) -> None:  # noqa: F811 (the fixture imported from test_pgbouncer)
    flow = point.split(".")[0]
    dsns = {"legacy": source_dsn, "target": target_dsn}
    dbnames = {"legacy": bouncer.legacy_db, "target": bouncer.target_db}
    cfg = pooler_config(make_config, bouncer)
    migrated(cfg, source_dsn)
    if flow == "rollback":
        assert cutover.run(cfg).ok
    config = write_config(tmp_path / "migration.toml", source_dsn, target_dsn,
                          guardian_timeout=killpoints.GUARDIAN_TIMEOUT, **bouncer.settings())
    served, frozen = killpoints.served_after_guardian(point), killpoints.frozen_after_guardian(point)
    end = "target" if flow == "cutover" else "legacy"

    with Writers(bouncer.client_dsn, CLIENTS, INSERT) as writers:
        killed = killpoints.killed_at(config, point)
        waits = assert_resumed(writers, killed.ended, f"the kill at {point}")
        print(f"\n{point}: clients resumed {min(waits):.2f}-{max(waits):.2f}s after the kill, on the {served} side")
        assert_pooler_serves(bouncer, dbnames[served])
        assert_sides(dsns, served, frozen, "after-guardian")

        again = killpoints.rerun(config, flow)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "nothing was paused or frozen" not in again.stderr + again.stdout
        assert_resumed(writers, again.ended, f"the re-run of `migrator {flow}`")

    assert_pooler_serves(bouncer, dbnames[end])
    # The side the clients left stays frozen: the legacy database after a cutover, the target after a rollback.
    assert_sides(dsns, end, "legacy" if flow == "cutover" else "target", "after-rerun")
    assert_flow_completed(flow, config, target_dsn)
    lost = writers.ids() - ids_on(dsns[end])
    assert not lost, f"{len(lost)} of {writers.count()} committed transactions are missing on the {end} side"


def test_without_a_pooler_a_kill_after_the_freeze_leaves_the_legacy_database_writable_and_the_rerun_completes(
        cfg: Config, source_dsn: str, target_dsn: str, tmp_path: Path) -> None:
    migrated(cfg, source_dsn)
    moved = tmp_path / "switched"
    config = write_config(tmp_path / "migration.toml", source_dsn, target_dsn,
                          guardian_timeout=killpoints.GUARDIAN_TIMEOUT, switch_command=f"touch {moved}")

    with Writers(source_dsn, CLIENTS, INSERT) as writers:
        killed = killpoints.killed_at(config, "cutover.freeze.ran")
        waits = assert_resumed(writers, killed.ended, "the kill at cutover.freeze.ran")
        print(f"\ncutover.freeze.ran without a pooler: clients wrote again {min(waits):.2f}-{max(waits):.2f}s "
              "after the kill")
        assert not moved.exists(), "switch_command ran although the cutover died before the switch"
        assert_sides({"legacy": source_dsn}, "legacy", None, "after-guardian")

        again = killpoints.rerun(config, "cutover")
        assert again.returncode == 0, again.stderr[-3000:]
        assert "nothing was paused or frozen" not in again.stderr + again.stdout

    assert moved.exists(), "the re-run did not run switch_command"
    assert_sides({"legacy": source_dsn, "target": target_dsn}, "target", "legacy", "after-rerun")
    assert_flow_completed("cutover", config, target_dsn)
    lost = writers.ids() - ids_on(target_dsn)
    assert not lost, f"{len(lost)} of {writers.count()} committed transactions are missing on the target"
