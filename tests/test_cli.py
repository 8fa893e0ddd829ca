"""The command line as an operator (or a script) meets it: configuration, exit codes, secrets, logs, re-runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from migrator.config import redact
from tests.helpers import fetch, run_sql

MIGRATOR = str(Path(sys.executable).with_name("migrator"))
SECRET = "S3cretPw"
UNREACHABLE_URI = f"postgresql://postgres:{SECRET}@127.0.0.1:5433/x"
UNREACHABLE_KV = f"host=127.0.0.1 port=5433 dbname=x user=postgres password={SECRET}"


def write_config(path: Path, source_dsn: str, target_dsn: str, extra: str = "") -> Path:
    path.write_text(f"[source]\ndsn = {json.dumps(source_dsn)}\n[target]\ndsn = {json.dumps(target_dsn)}\n{extra}")
    return path


def migrator(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the console script without a terminal; the environment carries no MIGRATOR_* unless given."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MIGRATOR_")}
    return subprocess.run([MIGRATOR, *args], env=base | (env or {}), cwd=cwd, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)


def schema_exists(dsn: str, name: str) -> bool:
    return bool(fetch(dsn, "SELECT count(*) FROM pg_namespace WHERE nspname = %s", (name,))[0][0])


# --- configuration ------------------------------------------------------------------------------------------------

def test_environment_dsns_override_the_configuration_file(
        source_dsn: str, target_dsn: str, tmp_path: Path) -> None:
    config = write_config(tmp_path / "migration.toml", UNREACHABLE_URI, UNREACHABLE_URI)
    run_sql(source_dsn, "CREATE TABLE public.patient (id int PRIMARY KEY, mrn text)")
    env = {"MIGRATOR_SOURCE_DSN": source_dsn, "MIGRATOR_TARGET_DSN": target_dsn}

    status = migrator("--config", str(config), "status", "--json", env=env)
    inspect = migrator("--config", str(config), "inspect", "--json", env=env)

    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["phase"] == "not prepared"
    assert inspect.returncode == 0, inspect.stderr
    assert [(t["schema"], t["name"]) for t in json.loads(inspect.stdout)["tables"]] == [("public", "patient")]
    # Without the file at all, the environment alone is enough.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert migrator("status", "--json", env=env, cwd=empty).returncode == 0


def test_missing_configuration_is_a_clear_error_with_exit_code_2(tmp_path: Path) -> None:
    named = migrator("--config", str(tmp_path / "nope.toml"), "status")
    default = migrator("status", cwd=tmp_path)
    only_source = migrator("status", cwd=tmp_path, env={"MIGRATOR_SOURCE_DSN": UNREACHABLE_URI})

    for proc in (named, default, only_source):
        assert proc.returncode == 2
        assert "not found" in proc.stderr and "migration.toml" in proc.stderr
        assert "what to do:" in proc.stderr and "MIGRATOR_SOURCE_DSN" in proc.stderr
        assert "Traceback" not in proc.stderr
    assert "nope.toml" in named.stderr


def test_unknown_key_in_the_configuration_is_named(source_dsn: str, target_dsn: str, tmp_path: Path) -> None:
    config = write_config(tmp_path / "migration.toml", source_dsn, target_dsn, "[cutover]\nswitch_comand = 'x'\n")
    proc = migrator("--config", str(config), "status")
    assert proc.returncode == 2 and "switch_comand" in proc.stderr and "[cutover]" in proc.stderr


# --- secrets ------------------------------------------------------------------------------------------------------

def test_passwords_are_never_printed_when_a_database_is_unreachable(target_dsn: str, tmp_path: Path) -> None:
    once = "[sync]\nconnect_retries = 1\n"  # sync's retry, its message included, without half a minute of backoff
    both_uri = write_config(tmp_path / "uri.toml", UNREACHABLE_URI, UNREACHABLE_URI, once)
    both_kv = write_config(tmp_path / "kv.toml", UNREACHABLE_KV, UNREACHABLE_KV, once)
    source_only = write_config(tmp_path / "source.toml", UNREACHABLE_URI, target_dsn, once)
    commands = [["inspect"], ["status"], ["status", "--json"], ["sync"], ["sync", "--check-lag", "5"],
                ["prepare", "--yes"], ["copy"], ["cutover", "--yes"]]
    runs = [(both_uri, args) for args in commands] + [(both_kv, args) for args in (["inspect"], ["status"], ["sync"])]
    runs += [(source_only, args) for args in (["status"], ["prepare", "--yes"], ["sync"])]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIGRATOR_")}
    # In parallel: each command starts an interpreter.
    procs = [subprocess.Popen([MIGRATOR, "--config", str(config), *args], env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for config, args in runs]
    results = [p.communicate(timeout=120) for p in procs]

    for (config, args), proc, (stdout, stderr) in zip(runs, procs, results, strict=True):
        what = (config.name, args)
        assert SECRET not in stdout + stderr, what
        assert "Traceback" not in stderr, what
        if config is source_only and args[0] == "status":
            assert proc.returncode == 0, what  # status shows what it can read
            continue
        assert proc.returncode != 0, what
        assert "what to do:" in stderr, what
        assert "5433" in stderr, what  # the message still says which server could not be reached


@pytest.mark.parametrize("text, expected", [
    ("postgresql://postgres:S3cretPw@db.example:5432/pacs", "postgresql://postgres:***@db.example:5432/pacs"),
    ("postgres://u:p%40ss:w0rd@h/db?sslmode=require", "postgres://u:***@h/db?sslmode=require"),
    ("cannot connect: postgresql://:S3cretPw@h/db failed", "cannot connect: postgresql://:***@h/db failed"),
    ("postgresql://postgres@h:5432/db", "postgresql://postgres@h:5432/db"),
    ("host=h port=5432 password=S3cretPw dbname=pacs", "host=h port=5432 password=*** dbname=pacs"),
    ("host=h password='S3cret Pw with \\' quote' dbname=pacs", "host=h password=*** dbname=pacs"),
    ("host=h PASSWORD = S3cretPw dbname=pacs", "host=h PASSWORD = *** dbname=pacs"),
    ("postgresql://h/db?user=u&password=S3cretPw", "postgresql://h/db?user=u&password=***"),
    ("host=h dbname=pacs user=postgres", "host=h dbname=pacs user=postgres"),
])
def test_redact_removes_passwords_from_uri_and_key_value_dsns(text: str, expected: str) -> None:
    assert redact(text) == expected
    assert "S3cret" not in redact(text) and "w0rd" not in redact(text)


def test_redact_handles_several_dsns_in_one_message() -> None:
    text = "source postgresql://a:S3cretPw@h1/x and target host=h2 password=0therPw dbname=y"
    out = redact(text)
    assert "S3cretPw" not in out and "0therPw" not in out
    assert "h1/x" in out and "dbname=y" in out


# --- confirmation -------------------------------------------------------------------------------------------------

def test_prepare_without_yes_and_without_a_terminal_refuses_and_changes_nothing(
        source_dsn: str, target_dsn: str, tmp_path: Path) -> None:
    run_sql(source_dsn, "CREATE TABLE public.patient (id int PRIMARY KEY, mrn text)")
    config = write_config(tmp_path / "migration.toml", source_dsn, target_dsn)

    proc = migrator("--config", str(config), "prepare")

    assert proc.returncode == 1
    assert "confirmation" in proc.stderr and "--yes" in proc.stderr
    assert not schema_exists(source_dsn, "_migrator")
    assert not schema_exists(target_dsn, "migrator_control")
    assert fetch(source_dsn, "SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal") == [(0,)]
    assert fetch(target_dsn, "SELECT count(*) FROM pg_class WHERE relname = 'patient'") == [(0,)]
    for args in (["cutover"], ["release"], ["cleanup"]):
        refused = migrator("--config", str(config), *args)
        assert refused.returncode == 1 and "--yes" in refused.stderr, args


# --- re-runs, status, logs ----------------------------------------------------------------------------------------

def test_status_shows_the_phase_and_every_command_is_rerunnable(
        source_dsn: str, target_dsn: str, tmp_path: Path) -> None:
    run_sql(source_dsn,
            "CREATE TABLE public.patient (id int PRIMARY KEY, mrn text)",
            "INSERT INTO public.patient SELECT g, 'MRN' || g FROM generate_series(1, 100) g")
    config = str(write_config(tmp_path / "migration.toml", source_dsn, target_dsn))

    def run_json(*args: str) -> dict[str, Any]:
        proc = migrator("--config", config, *args, "--json")
        assert proc.returncode == 0, (args, proc.stderr)
        data: dict[str, Any] = json.loads(proc.stdout)
        return data

    assert run_json("status")["phase"] == "not prepared"
    first = run_json("prepare", "--yes")
    assert first["triggers_installed"] == 1 and first["target_schema_created"] is True
    assert run_json("status")["phase"] == "prepared"
    assert [t["table"] for t in run_json("copy")["tables"]] == ["public.patient"]
    run_sql(source_dsn, "INSERT INTO public.patient VALUES (101, 'MRN101')")
    assert run_json("sync")["events"] == 1

    again = run_json("prepare", "--yes")
    assert again["triggers_installed"] == 0 and again["target_schema_created"] is False
    copied_again = run_json("copy")
    assert copied_again["tables"] == [] and copied_again["already_copied"] == ["public.patient"]
    synced_again = run_json("sync")
    assert synced_again["events"] == 0 and synced_again["caught_up"] is True
    status = run_json("status")
    assert status["phase"] == "syncing" and status["frozen"] is False
    assert status["copy"]["copied"] == 1 and status["sync"]["pending_events"] == 0
    assert fetch(target_dsn, "SELECT count(*) FROM public.patient") == [(101,)]
    # The text form says the same.
    copied_text = migrator("--config", config, "copy")
    assert copied_text.returncode == 0 and "copied 0 tables" in copied_text.stdout


def test_logs_on_stderr_are_json_lines_and_never_carry_row_values(
        source_dsn: str, target_dsn: str, tmp_path: Path) -> None:
    run_sql(source_dsn,
            "CREATE TABLE public.patient (id int PRIMARY KEY, name text NOT NULL)",
            "CREATE TABLE public.note (at timestamptz DEFAULT now(), body text)",  # no key: multiset replay
            "INSERT INTO public.patient VALUES (1, 'PATIENT-ZZTOP-COPIED')",
            "INSERT INTO public.note (body) VALUES ('PATIENT-ZZTOP-NOTE')")
    config = str(write_config(tmp_path / "migration.toml", source_dsn, target_dsn,
                              "[cutover]\nswitch_command = 'true'\n"))
    outputs: list[str] = []

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        proc = migrator("--config", config, *args)
        assert proc.returncode == 0, (args, proc.stderr)
        outputs.append(proc.stdout + proc.stderr)
        events = [json.loads(line) for line in proc.stderr.splitlines() if line.strip()]
        assert all("event" in e and "level" in e for e in events), args
        return proc

    run("prepare", "--yes")
    run("copy")
    run_sql(source_dsn,
            "INSERT INTO public.patient VALUES (2, 'PATIENT-ZZTOP')",
            "UPDATE public.patient SET name = 'PATIENT-ZZTOP-RENAMED' WHERE id = 1",
            "INSERT INTO public.note (body) VALUES ('PATIENT-ZZTOP-2')",
            "DELETE FROM public.note WHERE body = 'PATIENT-ZZTOP-NOTE'")
    sync = run("sync")
    run("status")
    run("status", "--json")
    run("cutover", "--yes", "--json")

    assert any(json.loads(line)["event"] == "sync.batch" for line in sync.stderr.splitlines())
    assert fetch(target_dsn, "SELECT name FROM public.patient ORDER BY id") == \
        [("PATIENT-ZZTOP-RENAMED",), ("PATIENT-ZZTOP",)]
    for output in outputs:
        assert "ZZTOP" not in output
