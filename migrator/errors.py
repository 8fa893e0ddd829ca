"""The one exception tree of migrator.

Every failure the engine can name is a `MigratorError`; each carries `hint`, the action an operator should take, and
`exit_code`. Database errors are re-raised as ours with the original attached as `__cause__`. Only the CLI entry point
turns these into a message and an exit code; library code never calls `sys.exit`.

The exit codes are declared here once (`ExitCode`); the CLI lists each command's in its `--help`, and the README's
table is checked against them.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """What a command's exit status means, for every command (scripts and monitoring test these)."""

    OK = 0
    """Done."""
    FINDING = 1
    """A finding the operator must look at: differences, blockers, no-go, declined, lag over its bound."""
    ERROR = 2
    """An error: the command could not do (or could not verify) what it was asked; the message says what to do."""
    CUTOVER_STOPPED = 3
    """A cutover stopped after it began; the legacy database was made writable again."""
    ROLLED_BACK_UNHEALTHY = 4
    """The cutover's health gate found clients failing on the target and rolled back: they are on the legacy
    database again, and nothing they wrote on the target is lost."""
    UNHEALTHY = 5
    """The cutover's health gate found clients failing on the target and they are still there (paused by
    --on-unhealthy=stop, or the automatic rollback failed): act now, as the message says."""
    USAGE = 64
    """A usage error: unknown option, bad value, options that exclude each other (EX_USAGE of sysexits.h)."""
    INTERRUPTED = 130
    """Interrupted by SIGINT (Ctrl-C): what was done is kept; run the same command again to continue."""
    TERMINATED = 143
    """Stopped by SIGTERM: as for SIGINT."""

    @property
    def meaning(self) -> str:
        return _MEANINGS[self]


_MEANINGS = {
    ExitCode.OK: "done",
    ExitCode.FINDING: "a finding the operator must look at (differences, blockers, no-go, declined, lag over bound)",
    ExitCode.ERROR: "an error: could not do or could not verify it; the message says what to do",
    ExitCode.CUTOVER_STOPPED: "the cutover stopped; the legacy database is writable again",
    ExitCode.ROLLED_BACK_UNHEALTHY: "rolled back: clients unhealthy on the target; they are on the legacy database "
                                    "again, nothing lost",
    ExitCode.UNHEALTHY: "clients unhealthy on the target and left there (paused by --on-unhealthy=stop, or the "
                        "rollback failed): act now, as the message says",
    ExitCode.USAGE: "usage error (unknown option, bad value, options that exclude each other)",
    ExitCode.INTERRUPTED: "interrupted (SIGINT, Ctrl-C); run the same command again to continue",
    ExitCode.TERMINATED: "stopped by SIGTERM; run the same command again to continue",
}


class MigratorError(Exception):
    """Base of every error migrator raises on purpose."""

    exit_code: int = ExitCode.ERROR
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
    """A phase was started before the one it depends on finished (or after `cleanup` ended the migration)."""


class Interrupted(MigratorError):
    """The operator stopped the command (SIGINT, SIGTERM) before it finished; what it did is kept or rolled back."""

    exit_code = ExitCode.INTERRUPTED
    default_hint = "Run the same command again to continue: it resumes from the recorded state."


class Blocked(MigratorError):
    """The operator declined, or a preflight check refused to go on."""

    exit_code = ExitCode.FINDING


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


class ConcurrentRun(MigratorError):
    """Another process moved recorded state this one was about to move (two syncs applying at once); this one's
    transaction is rolled back."""


class CopyError(MigratorError):
    """The bulk copy of a table failed."""

    default_hint = "Run `migrator copy` again: finished tables are kept and the rest is copied again."


class CutoverFailed(MigratorError):
    """The cutover stopped; the legacy database was made writable again."""

    exit_code = ExitCode.CUTOVER_STOPPED


class ClientsUnhealthy(MigratorError):
    """The cutover's health gate found clients failing on the target (migrator/health.py); `exit_code` says whether
    they were moved back (ROLLED_BACK_UNHEALTHY) or are still there (UNHEALTHY)."""

    def __init__(self, message: str, *, rolled_back: bool, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.rolled_back = rolled_back
        self.exit_code = ExitCode.ROLLED_BACK_UNHEALTHY if rolled_back else ExitCode.UNHEALTHY


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


class AuditUnavailable(MigratorError):
    """An operator action's audit row could not be written on the target: the action was not started."""

    default_hint = ("Check that the target (which holds the control schema and its audit trail) is reachable and "
                    "prepared, then run the action again.")
