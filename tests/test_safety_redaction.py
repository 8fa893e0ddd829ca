"""The operator's ordinary mistakes, made safe: no row values in errors and logs, patient keys printed as keyed hashes,
and names holding `%` migrated and verified like any other.

A copy the target refuses names the table and the chunk, never the row (and no traceback); a table keyed by patient
names shows `hmac:...` where a key is printed, the same within a migration and different in another, unless
`--show-values`; a table called `pct%s` migrates, syncs and verifies; and a verify that could not compare a table
records a failure that go/no-go refuses.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import structlog

from migrator import copy, copyplan, gonogo, prepare, state, sync, verify
from migrator import inspect as inspect_mod
from migrator import log as log_mod
from migrator.config import Config
from migrator.errors import MigratorError, ReplayError
from migrator.redaction import KeyMask, database_error, scrub
from tests.helpers import fetch, run_sql
from tests.test_cli import migrator, write_config

NAME = "Jane Testpatient"
PATIENTS = f"""
    CREATE TABLE public.patient (name text PRIMARY KEY, born date NOT NULL, n int NOT NULL);
    INSERT INTO public.patient SELECT 'Patient ' || lpad(g::text, 5, '0'), date '1950-01-01' + g, g
      FROM generate_series(1, 3000) g;
    INSERT INTO public.patient VALUES ('{NAME}', '1961-02-03', 7);
    ANALYZE public.patient;
"""


def _secret_hash(target_dsn: str, value: str) -> str:
    with psycopg.connect(target_dsn) as conn:
        return KeyMask.of(conn).value("text", value)


# --- 8. errors from workers and servers carry no row values ---------------------------------------------------------

def test_copy_refused_by_the_target_names_table_and_chunk_never_the_row_nor_a_traceback(
        source_dsn: str, target_dsn: str, cfg: Config, tmp_path: Path) -> None:
    run_sql(source_dsn, PATIENTS)
    prepare.prepare(cfg)
    # Small chunks: the table is split at sampled names, which are patient data too.
    config = write_config(tmp_path / "migration.toml", source_dsn, target_dsn, "[copy]\nworkers = 1\nchunk_mb = 0.02\n")
    # The new server is stricter than the legacy one.
    run_sql(target_dsn, f"ALTER TABLE public.patient ADD CONSTRAINT no_jane CHECK (name <> '{NAME}')")

    runs = [(how, migrator("--config", str(config), *how))
            for how in (("--log-pretty", "copy"), ("--log-json", "copy"), ("--log-json", "copy", "--json"))]

    for how, proc in runs:
        out = proc.stdout + proc.stderr
        assert proc.returncode == 2, (how, out)
        assert "public.patient" in out and "no_jane" in out and "23514" in out, (how, out)
        assert NAME not in out and "Failing row" not in out and "Patient 0" not in out, (how, out)
        assert "Traceback" not in out, (how, out)
        assert "heap blocks from" in out, (how, out)  # the refused chunk, by its blocks: no key in sight
    error = [line for line in runs[1][1].stderr.splitlines() if '"copy.worker_failed"' in line]
    assert error and json.loads(error[0])["level"] == "error"
    assert fetch(target_dsn, "SELECT count(*) FROM migrator_control.copy_chunk WHERE status = 'pending'")[0][0] >= 1


def test_a_refused_key_range_chunk_is_named_by_keyed_hashes_of_its_bounds(
        source_dsn: str, target_dsn: str, make_config: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # As on a source before PostgreSQL 14: the table is split at sampled names, which are patient data too.
    monkeypatch.setattr(copyplan, "BLOCK_RANGES_FROM", 10**9)
    run_sql(source_dsn, PATIENTS)
    cfg = make_config(copy={"workers": 1, "chunk_mb": 0.02})
    prepare.prepare(cfg)
    run_sql(target_dsn, f"ALTER TABLE public.patient ADD CONSTRAINT no_jane CHECK (name <> '{NAME}')")

    with pytest.raises(MigratorError) as refused:
        copy.run(cfg)

    message = str(refused.value)
    assert "public.patient" in message and "no_jane" in message and "hmac:" in message, message
    assert NAME not in message and "Patient 0" not in message, message


def test_database_errors_and_log_lines_keep_names_and_sqlstate_but_lose_row_values(
        source_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    run_sql(source_dsn, "CREATE TABLE public.p (mrn text PRIMARY KEY, born date CHECK (born > '1900-01-01'))",
            "INSERT INTO public.p VALUES ('MRN-4711', '1970-01-01')")
    failures: list[psycopg.Error] = []
    for statement in ("INSERT INTO public.p VALUES ('MRN-4711', '1980-01-01')",
                      "INSERT INTO public.p VALUES ('MRN-4712', '1800-01-01')",
                      "INSERT INTO public.p VALUES ('MRN-4713', 'Jane-Testpatient')"):
        with pytest.raises(psycopg.Error) as err, psycopg.connect(source_dsn) as conn:
            conn.execute(statement)  # type: ignore[arg-type]
        failures.append(err.value)
    duplicate, check, syntax = failures

    assert database_error(duplicate) == 'duplicate key value violates unique constraint "p_pkey" (SQLSTATE 23505, table p)'
    assert database_error(check) == 'new row for relation "p" violates check constraint "p_born_check" (SQLSTATE 23514)'
    assert database_error(syntax) == 'invalid input syntax for type date: "…" (SQLSTATE 22007)'
    for exc in failures:
        assert "MRN-47" not in database_error(exc) and "1800" not in database_error(exc)
        assert "MRN-47" not in scrub(str(exc)) and "1800" not in scrub(str(exc)) and "Jane" not in scrub(str(exc))
    # A traceback that slips into a log line (an unexpected failure) loses them as well, in JSON and pretty logs.
    before = structlog.get_config()
    try:
        for as_json in (True, False):
            log_mod.configure(json=as_json)
            try:
                raise RuntimeError("wrapped") from check
            except RuntimeError:
                log_mod.get(phase="test").error("test.failed", error=str(check), exc_info=True)
            written = capsys.readouterr().err
            assert "p_born_check" in written and "Traceback" in written
            assert "1800-01-01" not in written and "MRN-4712" not in written and "Failing row" not in written
    finally:
        structlog.configure(**before)


# --- 9. keys that are patient data are printed as keyed hashes ---------------------------------------------------

def test_inspect_flags_a_table_keyed_by_patient_data(source_dsn: str, cfg: Config) -> None:
    run_sql(source_dsn,
            'CREATE TABLE public.visit ("PatientName" text, birth_date date, seq int, '
            'PRIMARY KEY ("PatientName", birth_date, seq))',
            "CREATE TABLE public.record (mrn varchar(20) PRIMARY KEY, note text)",
            "CREATE TABLE public.study (id bigint PRIMARY KEY, patient_name text)",
            "CREATE TABLE public.instance (sop_uid text PRIMARY KEY)")

    report = inspect_mod.run(cfg)

    flagged = {f.table: f.message for f in report.findings if "look like patient data" in f.message}
    assert set(flagged) == {"public.visit", "public.record"}
    assert "PatientName, birth_date" in flagged["public.visit"] and "seq" not in flagged["public.visit"]
    assert all(f.severity == "warning" for f in report.findings if f.table in flagged)


def test_verify_prints_a_patient_name_key_as_a_keyed_hash_unless_show_values(
        source_dsn: str, target_dsn: str, cfg: Config, make_db: Callable[[str], str], tmp_path: Path) -> None:
    run_sql(source_dsn, PATIENTS)
    prepare.prepare(cfg)
    copy.run(cfg)
    run_sql(target_dsn, f"UPDATE public.patient SET n = 8 WHERE name = '{NAME}'")
    config = write_config(tmp_path / "migration.toml", source_dsn, target_dsn)

    text = migrator("--config", str(config), "verify")
    as_json = migrator("--config", str(config), "verify", "--json")
    shown = migrator("--config", str(config), "verify", "--show-values")

    hashed = _secret_hash(target_dsn, NAME)
    assert hashed.startswith("hmac:") and len(hashed) == len("hmac:") + 16
    for proc in (text, as_json):
        assert proc.returncode == 1, proc.stderr
        assert NAME not in proc.stdout + proc.stderr and "1961" not in proc.stdout + proc.stderr
    assert f"name={hashed}" in text.stdout
    difference = json.loads(as_json.stdout)["tables"][0]["differences"][0]
    assert difference == {"kind": "different", "key": {"name": hashed}}
    assert shown.returncode == 1 and f'name="{NAME}"' in shown.stdout
    # The same key hashes alike in every run of this migration (the secret is kept on the target, not on the legacy
    # database), and differently in another migration.
    again = verify.verify(cfg)
    assert f"name={hashed}" in again.render_text() and NAME not in json.dumps(again.to_dict())
    assert fetch(target_dsn, "SELECT count(*) FROM migrator_control.key_secret")[0][0] == 1
    assert fetch(source_dsn, "SELECT count(*) FROM pg_class WHERE relname = 'key_secret'")[0][0] == 0
    other = make_db("other")
    with psycopg.connect(other) as conn:
        state.upgrade(conn)
    assert _secret_hash(other, NAME) != hashed
    # An integer key says nothing about a patient and stays readable.
    with psycopg.connect(target_dsn) as conn:
        assert KeyMask.of(conn).key(("id", "name"), ("bigint", "text"), ("42", NAME)) == f"(id=42, name={hashed})"


def test_a_sync_refused_on_a_patient_keyed_table_names_the_key_as_its_keyed_hash(
        source_dsn: str, target_dsn: str, cfg: Config) -> None:
    run_sql(source_dsn, PATIENTS)
    prepare.prepare(cfg)
    copy.run(cfg)
    run_sql(target_dsn, "ALTER TABLE public.patient ADD CONSTRAINT n_small CHECK (n < 10000)")
    run_sql(source_dsn, f"UPDATE public.patient SET n = 4242424 WHERE name = '{NAME}'")

    with pytest.raises(ReplayError) as err:
        sync.sync(cfg)

    message = str(err.value)
    assert "public.patient" in message and "n_small" in message
    assert f"name={_secret_hash(target_dsn, NAME)}" in message
    assert NAME not in message and "4242424" not in message


# --- 11. names holding % ----------------------------------------------------------------------------------------------

def test_a_table_and_column_named_with_percent_s_migrate_sync_and_verify(
        source_dsn: str, target_dsn: str, cfg: Config) -> None:
    run_sql(source_dsn,
            'CREATE TABLE public."pct%s" (id int PRIMARY KEY, "a%sb" text, "%(x)s" int)',
            """INSERT INTO public."pct%s" SELECT g, 'v' || g, g FROM generate_series(1, 5000) g""",
            'CREATE TABLE public."bag%s" ("a%sb" text)',
            """INSERT INTO public."bag%s" SELECT 'v' || (g % 7) FROM generate_series(1, 100) g""",
            'ANALYZE public."pct%s"')
    prepare.prepare(cfg)
    copy.run(cfg)
    run_sql(source_dsn, """UPDATE public."pct%s" SET "a%sb" = 'changed' WHERE id = 17""",
            """INSERT INTO public."bag%s" VALUES ('new')""")
    sync.sync(cfg)

    for buckets in ("ranges", "hashes"):
        report = verify.verify(cfg, buckets=buckets)  # type: ignore[arg-type]
        assert report.identical, report.render_text()
        assert {t.name for t in report.tables} == {"public.pct%s", "public.bag%s"}

    # A difference is found, named and shown (the paths that list rows and fetch their values).
    run_sql(target_dsn, """UPDATE public."pct%s" SET "a%sb" = 'other' WHERE id = 4000""",
            """DELETE FROM public."bag%s" WHERE "a%sb" = 'new'""")
    report = verify.verify(cfg, show_values=True)
    by_name = {t.name: t for t in report.tables}
    assert [d.key for d in by_name["public.pct%s"].differences] == [("4000",)]
    assert by_name["public.pct%s"].differences[0].target_row == "(4000,other,4000)"
    assert by_name["public.bag%s"].differences[0].source_row == "(new)"

    # A change the target refuses on such a table is named by its key, as anywhere else.
    run_sql(target_dsn, """ALTER TABLE public."pct%s" ADD CONSTRAINT "no%s" CHECK ("a%sb" <> 'refused')""")
    run_sql(source_dsn, """UPDATE public."pct%s" SET "a%sb" = 'refused' WHERE id = 9""")
    with pytest.raises(ReplayError) as err:
        sync.sync(cfg)
    assert "id=9" in str(err.value) and "no%s" in str(err.value)


def test_a_verify_that_could_not_compare_a_table_records_a_failure_go_no_go_refuses(
        source_dsn: str, target_dsn: str, cfg: Config) -> None:
    run_sql(source_dsn, "CREATE TABLE public.study (id int PRIMARY KEY, note text)",
            "INSERT INTO public.study SELECT g, 'n' FROM generate_series(1, 100) g")
    prepare.prepare(cfg)
    copy.run(cfg)
    assert verify.verify(cfg).identical
    assert _verify_item(cfg).state == "pass"
    run_sql(target_dsn, "ALTER TABLE public.study DROP COLUMN note")

    report = verify.verify(cfg)

    assert report.exit_code == 2
    item = _verify_item(cfg)
    assert item.state == "fail" and "could not verify 1 table" in item.detail


def _verify_item(cfg: Config) -> gonogo.Check:
    return next(c for c in gonogo.run(cfg).checks if c.item == "verify")
