"""The migration's configuration: one TOML file, with DSNs overridable from the environment.

`load()` reads `migration.toml` (or the file given) into frozen dataclasses. MIGRATOR_SOURCE_DSN and
MIGRATOR_TARGET_DSN override the file, so that passwords need not be written into it. `redact()` is the one place a
DSN is turned into something printable.
"""

from __future__ import annotations

import fnmatch
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from migrator.errors import ConfigError

DEFAULT_PATH = Path("migration.toml")
CAPTURE_SCHEMA = "_migrator"
"""Schema of the engine's own on the legacy database: delta log, capture function, captured-table registry."""
CONTROL_SCHEMA = "migrator_control"
"""Schema of the engine's state on the target: runs, copy progress, applied position, cutover steps."""


@dataclass(frozen=True)
class TableFilter:
    """Which source tables migrate. Patterns are `schema.table` globs matched case-sensitively."""

    include: tuple[str, ...] = ("*.*",)
    exclude: tuple[str, ...] = ()

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


@dataclass(frozen=True)
class CopySettings:
    workers: int = field(default_factory=lambda: os.cpu_count() or 2)
    chunk_mb: float = 64.0
    """Tables with a key larger than twice this are split into key ranges of about this size."""
    max_rate: float | None = None
    """Read throttle in MB/s over all copy workers (the coordinator's and those that joined); None: unthrottled."""


@dataclass(frozen=True)
class SyncSettings:
    poll_interval: float = 1.0
    """Seconds between polls of the delta log when nothing is pending (`sync --follow`)."""
    statement_timeout: float = 60.0
    """Bound on each statement sync runs on the legacy database, seconds."""
    lock_timeout: float = 5.0
    rotate_seconds: float = 300.0
    """Writers move to the next child of the delta log once the current one is this old (seconds) ..."""
    rotate_rows: int = 1_000_000
    """... or holds about this many events; a child is truncated once the target holds all it recorded."""
    housekeeping_interval: float = 10.0
    """Seconds between sync's rotations and truncations of the delta log (each a few short statements)."""
    warn_log_mb: float = 1024.0
    """`status` warns when the delta log on the legacy database is larger than this (MB)."""
    warn_stalled_seconds: float = 300.0
    """`status` warns when changes are pending and sync has not moved its position for this long (seconds)."""


@dataclass(frozen=True)
class CutoverSettings:
    """How clients move: through PgBouncer (`pgbouncer_admin_dsn` and friends) or by `switch_command`."""

    switch_command: str | None = None
    """Run to move clients at sites without a pooler; a non-zero exit fails the cutover."""
    rollback_command: str | None = None
    """Run by `migrator rollback` to move clients back to the legacy database at sites without a pooler (environment:
    MIGRATOR_SOURCE, MIGRATOR_TARGET, MIGRATOR_DIRECTION=rollback); a non-zero exit stops the rollback."""
    freeze_lock_timeout: float = 10.0
    """How long the freeze may wait for writers in flight before it gives up and leaves the source writable."""
    verify: str = "counts"
    """Parity check inside the freeze window: "none", "counts" or "full"."""
    max_lag_seconds: float = 30.0
    """Go/no-go: the oldest change not yet applied must be younger than this."""
    max_session_seconds: float = 60.0
    """Go/no-go: no transaction on the source (running or idle in transaction) may be older than this."""
    max_verify_age: float = 86400.0
    """Go/no-go: the last verify must have started less than this many seconds ago (and after the last rollback,
    completed cutover and copy of a table)."""
    pgbouncer_admin_dsn: str | None = None
    """PgBouncer's admin console, e.g. postgresql://pgbouncer@127.0.0.1:6432/pgbouncer (the user in admin_users)."""
    pooler_databases: tuple[str, ...] = ()
    """The pooler's database names the clients connect to; each is paused, pointed at the target and resumed."""
    pgbouncer_ini: str | None = None
    """The file holding those names' [databases] entries (pgbouncer.ini itself or a file it %includes); rewritten
    atomically so that RELOAD points them at the target."""
    pooler_target: str | None = None
    """The connect string the entries get for the target (host=... port=... dbname=...); default: host, port and
    dbname of [target] dsn. Other keys of an entry (user, pool_size, ...) are kept."""
    pause_timeout: float = 10.0
    """How long PAUSE may wait for transactions in flight through the pooler before the cutover resumes and stops."""

    def __post_init__(self) -> None:
        if isinstance(self.pooler_databases, str):
            object.__setattr__(self, "pooler_databases", (self.pooler_databases,))
        else:
            object.__setattr__(self, "pooler_databases", tuple(self.pooler_databases))
        if self.pgbouncer_admin_dsn and not (self.pooler_databases and self.pgbouncer_ini):
            raise ConfigError("[cutover] pgbouncer_admin_dsn needs pooler_databases and pgbouncer_ini")

    @property
    def uses_pooler(self) -> bool:
        return bool(self.pgbouncer_admin_dsn)


@dataclass(frozen=True)
class ObjectSettings:
    """The files the rows point to (`[objects]`): how to list them, where the two stores are, how to copy them."""

    query: str | None = None
    """SQL run on each side listing one object per row: `key` and `location` (relative to the store root), optionally
    `size`, `sha256` (bytea or hex) and DICOM identifiers `sop_instance_uid`, `series_instance_uid`,
    `study_instance_uid`, `patient_id`."""
    source_root: str | None = None
    target_root: str | None = None
    workers: int = 4
    """Files copied or checked at once."""
    max_rate: float | None = None
    """Copy throttle in MB/s over all workers; None: unthrottled."""
    poll_interval: float = 10.0
    """Seconds between passes of `objects sync --follow`."""


@dataclass(frozen=True)
class Config:
    source_dsn: str
    target_dsn: str
    tables: TableFilter = TableFilter()
    copy: CopySettings = CopySettings()
    sync: SyncSettings = SyncSettings()
    cutover: CutoverSettings = CutoverSettings()
    path: Path | None = None
    objects: ObjectSettings = ObjectSettings()


def _section(data: dict[str, Any], name: str) -> dict[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{name}] must be a table in the configuration file")
    return value


def _build(cls: Any, values: dict[str, Any], section: str) -> Any:
    known = set(cls.__dataclass_fields__)
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown key(s) in [{section}]: {', '.join(sorted(unknown))}")
    try:
        return cls(**values)
    except TypeError as exc:  # pragma: no cover - dataclass signature errors
        raise ConfigError(f"[{section}]: {exc}") from exc


def from_dict(data: dict[str, Any], *, path: Path | None = None, env: dict[str, str] | None = None) -> Config:
    env = dict(os.environ) if env is None else env
    source = env.get("MIGRATOR_SOURCE_DSN") or _section(data, "source").get("dsn")
    target = env.get("MIGRATOR_TARGET_DSN") or _section(data, "target").get("dsn")
    if not source:
        raise ConfigError("no source DSN: set [source] dsn or MIGRATOR_SOURCE_DSN")
    if not target:
        raise ConfigError("no target DSN: set [target] dsn or MIGRATOR_TARGET_DSN")
    tables = _section(data, "tables")
    tf = TableFilter(
        include=tuple(tables.get("include", ["*.*"])),
        exclude=tuple(tables.get("exclude", [])),
    )
    return Config(
        source_dsn=source,
        target_dsn=target,
        tables=tf,
        copy=_build(CopySettings, _section(data, "copy"), "copy"),
        sync=_build(SyncSettings, _section(data, "sync"), "sync"),
        cutover=_build(CutoverSettings, _section(data, "cutover"), "cutover"),
        path=path,
        objects=_build(ObjectSettings, _section(data, "objects"), "objects"),
    )


def load(path: Path | str | None = None) -> Config:
    """Read the configuration file; a missing file is fine when both DSNs come from the environment."""
    p = Path(path) if path is not None else DEFAULT_PATH
    data: dict[str, Any] = {}
    if p.exists():
        try:
            data = tomllib.loads(p.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read {p}: {exc}") from exc
    elif path is not None or not (os.environ.get("MIGRATOR_SOURCE_DSN") and os.environ.get("MIGRATOR_TARGET_DSN")):
        raise ConfigError(f"configuration file {p} not found")
    return from_dict(data, path=p if p.exists() else None)


_PASSWORD_URI = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")
_PASSWORD_KV = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def redact(text: str) -> str:
    """Remove passwords from anything that may contain a DSN (a URI or key=value form)."""
    text = _PASSWORD_URI.sub(r"\1***@", text)
    return _PASSWORD_KV.sub(r"\1***", text)
