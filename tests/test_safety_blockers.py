"""What the row copy cannot carry is refused, migrated, or said plainly, never silently skipped: large objects stop
prepare unless the operator overrides the blocker by name (recorded, shown by status and go/no-go, and verify then
says their contents were not compared); unlogged tables migrate like any table; materialized views are populated
on the target and listed by verify as not compared."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from migrator import copy, gonogo, prepare, state, status, sync, verify
from migrator.config import Config
from migrator.db import session
from migrator.errors import Blocked
from migrator.terminal import render_status
from tests.helpers import fetch, run_sql

MIGRATOR = str(Path(sys.executable).with_name("migrator"))


def _schemas(dsn: str) -> set[str]:
    return {r[0] for r in fetch(dsn, "SELECT nspname FROM pg_namespace")}


def _item(checklist: gonogo.Checklist, item: str) -> gonogo.Check:
    [check] = [c for c in checklist.checks if c.item == item]
    return check


def test_prepare_refuses_a_source_with_a_large_object_and_creates_nothing(
        cfg: Config, source_dsn: str, target_dsn: str) -> None:
    run_sql(source_dsn, "CREATE TABLE public.report (id int PRIMARY KEY, doc oid)",
            "INSERT INTO public.report VALUES (1, lo_from_bytea(0, 'scanned referral'))")

    with pytest.raises(Blocked) as refused:
        prepare.prepare(cfg)

    assert "[large-objects]" in str(refused.value) and "1 large object" in str(refused.value)
    assert "--override large-objects" in refused.value.hint
    assert "_migrator" not in _schemas(source_dsn)
    assert "migrator_control" not in _schemas(target_dsn)
    assert fetch(target_dsn, "SELECT to_regclass('public.report')") == [(None,)]


def test_cli_prepare_exits_1_naming_the_blocker_and_what_to_do(
        source_dsn: str, target_dsn: str, tmp_path: Path) -> None:
    run_sql(source_dsn, "CREATE TABLE public.report (id int PRIMARY KEY, doc oid)", "SELECT lo_create(0)")
    config = tmp_path / "migration.toml"
    config.write_text(f"[source]\ndsn = {json.dumps(source_dsn)}\n[target]\ndsn = {json.dumps(target_dsn)}\n")

    done = subprocess.run([MIGRATOR, "--config", str(config), "prepare", "--yes"], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60)

    assert done.returncode == 1, done.stderr
    assert "[large-objects] 1 large object(s)" in done.stderr and "nothing was created" in done.stderr
    assert "what to do:" in done.stderr and "--override large-objects" in done.stderr
    assert "_migrator" not in _schemas(source_dsn)


def test_overridden_large_objects_are_recorded_shown_and_verify_says_their_contents_were_not_compared(
        cfg: Config, source_dsn: str, target_dsn: str) -> None:
    run_sql(source_dsn, "CREATE TABLE public.report (id int PRIMARY KEY, doc oid, note text)",
            "CREATE TABLE public.patient (id int PRIMARY KEY, name text)",
            "INSERT INTO public.report VALUES (1, lo_from_bytea(0, 'scanned referral'), 'a'), (2, NULL, 'b')",
            "INSERT INTO public.patient VALUES (1, 'x')")

    result = prepare.prepare(cfg, overrides=["large-objects"])
    copy.run(cfg)

    assert result.overridden == ("large-objects",)
    with session(target_dsn, role="target") as target:
        [recorded] = state.overrides(target).values()
        role = target.execute("SELECT current_user").fetchone()
    assert recorded.name == "large-objects" and "1 large object" in recorded.detail
    assert recorded.os_user and role is not None and recorded.db_role == role[0]
    st = status.read(cfg)
    assert [o["name"] for o in st.overrides] == ["large-objects"]
    assert "blocker large-objects overridden at prepare by" in render_status(st)

    # The rows are equal (the oid values were copied), but the large object they name does not exist on the target.
    assert fetch(target_dsn, "SELECT count(*) FROM pg_largeobject_metadata") == [(0,)]
    report = verify.verify(cfg)
    by_name = {t.name: t for t in report.tables}
    assert by_name["public.report"].status == "not_compared"
    assert "doc" in (by_name["public.report"].not_compared or "")
    assert by_name["public.patient"].status == "identical"
    assert not report.identical and report.exit_code == 2
    assert report.rows_identical  # what cutover's and rollback's full verify require: the override was the decision
    text = report.render_text()
    assert "NOT COMPARED  public.report" in text and "large objects are not migrated" in text
    assert [n["kind"] for n in report.to_dict()["not_compared"]] == ["large objects"]
    # Only the table asked about: its rows are fully compared.
    assert verify.verify(cfg, tables=["public.patient"]).exit_code == 0
    # Go/no-go shows the override, who and when; the verify it records is the rows' answer.
    checklist = gonogo.run(cfg)
    blockers = _item(checklist, "blockers")
    assert blockers.state == "overridden"
    assert f"large-objects overridden at prepare by {recorded.os_user} (role {recorded.db_role})" in blockers.detail
    assert _item(checklist, "verify").state == "pass"
    run_sql(target_dsn, "DELETE FROM public.patient")
    assert verify.verify(cfg).exit_code == 2
    assert _item(gonogo.run(cfg), "verify").state == "fail"  # a real difference is not hidden by the exit 2


def test_cutover_check_is_no_go_while_a_blocker_stands(cfg: Config, source_dsn: str, tmp_path: Path) -> None:
    run_sql(source_dsn, "CREATE TABLE public.report (id int PRIMARY KEY, doc oid)")
    prepare.prepare(cfg)
    copy.run(cfg)
    sync.sync(cfg)
    run_sql(source_dsn, "SELECT lo_create(0)")  # a large object written after prepare: no trigger saw it

    checklist = gonogo.run(cfg)

    assert not checklist.go and "blockers" in checklist.failing
    assert "large-objects stands, not overridden at prepare" in _item(checklist, "blockers").detail
    config = tmp_path / "migration.toml"
    config.write_text(f"[source]\ndsn = {json.dumps(source_dsn)}\n[target]\ndsn = {json.dumps(cfg.target_dsn)}\n")
    done = subprocess.run([MIGRATOR, "--config", str(config), "cutover", "--check"], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert done.returncode == 1 and "NO GO" in done.stdout and "[FAIL] blockers" in done.stdout


def test_unlogged_table_is_captured_copied_replayed_and_verified(cfg: Config, source_dsn: str,
                                                                 target_dsn: str) -> None:
    run_sql(source_dsn, "CREATE UNLOGGED TABLE public.worklist (id int PRIMARY KEY, station text)",
            "INSERT INTO public.worklist SELECT g, 'CT' || g FROM generate_series(1, 50) g")

    prepare.prepare(cfg)
    copy.run(cfg)
    run_sql(source_dsn, "INSERT INTO public.worklist VALUES (51, 'MR1')", "DELETE FROM public.worklist WHERE id = 1",
            "UPDATE public.worklist SET station = 'CT9' WHERE id = 2")
    sync.sync(cfg)

    assert fetch(target_dsn, "SELECT relpersistence FROM pg_class WHERE oid = 'public.worklist'::regclass") == [("u",)]
    assert fetch(target_dsn, "SELECT count(*), max(id) FROM public.worklist") == [(50, 51)]
    report = verify.verify(cfg)
    assert [(t.name, t.status, t.source_rows) for t in report.tables] == [("public.worklist", "identical", 50)]
    assert report.exit_code == 0


def test_materialized_views_are_populated_by_copy_and_listed_by_verify_as_not_compared(
        cfg: Config, source_dsn: str, target_dsn: str) -> None:
    run_sql(source_dsn, "CREATE TABLE public.modality (id int PRIMARY KEY, kind text)",
            "INSERT INTO public.modality SELECT g, CASE WHEN g % 2 = 0 THEN 'CT' ELSE 'MR' END "
            "FROM generate_series(1, 10) g",
            "CREATE MATERIALIZED VIEW public.modality_count AS SELECT kind, count(*) AS n FROM public.modality "
            "GROUP BY kind",
            "CREATE MATERIALIZED VIEW public.ct_count AS SELECT n FROM public.modality_count WHERE kind = 'CT'",
            "CREATE MATERIALIZED VIEW public.never_refreshed AS SELECT 1 AS x WITH NO DATA",
            "CREATE FOREIGN DATA WRAPPER mt_dummy", "CREATE SERVER legacy_ris FOREIGN DATA WRAPPER mt_dummy",
            "CREATE FOREIGN TABLE public.ris_order (id int) SERVER legacy_ris")

    prepare.prepare(cfg)
    copy.run(cfg)

    # Populated in dependency order (ct_count reads modality_count), from the copied rows.
    assert fetch(target_dsn, "SELECT kind, n FROM public.modality_count ORDER BY kind") == [("CT", 5), ("MR", 5)]
    assert fetch(target_dsn, "SELECT n FROM public.ct_count") == [(5,)]
    assert fetch(target_dsn, "SELECT relispopulated FROM pg_class WHERE oid = 'public.never_refreshed'::regclass") \
        == [(False,)]
    report = verify.verify(cfg)
    listed = {n.name: n for n in report.not_compared}
    assert set(listed) == {"public.ct_count", "public.modality_count", "public.never_refreshed", "public.ris_order"}
    assert listed["public.modality_count"].kind == "materialized view" and not listed["public.modality_count"].data
    assert listed["public.ris_order"].kind == "foreign table"
    assert report.exit_code == 0 and report.identical
    assert "NOT COMPARED  public.modality_count (materialized view)" in report.render_text()
