"""Fault points: where a test or a benchmark makes a process die on purpose, to prove what survives it.

`reached("cutover.freeze.ran")` kills the calling process's whole process group with SIGKILL when the environment
variable MIGRATOR_FAULT_KILL names that point, as an operator's dropped SSH session or an OOM kill would, at a moment
a test can name instead of guess. Unset (always, outside tests and `bench/`), it does nothing. Points are
`<flow>.<step>.started` (the step recorded as started, its action not yet run), `<flow>.<step>.ran` (its action done,
not yet recorded), and `<flow>.switch.rewritten` (the pooler's file rewritten, RELOAD not sent). MIGRATOR_FAULT_STOP
names a point where the process stops itself (SIGSTOP), as a hung one would.
"""

from __future__ import annotations

import os
import signal

ENV = "MIGRATOR_FAULT_KILL"
STOP_ENV = "MIGRATOR_FAULT_STOP"
"""The same points, where the process stops itself (SIGSTOP) instead: a hung process, as a test can name it."""


def reached(point: str) -> None:
    if os.environ.get(ENV) == point:
        os.killpg(0, signal.SIGKILL)
    if os.environ.get(STOP_ENV) == point:
        os.kill(os.getpid(), signal.SIGSTOP)
