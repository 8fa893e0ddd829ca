"""The control schema a new target gets from control_schema.sql, and the one alembic makes or upgrades.

The committed script is what alembic's offline mode writes for the revisions now; run on an empty database it makes
the same schema (pg_dump's definition of it) and the same alembic_version rows as alembic run online, without
importing alembic or SQLAlchemy; a control schema an older migrator made is still upgraded by alembic.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from migrator import state
from migrator.config import CONTROL_SCHEMA
from migrator.state import control
from tests.helpers import fetch, run_sql

ROOT = Path(__file__).resolve().parent.parent


def dumped(dsn: str) -> str:
    """The control schema's definition as pg_dump writes it, without the lines that differ between two dumps of the
    same definition (the \\restrict and \\unrestrict lines, whose key is random)."""
    out = subprocess.run(["pg_dump", "--schema-only", f"--schema={CONTROL_SCHEMA}", "--no-owner", "--no-privileges",
                          "--dbname", dsn], check=True, capture_output=True, text=True).stdout
    return "\n".join(line for line in out.splitlines() if not line.startswith(("\\restrict", "\\unrestrict")))


def version_rows(dsn: str) -> set[str]:
    return {str(r[0]) for r in fetch(dsn, f"SELECT version_num FROM {CONTROL_SCHEMA}.alembic_version")}


def test_the_committed_script_is_what_the_revisions_make_now() -> None:
    import alembic

    written = re.search(r"alembic ([\w.]+)\)", control.SCRIPT.read_text())
    if written is None or written[1] != alembic.__version__:
        # Another alembic may word the same statements otherwise; the next test still compares what the script makes.
        pytest.skip(f"{control.SCRIPT.name} was written by alembic {written[1] if written else '?'}, this is "
                    f"{alembic.__version__}")
    assert control.SCRIPT.read_text() == control.offline_script(), (
        f"{control.SCRIPT.name} is not what the revisions in versions/ make now: run `{control.WRITE_COMMAND}` "
        "from the repository's root and commit the file")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert control.SCRIPT.name in project["package-data"]["migrator.state"]


def test_the_script_makes_the_schema_alembic_makes(make_db: Callable[[str], str]) -> None:
    from_script, from_alembic = make_db("script"), make_db("alembic")
    with psycopg.connect(from_script) as conn:
        state.upgrade(conn)
    with psycopg.connect(from_alembic) as conn:
        control.alembic_upgrade(conn)

    assert "CREATE TABLE migrator_control.migration" in dumped(from_script)
    assert dumped(from_script) == dumped(from_alembic)
    assert version_rows(from_script) == version_rows(from_alembic) == control.revisions()[1]


def test_a_new_control_schema_is_made_without_importing_alembic(target_dsn: str) -> None:
    code = ("import sys, threading, psycopg\n"
            "from migrator.state import control\n"
            f"conn = psycopg.connect({target_dsn!r})\n"
            "control.preload_upgrade(conn)\n"
            "threads = [t.name for t in threading.enumerate()]\n"
            "control.upgrade(conn)\n"
            "print(threads, sorted(m for m in ('alembic', 'sqlalchemy') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         check=True, capture_output=True, text=True).stdout
    assert out.strip() == "['MainThread'] []"
    assert version_rows(target_dsn) == control.revisions()[1]


def test_the_script_runs_in_one_transaction(target_dsn: str) -> None:
    # A table of the control schema in the way, before the script has written any alembic_version row.
    run_sql(target_dsn, f"CREATE SCHEMA {CONTROL_SCHEMA}", f"CREATE TABLE {CONTROL_SCHEMA}.flag (name text)")
    with psycopg.connect(target_dsn) as conn, pytest.raises(psycopg.errors.DuplicateTable):
        state.upgrade(conn)

    assert fetch(target_dsn, "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                             "WHERE n.nspname = %s", (CONTROL_SCHEMA,)) == [("flag",)]


@pytest.mark.parametrize("bring_up", [state.upgrade, state.catch_up], ids=["upgrade", "catch_up"])
def test_an_older_control_schema_is_upgraded_by_alembic(
    make_db: Callable[[str], str], bring_up: Callable[[state.Conn], None]
) -> None:
    older, from_script = make_db("older"), make_db("script")
    with psycopg.connect(older) as conn:
        control.alembic_upgrade(conn, "0004")  # as a migrator of revision 0004 (its ancestor 0001 with it) left it
    assert version_rows(older) == {"0004"}
    with psycopg.connect(from_script) as conn:
        state.upgrade(conn)

    with psycopg.connect(older) as conn:
        bring_up(conn)  # the script would fail here: its alembic_version table exists already

    assert version_rows(older) == control.revisions()[1]
    assert dumped(older) == dumped(from_script)
