"""What the guardian tests (tests/test_guardian.py) and its benchmark (bench/guardian.py) assume of the mechanism that
brings a cutover or rollback whose process died to one side: the fault points, the side each point resolves to, the
bound on the clients' wait, and how a command is killed and run again. Kept in one place so that a change of the
contract is one change here.

The contract (issue 13, section 2):
- `MIGRATOR_FAULT_KILL=<flow>.<step>.<started|ran>` (or `<flow>.switch.rewritten`) makes a `migrator cutover` or
  `migrator rollback` process SIGKILL its own process group when it reaches that point: `started` once the step is
  recorded as started, before its action; `ran` once its action is done, before it is recorded done; `rewritten`
  once the pooler's file is rewritten, before RELOAD.
- `[cutover] guardian_timeout` (seconds): the guardian takes over after that much heartbeat silence, at once when the
  process is dead. Clients complete transactions again within `guardian_timeout + 10` seconds of the kill.
- The point of no return: for a cutover the switch (done once RELOAD made the pooler serve the target), for a rollback
  the release of the legacy database. Before it the guardian goes back, after it forward.
- After the guardian: the side the pooler serves takes writes; a frozen side rejects them (SQLSTATE 25006).
- `migrator <flow> --yes` run again resolves what is left and completes the flow (exit 0).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from migrator import cutover, rollback

FAULT_ENV = "MIGRATOR_FAULT_KILL"
GUARDIAN_TIMEOUT = 2.0
"""`[cutover] guardian_timeout` in the tests (the default is 5)."""
LOCK_BUSY = "another cutover or rollback is running"
"""What a command says when the action lock is held (migrator/state/lock.py): the guardian may hold it a moment
after clients resumed; a re-run then waits and tries again, as its hint says."""

STEPS = {"cutover": cutover.POOLER_STEPS, "rollback": rollback.POOLER_STEPS}
"""Each flow's steps through a pooler, in order (without one, the same less pause and resume)."""
NO_RETURN = {"cutover": "switch", "rollback": "release"}
"""Each flow's point of no return: once its action has run, the guardian goes forward."""


def bound(guardian_timeout: float = GUARDIAN_TIMEOUT) -> float:
    """Seconds after the kill within which every client completes a transaction again."""
    return guardian_timeout + 10.0


def points(flow: str) -> list[str]:
    """Every fault point of a flow through a pooler, in the order the flow reaches them."""
    out = []
    for step in STEPS[flow]:
        out.append(f"{flow}.{step}.started")
        if step == "switch":
            out.append(f"{flow}.switch.rewritten")
        out.append(f"{flow}.{step}.ran")
    return out


def forward(point: str) -> bool:
    """Whether a kill at `point` leaves the flow past its point of no return (the guardian completes it)."""
    flow, step, when = point.split(".")
    order = list(STEPS[flow])
    at, pnr = order.index(step), order.index(NO_RETURN[flow])
    return at > pnr or (at == pnr and when == "ran")


def served_after_guardian(point: str) -> str:
    """"legacy" or "target": the side clients are on once the guardian has acted on a kill at `point`."""
    flow = point.split(".")[0]
    moved = forward(point)
    if flow == "cutover":
        return "target" if moved else "legacy"
    return "legacy" if moved else "target"


def frozen_after_guardian(point: str) -> str | None:
    """The side that rejects client writes once the guardian has acted on a kill at `point`, or None.

    A cutover undone leaves the target as it was before the cutover (written by sync, not frozen); completed, the
    legacy database frozen. A rollback undone leaves the legacy database frozen (as the cutover left it); completed,
    the target frozen (its freeze step; `disarm` keeps it) until the next cutover or `migrator release --target`."""
    flow = point.split(".")[0]
    if flow == "cutover":
        return "legacy" if forward(point) else None
    return "target" if forward(point) else "legacy"


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    ended: float
    """time.monotonic() when the process was seen to end."""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIGRATOR_")}
    env.update(extra)
    return env


def migrator_exe() -> str:
    return str(Path(sys.executable).with_name("migrator"))


def run(config: Path, *args: str, timeout: float = 180, **env: str) -> Run:
    """Run `migrator --config CONFIG ARGS` as an operator would, in a session (process group) of its own, without a
    terminal. Output goes to files, not pipes: a guardian the command leaves behind may hold them open."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([migrator_exe(), "--config", str(config), *args], env=_env(**env),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        ended = time.monotonic()
        out.seek(0)
        err.seek(0)
        return Run(code, out.read().decode(errors="replace"), err.read().decode(errors="replace"), ended)


def killed_at(config: Path, point: str) -> Run:
    """Run the flow of `point` (`migrator cutover --yes` or `rollback --yes`) with the fault injected at `point`;
    AssertionError unless it died by SIGKILL. `ended` is the moment of the kill (within milliseconds)."""
    flow = point.split(".")[0]
    r = run(config, flow, "--yes", **{FAULT_ENV: point})
    assert r.returncode == -signal.SIGKILL, (
        f"`migrator {flow} --yes` with {FAULT_ENV}={point} was not killed there (exit {r.returncode}):\n"
        f"{r.stderr[-2000:]}")
    return r


def rerun(config: Path, flow: str, *, wait: float | None = None) -> Run:
    """`migrator <flow> --yes` after a kill, as the operator's recovery; while the guardian still holds the action
    lock (it may, a moment after the clients resumed), it is tried again, for up to `wait` seconds."""
    deadline = time.monotonic() + (bound() if wait is None else wait)
    while True:
        r = run(config, flow, "--yes")
        if LOCK_BUSY not in r.stderr or time.monotonic() > deadline:
            return r
        time.sleep(0.5)
