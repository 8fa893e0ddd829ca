"""Inspect reads the legacy database, reports what would migrate and what stands in the way, and changes nothing."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable

import psycopg
import pytest

from migrator import inspect
from migrator.config import Config, from_dict
from migrator.inspect import InspectReport
from tests.helpers import fetch, run_sql


def _messages(report: InspectReport, severity: str, table: str | None = None) -> list[str]:
    return [f.message for f in report.findings if f.severity == severity and (table is None or f.table == table)]


def _table(report: InspectReport, display: str) -> inspect.TableReport:
    matches = [t for t in report.tables if t.display == display]
    assert matches, f"{display} not in report: {[t.display for t in report.tables]}"
    return matches[0]


def test_keys_come_from_primary_key_or_unique_index_on_not_null_columns(cfg: Config, source_dsn: str) -> None:
    run_sql(
        source_dsn,
        "CREATE TABLE public.patient (id int PRIMARY KEY, name text)",
        "CREATE TABLE public.instance (sop_uid text NOT NULL UNIQUE, size int)",
        "CREATE TABLE public.audit_log (at timestamptz, msg text)",
        "CREATE TABLE public.nullable_unique (code text UNIQUE)",
    )
    report = inspect.run(cfg)

    assert _table(report, "public.patient").key == ("id",)
    assert _table(report, "public.patient").key_source == "primary key"
    assert _table(report, "public.instance").key == ("sop_uid",)
    assert _table(report, "public.instance").key_source == "unique index instance_sop_uid_key"
    for keyless in ("public.audit_log", "public.nullable_unique"):
        assert _table(report, keyless).key == ()
        [message] = _messages(report, "warning", keyless)
        assert "add a primary key" in message and "slower replay" in message
    assert not _messages(report, "warning", "public.patient")
    assert not _messages(report, "warning", "public.instance")
    assert report.ready


def test_large_object_makes_the_report_not_ready(cfg: Config, source_dsn: str) -> None:
    run_sql(source_dsn, "CREATE TABLE public.report (id int PRIMARY KEY, doc oid)", "SELECT lo_create(0)")
    report = inspect.run(cfg)

    assert not report.ready
    [blocker] = [f for f in report.findings if f.severity == "blocker"]
    assert "1 large object" in blocker.message and blocker.name == "large-objects"


def test_idle_in_transaction_session_is_reported_without_its_query_text(cfg: Config, source_dsn: str) -> None:
    with psycopg.connect(source_dsn, application_name="pacs-viewer") as idle:
        idle.execute("SELECT 'Jane Doe MRN-4711' AS patient")  # leaves the session idle in transaction
        pid = idle.info.backend_pid
        report = inspect.run(cfg, idle_in_transaction_seconds=0)
        idle.rollback()

    [message] = [m for m in _messages(report, "warning") if "long transaction" in m]
    assert f"pid {pid}" in message and "idle in transaction" in message and "pacs-viewer" in message
    everything = json.dumps(report.to_dict()) + report.render_text()
    assert "MRN-4711" not in everything and "Jane Doe" not in everything


def test_short_transactions_are_not_reported(cfg: Config, source_dsn: str) -> None:
    with psycopg.connect(source_dsn) as busy:
        busy.execute("SELECT 1")
        report = inspect.run(cfg)
        busy.rollback()
    assert not [m for m in _messages(report, "warning") if "long transaction" in m]


def test_always_and_replica_triggers_are_warned_and_capture_triggers_are_ignored(cfg: Config, source_dsn: str) -> None:
    run_sql(
        source_dsn,
        "CREATE TABLE public.series (id int PRIMARY KEY, n int)",
        "CREATE FUNCTION public.touch() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NEW; END$$",
        "CREATE TRIGGER series_count BEFORE INSERT ON public.series FOR EACH ROW EXECUTE FUNCTION public.touch()",
        "CREATE TRIGGER series_audit BEFORE UPDATE ON public.series FOR EACH ROW EXECUTE FUNCTION public.touch()",
        "CREATE TRIGGER _migrator_capture AFTER INSERT ON public.series FOR EACH ROW EXECUTE FUNCTION public.touch()",
        "ALTER TABLE public.series ENABLE ALWAYS TRIGGER series_count, ENABLE ALWAYS TRIGGER _migrator_capture",
        "ALTER TABLE public.series DISABLE TRIGGER series_audit",
        "CREATE TRIGGER series_sync AFTER DELETE ON public.series FOR EACH ROW EXECUTE FUNCTION public.touch()",
        "ALTER TABLE public.series ENABLE REPLICA TRIGGER series_sync",
        "CREATE TRIGGER series_plain AFTER DELETE ON public.series FOR EACH ROW EXECUTE FUNCTION public.touch()",
    )
    report = inspect.run(cfg)

    triggers = {(t.name, t.enabled) for t in _table(report, "public.series").triggers}
    assert triggers == {("series_count", "always"), ("series_audit", "disabled"), ("series_sync", "replica"),
                        ("series_plain", "enabled")}
    always, replica = _messages(report, "warning", "public.series")
    assert "series_count" in always and "ENABLE ALWAYS" in always
    assert "series_sync" in replica and "ENABLE REPLICA" in replica


def test_partitions_are_listed_as_leaves_with_their_parent(cfg: Config, source_dsn: str) -> None:
    run_sql(
        source_dsn,
        "CREATE TABLE public.study (id int, taken date, PRIMARY KEY (id, taken)) PARTITION BY RANGE (taken)",
        "CREATE TABLE public.study_2023 PARTITION OF public.study FOR VALUES FROM ('2023-01-01') TO ('2024-01-01')",
        "CREATE TABLE public.study_2024 PARTITION OF public.study FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')",
    )
    report = inspect.run(cfg)

    assert [t.display for t in report.tables] == ["public.study_2023", "public.study_2024"]
    for t in report.tables:
        assert t.partition_of == "public.study"
        assert t.key == ("id", "taken")


def test_include_and_exclude_patterns_decide_what_is_reported(make_config: Callable[..., Config],
                                                              source_dsn: str) -> None:
    run_sql(
        source_dsn,
        'CREATE SCHEMA pacs', 'CREATE SCHEMA ois', 'CREATE SCHEMA "Mixed Case"',
        "CREATE TABLE pacs.study (id serial PRIMARY KEY)",
        "CREATE TABLE pacs.scratch (x int)",
        "CREATE TABLE ois.plan (id serial PRIMARY KEY)",
        'CREATE TABLE "Mixed Case"."Treatment Plan" (id int PRIMARY KEY)',
        "CREATE UNLOGGED TABLE ois.tmp (x int)",
    )
    cfg = make_config(tables={"include": ["pacs.*", "Mixed Case.*"], "exclude": ["pacs.scratch"]})
    report = inspect.run(cfg)

    assert [t.display for t in report.tables] == ["Mixed Case.Treatment Plan", "pacs.study"]
    assert [s.display for s in report.sequences] == ["pacs.study_id_seq"]
    assert not [f for f in report.findings if f.table and not f.table.startswith("pacs.")]
    assert not _messages(report, "warning")


def test_foreign_tables_are_warned_unlogged_tables_migrate_and_materialized_views_are_refreshed(
        cfg: Config, source_dsn: str) -> None:
    run_sql(
        source_dsn,
        "CREATE FOREIGN DATA WRAPPER mt_dummy",
        "CREATE SERVER legacy_ris FOREIGN DATA WRAPPER mt_dummy",
        "CREATE FOREIGN TABLE public.ris_order (id int) SERVER legacy_ris",
        "CREATE UNLOGGED TABLE public.worklist_cache (id int PRIMARY KEY)",
        "CREATE TABLE public.modality (id int PRIMARY KEY)",
        "CREATE MATERIALIZED VIEW public.modality_count AS SELECT count(*) FROM public.modality",
    )
    report = inspect.run(cfg)

    assert [t.display for t in report.tables] == ["public.modality", "public.worklist_cache"]
    assert "foreign table" in _messages(report, "warning", "public.ris_order")[0]
    assert "migrated like any table" in _messages(report, "info", "public.worklist_cache")[0]
    assert "REFRESH" in _messages(report, "info", "public.modality_count")[0]
    assert report.ready


def test_unusual_column_types_are_warned(cfg: Config, source_dsn: str) -> None:
    run_sql(
        source_dsn,
        "CREATE EXTENSION citext",
        "CREATE DOMAIN public.fee AS money",
        "CREATE TABLE public.billing (id int PRIMARY KEY, amount money, charged public.fee, note xml, "
        "rel regclass, blobs oid[], code citext, search tsvector, body jsonb, uid uuid)",
    )
    report = inspect.run(cfg)

    flagged = {c.name for c in _table(report, "public.billing").unusual_columns}
    assert flagged == {"amount", "charged", "note", "rel", "blobs", "code"}
    assert any("extension citext" in m for m in _messages(report, "warning", "public.billing"))
    assert report.ready


def test_capture_schema_present_is_reported_as_prepared_already(cfg: Config, source_dsn: str) -> None:
    run_sql(source_dsn, "CREATE SCHEMA _migrator", "CREATE TABLE _migrator.delta_log (id int)")
    report = inspect.run(cfg)

    assert any("prepared already" in m for m in _messages(report, "info"))
    assert report.tables == ()


def test_role_that_is_not_superuser_is_warned(admin_dsn: str, source_dsn: str, target_dsn: str) -> None:
    role = f"mt_inspect_{uuid.uuid4().hex[:8]}"
    run_sql(admin_dsn, f'CREATE ROLE "{role}" LOGIN')
    try:
        dsn = psycopg.conninfo.make_conninfo(source_dsn, user=role)
        cfg = from_dict({"source": {"dsn": dsn}, "target": {"dsn": target_dsn}}, env={})
        report = inspect.run(cfg)
    finally:
        run_sql(admin_dsn, f'DROP ROLE "{role}"')

    assert any("not a superuser" in m for m in _messages(report, "warning"))
    assert any("pg_read_all_stats" in m for m in _messages(report, "info"))


def test_server_older_than_13_is_a_blocker() -> None:
    [finding] = inspect.version_findings(120015, "12.15")
    assert finding.severity == "blocker" and "13" in finding.message
    assert inspect.version_findings(130000, "13.0") == []


def test_report_is_json_serialisable_and_renders_as_text(cfg: Config, source_dsn: str) -> None:
    run_sql(
        source_dsn,
        "CREATE TABLE public.image (id bigserial PRIMARY KEY, path text)",
        "INSERT INTO public.image (path) SELECT 'x' FROM generate_series(1, 100)",
        "CREATE TABLE public.log (msg text)",
        "ANALYZE",
    )
    report = inspect.run(cfg, assumed_mb_per_s=1.0)

    data = json.loads(json.dumps(report.to_dict()))
    assert data["ready"] is True
    assert [t["name"] for t in data["tables"]] == ["image", "log"]
    assert data["tables"][0]["est_rows"] == 100
    assert data["sequences"] == [{"schema": "public", "name": "image_id_seq", "last_value": 100, "is_called": True}]
    assert {"severity": "warning", "table": "public.log"} == {k: data["findings"][0][k] for k in ("severity", "table")}
    assert report.server_version_num >= 130000 and report.database_size > 0
    assert report.total_bytes == sum(t.bytes for t in report.tables) > 0
    assert report.estimated_copy_seconds == pytest.approx(report.total_bytes / (1024 * 1024))

    text = report.render_text()
    assert "public.image" in text and "public.log" in text and "READY" in text
    assert "WARNING" in text


def test_inspect_changes_nothing(cfg: Config, source_dsn: str) -> None:
    run_sql(
        source_dsn,
        "CREATE TABLE public.patient (id int PRIMARY KEY)",
        "CREATE TABLE public.note (txt text)",
        "SELECT lo_create(0)",
    )
    snapshot = (
        "SELECT (SELECT count(*) FROM pg_class), (SELECT count(*) FROM pg_trigger), (SELECT count(*) FROM pg_proc), "
        "(SELECT array_agg(nspname ORDER BY nspname) FROM pg_namespace), "
        "(SELECT count(*) FROM pg_largeobject_metadata)"
    )
    before = fetch(source_dsn, snapshot)
    report = inspect.run(cfg)
    after = fetch(source_dsn, snapshot)

    assert before == after
    assert "_migrator" not in after[0][3]
    assert not report.ready
