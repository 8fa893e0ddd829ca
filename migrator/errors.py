"""The one exception tree of migrator.

Every failure the engine can name is a `MigratorError`; each carries `hint`, the action an operator should take, and
`exit_code`. Database errors are re-raised as ours with the original attached as `__cause__`. Only the CLI entry point
turns these into a message and an exit code; library code never calls `sys.exit`.
"""

from __future__ import annotations


class MigratorError(Exception):
    """Base of every error migrator raises on purpose."""

    exit_code = 2
    default_hint = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint if hint is not None else self.default_hint


class ConfigError(MigratorError):
    """The configuration file or environment is missing, unreadable or inconsistent."""

    default_hint = "Fix migration.toml (or MIGRATOR_SOURCE_DSN / MIGRATOR_TARGET_DSN) and run the command again."


class ConnectionFailed(MigratorError):
    """A database could not be reached."""

    default_hint = "Check that the server is up and the DSN is right, then run the command again."


class NotReady(MigratorError):
    """A phase was started before the one it depends on finished."""


class Blocked(MigratorError):
    """The operator declined, or a preflight check refused to go on."""

    exit_code = 1


class SchemaChanged(MigratorError):
    """DDL on the legacy database changed a captured table, or added or dropped one."""

    default_hint = (
        "For a changed table, apply the same DDL to the target first. Then run `migrator prepare --yes` (creates a "
        "new table on the target and captures it; records changed definitions, and a changed table goes back to "
        "pending), `migrator copy` (copies those tables, then a new table's indexes and constraints) and "
        "`migrator sync`."
    )


class ReplayError(MigratorError):
    """The target refused a change; the event stays pending."""

    default_hint = "Fix the cause on the target named above; `migrator sync` then resumes from the same position."


class CopyError(MigratorError):
    """The bulk copy of a table failed."""

    default_hint = "Run `migrator copy` again: finished tables are kept and the rest is copied again."


class CutoverFailed(MigratorError):
    """The cutover stopped; the legacy database was made writable again."""

    exit_code = 3


class ToolMissing(MigratorError):
    """An external PostgreSQL client tool (pg_dump, pg_restore) is missing."""

    default_hint = "Install the PostgreSQL client of the source's major version or newer (e.g. apt-get install postgresql-client-15)."


class NoGo(Blocked):
    """The go/no-go checklist refused the cutover before anything was paused or frozen."""

    default_hint = ("Fix the failing items and run `migrator cutover` again, or accept one knowingly with "
                    "`--override ITEM`.")

    def __init__(self, message: str, *, checklist: str = "", hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.checklist = checklist


class PoolerError(MigratorError):
    """PgBouncer's admin console refused a command, timed out, or its [databases] file could not be rewritten."""

    default_hint = ("Check [cutover] pgbouncer_admin_dsn (a user in admin_users), pooler_databases and "
                    "pgbouncer_ini; `SHOW DATABASES` on the admin console shows what the pooler serves.")
