"""The operator's ordinary mistakes around the switch, made safe, against a real server.

A cutover or rollback with nothing configured to move the clients (no pooler, no switch_command or rollback_command)
is refused before anything is frozen or replayed, unless the operator says so by name (`--override no-switch`),
which the attempt records (who, when) and the report repeats; the rehearsal, which has no clients, says so itself.
The go/no-go verify item counts a verify only when it covered every table and started after the last rollback,
completed cutover and copy of a table (a re-copy, or one after DDL), and within [cutover] max_verify_age.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from migrator import copy, cutover, gonogo, prepare, rehearse, rollback, sync, verify
from migrator.config import Config
from migrator.errors import Blocked, NoGo
from migrator.switchover import NOT_MOVED, signals_deferred
from tests.helpers import fetch, run_sql
from tests.test_cutover import READ_ONLY, cli, migrated, sqlstate_of_write, write_config

ATTEMPT_AND_SWITCH = ("SELECT a.kind, a.status, a.checklist, s.detail FROM migrator_control.cutover_attempt a "
                      "JOIN migrator_control.cutover_step s ON s.attempt_id = a.id AND s.step = 'switch' "
                      "WHERE a.status = 'done' ORDER BY a.id")


def switch_item(checklist: list[dict[str, Any]]) -> dict[str, Any]:
    [item] = [c for c in checklist if c["item"] == "switch"]
    return item


def assert_overridden_by_someone(item: dict[str, Any]) -> None:
    assert item["state"] == "overridden" and "(overridden by the operator)" in item["detail"]
    assert "@" in item["by"] and item["at"][:4].isdigit()


# --- a cutover or rollback that moves nobody ----------------------------------------------------------------------

def test_cutover_with_no_way_to_move_clients_is_refused_before_anything_is_frozen_unless_overridden_by_name(
        cfg: Config, source_dsn: str, target_dsn: str, tmp_path: Path) -> None:
    migrated(cfg, source_dsn)
    config = write_config(tmp_path / "migration.toml", source_dsn, target_dsn)  # no pooler, no switch_command

    refused = cli(config, "cutover", "--yes")

    assert refused.returncode == 1, refused.stderr
    assert "[FAIL] switch" in refused.stderr and "no pooler and no [cutover] switch_command" in refused.stderr
    assert "--override no-switch" in refused.stderr and "nothing was paused or frozen" in refused.stderr
    assert "[warn] verify" in refused.stderr  # none recorded: still a warning
    assert sqlstate_of_write(source_dsn, "INSERT INTO public.study (uid) VALUES ('still writable')") is None
    assert fetch(target_dsn, "SELECT frozen, cutover_at FROM migrator_control.migration") == [(False, None)]
    assert fetch(target_dsn, "SELECT status, failed_step FROM migrator_control.cutover_attempt") == \
        [("failed", "preflight")]
    assert fetch(target_dsn, "SELECT count(*) FROM pg_namespace WHERE nspname = '_migrator'") == [(0,)]
    assert cli(config, "cutover", "--yes", "--override", "switch").returncode == 64  # a usage error: the name says what it accepts

    proc = cli(config, "cutover", "--yes", "--override", "no-switch", "--json")

    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is True and report["clients_moved"] is False and report["clients"] == NOT_MOVED
    assert_overridden_by_someone(switch_item(report["checklist"]))
    assert sqlstate_of_write(source_dsn, "INSERT INTO public.study (uid) VALUES ('x')") == READ_ONLY
    # Recorded with the attempt: the override (who, when) in its checklist, and what its switch step did.
    [(kind, _, checklist, detail)] = fetch(target_dsn, ATTEMPT_AND_SWITCH)
    assert kind == "cutover" and detail == NOT_MOVED
    assert switch_item(checklist) == switch_item(report["checklist"])


def test_rollback_with_no_way_to_move_clients_back_is_refused_before_anything_is_touched_unless_overridden(
        make_config: Callable[..., Config], source_dsn: str, target_dsn: str, tmp_path: Path) -> None:
    cfg = make_config(copy={"workers": 2}, cutover={"switch_command": "true"})
    migrated(cfg, source_dsn)
    assert cutover.run(cfg).ok
    run_sql(target_dsn, "INSERT INTO public.study (uid, note) VALUES ('on target', 'new')")
    config = write_config(tmp_path / "migration.toml", source_dsn, target_dsn, switch_command="true")

    refused = cli(config, "rollback", "--yes")

    assert refused.returncode == 1, refused.stderr
    assert "[FAIL] switch" in refused.stderr and "no pooler and no [cutover] rollback_command" in refused.stderr
    assert "--override no-switch" in refused.stderr
    # Nothing touched: clients stay on a writable target, the legacy database stays frozen, nothing replayed.
    assert sqlstate_of_write(target_dsn, "INSERT INTO public.study (uid) VALUES ('still on target')") is None
    assert sqlstate_of_write(source_dsn, "INSERT INTO public.study (uid) VALUES ('x')") == READ_ONLY
    assert fetch(source_dsn, "SELECT count(*) FROM public.study WHERE uid LIKE '%on target'") == [(0,)]
    assert fetch(target_dsn, "SELECT kind, status FROM migrator_control.cutover_attempt ORDER BY id") == \
        [("cutover", "done")]
    with pytest.raises(Blocked, match="unknown override"):
        rollback.run(cfg, overrides=("sessions",))

    proc = cli(config, "rollback", "--yes", "--override", "no-switch")

    assert proc.returncode == 0, proc.stderr
    assert NOT_MOVED in proc.stdout
    assert fetch(source_dsn, "SELECT count(*) FROM public.study WHERE uid LIKE '%on target'") == [(2,)]
    [_, (kind, _, checklist, detail)] = fetch(target_dsn, ATTEMPT_AND_SWITCH)
    assert kind == "rollback" and detail == NOT_MOVED
    # The clients were not moved, but no split brain either: the legacy database takes writes, the target is frozen.
    assert sqlstate_of_write(source_dsn, "INSERT INTO public.study (uid) VALUES ('legacy again')") is None
    assert sqlstate_of_write(target_dsn, "UPDATE public.study SET note = 'x' WHERE id = 1") == READ_ONLY
    assert [c["item"] for c in checklist] == ["switch"]
    assert_overridden_by_someone(checklist[0])


def test_the_rehearsal_has_no_clients_to_move_and_says_so_and_records_it(admin_dsn: str) -> None:
    # The smallest rehearsal: one writer (the long transaction), no sync round before the cutover's own catch-up.
    report = rehearse.run(scale=0.0005, tps=1, writers=0, sync_rounds=0, keep=True, admin_dsn=admin_dsn)
    assert report.databases is not None
    try:
        assert report.ok, report.render_text()
        assert NOT_MOVED in report.render_text()
        target = psycopg.conninfo.make_conninfo(admin_dsn, dbname=report.databases[1])
        [(_, _, checklist, detail)] = fetch(target, ATTEMPT_AND_SWITCH)
        assert detail == NOT_MOVED
        assert_overridden_by_someone(switch_item(checklist))
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            for name in report.databases:
                conn.execute(psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                             .format(psycopg.sql.Identifier(name)))


# --- a stale go/no-go ---------------------------------------------------------------------------------------------

def verify_item(cfg: Config) -> gonogo.Check:
    [item] = [c for c in gonogo.run(cfg).checks if c.item == "verify"]
    return item


def test_a_verify_from_before_a_rollback_no_longer_lets_a_cutover_go(
        make_config: Callable[..., Config], source_dsn: str, target_dsn: str) -> None:
    cfg = make_config(copy={"workers": 2}, cutover={"switch_command": "true", "rollback_command": "true"})
    migrated(cfg, source_dsn)
    assert verify.verify(cfg).identical
    assert verify_item(cfg).state == "pass"
    assert cutover.run(cfg).ok
    run_sql(target_dsn, "UPDATE public.study SET note = 'written on the new server' WHERE id = 5")
    assert rollback.run(cfg).ok

    with pytest.raises(NoGo) as info:
        cutover.run(cfg)

    assert "[FAIL] verify" in info.value.checklist
    assert "the rollback (attempt 2)" in info.value.checklist and "run `migrator verify`" in info.value.checklist
    assert sqlstate_of_write(source_dsn, "INSERT INTO public.study (uid) VALUES ('not frozen')") is None
    # A verify now (sync caught up with the write above), then the same cutover goes.
    sync.sync(cfg)
    assert verify.verify(cfg).identical
    assert verify_item(cfg).state == "pass"
    assert cutover.run(cfg).ok


def test_a_verify_from_before_a_recopy_does_not_count_nor_does_one_of_some_tables(
        cfg: Config, source_dsn: str, target_dsn: str) -> None:
    migrated(cfg, source_dsn)
    assert verify.verify(cfg).identical
    assert verify_item(cfg).state == "pass"

    copy.run(cfg, only=["public.audit"])

    stale = verify_item(cfg)
    assert stale.state == "fail", stale
    assert "the copy of public.audit" in stale.detail and "run `migrator verify`" in stale.detail
    assert verify.verify(cfg, tables=["public.audit"]).identical  # `verify --tables`: not a verify of every table
    assert verify_item(cfg).state == "fail"
    assert verify.verify(cfg).identical
    assert verify_item(cfg).state == "pass"


def test_a_verify_from_before_a_ddl_recovery_does_not_count(cfg: Config, source_dsn: str, target_dsn: str) -> None:
    migrated(cfg, source_dsn)
    assert verify.verify(cfg).identical
    for dsn in (target_dsn, source_dsn):
        run_sql(dsn, "ALTER TABLE public.audit ADD COLUMN site text")

    prepare.prepare(cfg)  # records the changed definition: public.audit goes back to pending

    pending = verify_item(cfg)
    assert pending.state == "fail" and "public.audit" in pending.detail and "migrator copy" in pending.detail
    copy.run(cfg)
    copied = verify_item(cfg)
    assert copied.state == "fail" and "the copy of public.audit" in copied.detail
    sync.sync(cfg)
    assert verify.verify(cfg).identical
    assert verify_item(cfg).state == "pass"


def test_a_verify_older_than_max_verify_age_does_not_count(
        make_config: Callable[..., Config], source_dsn: str) -> None:
    cfg = make_config(copy={"workers": 2})
    bounded = make_config(copy={"workers": 2}, cutover={"max_verify_age": 0.001})
    migrated(cfg, source_dsn)
    assert verify.verify(cfg).identical
    assert verify_item(cfg).state == "pass"  # default bound: a day

    old = verify_item(bounded)  # the verify started longer ago than it took to run
    assert old.state == "fail" and "max_verify_age" in old.detail and "run `migrator verify`" in old.detail


# --- a second signal during the undo ------------------------------------------------------------------------------

def test_a_signal_during_the_switchover_undo_is_held_until_the_undo_is_done() -> None:
    """A second Ctrl-C (or a service manager's SIGTERM) while cutover or rollback puts things back must not cut that
    short, which would leave the pooler paused or a database frozen: cutover and rollback run their undo inside
    `signals_deferred`. Real signals to this process."""
    def terminate(signum: int, _: Any) -> None:  # as the CLI handles SIGTERM
        raise KeyboardInterrupt

    # Other tests of this process may have installed the CLI's stop handlers: start from the CLI's own.
    before = {s: signal.signal(s, h) for s, h in ((signal.SIGINT, signal.default_int_handler),
                                                   (signal.SIGTERM, terminate))}
    try:
        _held_until_undone()
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def _held_until_undone() -> None:
    steps: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        with signals_deferred("cutover"):
            os.kill(os.getpid(), signal.SIGINT)
            steps.append("entries restored")
            os.kill(os.getpid(), signal.SIGTERM)
            steps.append("freeze released")
            steps.append("RESUME sent")
    assert steps == ["entries restored", "freeze released", "RESUME sent"]

    # The undo ends by raising the cutover's own error: that one goes out, the held signal is not raised over it.
    with pytest.raises(RuntimeError, match="cutover stopped"):
        try:
            raise RuntimeError("cutover stopped at step switch")
        except RuntimeError:
            with signals_deferred("cutover"):
                os.kill(os.getpid(), signal.SIGINT)
                steps.append("undone")
            raise
    assert steps[-1] == "undone"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
