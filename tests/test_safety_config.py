"""The operator's ordinary configuration mistakes, made safe: a wrong file is refused whole before anything connects,
the same database is never both source and target, and a password in a malformed DSN never reaches the output."""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pydantic
import pytest

from migrator import copy as copy_mod
from migrator import db, prepare, verify
from migrator.config import Config, CopySettings, from_dict, redact, schema_keys
from migrator.errors import ConfigError
from tests.helpers import fetch, run_sql
from tests.test_cli import migrator, write_config

README = Path(__file__).resolve().parent.parent / "README.md"


def refused(data: dict[str, Any], env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as raised:
        from_dict(data, env=env or {})
    return str(raised.value)


def engine_schemas(dsn: str) -> list[str]:
    rows = fetch(dsn, "SELECT nspname FROM pg_namespace WHERE nspname IN ('_migrator', 'migrator_control')")
    return [r[0] for r in rows]


def dbname(dsn: str) -> str:
    return str(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"])


# --- 5: the file is validated against a typed schema ----------------------------------------------------------------

def test_every_wrong_type_misspelling_and_range_in_the_file_is_named_at_once_with_what_is_allowed() -> None:
    message = refused({
        "source": {"dns": "postgresql://u@legacy/pacs"},
        "target": {"dsn": "postgresql://u@new/pacs"},
        "tables": {"include": "public.*", "exclude": "public.patient", "exlude": ["public.audit"]},
        "tabels": {"include": ["public.*"]},
        "targett": {"dsn": "postgresql://u@new/pacs"},
        "copy": {"workers": "four", "chunk_mb": -1},
        "sync": {"lock_timeout": "2", "poll_interval": 0, "rotate_rows": 1.5},
        "cutover": {"verify": "fulll"},
        "objects": {"workers": 0},
    })

    lines = {line.split(": ", 1)[0].strip(" -"): line for line in message.splitlines()[1:]}
    assert message.startswith("the configuration has 13 problems")
    assert "did you mean dsn?" in lines["[source] dns"]
    assert 'write it as a list: ["public.*"]' in lines["[tables] include"]
    assert "allowed: a list of non-empty strings" in lines["[tables] exclude"]
    assert "did you mean exclude?" in lines["[tables] exlude"]
    assert "did you mean [tables]?" in lines["[tabels]"]
    assert "did you mean [target]?" in lines["[targett]"]
    assert lines["[copy] workers"].endswith('given a string, "four"; allowed: an integer >= 1')
    assert "allowed: a number > 0" in lines["[copy] chunk_mb"]
    assert lines["[sync] lock_timeout"].endswith('given a string, "2"; allowed: a number > 0')
    assert "given an integer, 0; allowed: a number > 0" in lines["[sync] poll_interval"]
    assert "allowed: an integer >= 1" in lines["[sync] rotate_rows"]
    assert 'did you mean full? allowed: one of "none", "counts", "full"' in lines["[cutover] verify"]
    assert "allowed: an integer >= 1" in lines["[objects] workers"]


def test_values_are_not_coerced_but_integers_are_numbers_and_lists_are_lists() -> None:
    cfg = from_dict({"source": {"dsn": "postgresql://u@legacy/pacs"}, "target": {"dsn": "postgresql://u@new/pacs"},
                     "tables": {"include": ["public.*"]}, "copy": {"workers": 3, "chunk_mb": 8, "max_rate": 5},
                     "sync": {"lock_timeout": 2, "warn_stalled_seconds": 0}, "cutover": {"verify": "full"}}, env={})

    assert cfg.tables.include == ("public.*",) and cfg.tables.matches("public", "patient")
    assert not cfg.tables.matches("secret", "patient")
    assert (cfg.copy.workers, cfg.copy.chunk_mb, cfg.sync.lock_timeout, cfg.cutover.verify) == (3, 8, 2, "full")
    assert "[copy] workers: given a boolean, true" in refused(
        {"source": {"dsn": "host=a"}, "target": {"dsn": "host=b"}, "copy": {"workers": True}})
    assert "[tables] include item 1: \"public\" names no table" in refused(
        {"source": {"dsn": "host=a"}, "target": {"dsn": "host=b"}, "tables": {"include": ["public"]}})
    # Built in code, the same schema holds (a test or a benchmark cannot build what the file may not say).
    with pytest.raises(pydantic.ValidationError):
        CopySettings(workers=0)
    with pytest.raises(pydantic.ValidationError):
        dataclasses.replace(cfg.sync, poll_interval=-1.0)
    assert "pgbouncer_admin_dsn needs pooler_databases and pgbouncer_ini" in refused(
        {"source": {"dsn": "host=a"}, "target": {"dsn": "host=b"},
         "cutover": {"pgbouncer_admin_dsn": "postgresql://pgbouncer@127.0.0.1:6432/pgbouncer"}})


def test_environment_dsns_replace_the_files_whole_and_are_validated_like_it() -> None:
    file = {"source": {"dsn": "postgresql://u@legacy/pacs"}, "target": {"dsn": "postgresql://u@new/pacs"}}

    cfg = from_dict(file, env={"MIGRATOR_TARGET_DSN": "host=other dbname=pacs", "MIGRATOR_SOURCE_DSN": " "})

    assert (cfg.source_dsn, cfg.target_dsn) == ("postgresql://u@legacy/pacs", "host=other dbname=pacs")
    assert cfg == from_dict({"target": {"dsn": "host=other dbname=pacs"}, "source": file["source"]}, env={})
    assert refused(file, {"MIGRATOR_SOURCE_DSN": "host=h password=a b"}).startswith(
        "the configuration: MIGRATOR_SOURCE_DSN: libpq cannot parse it")
    assert refused({"target": file["target"]}) == \
        "the configuration: [source] dsn: missing; set it in the file or in MIGRATOR_SOURCE_DSN"
    assert "MIGRATOR_TARGET_DNS is not read; did you mean MIGRATOR_TARGET_DSN?" in refused(
        file, {"MIGRATOR_TARGET_DNS": "host=other dbname=pacs"})


def test_a_wrong_configuration_stops_every_command_before_it_connects_or_asks(
        source_dsn: str, target_dsn: str, tmp_path: Path) -> None:
    run_sql(source_dsn, "CREATE SCHEMA secret", "CREATE TABLE secret.notes (id int PRIMARY KEY, body text)",
            "CREATE TABLE public.patient (id int PRIMARY KEY)")
    config = str(write_config(tmp_path / "migration.toml", source_dsn, target_dsn,
                              '[tables]\ninclude = "public.*"\n[copy]\nworkers = "four"\n'))
    commands = [["prepare"], ["prepare", "--yes"], ["copy"], ["sync"], ["verify"], ["status"], ["inspect"],
                ["cutover", "--check"], ["cleanup", "--yes"], ["release"], ["rollback", "--yes"],
                ["objects", "sync"]]

    with ThreadPoolExecutor(len(commands)) as pool:  # each command starts an interpreter
        runs = list(pool.map(lambda command: migrator("--config", config, *command), commands))
    for command, run in zip(commands, runs, strict=True):
        assert run.returncode == 2, (command, run.stderr)
        assert run.stderr.startswith(f"error: {config} has 2 problems:\n"), (command, run.stderr)
        assert "[tables] include: given a string" in run.stderr and "[copy] workers" in run.stderr
        assert "what to do: " in run.stderr and "Traceback" not in run.stderr
    assert engine_schemas(source_dsn) == [] and engine_schemas(target_dsn) == []


def test_the_readme_configuration_block_has_every_key_of_the_schema_and_validates() -> None:
    text = README.read_text()
    section = text.split("## Configuration (`migration.toml`)", 1)[1]
    block = re.search(r"```toml\n(.*?)```", section, re.S)
    assert block is not None
    data = tomllib.loads(block.group(1))

    assert {name: set(keys) for name, keys in data.items()} == {name: set(k) for name, k in schema_keys().items()}
    from_dict(data, env={})


# --- 6: source and target are never the same database ---------------------------------------------------------------

def test_the_same_database_spelled_two_ways_is_refused_by_prepare_and_nothing_is_created(
        source_dsn: str, tmp_path: Path) -> None:
    name = dbname(source_dsn)
    as_uri = f"postgresql://postgres@localhost/{name}"
    as_keywords = f"host=127.0.0.1 port=5432 dbname={name} user=postgres"
    run_sql(source_dsn, "CREATE TABLE public.patient (id int PRIMARY KEY)")
    config = str(write_config(tmp_path / "migration.toml", as_uri, as_keywords))

    run = migrator("--config", config, "prepare", "--yes")

    assert run.returncode == 2
    assert f"name the same database (localhost:5432/{name})" in run.stderr
    assert engine_schemas(source_dsn) == []
    # Spelled so that the text cannot tell (a Config built in code skips the file's check), the connected check
    # refuses prepare, copy and verify before anything is created.
    same = Config(source_dsn=as_uri, target_dsn=as_keywords)
    for phase in (prepare.prepare, copy_mod.run, verify.verify):
        with pytest.raises(ConfigError, match=f"the source and the target are the same database \\({name} "):
            phase(same)  # type: ignore[operator]
    assert engine_schemas(source_dsn) == []


def test_the_connected_check_tells_databases_apart_not_roles(source_dsn: str, target_dsn: str) -> None:
    db.refuse_same_database(source_dsn, target_dsn)  # two databases of one server: fine
    other_user = f"mt_role_{uuid.uuid4().hex[:8]}"
    run_sql(source_dsn, f'CREATE ROLE "{other_user}" LOGIN')
    try:
        with pytest.raises(ConfigError):
            db.refuse_same_database(source_dsn, psycopg.conninfo.make_conninfo(source_dsn, user=other_user))
    finally:
        run_sql(source_dsn, f'DROP ROLE "{other_user}"')


# --- 10: passwords in malformed DSNs ----------------------------------------------------------------------------------

def test_redact_removes_passwords_as_written_not_only_as_parsed() -> None:
    tag = uuid.uuid4().hex[:6]  # never registered: only the patterns can catch these
    assert redact(f"postgresql://u:ret{tag}@x@127.0.0.1/db") == "postgresql://u:***@127.0.0.1/db"
    assert redact(f"host=h password=Pw {tag} dbname=d") == "host=h password=*** dbname=d"
    assert redact(f"host=h password='a\\' {tag}' dbname=d") == "host=h password=*** dbname=d"
    assert redact(f"PGPASSWORD={tag}\npg_dump -d x") == "PGPASSWORD=***\npg_dump -d x"
    assert redact(f"from postgresql://u:a{tag}@h1/x to postgresql://v:b{tag}@h2/y") == \
        "from postgresql://u:***@h1/x to postgresql://v:***@h2/y"


def test_every_configured_password_is_redacted_wherever_it_appears() -> None:
    password = f"Pw {uuid.uuid4().hex[:6]}"
    cfg = from_dict({"source": {"dsn": f"host=legacy dbname=pacs password='{password}'"},
                     "target": {"dsn": "postgresql://u@new/pacs"}}, env={})
    tail = password.split()[1]

    assert redact(f'missing "=" after "{tail}" in connection info string') == \
        'missing "=" after "***" in connection info string'
    assert password not in redact(f"{password}!") and cfg.source_dsn.endswith(f"'{password}'")


@pytest.mark.parametrize("how", ["file", "environment"])
def test_a_malformed_dsns_password_and_its_tail_never_reach_the_output(how: str, tmp_path: Path) -> None:
    head, tail = f"hd{uuid.uuid4().hex[:5]}", f"tl{uuid.uuid4().hex[:5]}"
    malformed = {"source": f"postgresql://postgres:{head}@{tail}@127.0.0.1:5433/x",
                 "target": f"host=127.0.0.1 port=5433 dbname=x password={head} {tail}"}
    # Well-formed, quoted, with a space: read whole by libpq; the server is unreachable.
    quoted = f"host=127.0.0.1 port=5433 dbname=x user=postgres password='{head} {tail}'"
    runs = []
    for source, target in ((malformed["source"], malformed["target"]), (quoted, quoted.replace("=x", "=y"))):
        if how == "file":
            write_config(tmp_path / "migration.toml", source, target)
        env = {"MIGRATOR_SOURCE_DSN": source, "MIGRATOR_TARGET_DSN": target} if how == "environment" else {}
        for log in ("--log-json", "--log-pretty"):
            for command in ("status", "inspect"):
                runs.append(migrator(log, command, env=env, cwd=tmp_path))

    for run in runs:
        assert run.returncode == 2, run.stderr
        output = run.stdout + run.stderr
        assert head not in output and tail not in output, output
    assert re.search(r"(\[source\] dsn|MIGRATOR_SOURCE_DSN): a character ends the URI's user:password@ early",
                     runs[0].stderr)
    assert "cannot connect to the source database" in runs[-1].stderr
    events = [json.loads(line)["event"] for line in runs[5].stderr.splitlines() if line.startswith("{")]
    assert events == ["inspect.start"]
