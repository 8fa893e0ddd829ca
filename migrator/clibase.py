"""What every command shares at the command line (migrator/cli.py defines the commands): the context that loads
the configuration once, each command's declared exit codes, how a result is printed (text or --json), the question
before a change, and what SIGINT, SIGTERM and SIGHUP do."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import click
import psycopg

from migrator import config as config_mod
from migrator import log as log_mod
from migrator.config import Config
from migrator.errors import Blocked, ExitCode

C = TypeVar("C", bound=click.Command)


class Ctx:
    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path
        self._cfg: Config | None = None

    @property
    def cfg(self) -> Config:
        if self._cfg is None:
            self._cfg = config_mod.load(self.config_path)
        return self._cfg

    @property
    def roles(self) -> str:
        """The roles migrator connects as, for a privilege error ("" before the configuration is loaded)."""
        if self._cfg is None:
            return ""
        users = {}
        for side, dsn in (("source", self._cfg.source_dsn), ("target", self._cfg.target_dsn)):
            try:
                users[side] = psycopg.conninfo.conninfo_to_dict(dsn).get("user") or "the default user"
            except psycopg.ProgrammingError:
                users[side] = "?"
        return ", ".join(f"{side}: {user}" for side, user in users.items())


EVERY_COMMAND = (ExitCode.OK, ExitCode.ERROR, ExitCode.USAGE, ExitCode.INTERRUPTED, ExitCode.TERMINATED)
DECLARED: dict[click.Command, dict[ExitCode, str]] = {}


def exits(specific: dict[ExitCode, str] | None = None) -> Callable[[C], C]:
    """Declare a command's exit codes (those of every command, and its own meanings) and end its --help with them."""
    def declare(command: C) -> C:
        codes = {code: code.meaning for code in EVERY_COMMAND} | (specific or {})
        DECLARED[command] = codes
        command.epilog = "\b\nExit codes:\n" + "\n".join(f"  {int(c):<4} {codes[c]}" for c in sorted(codes))
        return command
    return declare


def emit(result: Any, as_json: bool, text: Callable[[], str] | None = None) -> None:
    """Print a result as JSON (`to_dict`) or as text (`text`, else the result's own `render_text`)."""
    if as_json:
        data = result.to_dict() if hasattr(result, "to_dict") else result
        click.echo(json.dumps(data, indent=2, default=str))
    elif text is not None:
        click.echo(text())
    elif hasattr(result, "render_text"):
        click.echo(result.render_text())
    else:
        data = result.to_dict() if hasattr(result, "to_dict") else result
        click.echo(json.dumps(data, indent=2, default=str))


def confirm(yes: bool, what: str) -> None:
    """Ask before a change to a database; a wrong configuration is refused before the question."""
    obj = click.get_current_context().find_object(Ctx)
    if obj is not None:
        _ = obj.cfg
    if yes:
        return
    if not sys.stdin.isatty():
        raise Blocked(f"{what}: confirmation needed", hint="Run it again with --yes (scripts) or on a terminal.")
    if not click.confirm(f"{what}. Go on?", default=False):
        raise Blocked("declined by the operator")


SIGNALLED: list[int] = []
"""The signals received (SIGINT, SIGTERM): an interrupted command exits 128 + the first one's number."""


def stop_on_signals() -> threading.Event:
    """For commands that stop cleanly: SIGINT and SIGTERM set the event instead of raising KeyboardInterrupt."""
    stop = threading.Event()

    def handler(signum: int, _: Any) -> None:
        log_mod.get(phase="cli").info("cli.stopping", signal=signal.Signals(signum).name)
        SIGNALLED.append(signum)
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


def hung_up(signum: int, _: Any) -> None:
    """The operator's terminal went away (SSH dropped): a cutover or rollback goes on. What it would print, its log
    lines included, goes to /dev/null from now on (a write to a hung-up terminal fails); the control schema and the
    guardian's journal keep the record (`migrator status` shows it)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)


def keep_going_on_hangup() -> None:
    """Cutover and rollback ignore SIGHUP: runbook 02 says to run them under tmux or systemd-run all the same."""
    signal.signal(signal.SIGHUP, hung_up)


def terminate(signum: int, _: Any) -> None:
    """SIGTERM stops a command as Ctrl-C does (KeyboardInterrupt: what it holds is released on the way out)."""
    SIGNALLED.append(signum)
    raise KeyboardInterrupt


def interrupted_code() -> ExitCode:
    return ExitCode.TERMINATED if SIGNALLED and SIGNALLED[0] == signal.SIGTERM else ExitCode.INTERRUPTED


json_option = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON for scripts.")
yes_option = click.option("--yes", is_flag=True, help="Do not ask for confirmation.")


def declared_codes(group: click.Group) -> dict[str, dict[ExitCode, str]]:
    """Every command's exit codes by its full name ("objects sync"), as declared with `exits`."""
    found: dict[str, dict[ExitCode, str]] = {}

    def walk(group: click.Group, prefix: str) -> None:
        for name, command in group.commands.items():
            if isinstance(command, click.Group):
                walk(command, f"{prefix}{name} ")
            else:
                found[f"{prefix}{name}"] = DECLARED[command]
    walk(group, "")
    return found


def code_table(group: click.Group) -> str:
    """The README's table: each code, what it means, and which commands give it (with their own meaning)."""
    commands = declared_codes(group)
    lines = ["| code | meaning | commands |", "| --- | --- | --- |"]
    for code in ExitCode:
        having = {name: codes[code] for name, codes in commands.items() if code in codes}
        own = "; ".join(f"`{name}`: {text}" for name, text in having.items() if text != code.meaning)
        if len(having) == len(commands):
            which = "every command" + (f" ({own})" if own else "")
        else:
            which = "; ".join(f"`{name}`: {text}" if text != code.meaning else f"`{name}`"
                              for name, text in having.items())
        lines.append(f"| {int(code)} | {code.meaning} | {which} |")
    return "\n".join(lines)
