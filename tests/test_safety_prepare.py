"""The operator's ordinary mistakes at prepare, made safe: a second migration from one legacy database, a source role
without the rights prepare needs, a target that is not empty. Each is refused before anything is created."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from migrator import catalog, copy, inspect, prepare, release, state, sync
from migrator import cleanup as cleanup_mod
from migrator.config import Config
from migrator.deltalog import freeze
from migrator.errors import Blocked, ConnectionFailed, NotReady
from tests.helpers import fetch, run_sql

SCHEMA = (
    "CREATE TABLE public.patient (id serial PRIMARY KEY, mrn text NOT NULL, note text)",
    "CREATE TABLE public.audit (at int, what text)",
    "INSERT INTO public.patient (mrn, note) SELECT 'MRN' || g, 'n' || g FROM generate_series(1, 200) g",
    "INSERT INTO public.audit SELECT g, 'a' || g FROM generate_series(1, 20) g",
)


def count(dsn: str, query: str, params: Any = None) -> int:
    return int(fetch(dsn, query, params)[0][0])


def has_schema(dsn: str, name: str) -> bool:
    return bool(count(dsn, "SELECT count(*) FROM pg_namespace WHERE nspname = %s", (name,)))


def capture_triggers(dsn: str) -> int:
    return count(dsn, "SELECT count(*) FROM pg_trigger WHERE tgname LIKE '\\_migrator%%'")


def user_relations(dsn: str) -> int:
    return count(dsn, "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                      "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%%'")


def same_rows(source_dsn: str, target_dsn: str) -> None:
    for q in ("SELECT * FROM public.patient ORDER BY id", "SELECT * FROM public.audit ORDER BY at, what"):
        assert fetch(source_dsn, q) == fetch(target_dsn, q)


def owner_row(dsn: str) -> list[tuple[Any, ...]]:
    return fetch(dsn, "SELECT migration_id, target, created_at FROM _migrator.migration_owner")


# --- one capture, one migration -----------------------------------------------------------------------------------

def test_a_second_migration_from_one_legacy_database_is_refused_and_the_first_loses_nothing(
        make_config: Callable[..., Config], make_db: Callable[[str], str], source_dsn: str, target_dsn: str) -> None:
    first = make_config()
    second_dsn = make_db("dr")
    second = make_config(target={"dsn": psycopg.conninfo.make_conninfo(second_dsn, password="S3cretPw")})
    run_sql(source_dsn, *SCHEMA)
    prepare.prepare(first)
    copy.run(first)
    run_sql(source_dsn, "UPDATE public.patient SET note = 'before the DR prepare' WHERE id <= 50",
            "INSERT INTO public.audit VALUES (100, 'before')")
    triggers, owner = capture_triggers(source_dsn), owner_row(source_dsn)
    migration_id = fetch(target_dsn, "SELECT migration_id FROM migrator_control.migration")[0][0]
    assert owner[0][0] == migration_id

    with pytest.raises(Blocked) as refused:
        prepare.prepare(second)

    message = str(refused.value)
    first_target = f"127.0.0.1:5432/{psycopg.conninfo.conninfo_to_dict(target_dsn)['dbname']}"
    assert f"captured for migration {migration_id} to {first_target}, prepared " in message
    assert "cleanup" in refused.value.hint and first_target in refused.value.hint
    assert "S3cretPw" not in message + refused.value.hint
    assert not has_schema(second_dsn, "migrator_control") and user_relations(second_dsn) == 0, \
        "nothing is created on the second target"
    assert capture_triggers(source_dsn) == triggers and owner_row(source_dsn) == owner
    assert any(f"serves migration {migration_id} to {first_target}" in f.message
               for f in inspect.run(second).by_severity("info"))

    # Sync and cleanup configured for the second target refuse too; cleanup leaves the first one's capture alone.
    with pytest.raises(NotReady, match="not prepared"):
        sync.sync(second)
    with pytest.raises(Blocked, match="cleanup refused: the legacy database is captured for migration") as cleanup:
        cleanup_mod.run(second)
    assert f"`migrator cleanup --migration {migration_id} --yes`" in cleanup.value.hint
    assert capture_triggers(source_dsn) == triggers and owner_row(source_dsn) == owner

    run_sql(source_dsn, "DELETE FROM public.patient WHERE id BETWEEN 60 AND 70",
            "INSERT INTO public.patient (mrn) VALUES ('after')", "DELETE FROM public.audit WHERE at = 3")
    result = sync.sync(first)

    assert result.caught_up and result.events > 0
    same_rows(source_dsn, target_dsn)


def test_sync_and_cleanup_refuse_a_capture_that_another_migration_owns(
        make_config: Callable[..., Config], make_db: Callable[[str], str], source_dsn: str, target_dsn: str) -> None:
    old = make_config()
    new_dsn = make_db("new")
    new = make_config(target={"dsn": new_dsn})
    run_sql(source_dsn, *SCHEMA)
    prepare.prepare(old)
    copy.run(old)
    # The old migration is abandoned: its capture is removed by naming it (its own target is not told), and a new
    # migration starts from the same legacy database.
    with psycopg.connect(target_dsn) as conn:
        old_id = str(state.migration(conn).migration_id)  # type: ignore[union-attr]
    cleanup_mod.run(new, migration=old_id)
    prepare.prepare(new)
    copy.run(new)
    run_sql(source_dsn, "UPDATE public.patient SET note = 'x' WHERE id <= 20", "TRUNCATE public.audit")
    triggers = capture_triggers(source_dsn)
    log = count(source_dsn, "SELECT count(*) FROM _migrator.delta_log")

    # The old migration's target is still prepared and copied: its sync would consume (and truncate) the new one's
    # delta log, its cleanup would drop the new one's triggers.
    with pytest.raises(Blocked, match="sync refused: the legacy database is captured for migration") as refused:
        sync.sync(old)
    assert "new" in refused.value.hint.split("[target]")[1]
    with pytest.raises(Blocked, match="cleanup refused"):
        cleanup_mod.run(old)
    with pytest.raises(Blocked, match="captured for migration"):
        prepare.prepare(old)

    assert capture_triggers(source_dsn) == triggers
    assert count(source_dsn, "SELECT count(*) FROM _migrator.delta_log") == log
    assert sync.sync(new).events == log
    same_rows(source_dsn, new_dsn)

    # Nor may the old migration lift the new one's cutover freeze (clients on both servers: split brain).
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        freeze.freeze(conn, catalog.list_tables(conn, new.tables), lock_timeout=5.0)
    with pytest.raises(Blocked, match="release refused"):
        release.run(old)
    assert fetch(source_dsn, "SELECT frozen FROM _migrator.freeze_state") == [(True,)]


def test_a_capture_without_an_owner_is_adopted_only_by_the_target_it_prepared(
        make_config: Callable[..., Config], make_db: Callable[[str], str], source_dsn: str, target_dsn: str) -> None:
    first = make_config()
    second_dsn = make_db("other")
    second = make_config(target={"dsn": second_dsn})
    run_sql(source_dsn, *SCHEMA)
    prepare.prepare(first)
    copy.run(first)
    # As an older migrator left it: capture installed, no owner recorded.
    run_sql(source_dsn, "DROP TABLE _migrator.migration_owner")

    with pytest.raises(Blocked, match="installed by an earlier migrator version"):
        prepare.prepare(second)
    assert not has_schema(second_dsn, "migrator_control")

    # Its sync too waits for the owner to be recorded: two targets may have been prepared from it.
    with pytest.raises(Blocked, match="records no owning migration"):
        sync.sync(first)
    prepare.prepare(first)  # adopts it
    run_sql(source_dsn, "INSERT INTO public.patient (mrn) VALUES ('adopted')")
    assert owner_row(source_dsn)[0][0] == fetch(target_dsn, "SELECT migration_id FROM migrator_control.migration")[0][0]
    with pytest.raises(Blocked, match="captured for migration"):
        prepare.prepare(second)
    sync.sync(first)
    same_rows(source_dsn, target_dsn)


def test_a_prepared_target_pointed_at_another_legacy_database_is_refused(
        make_config: Callable[..., Config], make_db: Callable[[str], str], source_dsn: str, target_dsn: str) -> None:
    run_sql(source_dsn, *SCHEMA)
    prepare.prepare(make_config())
    copy.run(make_config())
    other = make_db("site2")  # a second site's legacy database, same schema, never captured
    run_sql(other, *SCHEMA)
    moved = make_config(source={"dsn": other})

    with pytest.raises(Blocked, match="holds no capture of its migration"):
        prepare.prepare(moved)
    assert not has_schema(other, "_migrator") and capture_triggers(other) == 0


# --- the source role's rights -------------------------------------------------------------------------------------

@pytest.fixture
def limited_role(admin_dsn: str, source_dsn: str) -> Iterator[tuple[str, str]]:
    """A login role for migrator that owns some of the source's tables, and the application's login role that owns
    the rest; both dropped afterwards."""
    suffix = uuid.uuid4().hex[:8]
    role, app = f"mt_mig_{suffix}", f"mt_app_{suffix}"
    run_sql(admin_dsn, f'CREATE ROLE "{role}" LOGIN', f'CREATE ROLE "{app}" LOGIN')
    try:
        yield role, app
    finally:
        for name in (role, app):
            run_sql(source_dsn, f'REASSIGN OWNED BY "{name}" TO postgres', f'DROP OWNED BY "{name}"')
        run_sql(admin_dsn, f'DROP ROLE "{role}"', f'DROP ROLE "{app}"')


def test_prepare_without_the_rights_it_needs_creates_nothing_and_names_each_grant(
        make_config: Callable[..., Config], source_dsn: str, target_dsn: str,
        limited_role: tuple[str, str]) -> None:
    role, app = limited_role
    run_sql(source_dsn, *SCHEMA,
            f'ALTER TABLE public.patient OWNER TO "{role}"',  # with its sequence
            f'ALTER TABLE public.audit OWNER TO "{app}"', f'GRANT SELECT ON public.audit TO "{role}"',
            'CREATE SEQUENCE public.accession_seq', f'ALTER SEQUENCE public.accession_seq OWNER TO "{app}"',
            'CREATE TABLE public.app_settings (k text)', f'ALTER TABLE public.app_settings OWNER TO "{app}"')
    cfg = make_config(source={"dsn": psycopg.conninfo.make_conninfo(source_dsn, user=role)},
                      tables={"exclude": ["public.app_settings"]})
    dbname = psycopg.conninfo.conninfo_to_dict(source_dsn)["dbname"]
    fixes = {f'GRANT CREATE ON DATABASE "{dbname}" TO "{role}";',  # the _migrator schema
             f'GRANT "{app}" TO "{role}";',  # audit's triggers: ENABLE ALWAYS needs ownership
             f'GRANT SELECT ON SEQUENCE "public"."accession_seq" TO "{role}";',  # cutover reads its position
             f'GRANT SELECT ON "public"."app_settings" TO "{role}";'}  # not migrated, but pg_dump locks it

    report = inspect.run(cfg)

    assert not report.ready
    blockers = report.by_severity("blocker")
    assert {b.message.split("fix: ")[1] for b in blockers} == fixes
    assert {b.table for b in blockers} == {f"database {dbname}", "public.audit", "public.accession_seq",
                                           "public.app_settings"}

    with pytest.raises(Blocked, match="lacks 4 right") as refused:
        prepare.prepare(cfg)

    assert set(refused.value.hint.splitlines()[1:]) == fixes
    assert not has_schema(source_dsn, "_migrator") and capture_triggers(source_dsn) == 0
    assert not has_schema(target_dsn, "migrator_control") and user_relations(target_dsn) == 0

    # The grants named are enough for the whole migration.
    run_sql(source_dsn, *fixes)
    assert inspect.run(cfg).ready
    prepare.prepare(cfg)
    copy.run(cfg)
    run_sql(source_dsn, "UPDATE public.patient SET note = 'granted' WHERE id % 7 = 0")
    # The application, connected as a role of its own (not migrator's, not a superuser), still writes: the capture
    # triggers run as the writer, who may insert into the delta log.
    run_sql(source_dsn, f'GRANT SELECT, UPDATE ON public.patient TO "{app}"')
    run_sql(psycopg.conninfo.make_conninfo(source_dsn, user=app),
            "DELETE FROM public.audit WHERE at > 10", "UPDATE public.patient SET note = 'by the app' WHERE id < 5")
    sync.sync(cfg)
    same_rows(source_dsn, target_dsn)
    assert fetch(target_dsn, "SELECT count(*) FROM public.audit") == [(10,)]


# --- the target ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("foreign", [
    (["CREATE TABLE public.unrelated (x int)"], ["table public.unrelated"]),
    (["CREATE SEQUENCE public.patient_id_seq"], ["sequence public.patient_id_seq"]),  # the source's serial's name
    (["CREATE FUNCTION public.f() RETURNS int LANGUAGE sql AS 'SELECT 1'", "CREATE SCHEMA ris",
      "CREATE TYPE ris.modality AS ENUM ('CT', 'MR')"], ["function public.f", "schema ris", "type ris.modality"]),
], ids=["table", "sequence", "function-schema-type"])
def test_a_target_holding_objects_this_migration_did_not_create_is_refused_before_anything_is_created(
        cfg: Config, source_dsn: str, target_dsn: str, foreign: tuple[list[str], list[str]]) -> None:
    statements, named = foreign
    run_sql(source_dsn, *SCHEMA)
    run_sql(target_dsn, *statements)

    with pytest.raises(Blocked, match=rf"holds {len(named)} object\(s\) this migration did not create") as refused:
        prepare.prepare(cfg)

    assert all(n in str(refused.value) for n in named)
    assert not has_schema(target_dsn, "migrator_control")
    assert not has_schema(source_dsn, "_migrator") and capture_triggers(source_dsn) == 0


def test_a_target_this_migration_prepared_is_prepared_again(cfg: Config, source_dsn: str, target_dsn: str) -> None:
    run_sql(source_dsn, *SCHEMA)
    run_sql(target_dsn, "CREATE EXTENSION pgcrypto")  # the DBA's extension is not a foreign object

    first = prepare.prepare(cfg)
    again = prepare.prepare(cfg)

    assert first.triggers_installed == 2 and first.target_schema_created
    assert again.triggers_installed == 0 and not again.target_schema_created
    copy.run(cfg)
    run_sql(source_dsn, "INSERT INTO public.patient (mrn) VALUES ('again')")
    sync.sync(cfg)
    same_rows(source_dsn, target_dsn)


def test_the_capture_of_an_abandoned_migration_is_removed_only_by_naming_it(
        admin_dsn: str, make_config: Callable[..., Config], source_dsn: str, target_dsn: str, tmp_path: Path) -> None:
    cfg = make_config()
    run_sql(source_dsn, *SCHEMA)
    prepare.prepare(cfg)
    [(migration_id, _, _)] = owner_row(source_dsn)
    run_sql(admin_dsn, f'DROP DATABASE "{psycopg.conninfo.conninfo_to_dict(target_dsn)["dbname"]}" WITH (FORCE)')

    with pytest.raises(ConnectionFailed) as unreachable:
        cleanup_mod.run(cfg)
    assert f"migrator cleanup --migration {migration_id} --yes" in unreachable.value.hint
    other = uuid.uuid4()
    with pytest.raises(Blocked, match=f"not migration {other} but migration {migration_id}"):
        cleanup_mod.run(cfg, migration=str(other))
    assert capture_triggers(source_dsn) == 7

    config = tmp_path / "migration.toml"
    config.write_text(f"[source]\ndsn = {json.dumps(source_dsn)}\n[target]\ndsn = {json.dumps(target_dsn)}\n")
    done = subprocess.run([str(Path(sys.executable).with_name("migrator")), "--config", str(config), "cleanup",
                           "--migration", str(migration_id), "--yes"], capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if not k.startswith("MIGRATOR_")})

    assert done.returncode == 0, done.stderr
    assert capture_triggers(source_dsn) == 0 and not has_schema(source_dsn, "_migrator")
