"""The target's schema, taken from the source with PostgreSQL's own pg_dump and pg_restore.

Loaded the way pg_restore loads a dump: `pre-data` (types, functions, tables, sequences) at prepare, before any
row arrives; `post-data` (indexes, constraints, foreign keys, the application's own triggers, and the REFRESH that
populates each materialized view the source has populated) after the bulk copy. Post-data splits in two parts when
the copied rows were read under different snapshots (`part`): the items that hold for any mix of rows each read
under some snapshot of the source (primary keys: key-range chunks partition the key, and after block chunks of
several snapshots copy keeps one row per key before building it; indexes that are not unique;
check constraints; triggers; rules; policies) and the ones that relate rows to other rows, which only hold once the
target is the source as of one snapshot (unique and exclusion indexes and constraints, foreign keys, and the items
that depend on them or read rows: index attachments of partitions, comments, REFRESH of materialized views).
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
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import psycopg
from psycopg import sql

from migrator import db
from migrator.config import CAPTURE_SCHEMA
from migrator.errors import Interrupted, MigratorError, ToolMissing
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


Part = Literal["all", "immediate", "deferred"]
"""Which post-data items a restore takes: all of them; those that hold for rows read under different snapshots; or
the others, which relate rows to each other (see the module's docstring)."""

_MISSING_HINT = "Fix the cause named above (objects the target lacks, such as roles or extensions) and run the command again."
_BROKEN = re.compile(r"violates|could not create (unique index|exclusion constraint)|conflicting key value")
_BROKEN_HINT = ("The target's rows break a constraint or unique index (named above) that holds on the legacy database, "
                "and post-data that relates rows is restored only once the target holds the source's rows as of one "
                "snapshot: the rows differ from the source's (written on the target by hand, say). Run `migrator "
                "verify`, copy the tables it names again (`migrator copy --tables ...`), then `migrator sync`.")


def _hint(errors: str) -> str:
    """What to do about a failed restore: rows that break a constraint are a difference to find; anything else is
    an object the target lacks."""
    return _BROKEN_HINT if _BROKEN.search(errors) else _MISSING_HINT


def _run(args: list[str], env: dict[str, str], what: str) -> str:
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise MigratorError(f"{what} failed: {scrub(proc.stderr.strip())[-2000:]}", hint=_hint(proc.stderr))
    return proc.stdout


_ITEM = re.compile(r"^\s*\d+;\s+(\d+)\s+(\d+)\s+(.*)$")
"""A line of `pg_restore -l`: "218; 1259 16430 INDEX public name owner" (dump id; catalog table and oid; type,
schema, name, owner)."""
_RELATING_TYPES = ("FK CONSTRAINT", "INDEX ATTACH", "COMMENT", "SECURITY LABEL", "MATERIALIZED VIEW DATA")
"""Post-data item types that wait for one snapshot whatever their object: foreign keys; attachments of partitions'
indexes (a unique one's partition index may wait); comments and labels (their object may wait); REFRESH (it reads
rows of several tables). They carry no catalog oid to tell their object by, apart from foreign keys."""
_RELATING_OBJECTS = """
SELECT 'pg_class'::regclass::oid::bigint, i.indexrelid::bigint,
       format('%s index %I.%I on %I.%I', CASE WHEN i.indisexclusion THEN 'exclusion' ELSE 'unique' END,
              n.nspname, c.relname, tn.nspname, t.relname)
  FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace
  JOIN pg_class t ON t.oid = i.indrelid JOIN pg_namespace tn ON tn.oid = t.relnamespace
 WHERE (i.indisunique AND NOT i.indisprimary) OR i.indisexclusion
UNION ALL
SELECT 'pg_constraint'::regclass::oid::bigint, k.oid::bigint,
       format('%s %I on %I.%I', CASE k.contype WHEN 'u' THEN 'unique constraint' WHEN 'x' THEN 'exclusion constraint'
                                               ELSE 'foreign key' END, k.conname, n.nspname, t.relname)
  FROM pg_constraint k JOIN pg_class t ON t.oid = k.conrelid JOIN pg_namespace n ON n.oid = t.relnamespace
 WHERE k.contype IN ('u', 'x', 'f')
"""
"""The source's objects that relate rows, by (catalog table, oid) as `pg_restore -l` names them: unique indexes other
than primary keys (key-range chunks partition the key, and copy keeps one row per key of block chunks read under
several snapshots before the primary key is built), exclusion
indexes, and unique, exclusion and foreign-key constraints; each described for the operator."""


def _relating(source_dsn: str) -> dict[tuple[int, int], str]:
    with db.session(source_dsn, role="source", autocommit=True) as conn:
        return {(int(r[0]), int(r[1])): str(r[2]) for r in conn.execute(_RELATING_OBJECTS).fetchall()}


def _describe(line: str, relating: dict[tuple[int, int], str]) -> str | None:
    """How an item of the list is described when it relates rows (see `Part`); None for an item that does not."""
    m = _ITEM.match(line)
    if m is None:
        return None
    described = relating.get((int(m[1]), int(m[2])))
    if described is not None:
        return described
    kind = next((t for t in _RELATING_TYPES if m[3].startswith(t + " ")), None)
    if kind is None:
        return None
    # "COMMENT public INDEX name owner": the type in lower case, the rest without its owner.
    return kind.lower() + " " + m[3][len(kind) + 1:].rsplit(" ", 1)[0]


def _filtered_list(pg_restore: str, dump: Path, env: dict[str, str], part: Part,
                   relating: dict[tuple[int, int], str]) -> tuple[Path, list[str], list[str]]:
    """The restore list without the engine's triggers, narrowed to `part`; with the descriptions of the relating
    items it kept and of those it left out."""
    listing = _run([pg_restore, "-l", str(dump)], env, "pg_restore -l")
    kept, taken, left = [], [], []
    for line in listing.splitlines():
        fields = line.split()
        # "218; 2620 16421 TRIGGER public pp_a _migrator_capture postgres": drop the engine's triggers.
        if " TRIGGER " in line and any(f.startswith(TRIGGER_PREFIX) for f in fields[4:]):
            continue
        described = _describe(line, relating) if part != "all" else None
        if part == "immediate" and described is not None:
            left.append(described)
            continue
        if part == "deferred" and described is None and _ITEM.match(line):
            continue
        if described is not None:
            taken.append(described)
        kept.append(line)
    out = dump.with_suffix(".list")
    out.write_text("\n".join(kept) + "\n")
    return out, taken, left


def load_section(source_dsn: str, target_dsn: str, section: str, *, jobs: int = 1,
                 tables: list[tuple[str, str]] | None = None, part: Part = "all",
                 stop: threading.Event | None = None, resumable: bool = False) -> list[str]:
    """Dump one section of the source's schema and restore it into the target (in a single transaction with one job
    and the whole section).

    With `jobs` > 1 the items are restored in parallel (`pg_restore -j`), each committing on its own; a run after
    a killed one finds some already created, and only "already exists" errors are tolerated. `tables` ((schema,
    name) pairs) narrows the dump to those tables and what belongs to them (owned sequences; in post-data their
    indexes, constraints and triggers). `part` narrows post-data to the items that hold for rows read under
    different snapshots ("immediate") or to the others ("deferred"); a part is always restored item by item,
    tolerating items already there (a restore that was stopped or killed is run again), and so is the whole section
    when `resumable` (some items may be there already). `stop` ends a restore early (Interrupted; what committed
    stays).

    Returns the descriptions of the items that relate rows: those left out ("immediate") or restored ("deferred");
    an empty list for "all".
    """
    log = get(phase="schema", section=section, tables=len(tables) if tables is not None else None, part=part)
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
        listing, taken, left = _filtered_list(pg_restore, dump, src_env, part,
                                              _relating(source_dsn) if part != "all" else {})
        if part == "deferred" and not taken:
            log.info("schema.nothing_deferred")
            return []
        if jobs <= 1 and part == "all" and not resumable:
            _run([pg_restore, "--single-transaction", "--exit-on-error", "--no-owner", "--no-privileges",
                  f"--use-list={listing}", f"--dbname={tgt}", str(dump)], tgt_env, f"pg_restore of {section}")
        else:
            returncode, stderr = _restore([pg_restore, f"--jobs={max(1, jobs)}", "--no-owner", "--no-privileges",
                                           f"--use-list={listing}", f"--dbname={tgt}", str(dump)], tgt_env, stop)
            errors = [line for line in stderr.splitlines() if "ERROR:" in line]
            fatal = [e for e in errors if not _ALREADY_THERE.search(e)]
            if returncode != 0 and (fatal or not errors):
                raise MigratorError(
                    f"pg_restore of {section} failed: {scrub(chr(10).join(fatal) or stderr.strip())[-2000:]}",
                    hint=_hint("\n".join(fatal) or stderr))
            if errors:
                log.info("schema.items_already_there", items=len(errors))
    log.info("schema.loaded", relating=len(taken), left_for_later=len(left))
    return taken if part == "deferred" else left


_OWNED_ITEMS = """
SELECT 'pg_class'::regclass::oid::bigint, i.indexrelid::bigint, i.indrelid, 0::oid FROM pg_index i
UNION ALL
SELECT 'pg_constraint'::regclass::oid::bigint, k.oid::bigint, k.conrelid, k.confrelid FROM pg_constraint k
 WHERE k.conrelid <> 0
UNION ALL
SELECT 'pg_trigger'::regclass::oid::bigint, g.oid::bigint, g.tgrelid, 0::oid FROM pg_trigger g WHERE NOT g.tgisinternal
UNION ALL
SELECT 'pg_rewrite'::regclass::oid::bigint, r.oid::bigint, r.ev_class, 0::oid FROM pg_rewrite r
UNION ALL
SELECT 'pg_policy'::regclass::oid::bigint, p.oid::bigint, p.polrelid, 0::oid FROM pg_policy p
"""
"""Post-data objects by (catalog table, oid) as `pg_restore -l` names them, with the table each belongs to and, for a
foreign key, the table it references."""


class PostDataDump:
    """The source's post-data, dumped once and restored in groups of items (`restore`), each group when the
    tables it needs are in: a table's own items (indexes, its constraints other than foreign keys, triggers, rules,
    policies) by `of_table`; a foreign key once both its tables are (`foreign_keys`); the rest (`others`: comments,
    index attachments, materialized views' data) last. The engine's capture triggers are left out."""

    def __init__(self, source_dsn: str, target_dsn: str, workdir: Path) -> None:
        self.pg_restore = tool("pg_restore")
        src, src_env = _libpq_env(source_dsn)
        self.tgt, self.tgt_env = _libpq_env(target_dsn)
        self.dump = workdir / "post-data.dump"
        _run([tool("pg_dump"), "--format=custom", "--section=post-data", f"--exclude-schema={CAPTURE_SCHEMA}",
              "--no-owner", "--no-privileges", f"--file={self.dump}", f"--dbname={src}"], src_env,
             "pg_dump of the source schema")
        with db.session(source_dsn, role="source", autocommit=True) as conn:
            owners = {(int(r[0]), int(r[1])): (int(r[2]), int(r[3])) for r in conn.execute(_OWNED_ITEMS).fetchall()}
            names = {int(r[0]): (str(r[1]), str(r[2])) for r in conn.execute(
                "SELECT c.oid, n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.relkind IN ('r', 'p', 'm')").fetchall()}
        self.of_table: dict[tuple[str, str], list[str]] = {}
        self.foreign_keys: list[tuple[str, set[tuple[str, str]]]] = []
        self.others: list[str] = []
        for line in _run([self.pg_restore, "-l", str(self.dump)], src_env, "pg_restore -l").splitlines():
            m = _ITEM.match(line)
            if m is None:
                continue
            if " TRIGGER " in line and any(f.startswith(TRIGGER_PREFIX) for f in line.split()[4:]):
                continue
            owner = owners.get((int(m[1]), int(m[2])))
            table = names.get(owner[0]) if owner else None
            if owner is None or table is None:
                self.others.append(line)
            elif owner[1]:
                referenced = names.get(owner[1])
                self.foreign_keys.append((line, {table, referenced} if referenced else {table}))
            else:
                self.of_table.setdefault(table, []).append(line)

    def restore(self, lines: list[str], *, jobs: int = 1, stop: threading.Event | None = None) -> None:
        """Restore these items of the dump, item by item, tolerating items already there (a run killed before)."""
        if not lines:
            return
        with tempfile.NamedTemporaryFile("w", prefix="migrator-list-", suffix=".list", dir=self.dump.parent,
                                         delete=False) as f:
            f.write("\n".join(lines) + "\n")
        # No more jobs than items: each job is a process and a session of its own.
        returncode, stderr = _restore([self.pg_restore, f"--jobs={max(1, min(jobs, len(lines)))}", "--no-owner",
                                       "--no-privileges", f"--use-list={f.name}", f"--dbname={self.tgt}",
                                       str(self.dump)], self.tgt_env, stop)
        fatal = [e for e in stderr.splitlines() if "ERROR:" in e and not _ALREADY_THERE.search(e)]
        if returncode != 0 and (fatal or "ERROR:" not in stderr):
            raise MigratorError(f"pg_restore of post-data failed: {scrub(chr(10).join(fatal) or stderr.strip())[-2000:]}",
                                hint=_hint("\n".join(fatal) or stderr))


def _restore(args: list[str], env: dict[str, str], stop: threading.Event | None) -> tuple[int, str]:
    """Run pg_restore to its end, or until `stop` is set: then SIGTERM, on which it cancels its statements on the
    server (an item in progress rolls back), and Interrupted."""
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while True:
            try:
                _, stderr = proc.communicate(timeout=0.5)
                return proc.returncode, stderr
            except subprocess.TimeoutExpired:
                if stop is not None and stop.is_set():
                    proc.terminate()
                    proc.communicate()
                    raise Interrupted("stopped while pg_restore restored post-data; the items it finished are "
                                      "kept, and the rest is restored when the command runs again") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


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
