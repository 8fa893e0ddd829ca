"""The write load of a rehearsal on the site's test databases: one of the synthetic PACS writers (`pacs`), the
catalog-derived writers (`generic`), or the site's own load tool (`command`), behind one small interface: start
before the copy, `at_cutover` when the cutover begins, `stop`, then `check` the target against what it committed."""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from migrator import db
from migrator.config import Config
from migrator.log import get
from migrator.rehearse.generic import GenericSpec, GenericWorkload
from migrator.rehearse.workload import Workload, WorkloadSpec
from migrator.rehearse.workload import verify as pacs_verify

COMMAND_STOP_SECONDS = 30.0
"""How long the site's load tool has to exit after SIGTERM before it is killed (SIGKILL, its process group)."""


@dataclass(frozen=True)
class LoadSpec:
    kind: str
    """"pacs", "generic" or "command"."""
    writers: int = 2
    rate: float = 20.0
    """generic: transactions per second over all writers."""
    tps: float = 40.0
    """pacs: transactions per second per writer."""
    command: str | None = None


@dataclass(frozen=True)
class Checked:
    ok: bool
    text: str
    figures: dict[str, Any]


class Load(Protocol):
    def start(self) -> str: ...
    def at_cutover(self) -> None: ...
    def stop(self) -> tuple[str, dict[str, Any]]: ...
    def check(self) -> Checked | None: ...
    def close(self) -> None: ...


def make(cfg: Config, spec: LoadSpec) -> Load:
    if spec.kind == "command":
        return CommandLoad(cfg, spec)
    if spec.kind == "pacs":
        return PacsLoad(cfg, spec)
    return GenericLoad(cfg, spec)


class GenericLoad:
    def __init__(self, cfg: Config, spec: LoadSpec) -> None:
        self.cfg = cfg
        self.workload = GenericWorkload(cfg.source_dsn, cfg.tables, GenericSpec(writers=spec.writers, rate=spec.rate))

    def start(self) -> str:
        self.workload.start()
        spec = self.workload.spec
        return f"generic: {spec.writers} writers, {spec.rate:g} transactions/s, {len(self.workload.plans)} tables"

    def at_cutover(self) -> None:
        """The writers go on into the freeze (their writes are rejected there, and counted)."""

    def stop(self) -> tuple[str, dict[str, Any]]:
        stats = self.workload.stop()
        return stats.render_text(), stats.to_dict()

    def check(self) -> Checked:
        found = self.workload.check(self.cfg.target_dsn, self.cfg.source_dsn)
        return Checked(found.ok, found.render_text(), found.to_dict())

    def close(self) -> None:
        try:
            self.workload.stop()
        finally:
            self.workload.remove_ledgers()


class PacsLoad:
    def __init__(self, cfg: Config, spec: LoadSpec) -> None:
        self.cfg = cfg
        self.workload = Workload(cfg.source_dsn, WorkloadSpec(processes=spec.writers, tps=spec.tps,
                                                              long_transaction_seconds=3.0))

    def start(self) -> str:
        self.workload.start()
        return f"pacs: {self.workload.spec.processes} writers at {self.workload.spec.tps:g} transactions/s each"

    def at_cutover(self) -> None:
        """The writers go on into the freeze (their writes are rejected there, and counted)."""

    def stop(self) -> tuple[str, dict[str, Any]]:
        stats = self.workload.stop().to_dict()
        return (f"workload (pacs): {stats['committed']} transactions committed, {stats['frozen_rejections']} "
                f"rejected by the freeze, {stats['rolled_back_on_purpose']} rolled back on purpose", stats)

    def check(self) -> Checked:
        stats = self.workload.stop()
        found = pacs_verify(self.cfg.target_dsn, stats)
        return Checked(found.ok, f"workload ledger on the target: {len(found.missing)} committed studies missing, "
                                 f"{len(found.resurrected)} purged studies present, {found.rolled_back_rows} "
                                 "rolled-back rows",
                       {"missing": len(found.missing), "resurrected": len(found.resurrected),
                        "rolled_back_rows": found.rolled_back_rows})

    def close(self) -> None:
        if self.workload.stats is None:
            try:
                self.workload.stop()
            except RuntimeError:  # never started
                pass


class CommandLoad:
    """The site's load tool: a shell command started in a session of its own before the copy, stopped with SIGTERM
    when the cutover begins (killed after COMMAND_STOP_SECONDS). Its output goes to `rehearsal-workload.log` in the
    configuration's local directory. It is given MIGRATOR_SOURCE and MIGRATOR_TARGET (host:port/dbname, as the
    switch commands are); migrator cannot know what it committed, so the check is the rehearsal's full verify."""

    def __init__(self, cfg: Config, spec: LoadSpec) -> None:
        assert spec.command
        self.cfg, self.command = cfg, spec.command
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit: int | None = None
        self.early: int | None = None
        """Its exit status when it ended by itself before the cutover."""
        self.log_path = cfg.local_dir / "rehearsal-workload.log"

    def start(self) -> str:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, MIGRATOR_SOURCE=db.describe_dsn(self.cfg.source_dsn),
                   MIGRATOR_TARGET=db.describe_dsn(self.cfg.target_dsn))
        with Path(self.log_path).open("ab") as out:
            self.proc = subprocess.Popen(self.command, shell=True, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        get(phase="rehearse").info("rehearse.workload_started", kind="command", pid=self.proc.pid)
        return f"command (pid {self.proc.pid}; its output in {self.log_path})"

    def at_cutover(self) -> None:
        if self.proc is None or self.exit is not None:
            return
        self.early = self.proc.poll()
        if self.early is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(COMMAND_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.exit = self.proc.returncode
        get(phase="rehearse").info("rehearse.workload_stopped", kind="command", exit=self.exit,
                                   ended_early=self.early is not None)

    def stop(self) -> tuple[str, dict[str, Any]]:
        self.at_cutover()
        if self.early is not None:
            text = (f"workload command ended by itself before the cutover (exit {self.early}): the cutover ran "
                    f"without its load; see {self.log_path}")
        else:
            text = f"workload command stopped by SIGTERM at the cutover (exit {self.exit})"
        return text, {"kind": "command", "exit": self.exit, "ended_early": self.early is not None,
                      "log": str(self.log_path)}

    def check(self) -> None:
        """Nothing to compare but the full verify."""
        return None

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.at_cutover()
