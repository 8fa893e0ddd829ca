"""A rehearsal on two configured test databases (issue 16): a schema the synthetic builder did not make, under the
generic workload, end to end through the command line; the refusals, which change nothing; and the workload's check,
which finds a write that did not arrive."""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from migrator.config import TableFilter
from migrator.rehearse.generic import GenericSpec, GenericWorkload
from tests.helpers import fetch, run_sql
from tests.test_cli import migrator, write_config

# Text, uuid, integer, identity and composite keys; a table without a key; a foreign key cycle (department <-> staff);
# a composite foreign key; an application trigger that changes the row it updates; a check the workload's new text
# values break (what the schema refused is reported, never fatal).
SCHEMA = """
CREATE SCHEMA clinic;
CREATE TABLE clinic.department (code text PRIMARY KEY, name text NOT NULL, head_id int);
CREATE TABLE clinic.staff (id int PRIMARY KEY, dept text NOT NULL REFERENCES clinic.department,
                           name varchar(80), badge uuid NOT NULL UNIQUE DEFAULT gen_random_uuid());
ALTER TABLE clinic.department ADD FOREIGN KEY (head_id) REFERENCES clinic.staff DEFERRABLE INITIALLY DEFERRED;
CREATE TABLE clinic.visit (site text, visit_no bigint, staff_id int REFERENCES clinic.staff,
                           notes text CHECK (notes IS NULL OR length(notes) <= 40), updated_at timestamptz,
                           revision int NOT NULL DEFAULT 0, PRIMARY KEY (site, visit_no));
CREATE FUNCTION clinic.bump() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.revision := OLD.revision + 1; NEW.updated_at := now(); RETURN NEW; END $$;
CREATE TRIGGER visit_bump BEFORE UPDATE ON clinic.visit FOR EACH ROW EXECUTE FUNCTION clinic.bump();
CREATE TABLE clinic.document (doc_id uuid PRIMARY KEY, visit_site text, visit_no bigint, title varchar(64),
                              body bytea, FOREIGN KEY (visit_site, visit_no) REFERENCES clinic.visit);
CREATE TABLE clinic.event_log (at timestamptz, what text, amount numeric(8,2));
CREATE TABLE public.measurement (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, site text,
                                 value double precision, unit char(2) CHECK (unit IN ('mg', 'ml')));
BEGIN;
INSERT INTO clinic.department SELECT 'D' || i, 'Department ' || i, NULL FROM generate_series(1, 20) i;
INSERT INTO clinic.staff SELECT i, 'D' || (1 + i % 20), 'Staff ' || i FROM generate_series(1, 300) i;
UPDATE clinic.department SET head_id = substr(code, 2)::int;
COMMIT;
INSERT INTO clinic.visit SELECT 'S' || (i % 3), i, 1 + i % 300, CASE WHEN i % 5 = 0 THEN NULL ELSE 'note ' || i END,
       now() - i * interval '1 hour', 0 FROM generate_series(1, 3000) i;
INSERT INTO clinic.document SELECT gen_random_uuid(), 'S' || (i % 3), i, 'doc ' || i, sha256(int4send(i))
  FROM generate_series(1, 2000) i;
INSERT INTO clinic.event_log SELECT now() - (i % 50) * interval '1 minute', 'event ' || (i % 40), (i % 7) * 1.5
  FROM generate_series(1, 1000) i;
INSERT INTO public.measurement (site, value, unit) SELECT 'S' || (i % 3), i / 7.0, (ARRAY['mg', 'ml'])[1 + i % 2]
  FROM generate_series(1, 500) i;
ANALYZE;
"""
REHEARSAL = "[cutover]\nhealth_seconds = 1.0\n[rehearsal]\nsync_seconds = 2.0\n"


@pytest.fixture
def legacy(source_dsn: str) -> str:
    run_sql(source_dsn, SCHEMA)
    return source_dsn


def state_of(dsn: str) -> list[tuple[object, ...]]:
    """Everything a refusal must leave alone: schemas, relations with their row counts, triggers, comments."""
    return fetch(dsn, """
        SELECT 'schema', nspname, NULL::bigint FROM pg_namespace WHERE nspname !~ '^pg_' AND nspname <> 'information_schema'
        UNION ALL
        SELECT 'relation', c.oid::regclass::text,
               (xpath('/row/n/text()', query_to_xml(format('SELECT count(*) AS n FROM %s', c.oid::regclass),
                                                    false, true, '')))[1]::text::bigint
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind = 'r' AND n.nspname !~ '^pg_' AND n.nspname <> 'information_schema'
        UNION ALL
        SELECT 'trigger', tgname, NULL FROM pg_trigger WHERE NOT tgisinternal
        UNION ALL
        SELECT 'comment', description, NULL FROM pg_description d JOIN pg_database b ON b.oid = d.objoid
         WHERE b.datname = current_database()
        ORDER BY 1, 2""")


def test_a_rehearsal_on_configured_test_databases_under_the_generic_workload(
        legacy: str, target_dsn: str, tmp_path: Path) -> None:
    config = write_config(tmp_path / "rehearsal.toml", legacy, target_dsn,
                          REHEARSAL + "test_databases = true\nrollback = true\n")

    run = migrator("--config", str(config), "rehearse", "--workload", "generic", "--rate", "40", "--json",
                   timeout=300, cwd=tmp_path)

    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert report["ok"] and report["problems"] == []
    # Its report, written at the end from the control schema (into .migrator/reports of the working directory).
    page = tmp_path / report["report"]
    assert page.parent == tmp_path / ".migrator" / "reports" and "<svg" in page.read_text()
    assert [p["name"] for p in json.loads(page.with_suffix(".json").read_text())["rehearsals"][-1]["phases"]][:3] == \
        ["start", "workload", "inspect"]
    assert [p["name"] for p in report["phases"]] == [
        "start", "workload", "inspect", "prepare", "copy", "sync", "live_verify", "cutover", "verify", "rollback",
        "verify_back", "cleanup"]
    workload, check = report["workload"], report["workload_check"]
    assert workload["committed"] > 0 and workload["writes"]["insert"] > 0 and workload["writes"]["update"] > 0
    assert workload["workers_lost"] == 0 and workload["tables"] == 6
    assert "clinic.event_log update" in workload["skipped"]  # no key: never updated, and said so
    assert check["ok"] and check["checked"] > 0, check  # every committed workload write is on the target
    assert report["parity"]["identical"]
    assert fetch(target_dsn, "SELECT count(*) FROM clinic.staff WHERE id > 300")[0][0] > 0  # copies under new keys
    # The legacy database holds no migrator object afterwards; the workload's writes stay there.
    assert fetch(legacy, "SELECT count(*) FROM pg_namespace WHERE nspname = '_migrator'") == [(0,)]
    assert fetch(legacy, "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'migrator%'") == [(0,)]
    assert fetch(legacy, "SELECT count(*) FROM clinic.staff WHERE id > 300")[0][0] > 0
    assert "what the workload wrote there stays" in " ".join(report["notes"])
    # The target says a rehearsal made it, with each phase.
    [(ok, phases)] = fetch(target_dsn, "SELECT ok, phases FROM migrator_control.rehearsal")
    assert ok is True and [p["name"] for p in phases] == [p["name"] for p in report["phases"]]

    # A second rehearsal starts over on the target the first one made.
    again = migrator("--config", str(config), "rehearse", "--rate", "20", timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "emptied the target an earlier rehearsal made" in again.stdout
    assert fetch(target_dsn, "SELECT count(*) FROM migrator_control.rehearsal") == [(1,)]


def test_the_refusals_change_nothing(legacy: str, target_dsn: str, make_db: Callable[[str], str],
                                     tmp_path: Path) -> None:
    empty_target = make_db("tgt2")
    before = {dsn: state_of(dsn) for dsn in (legacy, target_dsn, empty_target)}

    # Not declared test databases.
    undeclared = write_config(tmp_path / "rehearsal.toml", legacy, empty_target, REHEARSAL)
    no = migrator("--config", str(undeclared), "rehearse")
    assert no.returncode == 1 and "does not declare its databases test databases" in no.stderr, no.stderr
    # A target holding something no rehearsal made.
    run_sql(target_dsn, "CREATE TABLE public.production_data (id int PRIMARY KEY)")
    before[target_dsn] = state_of(target_dsn)
    foreign = write_config(tmp_path / "foreign.toml", legacy, target_dsn, REHEARSAL + "test_databases = true\n")
    no = migrator("--config", str(foreign), "rehearse", "--workload", "generic")
    assert no.returncode == 1 and "table public.production_data" in no.stderr, no.stderr
    # The default ./migration.toml: neither named explicitly nor implied by a configured workload.
    default = write_config(tmp_path / "migration.toml", legacy, empty_target, REHEARSAL + "test_databases = true\n")
    for args in (("--config", "migration.toml", "rehearse", "--workload", "generic"),
                 ("--config", str(default), "rehearse"), ("rehearse", "--workload", "generic"),
                 ("rehearse", "--workload-command", "true")):
        no = migrator(*args, cwd=tmp_path)
        assert no.returncode == 1 and "refused" in no.stderr and "migration.toml" in no.stderr, (args, no.stderr)
    # The synthetic workload on a schema it did not build.
    declared = write_config(tmp_path / "declared.toml", legacy, empty_target, REHEARSAL + "test_databases = true\n")
    no = migrator("--config", str(declared), "rehearse", "--workload", "pacs")
    assert no.returncode == 1 and "synthetic PACS schema" in no.stderr, no.stderr
    assert migrator("--config", str(declared), "rehearse", "--scale", "2").returncode == 64

    assert {dsn: state_of(dsn) for dsn in before} == before


def test_the_workload_check_finds_writes_that_did_not_arrive(
        legacy: str, admin_dsn: str, make_db: Callable[[str], str]) -> None:
    workload = GenericWorkload(legacy, TableFilter(), GenericSpec(writers=2, rate=200))
    workload.start()
    time.sleep(2)
    stats = workload.stop()
    assert stats.committed > 0 and stats.workers_lost == 0
    copy_dsn = make_db("copy")
    name = psycopg.conninfo.conninfo_to_dict(copy_dsn)["dbname"]
    run_sql(copy_dsn, "SELECT 1")  # the database exists; replace it with a clone of the legacy one
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("DROP DATABASE {} WITH (FORCE)").format(psycopg.sql.Identifier(name)))
        conn.execute(psycopg.sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            psycopg.sql.Identifier(name),
            psycopg.sql.Identifier(str(psycopg.conninfo.conninfo_to_dict(legacy)["dbname"]))))
    try:
        clean = workload.check(copy_dsn, legacy)
        assert clean.ok and clean.checked > 0, clean.to_dict()
        # The copies the workload inserted (under new text keys) go missing, or hold something else.
        with psycopg.connect(copy_dsn, autocommit=True) as conn:
            conn.execute("SET session_replication_role = replica")  # foreign keys aside: this is the damage
            lost = conn.execute("DELETE FROM clinic.department WHERE code LIKE '2.25.%'").rowcount
            changed = conn.execute("UPDATE clinic.visit SET notes = 'tampered' WHERE site LIKE '2.25.%'").rowcount
        found = workload.check(copy_dsn, legacy)
    finally:
        workload.remove_ledgers()
    assert lost + changed > 0
    assert (found.missing, found.different) == (lost, changed), found.to_dict()
    assert not found.ok and found.resurrected == found.miscounted == 0


LOAD_TOOL = """
import sys, time, psycopg
with psycopg.connect(sys.argv[1], autocommit=True) as conn:
    while True:
        conn.execute("INSERT INTO clinic.event_log VALUES (now(), 'site load', 1)")
        time.sleep(0.02)
"""


def test_the_sites_own_load_tool_runs_until_the_cutover_and_the_full_verify_checks(
        legacy: str, target_dsn: str, tmp_path: Path) -> None:
    tool = tmp_path / "load.py"
    tool.write_text(LOAD_TOOL)
    config = write_config(tmp_path / "rehearsal.toml", legacy, target_dsn, REHEARSAL + "test_databases = true\n")

    run = migrator("--config", str(config), "rehearse", "--workload-command", f"{sys.executable} {tool} '{legacy}'",
                   "--json", timeout=300)

    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert report["ok"] and report["parity"]["identical"]
    assert report["workload"]["ended_early"] is False and report["workload"]["exit"] == -signal.SIGTERM
    assert report["workload_check"] == {"by": "full verify"}
    written = fetch(legacy, "SELECT count(*) FROM clinic.event_log WHERE what = 'site load'")[0][0]
    assert written > 0 and fetch(target_dsn, "SELECT count(*) FROM clinic.event_log WHERE what = 'site load'") \
        == [(written,)]
