"""Inspect: the readiness report, phase 1 of a migration.

The inspector only reads the legacy database, in one REPEATABLE READ READ ONLY transaction, and changes nothing: it
creates no schema, no trigger and no temporary object. It lists the tables that would migrate (through
`catalog.list_tables`, so it sees them exactly as the later phases will), their keys, user triggers and sizes, the
sequences, and what stands in the way as `Finding`s. A *blocker* means a later phase would lose data or cannot run; a
*warning* needs an operator's decision but does not stop the migration; an *info* is a fact worth knowing. Each
blocker has a stable name (`large-objects`): `check_blockers`, which prepare runs before it creates anything,
refuses while one stands that the operator did not override by name (only those in `OVERRIDABLE` can be).

Nothing in the report carries row values or query text: the legacy database holds patient data.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from migrator import catalog, db, ownership
from migrator.catalog import Sequence, Table
from migrator.config import CAPTURE_SCHEMA, Config, TableFilter
from migrator.errors import Blocked, MigratorError
from migrator.log import get
from migrator.redaction import PLAIN_KEY_TYPES, database_error

Severity = Literal["blocker", "warning", "info"]

MIN_SERVER_VERSION = 130000
"""The capture and replay need xid8, pg_current_xact_id() and pg_visible_in_snapshot(), new in PostgreSQL 13."""
LONG_TRANSACTION_SECONDS = 300.0
IDLE_IN_TRANSACTION_SECONDS = 60.0
_MB = 1024 * 1024
_LOCK_TIMEOUT = "5s"
"""Reading sizes and sequences takes ACCESS SHARE locks; behind pending DDL, fail fast rather than wait unseen."""
_CAPTURE_TRIGGER_PREFIX = "_migrator_capture"
_TRIGGER_STATES = {"O": "enabled", "D": "disabled", "R": "replica", "A": "always"}


@dataclass(frozen=True)
class Finding:
    severity: Severity
    table: str | None
    message: str
    name: str = ""
    """A blocker's stable name (`large-objects`), by which `prepare --override NAME` accepts it when allowed."""


OVERRIDABLE = ("large-objects",)
"""Blockers an operator may accept by name at prepare (`--override NAME`); the override is recorded in the control
schema and shown by `status` and go/no-go. Any other blocker (too old a server, a missing privilege) must be fixed:
going past it would leave a prepare half done."""


@dataclass(frozen=True)
class Trigger:
    name: str
    enabled: str
    """"enabled" (fires in normal sessions), "disabled", "replica" (ENABLE REPLICA) or "always" (ENABLE ALWAYS)."""


@dataclass(frozen=True)
class UnusualColumn:
    name: str
    type: str
    base_type: str
    """The type the values really have: a domain's base type, an array's element type."""
    reason: str


@dataclass(frozen=True)
class TableReport:
    schema: str
    name: str
    est_rows: int
    bytes: int
    key: tuple[str, ...]
    key_source: str
    partition_of: str | None
    triggers: tuple[Trigger, ...] = ()
    unusual_columns: tuple[UnusualColumn, ...] = ()

    @property
    def display(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(frozen=True)
class InspectReport:
    server_version: str
    server_version_num: int
    database_size: int
    tables: tuple[TableReport, ...]
    sequences: tuple[Sequence, ...]
    findings: tuple[Finding, ...]
    assumed_mb_per_s: float
    total_bytes: int = field(init=False)
    """Bytes of the migrating tables, indexes and TOAST included (what the copy reads, roughly)."""
    estimated_copy_seconds: float = field(init=False)

    def __post_init__(self) -> None:
        total = sum(t.bytes for t in self.tables)
        object.__setattr__(self, "total_bytes", total)
        object.__setattr__(self, "estimated_copy_seconds", total / (self.assumed_mb_per_s * _MB))

    @property
    def ready(self) -> bool:
        return not any(f.severity == "blocker" for f in self.findings)

    def by_severity(self, severity: Severity) -> list[Finding]:
        return [f for f in self.findings if f.severity == severity]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ready"] = self.ready
        return data

    def render_text(self) -> str:
        from rich.console import Console
        from rich.table import Table as RichTable

        console = Console(record=True, width=120, file=io.StringIO())
        console.print(
            f"PostgreSQL {self.server_version}, database {_size(self.database_size)}; "
            f"{len(self.tables)} tables ({_size(self.total_bytes)}), {len(self.sequences)} sequences; "
            f"copy estimate {_duration(self.estimated_copy_seconds)} at {self.assumed_mb_per_s:g} MB/s",
            markup=False, highlight=False,
        )
        tables = RichTable(show_lines=False)
        tables.add_column("table", overflow="fold")
        tables.add_column("rows (est.)", justify="right")
        tables.add_column("size", justify="right")
        for heading in ("key", "partition of", "triggers", "unusual columns"):
            tables.add_column(heading, overflow="fold")
        for t in self.tables:
            key = f"{', '.join(t.key)} ({t.key_source})" if t.key else "none"
            triggers = ", ".join(f"{tr.name} ({tr.enabled})" for tr in t.triggers)
            unusual = ", ".join(f"{c.name} {c.type}" for c in t.unusual_columns)
            tables.add_row(t.display, f"{t.est_rows:,}", _size(t.bytes), key, t.partition_of or "", triggers, unusual)
        console.print(tables)
        if self.findings:
            for f in self.findings:
                where = f"{f.table}: " if f.table else ""
                name = f"[{f.name}] " if f.name else ""
                console.print(f"{f.severity.upper():8} {name}{where}{f.message}", markup=False, highlight=False)
        else:
            console.print("No findings.")
        verdict = "READY" if self.ready else f"NOT READY: {len(self.by_severity('blocker'))} blocker(s)"
        console.print(f"{verdict}, {len(self.by_severity('warning'))} warning(s)", markup=False, highlight=False)
        return console.export_text()


def run(cfg: Config, *, assumed_mb_per_s: float = 100.0,
        long_transaction_seconds: float = LONG_TRANSACTION_SECONDS,
        idle_in_transaction_seconds: float = IDLE_IN_TRANSACTION_SECONDS) -> InspectReport:
    """Read the legacy database and report whether it is ready to migrate. Changes nothing."""
    if assumed_mb_per_s <= 0:
        raise ValueError("assumed_mb_per_s must be positive")
    log = get(phase="inspect")
    log.info("inspect.start", source=db.describe_dsn(cfg.source_dsn))
    with db.session(cfg.source_dsn, role="source") as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        try:
            with conn.transaction():
                conn.execute("SELECT set_config('lock_timeout', %s, true)", (_LOCK_TIMEOUT,))
                report = _inspect(conn, cfg.tables, assumed_mb_per_s,
                                  long_transaction_seconds, idle_in_transaction_seconds)
        except psycopg.Error as exc:
            raise MigratorError(
                f"inspecting the source database failed: {database_error(exc)}",
                hint="A lock timeout means DDL is pending on the source; run inspect again once it is done.",
            ) from exc
    log.info("inspect.done", tables=len(report.tables), sequences=len(report.sequences),
             blockers=len(report.by_severity("blocker")), warnings=len(report.by_severity("warning")),
             ready=report.ready)
    return report


def _inspect(conn: psycopg.Connection[Any], tables: TableFilter, assumed_mb_per_s: float,
             long_transaction_seconds: float, idle_in_transaction_seconds: float) -> InspectReport:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute("SELECT current_setting('server_version') AS version, "
                    "current_setting('server_version_num')::int AS num, "
                    "pg_database_size(current_database()) AS size")
        server = cur.fetchone()
        assert server is not None
    migrating = catalog.list_tables(conn, tables)
    oids = [t.oid for t in migrating]
    triggers = _user_triggers(conn, oids)
    unusual = _unusual_columns(conn, oids)

    findings: list[Finding] = []
    findings += version_findings(server["num"], server["version"])
    findings += _role_findings(conn)
    findings += _prepare_findings(conn, migrating, tables)
    findings += _capture_schema_findings(conn)
    findings += _large_object_findings(conn)
    findings += _not_migrated_findings(conn, tables)
    reports = []
    for t in migrating:
        t_triggers = triggers.get(t.oid, ())
        t_unusual = unusual.get(t.oid, ())
        findings += _table_findings(t, t_triggers, t_unusual)
        reports.append(TableReport(
            schema=t.schema, name=t.name, est_rows=t.est_rows, bytes=t.bytes, key=t.key, key_source=t.key_source,
            partition_of=t.partition_of, triggers=t_triggers, unusual_columns=t_unusual,
        ))
    findings += _transaction_findings(conn, long_transaction_seconds, idle_in_transaction_seconds)
    return InspectReport(
        server_version=server["version"], server_version_num=server["num"], database_size=int(server["size"]),
        tables=tuple(reports), sequences=tuple(_listed_sequences(conn, tables)), findings=tuple(findings),
        assumed_mb_per_s=assumed_mb_per_s,
    )


def version_findings(version_num: int, version: str) -> list[Finding]:
    if version_num < MIN_SERVER_VERSION:
        return [Finding("blocker", None,
                        f"PostgreSQL {version} is too old: capture needs 13 or newer (xid8, pg_visible_in_snapshot); "
                        "upgrade the legacy server in place first", "server-version")]
    return []


def _role_findings(conn: psycopg.Connection[Any]) -> list[Finding]:
    row = conn.execute("SELECT current_user, rolsuper, pg_has_role('pg_read_all_stats', 'USAGE') "
                       "FROM pg_roles WHERE rolname = current_user").fetchone()
    assert row is not None
    user, superuser, reads_stats = row
    findings = []
    if not superuser:
        findings.append(Finding(
            "warning", None,
            f"role {user!r} is not a superuser: prepare creates triggers on every migrating table, which needs "
            "ownership of each; run migrator as a superuser or as the tables' owner"))
    if not reads_stats:
        findings.append(Finding(
            "info", None,
            f"role {user!r} sees only its own sessions in pg_stat_activity, so other users' long transactions are "
            "not reported; grant pg_read_all_stats to see them"))
    return findings


def _capture_schema_findings(conn: psycopg.Connection[Any]) -> list[Finding]:
    row = conn.execute("SELECT EXISTS (SELECT FROM pg_namespace WHERE nspname = %s)", (CAPTURE_SCHEMA,)).fetchone()
    if row and row[0]:
        return [Finding("info", None, f"capture schema {CAPTURE_SCHEMA} exists: the database was prepared already")]
    return []


def _large_object_findings(conn: psycopg.Connection[Any]) -> list[Finding]:
    count = catalog.large_object_count(conn)
    if count:
        return [Finding(
            "blocker", None,
            f"{count} large object(s) in pg_largeobject: they are not migrated (lo_write and lo_unlink fire no "
            "trigger, so their changes cannot be captured); move them into bytea columns (or remove them) before "
            "migrating, or, if they need not move with the rows, accept it with `prepare --override large-objects` "
            "(verify then reports the tables with oid/lo columns as not compared)", "large-objects")]
    return []


def blockers(conn: psycopg.Connection[Any]) -> list[Finding]:
    """The blockers `prepare` refuses to go past (unless overridden) and go/no-go checks again before a cutover."""
    row = conn.execute("SELECT current_setting('server_version'), "
                       "current_setting('server_version_num')::int").fetchone()
    assert row is not None
    return version_findings(row[1], row[0]) + _large_object_findings(conn)


def check_blockers(conn: psycopg.Connection[Any], overrides: Iterable[str] = ()) -> list[Finding]:
    """Refuse (Blocked, naming each blocker and what to do) while a blocker stands that the operator did not
    override by name; returns the blockers overridden. Reads only."""
    accepted = set(overrides)
    unknown = accepted - set(OVERRIDABLE)
    if unknown:
        raise Blocked(f"not a blocker that can be overridden: {', '.join(sorted(unknown))}",
                      hint=f"Blockers that can be overridden: {', '.join(OVERRIDABLE)}.")
    found = blockers(conn)
    standing = [f for f in found if f.name not in accepted]
    if standing:
        get(phase="prepare").warning("prepare.refused", blockers=[f.name for f in standing])
        overridable = [f.name for f in standing if f.name in OVERRIDABLE]
        raise Blocked(
            f"{len(standing)} blocker(s) stand, nothing was created: "
            + "; ".join(f"[{f.name}] {f.message}" for f in standing),
            hint="Fix each blocker as its message says and run prepare again"
                 + (f"; or accept {', '.join(overridable)} knowingly with "
                    + " ".join(f"--override {n}" for n in overridable)
                    + " (recorded, and shown by `migrator status` and the cutover's go/no-go)" if overridable else "")
                 + ".")
    return [f for f in found if f.name in accepted]


def _not_migrated_findings(conn: psycopg.Connection[Any], tables: TableFilter) -> list[Finding]:
    findings = []
    for r in catalog.list_relations(conn, tables):
        if r.kind == "foreign table":
            findings.append(Finding("warning", r.display, "foreign table, not migrated: its data lives on another "
                                    "server; the schema creates it, its server and user mapping must work from the "
                                    "target; verify lists it as not compared"))
        elif r.populated:
            findings.append(Finding("info", r.display, "materialized view: copy populates it on the target from the "
                                    "copied tables (REFRESH, after the indexes); it then holds the target's data as "
                                    "of the copy, so REFRESH it after cutover as the application does; verify lists "
                                    "it as not compared"))
    return findings


_TRIGGERS = """
SELECT t.tgrelid::bigint AS oid, t.tgname AS name, t.tgenabled AS enabled
  FROM pg_trigger t
 WHERE t.tgrelid = ANY(%s) AND NOT t.tgisinternal AND left(t.tgname, %s) <> %s
 ORDER BY t.tgrelid, t.tgname
"""


def _user_triggers(conn: psycopg.Connection[Any], oids: list[int]) -> dict[int, tuple[Trigger, ...]]:
    """User triggers per table; the engine's own capture triggers are left out."""
    result: dict[int, list[Trigger]] = {}
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(_TRIGGERS, (oids, len(_CAPTURE_TRIGGER_PREFIX), _CAPTURE_TRIGGER_PREFIX))
        for r in cur.fetchall():
            state = _TRIGGER_STATES.get(r["enabled"]) or str(r["enabled"])
            result.setdefault(r["oid"], []).append(Trigger(r["name"], state))
    return {oid: tuple(ts) for oid, ts in result.items()}


# The type a column's values really are: a domain's base type, then an array's element type. (One level of each;
# domains over domains are rare enough in PACS schemas not to chase.)
_COLUMN_TYPES = """
SELECT a.attrelid::bigint AS oid, a.attname AS name, format_type(a.atttypid, a.atttypmod) AS type,
       b.typname AS base, bn.nspname AS base_schema, b.typtype AS kind, b.oid::bigint AS base_oid,
       (SELECT e.extname FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid
         WHERE d.classid = 'pg_type'::regclass AND d.objid = b.oid
           AND d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e' LIMIT 1) AS extension
  FROM pg_attribute a
  JOIN pg_type t ON t.oid = a.atttypid
  JOIN pg_type dt ON dt.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
  JOIN pg_type b ON b.oid = CASE WHEN dt.typcategory = 'A' AND dt.typelem <> 0 THEN dt.typelem ELSE dt.oid END
  JOIN pg_namespace bn ON bn.oid = b.typnamespace
 WHERE a.attrelid = ANY(%s) AND a.attnum > 0 AND NOT a.attisdropped
 ORDER BY a.attrelid, a.attnum
"""
_FIRST_USER_OID = 16384
_SERVER_LOCAL_TYPES = frozenset({"oid", "xid", "xid8", "cid", "tid", "pg_lsn", "txid_snapshot", "pg_snapshot"})
_REG_TYPE = re.compile(r"reg[a-z]+")


def _unusual_reason(base: str, base_schema: str, kind: str, base_oid: int, extension: str | None) -> str | None:
    """Why a column of this type needs attention on the target, or None when the type is unremarkable."""
    if base_schema == "pg_catalog":
        if base == "money":
            return "its text form depends on lc_monetary; the target must use the same monetary locale"
        if base == "xml":
            return "it has no equality operator: parity checks and keyless replay cannot compare its values"
        if base in _SERVER_LOCAL_TYPES or _REG_TYPE.fullmatch(base):
            return "its values name objects or positions of the legacy server, which differ on the target"
        return None
    if kind == "b" and base_oid >= _FIRST_USER_OID:
        if extension:
            return f"the type comes from extension {extension}: install the same version on the target"
        return "a user-defined base type: the target needs the same input and output functions"
    return None


def _unusual_columns(conn: psycopg.Connection[Any], oids: list[int]) -> dict[int, tuple[UnusualColumn, ...]]:
    result: dict[int, list[UnusualColumn]] = {}
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(_COLUMN_TYPES, (oids,))
        for r in cur.fetchall():
            reason = _unusual_reason(r["base"], r["base_schema"], r["kind"], r["base_oid"], r["extension"])
            if reason:
                result.setdefault(r["oid"], []).append(UnusualColumn(r["name"], r["type"], r["base"], reason))
    return {oid: tuple(cs) for oid, cs in result.items()}


def _table_findings(t: Table, triggers: tuple[Trigger, ...], unusual: tuple[UnusualColumn, ...]) -> list[Finding]:
    findings = []
    if t.unlogged:
        findings.append(Finding(
            "info", t.display,
            "unlogged table: migrated like any table (captured, copied, replayed, verified); a crash of the legacy "
            "server empties it without firing a trigger, so verify would then find its rows extra on the target "
            "(`copy --tables` copies it again)"))
    if not t.key:
        findings.append(Finding(
            "warning", t.display,
            f"no primary key or unique index on NOT NULL columns (~{t.est_rows:,} rows, {_size(t.bytes)}): rows "
            "migrate as a multiset, but each replayed change scans the table on the target; add a primary key, "
            "or accept the slower replay"))
    # Copy and replay write the target with session_replication_role = replica: ordinary triggers stay quiet there,
    # ALWAYS and REPLICA triggers fire and would act a second time on rows that already carry their effect.
    for tr in triggers:
        if tr.enabled in ("always", "replica"):
            findings.append(Finding(
                "warning", t.display,
                f"trigger {tr.name} is ENABLE {tr.enabled.upper()}: it would fire on the target during copy and "
                "replay as well; disable it on the target until cutover, or make it an ordinary trigger"))
    for c in unusual:
        of = "" if c.type == c.base_type else f", of {c.base_type}"
        findings.append(Finding("warning", t.display, f"column {c.name} ({c.type}{of}): {c.reason}"))
    personal = personal_key_columns(t)
    if personal:
        findings.append(Finding(
            "warning", t.display,
            f"key column(s) {', '.join(personal)} look like patient data (a name, a birth date, an MRN): the rows "
            "of this table are named by keyed hashes (hmac:...) in verify findings and in sync and copy errors; "
            "`verify --show-values` prints the values. A surrogate key (an identity column) names rows without them"))
    return findings


_PERSONAL = re.compile(r"name|birth|dob|mrn|ssn|socialsecurity|patientid|patid|insurance")
"""Column names (lower case, without separators) that suggest a person's identity: patient_name, family_name,
PatientBirthDate, dob, mrn, patient_id, ..."""


def personal_key_columns(table: Table) -> list[str]:
    """Key columns that look like patient data: named like a name, birth date or MRN, and of a type whose values are
    not just numbers or generated ids (text, varchar, dates)."""
    types = {c.name: c.type for c in table.columns}
    return [k for k in table.key
            if types.get(k) not in PLAIN_KEY_TYPES and _PERSONAL.search(re.sub(r"[^a-z0-9]", "", k.lower()))]


# Only client sessions of this database: another database's transactions take no locks on these tables.
_LONG_TRANSACTIONS = """
SELECT pid, state, coalesce(application_name, '') AS application_name,
       extract(epoch FROM clock_timestamp() - xact_start)::float8 AS xact_age,
       extract(epoch FROM clock_timestamp() - state_change)::float8 AS state_age
  FROM pg_stat_activity
 WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'
   AND xact_start IS NOT NULL
   AND (clock_timestamp() - xact_start > make_interval(secs => %s)
        OR (state LIKE 'idle in transaction%%' AND clock_timestamp() - state_change > make_interval(secs => %s)))
 ORDER BY xact_start
"""


def _transaction_findings(conn: psycopg.Connection[Any], long_seconds: float, idle_seconds: float) -> list[Finding]:
    """Sessions that would hold prepare's trigger DDL (and the copy's snapshot) back. Never their query text."""
    findings = []
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(_LONG_TRANSACTIONS, (long_seconds, idle_seconds))
        for r in cur.fetchall():
            state = r["state"] or "unknown"
            idle = f", idle for {r['state_age']:.0f} s" if state.startswith("idle in transaction") else ""
            findings.append(Finding(
                "warning", None,
                f"long transaction: pid {r['pid']} ({state}), open for {r['xact_age']:.0f} s{idle}, "
                f"application_name {r['application_name']!r}; prepare's trigger DDL waits for it to end"))
    return findings


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def _duration(seconds: float) -> str:
    if seconds < 1:
        return "under 1 s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# --- the source role's rights: what prepare (and copy, sync, cutover after it) needs --------------------------------

@dataclass(frozen=True)
class MissingRight:
    """A right the source role lacks, what needs it, and the statement that grants it."""

    object: str
    """"public.patient", "schema public", "database pacs"."""
    need: str
    fix: str
    """The statement a superuser (or the object's owner) runs on the legacy database: `GRANT ... TO role;`."""


_MIGRATOR_SCHEMA = """
SELECT current_user, current_database(), has_database_privilege(current_database(), 'CREATE'),
       (SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = %(capture)s),
       (SELECT pg_has_role(nspowner, 'USAGE') FROM pg_namespace WHERE nspname = %(capture)s)
"""
# The captured tables, and every table pg_dump dumps (and locks) when prepare copies the schema: all of the
# database's but the capture schema's and extensions'. Sequences of the schemas that migrate.
_RELATION_RIGHTS = """
SELECT c.oid::bigint AS oid, n.nspname AS schema, c.relname AS name, c.relkind = 'S' AS sequence,
       pg_get_userbyid(c.relowner) AS owner, pg_has_role(c.relowner, 'USAGE') AS owns,
       CASE WHEN c.relkind = 'S' THEN has_sequence_privilege(c.oid, 'SELECT')
            ELSE has_table_privilege(c.oid, 'SELECT') END AS reads,
       has_schema_privilege(n.oid, 'USAGE') AS schema_usage
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind IN ('r', 'p', 'S')
   AND n.nspname NOT IN ('pg_catalog', 'information_schema', %(capture)s) AND n.nspname NOT LIKE 'pg\\_%%'
   AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                   AND d.deptype = 'e')
 ORDER BY n.nspname, c.relname
"""


def missing_rights(conn: psycopg.Connection[Any], tables: list[Table], table_filter: TableFilter) -> list[MissingRight]:
    """Every right the connected role lacks on the legacy database for prepare to capture `tables` and for the
    phases after it: CREATE on the database (or ownership of an existing capture schema); ownership of each
    captured table (CREATE TRIGGER needs the TRIGGER privilege, but ENABLE ALWAYS TRIGGER and DROP TRIGGER need
    ownership); SELECT on each table pg_dump dumps and copy reads, and on each sequence that migrates; USAGE on their
    schemas. Reads only; a superuser lacks nothing."""
    def ident(*names: str) -> str:
        return sql.SQL(".").join(map(sql.Identifier, names)).as_string(conn)

    row = conn.execute(_MIGRATOR_SCHEMA, {"capture": CAPTURE_SCHEMA}).fetchone()
    assert row is not None
    role, database, may_create, capture_owner, owns_capture = row
    missing = []
    if capture_owner is None and not may_create:
        missing.append(MissingRight(f"database {database}", f"prepare creates the schema {CAPTURE_SCHEMA} there",
                                    f"GRANT CREATE ON DATABASE {ident(database)} TO {ident(role)};"))
    elif capture_owner is not None and not owns_capture:
        missing.append(MissingRight(f"schema {CAPTURE_SCHEMA}",
                                    f"prepare writes the capture functions there (it is owned by {capture_owner})",
                                    f"GRANT {ident(capture_owner)} TO {ident(role)};"))
    captured = {t.oid for t in tables}
    no_usage: set[str] = set()
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(_RELATION_RIGHTS, {"capture": CAPTURE_SCHEMA})
        for r in cur.fetchall():
            if r["sequence"] and not table_filter.matches_schema(r["schema"]):
                continue
            name = f"{r['schema']}.{r['name']}"
            if not r["schema_usage"] and r["schema"] not in no_usage:
                no_usage.add(r["schema"])
                missing.append(MissingRight(f"schema {r['schema']}", "prepare, copy and sync name its tables",
                                            f"GRANT USAGE ON SCHEMA {ident(r['schema'])} TO {ident(role)};"))
            if r["oid"] in captured and not r["owns"]:
                missing.append(MissingRight(
                    name, f"prepare creates and enables ALWAYS its capture triggers, which needs ownership (owner: "
                          f"{r['owner']}; or ALTER TABLE {ident(r['schema'], r['name'])} OWNER TO {ident(role)})",
                    f"GRANT {ident(r['owner'])} TO {ident(role)};"))
            if not r["reads"]:
                need = ("inspect and cutover read its position" if r["sequence"] else
                        "copy and sync read its rows" if r["oid"] in captured else "pg_dump of the schema locks it")
                kind = "SEQUENCE " if r["sequence"] else ""
                missing.append(MissingRight(name, need, f"GRANT SELECT ON {kind}{ident(r['schema'], r['name'])} "
                                                        f"TO {ident(role)};"))
    return missing


def _prepare_findings(conn: psycopg.Connection[Any], tables: list[Table], table_filter: TableFilter) -> list[Finding]:
    """What prepare checks on the legacy database before it creates anything: each right the role lacks (a
    blocker), and the migration an existing capture serves (prepare refuses any other)."""
    findings = [Finding("blocker", m.object, f"the source role lacks a right: {m.need}; fix: {m.fix}")
                for m in missing_rights(conn, tables, table_filter)]
    owner = ownership.legacy_owner(conn)
    if owner is not None:
        findings.append(Finding("info", None, f"the capture serves {owner.describe()}: prepare, sync and cleanup "
                                              "of any other migration refuse"))
    return findings


def require_rights(conn: psycopg.Connection[Any], tables: list[Table], table_filter: TableFilter) -> None:
    """Refuse (prepare, before it creates anything) when the source role lacks any right `missing_rights` lists."""
    missing = missing_rights(conn, tables, table_filter)
    if not missing:
        return
    get(phase="prepare").warning("prepare.refused", reason="source_rights", missing=len(missing))
    listed = "; ".join(f"{m.object}: {m.need}" for m in missing[:10])
    raise Blocked(
        f"the source role lacks {len(missing)} right(s) that prepare needs, so nothing was created: {listed}"
        f"{' ...' if len(missing) > 10 else ''}",
        hint="Have a superuser (or the objects' owners) run on the legacy database, then prepare again:\n"
             + "\n".join(dict.fromkeys(m.fix for m in missing)),
    )


def _listed_sequences(conn: psycopg.Connection[Any], tables: TableFilter) -> list[Sequence]:
    """The migrating sequences with their positions; none when one cannot be read (reported as a missing right)."""
    try:
        with conn.transaction():
            return catalog.list_sequences(conn, tables)
    except psycopg.errors.InsufficientPrivilege:
        return []
