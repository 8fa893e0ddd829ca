"""The target's schema, taken from the source with PostgreSQL's own pg_dump and pg_restore.

Loaded the way pg_restore loads a dump: `pre-data` (types, functions, tables, sequences) at prepare, before any
row arrives; `post-data` (indexes, constraints, foreign keys, the application's own triggers) after the bulk copy.
The engine's own objects never reach the target: the capture schema is excluded from the dump and the capture
triggers on the application's tables are filtered out of the restore list.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg

from migrator.config import CAPTURE_SCHEMA, redact
from migrator.errors import MigratorError, ToolMissing
from migrator.log import get

TRIGGER_PREFIX = "_migrator_"


def _tool(name: str) -> str:
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
            f"{what} failed: {redact(proc.stderr.strip())[-2000:]}",
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


def load_section(source_dsn: str, target_dsn: str, section: str) -> None:
    """Dump one section of the source's schema and restore it into the target in a single transaction."""
    log = get(phase="schema", section=section)
    pg_dump, pg_restore = _tool("pg_dump"), _tool("pg_restore")
    src, src_env = _libpq_env(source_dsn)
    tgt, tgt_env = _libpq_env(target_dsn)
    with tempfile.TemporaryDirectory(prefix="migrator-schema-") as tmp:
        dump = Path(tmp) / "schema.dump"
        _run([pg_dump, "--format=custom", "--schema-only", f"--section={section}",
              f"--exclude-schema={CAPTURE_SCHEMA}", "--no-owner", "--no-privileges",
              f"--file={dump}", f"--dbname={src}"], src_env, "pg_dump of the source schema")
        listing = _filtered_list(pg_restore, dump, src_env)
        _run([pg_restore, "--single-transaction", "--exit-on-error", "--no-owner", "--no-privileges",
              f"--use-list={listing}", f"--dbname={tgt}", str(dump)], tgt_env, f"pg_restore of {section}")
    log.info("schema.loaded")
