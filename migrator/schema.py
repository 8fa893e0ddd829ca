"""The target's schema, taken from the source with PostgreSQL's own pg_dump and pg_restore.

Loaded the way pg_restore loads a dump: `pre-data` (types, functions, tables, sequences) at prepare, before any
row arrives; `post-data` (indexes, constraints, foreign keys, the application's own triggers, and the REFRESH that
populates each materialized view the source has populated) after the bulk copy.
The engine's own objects never reach the target: the capture schema is excluded from the dump and the capture
triggers on the application's tables are filtered out of the restore list. Copy and sync write with
`session_replication_role = replica`, which silences the application's triggers and foreign keys on the target,
except triggers enabled ALWAYS or REPLICA: `silenced` turns those off for one transaction.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from migrator.config import CAPTURE_SCHEMA
from migrator.errors import MigratorError, ToolMissing
from migrator.log import get
from migrator.redaction import scrub

TRIGGER_PREFIX = "_migrator_"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
            return str(candidate)
        raise ToolMissing(f"{name} not found on PATH")
    return path


def _libpq_env(dsn: str) -> tuple[str, dict[str, str]]:
    """A conninfo without the password, and an environment carrying it, so `ps` never shows a secret."""
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    env = dict(os.environ)
    password = info.pop("password", None)
    if password is not None:
        env["PGPASSWORD"] = str(password)
    return psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in info.items() if v is not None}), env


def _run(args: list[str], env: dict[str, str], what: str) -> str:
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise MigratorError(
            f"{what} failed: {scrub(proc.stderr.strip())[-2000:]}",
            hint="Fix the cause named above (objects the target lacks, such as roles or extensions) and run the command again.",
        )
    return proc.stdout


def _filtered_list(pg_restore: str, dump: Path, env: dict[str, str]) -> Path:
    listing = _run([pg_restore, "-l", str(dump)], env, "pg_restore -l")
    kept = []
    for line in listing.splitlines():
        fields = line.split()
        # "218; 2620 16421 TRIGGER public pp_a _migrator_capture postgres": drop the engine's triggers.
        if " TRIGGER " in line and any(f.startswith(TRIGGER_PREFIX) for f in fields[4:]):
            continue
        kept.append(line)
    out = dump.with_suffix(".list")
    out.write_text("\n".join(kept) + "\n")
    return out


def load_section(source_dsn: str, target_dsn: str, section: str, *, jobs: int = 1,
                 tables: list[tuple[str, str]] | None = None) -> None:
    """Dump one section of the source's schema and restore it into the target in a single transaction.

    With `jobs` > 1 the items are restored in parallel (`pg_restore -j`), each committing on its own; a run after
    a killed one finds some already created, and only "already exists" errors are tolerated. `tables` ((schema,
    name) pairs) narrows the dump to those tables and what belongs to them (owned sequences; in post-data their
    indexes, constraints and triggers).
    """
    log = get(phase="schema", section=section, tables=len(tables) if tables is not None else None)
    only = [f"--table={_pattern(schema_name)}.{_pattern(name)}" for schema_name, name in tables or ()]
    pg_dump, pg_restore = tool("pg_dump"), tool("pg_restore")
    src, src_env = _libpq_env(source_dsn)
    tgt, tgt_env = _libpq_env(target_dsn)
    with tempfile.TemporaryDirectory(prefix="migrator-schema-") as tmp:
        dump = Path(tmp) / "schema.dump"
        # post-data without --schema-only: the section then also carries the REFRESH of each populated
        # materialized view (MATERIALIZED VIEW DATA), ordered after the indexes and the views it reads; no table's
        # rows are dumped (they belong to the data section). Pre-data keeps --schema-only, which leaves large
        # objects out (they are not migrated: see inspect's large-objects blocker).
        schema_only = ["--schema-only"] if section != "post-data" else []
        _run([pg_dump, "--format=custom", *schema_only, f"--section={section}",
              f"--exclude-schema={CAPTURE_SCHEMA}", "--no-owner", "--no-privileges", *only,
              f"--file={dump}", f"--dbname={src}"], src_env, "pg_dump of the source schema")
        listing = _filtered_list(pg_restore, dump, src_env)
        if jobs <= 1:
            _run([pg_restore, "--single-transaction", "--exit-on-error", "--no-owner", "--no-privileges",
                  f"--use-list={listing}", f"--dbname={tgt}", str(dump)], tgt_env, f"pg_restore of {section}")
        else:
            proc = subprocess.run([pg_restore, f"--jobs={jobs}", "--no-owner", "--no-privileges",
                                   f"--use-list={listing}", f"--dbname={tgt}", str(dump)],
                                  env=tgt_env, capture_output=True, text=True)
            errors = [line for line in proc.stderr.splitlines() if "ERROR:" in line]
            fatal = [e for e in errors if not _ALREADY_THERE.search(e)]
            if proc.returncode != 0 and (fatal or not errors):
                raise MigratorError(
                    f"pg_restore of {section} failed: {scrub(chr(10).join(fatal) or proc.stderr.strip())[-2000:]}",
                    hint="Fix the cause named above (objects the target lacks, such as roles or extensions) and run "
                         "the command again.",
                )
            if errors:
                log.info("schema.items_already_there", items=len(errors))
    log.info("schema.loaded")


def _pattern(name: str) -> str:
    """A name as a pg_dump pattern matching exactly it: double-quoted, so that case, dots and wildcard characters
    are taken literally."""
    return '"' + name.replace('"', '""') + '"'


_ALREADY_THERE = re.compile(r"already exists|multiple primary keys for table")


Triggers = dict[tuple[str, str], list[tuple[str, bool]]]
"""(schema, table) -> [(trigger, enabled ALWAYS)]"""


def firing_in_replica(cur: psycopg.Cursor[Any]) -> Triggers:
    """The application's triggers on the target that fire even for the replica role (enabled ALWAYS or REPLICA)."""
    cur.execute("SELECT n.nspname, c.relname, t.tgname, t.tgenabled = 'A' FROM pg_trigger t "
                "JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE NOT t.tgisinternal AND t.tgenabled IN ('A', 'R')")
    found: Triggers = {}
    for schema_name, table_name, trigger, always in cur.fetchall():
        found.setdefault((schema_name, table_name), []).append((trigger, always))
    return found


@contextmanager
def silenced(cur: psycopg.Cursor[Any], table: sql.Composable, triggers: list[tuple[str, bool]]) -> Iterator[None]:
    """Disable these triggers of a table for the block, then enable them as they were, in the caller's transaction.

    An error leaves them disabled only until the caller's transaction rolls back, which restores them too.
    """
    for trigger, _ in triggers:
        cur.execute(sql.SQL("ALTER TABLE {} DISABLE TRIGGER {}").format(table, sql.Identifier(trigger)))
    yield
    for trigger, always in triggers:
        cur.execute(sql.SQL("ALTER TABLE {} ENABLE {} TRIGGER {}").format(
            table, sql.SQL("ALWAYS" if always else "REPLICA"), sql.Identifier(trigger)))
