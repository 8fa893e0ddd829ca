"""The audit trail (issue 15): every operator action from the command line is recorded before it starts, with who,
what, the arguments, the outcome and how long it took; the trail is append-only; sync records the samples the console
charts; cleanup writes the run's history to a file before it offers to drop the control schema."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import psycopg
import pytest

from migrator import audit, cleanup, copy, prepare, state, sync
from migrator.config import Config
from migrator.errors import AuditUnavailable
from tests.helpers import fetch, run_sql
from tests.test_cutover import SCHEMA, cli, write_config


def _prepared(cfg: Config, source_dsn: str) -> None:
    run_sql(source_dsn, *SCHEMA)
    prepare.prepare(cfg)
    copy.run(cfg)


def test_cli_actions_are_audited_with_who_what_outcome_and_time(cfg: Config, source_dsn: str, target_dsn: str,
                                                                tmp_path: Path) -> None:
    _prepared(cfg, source_dsn)
    config = write_config(tmp_path / "migration.toml", source_dsn, target_dsn)
    for args in (["copy", "--pause"], ["copy", "--resume"], ["cutover", "--hold"], ["cutover", "--release-hold"],
                 ["cutover", "--release-hold"]):
        assert cli(config, *args).returncode == 0, args
    # Refused by the go/no-go (no verify recorded is a warning; sync never ran, so the lag is whatever was logged):
    # a release of a database that is not frozen fails, and is recorded as such.
    released = cli(config, "release", "--yes")
    assert released.returncode == 2 and "not frozen" in released.stderr

    shown = cli(config, "audit", "--json")
    assert shown.returncode == 0, shown.stderr
    trail = json.loads(shown.stdout)["actions"]
    assert [(a["action"], a["outcome"]) for a in trail] == [
        ("copy --pause", "done"), ("copy --resume", "done"), ("cutover --hold", "done"),
        ("cutover --release-hold", "done"), ("cutover --release-hold", "done"), ("release", "failed")]
    me = state.operator()
    assert {a["actor"] for a in trail} == {me} and {a["via"] for a in trail} == {"cli"}
    assert all(a["seconds"] is not None and a["seconds"] >= 0 and a["host"] == socket.gethostname() for a in trail)
    assert trail[4]["detail"] == "there was no hold"
    assert "not frozen" in trail[5]["detail"]
    # The hold says who set it.
    with psycopg.connect(target_dsn) as conn:
        assert state.cutover_hold(conn) is None
    assert me in cli(config, "audit").stdout


def test_a_cutover_and_its_overrides_are_audited_and_the_trail_is_append_only(
        cfg: Config, source_dsn: str, target_dsn: str, tmp_path: Path) -> None:
    _prepared(cfg, source_dsn)
    sync.sync(cfg)
    config = write_config(tmp_path / "migration.toml", source_dsn, target_dsn)
    done = cli(config, "cutover", "--yes", "--override", "no-switch", "--override", "verify")
    assert done.returncode == 0, done.stderr
    trail = audit.read(cfg).actions
    assert [(a.action, a.arguments, a.outcome) for a in trail] == [
        ("cutover", {"overrides": ["no-switch", "verify"], "on_unhealthy": "rollback"}, "done")]
    assert trail[0].detail is not None and trail[0].detail.startswith("attempt 1, write freeze ")
    for statement in ("UPDATE migrator_control.audit SET outcome = 'done'", "DELETE FROM migrator_control.audit",
                      "TRUNCATE migrator_control.audit"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            run_sql(target_dsn, statement)
    assert len(fetch(target_dsn, "SELECT id FROM migrator_control.audit")) == 2  # start and end


def test_an_action_whose_audit_row_cannot_be_written_does_not_start(cfg: Config, target_dsn: str) -> None:
    """From the console: a target without a control schema (or out of reach) refuses the action before it starts."""
    with pytest.raises(AuditUnavailable, match="not started"):
        audit.start(cfg, "cutover --hold", {}, actor="alice", via="console")
    assert fetch(target_dsn, "SELECT count(*) FROM pg_namespace WHERE nspname = 'migrator_control'") == [(0,)]


def test_sync_records_samples_with_the_pending_events_per_table(cfg: Config, source_dsn: str,
                                                                target_dsn: str) -> None:
    _prepared(cfg, source_dsn)
    run_sql(source_dsn, "INSERT INTO public.study (uid) SELECT 'x' || g FROM generate_series(1, 7) g",
            "INSERT INTO public.audit (what) VALUES ('a'), ('b')")
    syncer = sync.Syncer(cfg)
    try:
        syncer.sample()
    finally:
        syncer.close()
    sync.sync(cfg, samples=True)
    with psycopg.connect(target_dsn) as conn:
        found = state.samples(conn)
    assert len(found) == 2
    assert found[0].per_table == {"public.audit": 2, "public.study": 7} and found[0].pending_events == 9
    assert found[0].lag_seconds is not None and found[0].log_bytes and found[0].log_bytes > 0
    assert found[1].pending_events == 0 and found[1].per_table == {} and found[1].events_applied >= 9
    # Samples older than [sync] sample_days go as new ones come.
    time.sleep(1.1)
    with psycopg.connect(target_dsn) as conn:
        state.record_sample(conn, lag_seconds=None, pending_events=0, log_bytes=0, events_applied=0, per_table={},
                            keep_days=1 / 86400)
        conn.commit()
        assert len(state.samples(conn)) == 1


def test_cleanup_exports_the_history_and_audit_then_drops_the_control_schema_when_asked(
        cfg: Config, source_dsn: str, target_dsn: str, tmp_path: Path) -> None:
    _prepared(cfg, source_dsn)
    config = write_config(tmp_path / "migration.toml", source_dsn, target_dsn)
    assert cli(config, "cutover", "--hold").returncode == 0
    kept = cli(config, "cleanup", "--yes", "--json")
    assert kept.returncode == 0, kept.stderr
    result = json.loads(kept.stdout)
    assert result["control_schema_dropped"] is False
    first = json.loads(Path(result["history_file"]).read_text())
    assert Path(result["history_file"]).parent == tmp_path / ".migrator"
    assert Path(result["history_file"]).stat().st_mode & 0o077 == 0
    assert [(r["action"], r["outcome"]) for r in first["audit"]] == [
        ("cutover --hold", "started"), ("cutover --hold", "done"), ("cleanup", "started"), ("cleanup", "done")]
    assert {t["table"] for t in first["tables"]} == {"public.study", "public.series", "public.audit"}

    dropped = cli(config, "cleanup", "--yes", "--drop-control-schema", "--json")
    assert dropped.returncode == 0, dropped.stderr
    assert json.loads(dropped.stdout)["control_schema_dropped"] is True
    second = json.loads(Path(json.loads(dropped.stdout)["history_file"]).read_text())
    assert [r["action"] for r in second["audit"]][-2:] == ["cleanup", "cleanup"]
    assert fetch(target_dsn, "SELECT count(*) FROM pg_namespace WHERE nspname = 'migrator_control'") == [(0,)]
    assert cleanup.export_history(cfg) is None  # nothing left to export
