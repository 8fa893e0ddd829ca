"""The control schema itself: where it lives, how a module names one of its tables, and its alembic upgrade.

Every other module of `migrator.state` composes its SQL with `relation`; nothing outside the package touches the
control schema.
"""

from __future__ import annotations

import io
import re
import threading
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from migrator.config import CONTROL_SCHEMA
from migrator.errors import MigratorError, NotReady
from migrator.redaction import scrub

Conn = psycopg.Connection[Any]

SCRIPT = Path(__file__).parent / "control_schema.sql"
"""The control schema at the newest revision, as SQL: what `offline_script` returned when it was last written
(`WRITE_COMMAND`); tests/test_control_schema.py checks that it still does."""
WRITE_COMMAND = "python -m migrator.state --write-sql"
"""How `SCRIPT` is written again (migrator/state/__main__.py), run from the repository's root."""


def relation(name: str) -> sql.Composed:
    """A table of the control schema, as an SQL identifier."""
    return sql.SQL("{}.{}").format(sql.Identifier(CONTROL_SCHEMA), sql.Identifier(name))


def preload_upgrade() -> None:
    """Import alembic (and SQLAlchemy) in a background thread, which is most of `upgrade`'s time (about 0.3 s of a
    core): started first, the import goes on while the caller checks the servers."""
    def load() -> None:
        from alembic import command  # noqa: F401
        from alembic.config import Config  # noqa: F401

    threading.Thread(target=load, name="alembic-import", daemon=True).start()


def revisions() -> tuple[set[str], set[str]]:
    """(every revision, the newest: those no other revision follows), read from versions/ without importing alembic
    (each file names its `revision` and its one `down_revision`, as those here do)."""
    known: set[str] = set()
    follows: set[str] = set()
    for path in (Path(__file__).parent / "versions").glob("*.py"):
        text = path.read_text()
        revision = re.search(r'^revision = "(\w+)"', text, re.M)
        down = re.search(r'^down_revision = "(\w+)"', text, re.M)
        if revision:
            known.add(revision[1])
        if down:
            follows.add(down[1])
    return known, known - follows


def catch_up(conn: Conn) -> None:
    """`upgrade` when the control schema lacks a revision this migrator has (prepared by an older one), waiting at
    most 10 s for its tables' locks; without importing alembic otherwise. Refuses a schema a newer migrator made.
    Commits."""
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT version_num FROM {}").format(relation("alembic_version")))
        have = {str(r[0]) for r in cur.fetchall()}
    conn.rollback()
    known, newest = revisions()
    if have - known:
        raise NotReady(f"the control schema is at revision(s) {', '.join(sorted(have - known))}, newer than this "
                       "migrator knows", hint="Run the migrator version that prepared this migration (or a newer one).")
    if newest and newest <= have:
        return
    conn.execute("SET lock_timeout = '10s'")
    try:
        upgrade(conn)
    except Exception as exc:  # alembic's and SQLAlchemy's errors, a lock wait that timed out among them
        raise MigratorError(f"the control schema could not be brought up to this migrator's revisions: {scrub(str(exc))}",
                            hint="Run the same command again (another migrator process may have held the control "
                                 "tables); if it fails again, run `migrator prepare --yes`, which upgrades it.") from exc
    finally:
        try:
            conn.rollback()
            conn.execute("RESET lock_timeout")
            conn.commit()
        except psycopg.Error:
            pass


def upgrade(conn: Conn) -> None:
    """Create or upgrade the control schema to the newest revision (alembic, on this connection)."""
    from alembic import command
    from alembic.config import Config as AlembicConfig
    from sqlalchemy import create_engine
    from sqlalchemy.pool import StaticPool

    with conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(CONTROL_SCHEMA)))
    conn.commit()
    engine = create_engine("postgresql+psycopg://", creator=lambda: conn, poolclass=StaticPool)
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(Path(__file__).parent))
    with engine.begin() as sa_conn:
        cfg.attributes["connection"] = sa_conn
        command.upgrade(cfg, "heads")
    conn.commit()


def offline_script() -> str:
    """The SQL that makes the control schema on an empty database: every revision, as alembic's offline mode writes
    it (env.py: the schema created first, no BEGIN or COMMIT, alembic_version's rows written as each revision ends),
    after a header that says so. Imports alembic."""
    from alembic import command
    from alembic.config import Config as AlembicConfig

    out = io.StringIO()
    cfg = AlembicConfig(output_buffer=out)
    cfg.set_main_option("script_location", str(Path(__file__).parent))
    command.upgrade(cfg, "heads", sql=True)
    header = ("-- Generated by alembic's offline mode from migrator/state/versions/ (migrator.state.control.offline_script).\n"
              f"-- Not edited by hand: after adding or changing a revision, run `{WRITE_COMMAND}`.\n"
              "-- migrator.state.control.upgrade runs it in one transaction on a target without a control schema,\n"
              "-- and commits (there is no BEGIN or COMMIT here).\n\n")
    return header + out.getvalue().rstrip("\n") + "\n"


def exists(conn: Conn) -> bool:
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{CONTROL_SCHEMA}.migration",))
        row = cur.fetchone()
    return bool(row and row[0])


def drop(conn: Conn) -> None:
    """Drop the control schema and everything in it (`migrator cleanup --drop-control-schema`, after the history was
    written to a file); the caller commits."""
    conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(CONTROL_SCHEMA)))
