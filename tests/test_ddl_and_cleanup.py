"""DDL on the legacy database stops sync with a way out; cleanup leaves no trace; the target never gets engine objects."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from migrator import cleanup, copy, cutover, prepare, rollback, sync
from migrator.config import Config
from migrator.deltalog import triggers
from migrator.errors import NotReady, SchemaChanged
from tests.helpers import fetch, run_sql

SCHEMA = (
    "CREATE TABLE public.study (id int PRIMARY KEY, uid text NOT NULL, note text)",
    "CREATE TABLE public.series (id int PRIMARY KEY, study_id int NOT NULL REFERENCES public.study (id), "
    "modality text)",
    "CREATE TABLE public.audit (at timestamptz DEFAULT now(), what text)",
    "INSERT INTO public.study SELECT g, '1.2.' || g, 'n' || g FROM generate_series(1, 100) g",
    "INSERT INTO public.series SELECT g, 1 + g % 100, 'CT' FROM generate_series(1, 150) g",
    "INSERT INTO public.audit (what) SELECT 'a' || g FROM generate_series(1, 20) g",
)

APP_TRIGGERS = ("SELECT tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE NOT tgisinternal AND n.nspname <> 'migrator_control'")
"""The target's triggers outside the control schema (whose audit trail keeps itself append-only by triggers)."""

ENGINE_TRACES = {
    "schema": "SELECT count(*) FROM pg_namespace WHERE nspname = '_migrator'",
    "triggers": "SELECT count(*) FROM pg_trigger WHERE tgname LIKE '\\_migrator%%'",
    "functions": "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                 "WHERE n.nspname = '_migrator'",
}


def traces(dsn: str) -> dict[str, int]:
    return {what: fetch(dsn, q)[0][0] for what, q in ENGINE_TRACES.items()}


def catalog_counts(dsn: str) -> dict[str, int]:
    return {c: fetch(dsn, f"SELECT count(*) FROM pg_catalog.{c}")[0][0]
            for c in ("pg_class", "pg_trigger", "pg_proc", "pg_namespace", "pg_type", "pg_depend")}


def rows(dsn: str, table: str) -> list[tuple[Any, ...]]:
    return fetch(dsn, f"SELECT * FROM {table} ORDER BY 1, 2")


def position(target_dsn: str) -> list[tuple[Any, ...]]:
    return fetch(target_dsn, "SELECT applied_snapshot, events_applied, batches FROM migrator_control.sync_position")


def synced(cfg: Config, source_dsn: str) -> None:
    run_sql(source_dsn, *SCHEMA)
    prepare.prepare(cfg)
    copy.run(cfg)
    run_sql(source_dsn, "INSERT INTO public.study VALUES (101, '1.2.101', 'after copy')",
            "UPDATE public.series SET modality = 'MR' WHERE id <= 10")
    sync.sync(cfg)


def cli(source_dsn: str, target_dsn: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "migration.toml"
    config.write_text(f"[source]\ndsn = {json.dumps(source_dsn)}\n[target]\ndsn = {json.dumps(target_dsn)}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIGRATOR_")}
    return subprocess.run([str(Path(sys.executable).with_name("migrator")), "--config", str(config), *args],
                          env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)


# --- DDL ----------------------------------------------------------------------------------------------------------

def test_added_column_stops_sync_naming_the_table_and_leaves_the_position_unchanged(
        cfg: Config, source_dsn: str, target_dsn: str, tmp_path: Path) -> None:
    synced(cfg, source_dsn)
    before = position(target_dsn)
    run_sql(source_dsn, "ALTER TABLE public.study ADD COLUMN accession text",
            "INSERT INTO public.study VALUES (102, '1.2.102', 'after alter', 'ACC-1')")

    with pytest.raises(SchemaChanged, match=r"public\.study was altered"):
        sync.sync(cfg)
    proc = cli(source_dsn, target_dsn, tmp_path, "sync", "--until-caught-up")

    assert proc.returncode != 0
    assert "public.study" in proc.stderr and "DDL" in proc.stderr
    [what_to_do] = [line for line in proc.stderr.splitlines() if line.startswith("what to do:")]
    # The way out names commands that exist: the DDL on the target, prepare, copy, sync.
    assert "target" in what_to_do and "migrator prepare" in what_to_do and "migrator copy" in what_to_do
    assert "--accept-schema" not in what_to_do
    assert position(target_dsn) == before
    assert fetch(target_dsn, "SELECT count(*) FROM public.study WHERE id = 102") == [(0,)]


def test_a_key_columns_type_change_is_refused_naming_the_trigger_and_other_ddl_stops_sync(
        cfg: Config, source_dsn: str, target_dsn: str) -> None:
    # The key-change trigger's WHEN clause names the key columns: changing their type is refused on the legacy
    # database while capture is installed (a clear DDL error, rather than sessions that cached the old type failing
    # their updates later). Other columns change as before, and sync stops naming the table.
    synced(cfg, source_dsn)
    with pytest.raises(psycopg.errors.FeatureNotSupported, match=triggers.KEY_CHANGE_TRIGGER):
        run_sql(source_dsn, "ALTER TABLE public.study ALTER COLUMN id TYPE bigint")
    run_sql(source_dsn, "UPDATE public.study SET note = 'still written' WHERE id = 3")
    run_sql(source_dsn, "ALTER TABLE public.study ALTER COLUMN note TYPE varchar(200)")

    with pytest.raises(SchemaChanged, match=r"public\.study was altered"):
        sync.sync(cfg)


def test_a_leftover_subclass_flag_does_not_stop_sync(cfg: Config, source_dsn: str, target_dsn: str) -> None:
    # A temporary child sets relhassubclass on the parent, and the flag outlives the child until ANALYZE.
    synced(cfg, source_dsn)
    run_sql(source_dsn, "CREATE TEMP TABLE scratch () INHERITS (public.study)", "DROP TABLE scratch",
            "UPDATE public.study SET note = 'after the temp child' WHERE id = 4")

    sync.sync(cfg)

    assert fetch(target_dsn, "SELECT note FROM public.study WHERE id = 4") == [("after the temp child",)]
    # While a child exists, statement-level capture would not see rows written through the parent: sync says why.
    with psycopg.connect(source_dsn, autocommit=True) as holder:
        holder.execute("CREATE TEMP TABLE scratch () INHERITS (public.study)")
        with pytest.raises(SchemaChanged, match=r"public\.study \(now in an inheritance tree"):
            sync.sync(cfg)


def test_a_new_key_is_ddl_that_stops_sync(cfg: Config, source_dsn: str, target_dsn: str) -> None:
    # Capture and replay address rows by the key: a table keyed by a unique index that gets a primary key is
    # keyed differently from then on, which sync must not apply with the old key's triggers.
    run_sql(source_dsn, *SCHEMA, "CREATE TABLE public.device (serial text NOT NULL UNIQUE, n int NOT NULL)",
            "INSERT INTO public.device SELECT 'SN' || g, g FROM generate_series(1, 5) g")
    prepare.prepare(cfg)
    copy.run(cfg)
    # Logged by the old key (serial), not yet applied when the key changes:
    run_sql(source_dsn, "UPDATE public.device SET n = n + 100 WHERE serial IN ('SN1', 'SN2')",
            "INSERT INTO public.device VALUES ('SN6', 6)", "DELETE FROM public.device WHERE serial = 'SN3'",
            "ALTER TABLE public.device ADD PRIMARY KEY (n)",
            "UPDATE public.device SET serial = 'SN4b' WHERE n = 4")

    with pytest.raises(SchemaChanged, match=r"public\.device's key changed \(from serial to n\)"):
        sync.sync(cfg)

    # The runbook: the same DDL on the target, prepare (the table goes back to pending), copy, sync.
    run_sql(target_dsn, "ALTER TABLE public.device ADD PRIMARY KEY (n)")
    prepare.prepare(cfg)
    assert fetch(target_dsn, "SELECT status FROM migrator_control.table_state WHERE table_name = 'device'") == [
        ("pending",)]
    copy.run(cfg)
    run_sql(source_dsn, "UPDATE public.device SET serial = 'SN5b' WHERE n = 5")
    sync.sync(cfg)
    assert fetch(target_dsn, "SELECT serial, n FROM public.device ORDER BY n") == fetch(
        source_dsn, "SELECT serial, n FROM public.device ORDER BY n")


def test_new_table_in_an_included_schema_stops_sync_naming_it(
        cfg: Config, source_dsn: str, target_dsn: str) -> None:
    synced(cfg, source_dsn)
    before = position(target_dsn)
    run_sql(source_dsn, "CREATE TABLE public.dose_report (id int PRIMARY KEY, gy numeric)",
            "INSERT INTO public.study VALUES (102, '1.2.102', 'pending')")

    with pytest.raises(SchemaChanged, match=r"new table public\.dose_report"):
        sync.sync(cfg)
    assert position(target_dsn) == before

    # The hint's way out for a new table: prepare (creates it on the target and captures it), copy, sync.
    run_sql(source_dsn, "INSERT INTO public.dose_report VALUES (1, 0.5)",
            "CREATE INDEX dose_report_gy ON public.dose_report (gy)",
            # A name pg_dump would read as a pattern unless quoted exactly: a dot, a wildcard, capitals.
            'CREATE TABLE public."Plan.V*" (id serial PRIMARY KEY, note text DEFAULT \'x\')', 'INSERT INTO public."Plan.V*" DEFAULT VALUES')
    assert prepare.prepare(cfg).triggers_installed == 2
    assert sorted(c.table for c in copy.run(cfg).copied) == ["public.Plan.V*", "public.dose_report"]
    run_sql(source_dsn, "INSERT INTO public.dose_report VALUES (2, 1.5)")
    sync.sync(cfg)
    for table in ("public.study", "public.dose_report", 'public."Plan.V*"'):
        assert rows(target_dsn, table) == rows(source_dsn, table), table
    indexes = "SELECT indexname FROM pg_indexes WHERE tablename = 'dose_report' ORDER BY 1"
    assert fetch(target_dsn, indexes) == fetch(source_dsn, indexes) == [("dose_report_gy",), ("dose_report_pkey",)]


def test_altered_table_is_recopied_after_the_ddl_reaches_the_target_and_sync_resumes(
        cfg: Config, source_dsn: str, target_dsn: str) -> None:
    synced(cfg, source_dsn)
    # Changes before the ALTER, not yet applied; the altered table is referenced by a foreign key on the target.
    run_sql(source_dsn,
            "INSERT INTO public.study VALUES (102, '1.2.102', 'before alter')",
            "UPDATE public.study SET note = 'changed before alter' WHERE id = 5",
            "DELETE FROM public.series WHERE study_id = 6",
            "DELETE FROM public.study WHERE id = 6",
            "INSERT INTO public.audit (what) VALUES ('before alter')")
    run_sql(source_dsn, "ALTER TABLE public.study ADD COLUMN accession text")
    run_sql(source_dsn,
            "INSERT INTO public.study VALUES (103, '1.2.103', 'after alter', 'ACC-103')",
            "UPDATE public.study SET accession = 'ACC-7' WHERE id = 7",
            "INSERT INTO public.series VALUES (151, 103, 'US')",
            "INSERT INTO public.audit (what) VALUES ('after alter')")
    with pytest.raises(SchemaChanged):
        sync.sync(cfg)

    # The way out: the same DDL on the target, prepare (new definition, table back to pending), copy, sync.
    run_sql(target_dsn, "ALTER TABLE public.study ADD COLUMN accession text")
    prepare.prepare(cfg)
    assert fetch(target_dsn, "SELECT status FROM migrator_control.table_state WHERE table_name = 'study'") == \
        [("pending",)]
    result = copy.run(cfg)
    assert [c.table for c in result.copied] == ["public.study"]
    # More changes after the re-copy, on both sides of the boundary.
    run_sql(source_dsn,
            "INSERT INTO public.study VALUES (104, '1.2.104', 'after recopy', 'ACC-104')",
            "UPDATE public.study SET accession = 'ACC-8', note = 'after recopy' WHERE id = 8",
            "INSERT INTO public.audit (what) VALUES ('after recopy')")
    sync.sync(cfg)

    for table in ("public.study", "public.series", "public.audit"):
        assert rows(target_dsn, table) == rows(source_dsn, table), table
    assert fetch(target_dsn, "SELECT accession FROM public.study WHERE id IN (7, 8, 103, 104) ORDER BY id") == \
        [("ACC-7",), ("ACC-8",), ("ACC-103",), ("ACC-104",)]


def test_prepare_again_restores_a_capture_trigger_dropped_by_hand(
        cfg: Config, source_dsn: str, target_dsn: str) -> None:
    synced(cfg, source_dsn)
    run_sql(source_dsn, f"DROP TRIGGER {triggers.KEY_CHANGE_TRIGGER} ON public.study")
    with pytest.raises(SchemaChanged, match=r"capture triggers of public\.study") as info:
        sync.sync(cfg)  # changes could go unlogged: sync says so rather than go on
    assert "migrator prepare" in info.value.hint

    prepare.prepare(cfg)
    run_sql(source_dsn, "ALTER TABLE public.series DISABLE TRIGGER _migrator_capture_upd")
    with pytest.raises(SchemaChanged, match=r"capture triggers of public\.series"):
        sync.sync(cfg)  # disabled is as bad as dropped
    prepare.prepare(cfg)

    assert fetch(source_dsn, "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'public.study'::regclass "
                             "AND tgname LIKE '\\_migrator%%'") == [(5,)]
    # The old key of a moved row is captured again: without it the target would keep the row under both keys.
    run_sql(source_dsn, "UPDATE public.study SET id = 1001 WHERE id = 101")
    sync.sync(cfg)
    assert fetch(target_dsn, "SELECT id FROM public.study WHERE id IN (101, 1001)") == [(1001,)]


# --- cleanup ------------------------------------------------------------------------------------------------------

def test_cleanup_removes_every_trace_from_the_legacy_database(
        cfg: Config, source_dsn: str, target_dsn: str) -> None:
    run_sql(source_dsn, *SCHEMA)
    before = catalog_counts(source_dsn)
    prepare.prepare(cfg)
    copy.run(cfg)
    run_sql(source_dsn, "INSERT INTO public.study VALUES (101, '1.2.101', 'x')", "TRUNCATE public.audit")
    sync.sync(cfg)
    # Keyed tables: three statement-level key triggers, the key-change row trigger and a TRUNCATE trigger, and a key
    # function each; the keyless audit table: a row trigger and a TRUNCATE trigger on the shared capture() function.
    assert traces(source_dsn) == {"schema": 1, "triggers": 12, "functions": 3}

    result = cleanup.run(cfg)

    assert result.triggers_removed == 12
    assert traces(source_dsn) == {"schema": 0, "triggers": 0, "functions": 0}
    assert catalog_counts(source_dsn) == before
    # The application writes as before, and nothing is recorded any more; cleanup again is harmless.
    run_sql(source_dsn, "INSERT INTO public.study VALUES (102, '1.2.102', 'y')")
    assert cleanup.run(cfg).triggers_removed == 0
    assert catalog_counts(source_dsn) == before


def test_cleanup_after_cutover_refuses_unless_the_freeze_is_released(
        make_config: Any, source_dsn: str, target_dsn: str) -> None:
    cfg = make_config(cutover={"switch_command": "true"})
    run_sql(source_dsn, *SCHEMA)
    prepare.prepare(cfg)
    copy.run(cfg)
    assert cutover.run(cfg).ok

    with pytest.raises(NotReady, match="frozen") as info:
        cleanup.run(cfg)
    assert "--release-freeze" in info.value.hint
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        run_sql(source_dsn, "INSERT INTO public.study VALUES (500, 'x', 'x')")
    assert traces(source_dsn)["triggers"] == 12
    with pytest.raises(NotReady, match="frozen"):
        prepare.prepare(cfg)  # writing the capture functions again would lift the freeze
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        run_sql(source_dsn, "INSERT INTO public.study VALUES (500, 'x', 'x')")

    cleanup.run(cfg, release_freeze=True)

    assert traces(source_dsn) == {"schema": 0, "triggers": 0, "functions": 0}
    run_sql(source_dsn, "INSERT INTO public.study VALUES (500, 'x', 'x')")


def test_target_never_receives_engine_objects(make_config: Any, source_dsn: str, target_dsn: str) -> None:
    cfg = make_config(cutover={"switch_command": "true"})
    run_sql(source_dsn, *SCHEMA,
            # The application's own trigger must reach the target; the engine's must not.
            "CREATE FUNCTION public.touch() RETURNS trigger LANGUAGE plpgsql AS "
            "$$BEGIN NEW.note := coalesce(NEW.note, 'touched'); RETURN NEW; END$$",
            "CREATE TRIGGER study_touch BEFORE INSERT ON public.study FOR EACH ROW EXECUTE FUNCTION public.touch()")
    prepare.prepare(cfg)
    assert traces(target_dsn) == {"schema": 0, "triggers": 0, "functions": 0}
    copy.run(cfg)  # post-data: indexes, constraints, triggers

    assert traces(target_dsn) == {"schema": 0, "triggers": 0, "functions": 0}
    assert fetch(target_dsn, APP_TRIGGERS) == [("study_touch",)]

    run_sql(source_dsn, "INSERT INTO public.study (id, uid) VALUES (101, '1.2.101')")
    sync.sync(cfg)
    assert cutover.run(cfg).ok

    # The rollback window: from cutover until cleanup, capture on the target records what clients write there.
    assert traces(target_dsn)["schema"] == 1
    assert fetch(target_dsn, "SELECT note FROM public.study WHERE id = 101") == [("touched",)]
    cleanup.run(cfg, release_freeze=True)
    rollback.disarm(cfg)
    assert traces(target_dsn) == {"schema": 0, "triggers": 0, "functions": 0}
    assert fetch(target_dsn, APP_TRIGGERS) == [("study_touch",)]


def test_prepare_refuses_a_target_role_that_may_not_silence_triggers_and_names_the_grant(
    make_config: Any, source_dsn: str, target_dsn: str, admin_dsn: str
) -> None:
    import uuid

    from migrator.errors import Blocked

    role = f"mt_role_{uuid.uuid4().hex[:8]}"
    dbname = psycopg.conninfo.conninfo_to_dict(target_dsn)["dbname"]
    run_sql(admin_dsn, f'CREATE ROLE "{role}" LOGIN', f'ALTER DATABASE "{dbname}" OWNER TO "{role}"')
    try:
        cfg = make_config(target={"dsn": psycopg.conninfo.make_conninfo(target_dsn, user=role)})
        run_sql(source_dsn, "CREATE TABLE public.t (id int PRIMARY KEY)")
        with pytest.raises(Blocked, match="session_replication_role") as refused:
            prepare.prepare(cfg)
        assert "GRANT SET ON PARAMETER session_replication_role" in (refused.value.hint or "")
        assert fetch(target_dsn, "SELECT count(*) FROM pg_namespace WHERE nspname = 'migrator_control'") == [(0,)], \
            "nothing is created before the check"

        # With the grant, a role that owns the target database is enough for the whole migration.
        run_sql(admin_dsn, f'GRANT SET ON PARAMETER session_replication_role TO "{role}"')
        run_sql(source_dsn, "INSERT INTO public.t SELECT generate_series(1, 100)")
        prepare.prepare(cfg)
        copy.run(cfg)
        run_sql(source_dsn, "DELETE FROM public.t WHERE id <= 10", "INSERT INTO public.t VALUES (1000)")
        sync.sync(cfg)
        assert fetch(target_dsn, "SELECT count(*), max(id) FROM public.t") == [(91, 1000)]
    finally:
        run_sql(admin_dsn, f'ALTER DATABASE "{dbname}" OWNER TO postgres')
        run_sql(target_dsn, f'REASSIGN OWNED BY "{role}" TO postgres', f'DROP OWNED BY "{role}"')
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(f'REVOKE SET ON PARAMETER session_replication_role FROM "{role}"')
            conn.execute(f'DROP ROLE "{role}"')
