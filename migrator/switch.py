"""Moving clients between the two databases, shared by cutover and rollback.

The pooler side of a switch (PAUSE, rewrite the [databases] entries and RELOAD, restore, RESUME), the client command
for sites without a pooler, and the two checks made at the moment of switching: row counts equal on both sides,
and the sequences of the database clients move to at least where the other side's are.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from migrator import catalog, db, pooler, state
from migrator.config import Config
from migrator.errors import MigratorError
from migrator.log import get
from migrator.redaction import scrub


@contextmanager
def signals_deferred(phase: str) -> Iterator[None]:
    """Hold SIGINT and SIGTERM while a switchover undoes what it began (pooler entries back, freeze released or put
    back, RESUME): a second Ctrl-C, or a service manager's stop, must not cut the undo short and leave the pooler
    paused or a database frozen. A signal that came is delivered again once the undo is done, unless an exception is
    already on its way out (the undo ends by raising one, which stops the command anyway). Main thread only, where
    Python runs signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []

    def hold(signum: int, _: Any) -> None:
        held.append(signum)
        get(phase=phase).warning(f"{phase}.signal_held", signal=signal.Signals(signum).name)

    previous = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if held and sys.exc_info()[1] is None:
            signal.raise_signal(held[0])


def count_differences(a: psycopg.Connection[Any], b: psycopg.Connection[Any], tables: list[catalog.Table]) -> list[str]:
    """Tables whose row counts differ between the two connections' databases."""
    differ = []
    for table in tables:
        q = sql.SQL("SELECT count(*) FROM ONLY {}").format(table.ident)
        if a.execute(q).fetchone() != b.execute(q).fetchone():
            differ.append(table.display)
    return differ


def carry_sequences(seqs: list[catalog.Sequence], into: psycopg.Connection[Any]) -> list[str]:
    """Set each sequence on `into` at least to the position read on the other side (never backwards), in the
    caller's transaction, and read it back; returns the sequences still behind (none, unless something raced)."""
    behind = []
    for seq in seqs:
        if seq.last_value is None:
            continue
        read = sql.SQL("SELECT last_value, is_called FROM {}").format(seq.ident)
        row = into.execute(read).fetchone()
        if row is not None and (row[0], row[1]) >= (seq.last_value, seq.is_called):
            continue
        into.execute("SELECT setval(%s::regclass, %s, %s)", (seq.ident.as_string(into), seq.last_value, seq.is_called))
        row = into.execute(read).fetchone()
        if row is None or (row[0], row[1]) < (seq.last_value, seq.is_called):
            behind.append(seq.display)
    return behind


NOT_MOVED = "clients were not moved: no switch configured, overridden by the operator"
"""What a cutover or rollback run with `--override no-switch` and neither a pooler nor a command says it did."""


def run_command(cfg: Config, command: str | None, setting: str, **env: str) -> str:
    """Run the site's own command that moves clients (`switch_command`, `rollback_command`); non-zero exit fails.
    Without a command there is nothing to run: the go/no-go `switch` item refused, or the operator overrode it."""
    if not command:
        return NOT_MOVED
    full_env = dict(os.environ, MIGRATOR_TARGET=db.describe_dsn(cfg.target_dsn),
                    MIGRATOR_SOURCE=db.describe_dsn(cfg.source_dsn), **env)
    proc = subprocess.run(command, shell=True, env=full_env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise MigratorError(f"{setting} exited {proc.returncode}: {scrub(proc.stderr.strip())[-500:]}")
    return f"{setting} exited 0"


class PoolerSession:
    """The pooler side of one switch (cutover or rollback): what it paused and rewrote, so that every exit can undo
    exactly that."""

    def __init__(self, cfg: Config) -> None:
        c = cfg.cutover
        assert c.pgbouncer_admin_dsn and c.pgbouncer_ini
        self.admin_dsn = c.pgbouncer_admin_dsn
        self.names = list(c.pooler_databases)
        self.ini = c.pgbouncer_ini
        self.where = pooler.target_location(cfg.target_dsn, c.pooler_target)
        self.admin: pooler.Admin | None = None
        self.paused: list[str] = []
        self.former_text: str | None = None
        self.pause_started: float | None = None
        self.pause_seconds: float | None = None

    def pause(self, timeout: float) -> str:
        self.admin = pooler.Admin(self.admin_dsn)
        self.pause_started = time.monotonic()
        deadline = self.pause_started + timeout
        for name in self.names:
            # Marked first: a PAUSE cut short by an interrupt may still have paused it.
            self.paused.append(name)
            self.admin.pause(name, max(deadline - time.monotonic(), 0.1))
        return f"paused {', '.join(self.names)} in {time.monotonic() - self.pause_started:.3f}s"

    def entries(self) -> dict[str, state.PoolerEntry]:
        legacy = pooler.read_entries(self.ini, self.names)
        return {n: state.PoolerEntry(n, self.ini, e, pooler.repoint(e, self.where), "target")
                for n, e in legacy.items()}

    def point(self, entries: dict[str, str]) -> None:
        assert self.admin is not None
        former = pooler.rewrite_entries(self.ini, entries)
        if self.former_text is None:
            self.former_text = former
        self.admin.reload()

    def restore(self) -> str:
        """Put the [databases] file back as it was and RELOAD, when this switch rewrote it. Never raises."""
        if self.former_text is None:
            return ""
        try:
            pooler.write_text(Path(self.ini), self.former_text)
            self.former_text = None
            with pooler.Admin(self.admin_dsn) as a:
                a.reload()
            return "the pooler points at the legacy database again"
        except (MigratorError, OSError, psycopg.Error) as exc:
            return (f"RESTORING THE POOLER'S ENTRIES FAILED ({scrub(str(exc).strip())}): put back {self.ini} and "
                    "RELOAD by hand")

    def resume(self) -> str:
        """RESUME every database this switch paused (each on a fresh admin connection). Never raises."""
        if not self.paused:
            return ""
        failed = []
        for name in list(self.paused):
            try:
                with pooler.Admin(self.admin_dsn) as a:
                    a.resume(name)
                self.paused.remove(name)
            except MigratorError:
                failed.append(name)
        if self.pause_started is not None:
            self.pause_seconds = time.monotonic() - self.pause_started
        if failed:
            return f"RESUME FAILED for {', '.join(failed)}: run `RESUME <db>` on the PgBouncer admin console NOW"
        return "the pooler was resumed"

    def close(self) -> None:
        if self.admin is not None:
            self.admin.close()
