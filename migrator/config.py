"""The migration's configuration: one TOML file, validated against a typed schema before anything connects.

`load()` reads `migration.toml` (or the file given) and `from_dict()` validates it into frozen dataclasses
(pydantic dataclasses, so that a wrong value is refused however the object is built). The whole file is checked at
once and every problem is named in one `ConfigError`: unknown sections and keys (with a "did you mean"), wrong types
(no coercion: `"2"` is not a number, `"public.*"` is not a list; an integer is accepted where a number is), values
out of range, unknown choices, and DSNs libpq cannot parse or that would leak a password. Values of DSNs, commands
and passwords are never repeated in a message.

File and environment combine in one way only:
- `MIGRATOR_SOURCE_DSN` and `MIGRATOR_TARGET_DSN`, when set and not empty, replace `[source] dsn` and `[target] dsn`
  whole (nothing of the file's DSN is kept), so that passwords need not be written into the file. They are validated
  like the file's values and named in messages as themselves. A missing file is fine when both are set.
- No other setting comes from the environment. A `MIGRATOR_*` variable that looks like a misspelling of those two is
  an error. libpq's own variables (PGPASSWORD, PGPASSFILE, PGHOST, PGPORT, PGUSER, PGDATABASE, ...) apply as libpq
  applies them, to what a DSN leaves out.
- The source and the target must not name the same database: refused here when the DSNs say so (any spelling of the
  local host, the default port, dbname defaulting to the user), and by `db.refuse_same_database` once connected.

The schema is the one place to extend: a new section is a frozen dataclass with `config=_SECTION` whose fields carry
their type, default and range (`Count`, `Positive`, `Literal[...]`, ...), added to `_File` and `Config`; a nested
table (`[tables.filter]`) is a field of such a dataclass type, an array of tables (`[[sources]]`) a `tuple` of one. A
new environment variable is declared next to `ENV_DSN` and in this docstring. The README's configuration block is
checked against the schema by tests/test_safety_config.py.

`redact()` (migrator/passwords.py, re-exported here) is the one place a text that may hold a DSN is made printable:
it removes passwords by pattern (also from malformed DSNs) and replaces every password found in the configured DSNs
literally, wherever it appears.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import getpass
import os
import tomllib
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

import annotated_types
import psycopg
from pydantic import AfterValidator, ConfigDict, Strict, TypeAdapter, ValidationError, model_validator
from pydantic.dataclasses import dataclass

from migrator import configmessages
from migrator.errors import ConfigError
from migrator.passwords import passwords_in, redact, register_secret  # noqa: F401 - re-exported

DEFAULT_PATH = Path("migration.toml")
CAPTURE_SCHEMA = "_migrator"
"""Schema of the engine's own on the legacy database: delta log, capture function, captured-table registry."""
CONTROL_SCHEMA = "migrator_control"
"""Schema of the engine's state on the target: runs, copy progress, applied position, cutover steps."""

ENV_DSN = {"MIGRATOR_SOURCE_DSN": "source", "MIGRATOR_TARGET_DSN": "target"}
"""The environment variables read, and the section whose `dsn` each replaces."""
ENV_OTHER = ("MIGRATOR_TEST_DSN", "MIGRATOR_BENCH_DSN", "MIGRATOR_REHEARSAL_DSN", "MIGRATOR_SOURCE",
             "MIGRATOR_TARGET", "MIGRATOR_DIRECTION", "MIGRATOR_AUDIT_ID")
"""MIGRATOR_* variables that are not configuration (tests, benchmarks, rehearse; given to switch commands; given by
the console to the command it starts, naming the audit row of the action: migrator/audit.py)."""

_SECTION = ConfigDict(extra="forbid")

Count = Annotated[int, Strict(), annotated_types.Ge(1)]
"""An integer >= 1 (workers, rows)."""
Positive = Annotated[float, Strict(), annotated_types.Gt(0)]
"""A number > 0 (seconds, MB, MB/s); an integer is accepted."""
NonNegative = Annotated[float, Strict(), annotated_types.Ge(0)]
CountOrZero = Annotated[int, Strict(), annotated_types.Ge(0)]
"""An integer >= 0 (a bound on errors)."""
Text = Annotated[str, Strict(), annotated_types.MinLen(1)]
Flag = Annotated[bool, Strict()]
"""true or false (a string "true" is refused)."""


def _pattern(value: str) -> str:
    if "." not in value and "*" not in value:
        raise ValueError(f'"{value}" names no table: a pattern is schema.table, e.g. "{value}.*"')
    return value


Pattern = Annotated[str, Strict(), annotated_types.MinLen(1), AfterValidator(_pattern)]


def _listen(value: str) -> str:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f'"{value}" is not host:port, e.g. "127.0.0.1:8765" or "[::1]:8765"')
    return value


Listen = Annotated[str, Strict(), AfterValidator(_listen)]


@dataclass(frozen=True, config=_SECTION)
class TableFilter:
    """Which source tables migrate. Patterns are `schema.table` globs matched case-sensitively."""

    include: tuple[Pattern, ...] = ("*.*",)
    exclude: tuple[Pattern, ...] = ()

    def matches(self, schema: str, table: str) -> bool:
        name = f"{schema}.{table}"
        if schema in (CAPTURE_SCHEMA, CONTROL_SCHEMA):
            return False
        return any(fnmatch.fnmatchcase(name, p) for p in self.include) and not any(
            fnmatch.fnmatchcase(name, p) for p in self.exclude
        )

    def matches_schema(self, schema: str) -> bool:
        """Whether some include pattern reaches into this schema (sequences of such schemas migrate)."""
        if schema in (CAPTURE_SCHEMA, CONTROL_SCHEMA):
            return False
        return any(fnmatch.fnmatchcase(schema, p.split(".", 1)[0]) for p in self.include)


@dataclass(frozen=True, config=_SECTION)
class CopySettings:
    workers: Count = field(default_factory=lambda: os.cpu_count() or 2)
    chunk_mb: Positive = 64.0
    """Tables with a key larger than twice this are split into chunks of about this size (heap block ranges on a
    PostgreSQL 14+ source, key ranges before)."""
    max_rate: Positive | None = None
    """Read throttle in MB/s over all copy workers (the coordinator's and those that joined); None: unthrottled."""


@dataclass(frozen=True, config=_SECTION)
class SyncSettings:
    poll_interval: Positive = 1.0
    """Seconds between polls of the delta log when nothing is pending (`sync --follow`); also sync's bound for
    "caught up" (a batch shorter than this), so it must be above 0."""
    statement_timeout: Positive = 60.0
    """Bound on each statement sync runs on the legacy database, seconds."""
    lock_timeout: Positive = 5.0
    rotate_seconds: Positive = 300.0
    """Writers move to the next child of the delta log once the current one is this old (seconds) ..."""
    rotate_rows: Count = 1_000_000
    """... or holds about this many events; a child is truncated once the target holds all it recorded."""
    housekeeping_interval: Positive = 10.0
    """Seconds between sync's rotations and truncations of the delta log (each a few short statements)."""
    warn_log_mb: Positive = 1024.0
    """`status` warns when the delta log on the legacy database is larger than this (MB)."""
    warn_stalled_seconds: NonNegative = 300.0
    """`status` warns when changes are pending and sync has not moved its position for this long (seconds)."""
    sample_interval: Positive = 5.0
    """Seconds between the samples sync records in the control schema (lag, pending events per table, delta log size),
    which `migrator console` charts and the rehearsal report summarises."""
    sample_days: Positive = 7.0
    """Samples older than this many days are deleted as new ones are recorded."""
    connect_retries: CountOrZero = 5
    """Without --follow, how many times sync retries a refused or lost connection before it gives up (waiting 1, 2, 4
    ... seconds between tries, at most 30); with --follow it retries for ever."""


@dataclass(frozen=True, config=_SECTION)
class CutoverSettings:
    """How clients move: through PgBouncer (`pgbouncer_admin_dsn` and friends) or by `switch_command`."""

    switch_command: Text | None = None
    """Run to move clients at sites without a pooler; a non-zero exit fails the cutover."""
    rollback_command: Text | None = None
    """Run by `migrator rollback` to move clients back to the legacy database at sites without a pooler (environment:
    MIGRATOR_SOURCE, MIGRATOR_TARGET, MIGRATOR_DIRECTION=rollback); a non-zero exit stops the rollback."""
    freeze_lock_timeout: Positive = 10.0
    """How long the freeze may wait for writers in flight before it gives up and leaves the source writable."""
    verify: Literal["none", "counts", "full"] = "counts"
    """Parity check inside the freeze window: "none", "counts" or "full"."""
    max_lag_seconds: Positive = 30.0
    """Go/no-go: the oldest change not yet applied must be younger than this."""
    max_session_seconds: Positive = 60.0
    """Go/no-go: no transaction on the source (running or idle in transaction) may be older than this."""
    max_verify_age: Positive = 86400.0
    """Go/no-go: the last verify must have started less than this many seconds ago (and after the last rollback,
    completed cutover and copy of a table)."""
    pgbouncer_admin_dsn: Text | None = None
    """PgBouncer's admin console, e.g. postgresql://pgbouncer@127.0.0.1:6432/pgbouncer (the user in admin_users)."""
    pooler_databases: tuple[Text, ...] = ()
    """The pooler's database names the clients connect to; each is paused, pointed at the target and resumed."""
    pgbouncer_ini: Text | None = None
    """The file holding those names' [databases] entries (pgbouncer.ini itself or a file it %includes); rewritten
    atomically so that RELOAD points them at the target."""
    pooler_target: Text | None = None
    """The connect string the entries get for the target (host=... port=... dbname=...); default: host, port and
    dbname of [target] dsn. Other keys of an entry (user, pool_size, ...) are kept."""
    pause_timeout: Positive = 10.0
    """How long PAUSE may wait for transactions in flight through the pooler before the cutover resumes and stops."""
    switch_check_command: Text | None = None
    """Tells whether the clients moved, for a guardian that finds a cutover or rollback killed inside its switch
    (`switch_command` or `rollback_command`): exit 0 when the clients are on the target, 1 when they are on the legacy
    database, anything else when it cannot tell. Without it, the guardian runs the interrupted command again, so that
    command must be idempotent (runbook 02, "If the cutover process dies")."""
    guardian_timeout: Positive = 5.0
    """Seconds of silence from a cutover or rollback process (its heartbeat, sent whatever a step is doing) after
    which its guardian stops it and brings clients to one side; a process that dies is taken over at once."""
    step_timeout: Positive = 300.0
    """A step of a cutover or rollback (once its guardian watches) running longer than this is taken as hung (a
    server that stopped answering): its heartbeat stops, and the guardian takes over. Raise it with verify = "full"
    on a large database."""
    guardian_dir: Text | None = None
    """Where cutover and rollback keep their local journal (what the guardian needs when the target is down) and
    the guardian's log; default: `.migrator/` beside the configuration file (or in the working directory)."""
    health_seconds: Positive = 5.0
    """After the switch, how long the health gate watches the clients on the target (migrator/health.py)."""
    health_max_errors: CountOrZero = 0
    """The health gate's bound: transactions rolled back on the target plus clients left waiting in the pooler,
    within health_seconds; above it the clients are unhealthy there (`cutover --on-unhealthy` says what follows)."""
    health_probe_dsn: Text | None = None
    """Where the health gate's probe connects as a client: with a pooler, a DSN through it whose dbname is replaced
    by each pooled database (default: pgbouncer_admin_dsn's host, port and user); without one, where clients reach
    the target after switch_command (default: [target] dsn)."""
    prepared_statements: Literal["unknown", "unused"] = "unknown"
    """"unused" declares that no client of the pooled databases prepares statements by name (go/no-go then does not
    warn that a pooler without prepared-statement support loses them, and the health gate does not count the loss
    its canary sees); recorded with each attempt's checklist."""

    @model_validator(mode="after")
    def _pooler_complete(self) -> CutoverSettings:
        if self.pgbouncer_admin_dsn and not (self.pooler_databases and self.pgbouncer_ini):
            raise ValueError("pgbouncer_admin_dsn needs pooler_databases and pgbouncer_ini")
        return self

    @property
    def uses_pooler(self) -> bool:
        return bool(self.pgbouncer_admin_dsn)


@dataclass(frozen=True, config=_SECTION)
class ObjectSettings:
    """The files the rows point to (`[objects]`): how to list them, where the two stores are, how to copy them."""

    query: Text | None = None
    """SQL run on each side listing one object per row: `key` and `location` (relative to the store root), optionally
    `size`, `sha256` (bytea or hex) and DICOM identifiers `sop_instance_uid`, `series_instance_uid`,
    `study_instance_uid`, `patient_id`."""
    source_root: Text | None = None
    target_root: Text | None = None
    workers: Count = 4
    """Files copied or checked at once."""
    max_rate: Positive | None = None
    """Copy throttle in MB/s over all workers; None: unthrottled."""
    poll_interval: Positive = 10.0
    """Seconds between passes of `objects sync --follow`."""
    full_pass_interval: Positive = 3600.0
    """Seconds between the full passes of `objects sync --follow` (the others read only the rows the delta log says
    changed): a full pass lists every object again and catches files changed in place."""


@dataclass(frozen=True, config=_SECTION)
class RehearsalSettings:
    """`[rehearsal]`: a rehearsal on the site's own test databases (`migrator --config FILE rehearse`)."""

    test_databases: Flag = False
    """true declares that [source] and [target] are test databases (a restored copy of the legacy database, and an
    empty one or a target an earlier rehearsal made): only then does `rehearse` write to them."""
    sync_seconds: Positive = 10.0
    """How long sync follows under the workload before the live verify (which sync keeps following through)."""
    rollback: Flag = False
    """After the cutover and its verify, roll back too (and verify again)."""
    production_bytes: Positive | None = None
    """The production tables' total size in bytes (`migrator inspect`'s total: pg_total_relation_size of each
    table): `migrator report` predicts the copy time from the rehearsal's tables, measured the same way."""
    production_rows: Positive | None = None
    """The production database's rows: the report predicts the copy time from the measured rows per second too."""
    production_dsn: Text | None = None
    """Instead of production_bytes and production_rows: a DSN of the production legacy database, which `migrator
    report` reads (read-only: the migrating tables' sizes, row estimates and index sizes, and the server version;
    it writes nothing there) to predict cutover night. It must name neither [source] nor [target]."""
    production_write_rate: Positive | None = None
    """Production's write rate, in captured row changes per second: the report predicts sync's lag and the cutover's
    freeze window at it."""


@dataclass(frozen=True, config=_SECTION)
class ConsoleSettings:
    """`migrator console`, the web page for cutover night (migrator/console/)."""

    listen: Listen = "127.0.0.1:8765"
    """host:port; an address other than loopback needs tls_certfile and tls_keyfile (or `--insecure`, which warns)."""
    operators_file: Text | None = None
    """A TOML file of `name = "token"` lines, one per operator; without it a token is made at start for the operator
    who started the console and printed once."""
    tls_certfile: Text | None = None
    """The certificate (PEM) the console serves https with; a relative path is relative to this file's directory."""
    tls_keyfile: Text | None = None
    poll_interval: Positive = 0.5
    """Seconds between the console's reads of the control schema on the target (steps, flags, samples, audit)."""
    source_interval: Positive = 5.0
    """Seconds between the console's own reads of the legacy database (frozen, pending events, delta log size)."""
    checklist_interval: Positive = 60.0
    """Seconds between evaluations of the go/no-go checklist (which reads both databases); it is evaluated at once,
    too, when the phase changes or an action was carried out (at most every 5 seconds)."""


@dataclass(frozen=True, config=_SECTION)
class DatabaseSection:
    """`[source]` or `[target]`: where the database is (the environment may replace it, see the module docstring)."""

    dsn: Text | None = None


@dataclass(frozen=True, config=_SECTION)
class _File:
    """The file as written: every section and key it may hold. Later sections are added here and to `Config`."""

    source: DatabaseSection = DatabaseSection()
    target: DatabaseSection = DatabaseSection()
    tables: TableFilter = TableFilter()
    copy: CopySettings = CopySettings()
    sync: SyncSettings = SyncSettings()
    cutover: CutoverSettings = CutoverSettings()
    objects: ObjectSettings = ObjectSettings()
    rehearsal: RehearsalSettings = RehearsalSettings()
    console: ConsoleSettings = ConsoleSettings()


@dataclass(frozen=True, config=_SECTION)
class Config:
    source_dsn: Text
    target_dsn: Text
    tables: TableFilter = TableFilter()
    copy: CopySettings = CopySettings()
    sync: SyncSettings = SyncSettings()
    cutover: CutoverSettings = CutoverSettings()
    path: Path | None = None
    objects: ObjectSettings = ObjectSettings()
    rehearsal: RehearsalSettings = RehearsalSettings()
    console: ConsoleSettings = ConsoleSettings()

    def __post_init__(self) -> None:
        _register_secrets_of(self)

    @property
    def local_dir(self) -> Path:
        """Where this host keeps the migration's local files (the cutover's journals, the guardian's log, the
        action lock's file): `[cutover] guardian_dir`, else `.migrator/` beside the configuration file."""
        if self.cutover.guardian_dir:
            return Path(self.cutover.guardian_dir)
        return (self.path.resolve().parent if self.path is not None else Path.cwd()) / ".migrator"

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A copy worker process gets the configuration by pickling; its log lines need the same secrets redacted.
        for key, value in state.items():
            object.__setattr__(self, key, value)
        _register_secrets_of(self)


def schema_keys() -> dict[str, tuple[str, ...]]:
    """Every section of the file and its keys, in schema order (for documentation and its test)."""
    return {s.name: tuple(f.name for f in dataclasses.fields(_section_class(s.name)))
            for s in dataclasses.fields(_File)}


def from_dict(data: dict[str, Any], *, path: Path | None = None, env: dict[str, str] | None = None) -> Config:
    """Validate a parsed file and the environment into a `Config`; every problem is named in one ConfigError."""
    env = dict(os.environ) if env is None else env
    _register_raw_secrets(data, env)
    problems: list[str] = []
    file = _validate(data, problems)
    dsns: dict[str, str] = {}
    for var, section in ENV_DSN.items():
        from_env = env.get(var, "").strip()
        where = var if from_env else f"[{section}] dsn"
        dsn = from_env or (getattr(file, section).dsn if file is not None else _raw_dsn(data, section))
        if not dsn:
            if file is not None:
                problems.append(f"[{section}] dsn: missing; set it in the file or in {var}")
            continue
        problem = dsn_problem(dsn)
        if problem:
            problems.append(f"{where}: {problem}")
        else:
            dsns[section] = dsn
    for section, key in (("cutover", "pgbouncer_admin_dsn"), ("cutover", "health_probe_dsn"),
                         ("rehearsal", "production_dsn")):
        value = getattr(getattr(file, section), key) if file is not None else None
        problem = dsn_problem(value) if value else None
        if problem:
            problems.append(f"[{section}] {key}: {problem}")
    problems += _misspelled_env(env)
    source, target = dsns.get("source"), dsns.get("target")
    if source and target:
        same = _same_endpoint(source, target, env)
        if same:
            problems.append(f"[source] dsn and [target] dsn name the same database ({same}); the target must be the "
                            "new, empty database")
    production = file.rehearsal.production_dsn if file is not None else None
    if production and not dsn_problem(production):
        problems += configmessages.production_problems(
            {section: _same_endpoint(production, dsn, env) for section, dsn in dsns.items()})
    if problems or file is None or source is None or target is None:
        raise ConfigError(configmessages.problems_text(problems, path),
                          hint="Fix what is named above in the file (or the environment variable named) and run the "
                               "command again; the README's configuration section lists every key.")
    return Config(source_dsn=source, target_dsn=target, tables=file.tables, copy=file.copy, sync=file.sync,
                  cutover=file.cutover, path=path, objects=file.objects, rehearsal=file.rehearsal,
                  console=file.console)


def _raw_dsn(data: dict[str, Any], section: str) -> str | None:
    """The DSN as written, when the file as a whole failed validation (its own problems are reported already)."""
    value = data.get(section)
    dsn = value.get("dsn") if isinstance(value, dict) else None
    return dsn if isinstance(dsn, str) else None


def load(path: Path | str | None = None) -> Config:
    """Read the configuration file; a missing file is fine when both DSNs come from the environment."""
    p = Path(path) if path is not None else DEFAULT_PATH
    data: dict[str, Any] = {}
    if p.exists():
        try:
            data = tomllib.loads(p.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            # tomllib names the line and column, never the value.
            raise ConfigError(f"cannot read {p}: {exc}") from exc
    elif path is not None or not all(os.environ.get(var, "").strip() for var in ENV_DSN):
        raise ConfigError(f"configuration file {p} not found")
    return from_dict(data, path=p if p.exists() else None)


# --- validation ----------------------------------------------------------------------------------------------------

_FILE = TypeAdapter(_File)


def _validate(data: dict[str, Any], problems: list[str]) -> _File | None:
    try:
        return _FILE.validate_python(data)
    except ValidationError as exc:
        problems.extend(configmessages.describe_error(_File, e) for e in exc.errors())
        return None


def _section_class(name: str) -> type:
    cls = configmessages.fields_of(_File)[name].annotation
    assert isinstance(cls, type)
    return cls


def _misspelled_env(env: dict[str, str]) -> list[str]:
    problems = []
    for name in env:
        if name.startswith("MIGRATOR_") and name not in ENV_DSN and name not in ENV_OTHER:
            close = difflib.get_close_matches(name, list(ENV_DSN), n=1, cutoff=0.8)
            if close:
                problems.append(f"environment variable {name} is not read; did you mean {close[0]}?")
    return problems


# --- DSNs ----------------------------------------------------------------------------------------------------------

def dsn_problem(dsn: str) -> str | None:
    """Why libpq would misread this connection string (never quoting it), or None when it reads it as written."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.Error:
        return ("libpq cannot parse it (value not shown); in key=value form quote a value holding spaces or quotes "
                r"(password='a b\'c'), in a URI percent-encode them (%20 for a space, %40 for @, %2F for /)")
    hosts = str(info.get("host") or "").split(",")
    ports = str(info.get("port") or "").split(",")
    if (any("@" in h for h in hosts) or "@" in str(info.get("dbname") or "")
            or not all(p.strip().isdigit() for p in ports if p.strip())):
        return ("a character ends the URI's user:password@ early (value not shown): in a URI password write @ as "
                "%40 and / as %2F")
    return None


_LOOPBACK = {"localhost", "127.0.0.1", "::1", "[::1]", "localhost.localdomain"}


def _endpoint(dsn: str, env: dict[str, str]) -> tuple[str, str, str] | None:
    """(host, port, dbname) a DSN reaches, as far as the text and libpq's defaults tell; None for several hosts or
    a service file (the check once connected decides those)."""
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    if info.get("service") or env.get("PGSERVICE"):
        return None
    host = str(info.get("hostaddr") or info.get("host") or env.get("PGHOSTADDR") or env.get("PGHOST") or "")
    port = str(info.get("port") or env.get("PGPORT") or "5432")
    if "," in host or "," in port:
        return None
    user = str(info.get("user") or env.get("PGUSER") or _os_user())
    dbname = str(info.get("dbname") or env.get("PGDATABASE") or user)
    host = host.lower()
    if host in _LOOPBACK or host.startswith("127."):
        host = "localhost"
    elif not host:
        host = "the local socket"
    return host, port.strip(), dbname


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""


def _same_endpoint(source: str, target: str, env: dict[str, str]) -> str | None:
    a, b = _endpoint(source, env), _endpoint(target, env)
    if a is None or a != b:
        return None
    return f"{a[0]}:{a[1]}/{a[2]}"


# --- the passwords of the configuration (migrator/passwords.py redacts them) ------------------------------------

def _register_raw_secrets(data: dict[str, Any], env: dict[str, str]) -> None:
    texts = [env.get(var, "") for var in ENV_DSN]
    for section, key in (("source", "dsn"), ("target", "dsn"), ("cutover", "pgbouncer_admin_dsn"),
                         ("cutover", "pooler_target"), ("cutover", "health_probe_dsn"), ("rehearsal", "production_dsn")):
        value = data.get(section, {}).get(key) if isinstance(data.get(section), dict) else data.get(section)
        if isinstance(value, str):
            texts.append(value)
    for text in texts:
        for password in passwords_in(text):
            register_secret(password)
    if env.get("PGPASSWORD"):
        register_secret(env["PGPASSWORD"])


def _register_secrets_of(cfg: Config) -> None:
    for text in (cfg.source_dsn, cfg.target_dsn, cfg.cutover.pgbouncer_admin_dsn, cfg.cutover.pooler_target,
                 cfg.cutover.health_probe_dsn, cfg.rehearsal.production_dsn):
        for password in passwords_in(text or ""):
            register_secret(password)
