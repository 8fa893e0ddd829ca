"""The guardian: a small process that sees a cutover or rollback through when the process running it dies.

An operator's SSH session dropping, an OOM kill or a kill -9 while clients are paused or the legacy database is
frozen would otherwise leave the hospital waiting on a pooler nobody resumes. So before it pauses or freezes anything
(its `guard` step), a cutover or rollback starts a guardian: `python -m migrator.guardian`, in a session of its own
(a hang-up or a kill of the operator's process group does not reach it), given the configuration through a pipe.
The flow's process sends it a heartbeat from a thread of its own every HEARTBEAT seconds, whatever a step is doing;
each step is written to a local journal (`Journal`) as it starts and ends, beside the control schema's record,
because the target that holds the control schema may be the server that failed.

When the heartbeat pipe closes without the flow's "ended" (the process died), the guardian acts at once; when it
stays silent for `[cutover] guardian_timeout` seconds (the process hangs), it kills the process first, so that only
one of them ever acts. Acting is `migrator.recovery.resolve`: forward or back from the real state, recorded in the
journal and then in the control schema (retried until the target answers; a re-run writes back what is left). The
guardian and a re-run of the command take turns through the action lock's local file lock (migrator/state/lock.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from migrator.config import Config
from migrator.errors import MigratorError
from migrator.log import get

HEARTBEAT = 0.2
"""Seconds between heartbeats from the flow's process."""
READY_TIMEOUT = 15.0
"""How long a flow waits for its guardian to say it is watching before it stops (nothing paused yet)."""
WRITE_BACK_FOR = 600.0
"""How long a guardian keeps trying to record its outcome in the control schema when the target does not answer."""
_BEAT, _END, _READY = b".", b"E", b"R"


@dataclass
class Journal:
    """What a cutover or rollback attempt did, as far as its process got: kept on local disk so that the guardian
    (or a re-run) can resolve the attempt when the target is out of reach. No row values. The pooler entries are
    kept as the pooler's file has them (a `password=` there is here too: the file is 0600, in a 0700 directory)."""

    kind: str
    attempt: int
    migration: str
    """The migration's id (the control schema's): the journal of one migration is never taken for another's, nor
    for an attempt of the same number after the target was prepared again."""
    target: str
    """The target as host:port/dbname, for messages."""
    pid: int
    """The flow's process."""
    guardian: int = 0
    """The guardian's process."""
    command: int = 0
    """The process of the site's switch or rollback command while it runs (in a session of its own): the guardian
    waits for it, or stops it, before it decides whether clients moved."""
    steps: dict[str, str] = field(default_factory=dict)
    """step → "started" or "done", in the order they started."""
    home: dict[str, str] = field(default_factory=dict)
    """Pooler database name → the entry its clients were served from before this attempt."""
    away: dict[str, str] = field(default_factory=dict)
    """Pooler database name → the entry this attempt moves them to."""
    outcome: str | None = None
    """None while the attempt runs; "ended" when its process finished it (done or undone); "forward" or "back" when
    a guardian or a re-run resolved it after the process died."""
    by: str | None = None
    detail: str = ""
    died_at: float | None = None
    """Wall-clock time the guardian saw the process gone (or silent)."""
    resolved_at: float | None = None
    written_back: bool = False
    reported: bool = False
    """A re-run has told the operator how the attempt was resolved."""
    path: str = ""

    @classmethod
    def create(cls, cfg: Config, kind: str, attempt: int, migration: str, target: str) -> Journal:
        d = cfg.local_dir
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        j = cls(kind=kind, attempt=attempt, migration=migration, target=target, pid=os.getpid(),
                path=str(journal_path(d, kind, attempt, migration)))
        j.save()
        return j

    @classmethod
    def load(cls, path: Path | str) -> Journal:
        data = json.loads(Path(path).read_text())
        data["path"] = str(path)
        return cls(**data)

    def save(self, *, durable: bool = True) -> None:
        """Written to a file beside it and renamed over it: a kill never leaves half a journal. `durable` also
        survives the host's crash (fsync); a step's note, written while clients wait, only needs to survive the
        process (the page cache does), and the guardian decides from the real state first."""
        p = Path(self.path)
        tmp = p.with_name(f".{p.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({k: v for k, v in asdict(self).items() if k != "path"}, f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, p)

    def note(self, step: str, how: str) -> None:
        self.steps[step] = how
        self.save(durable=False)

    @property
    def last_step(self) -> str:
        return next(reversed(self.steps), "")


def journal_path(d: Path, kind: str, attempt: int, migration: str) -> Path:
    """One file per attempt and migration (two migrations may keep their files in one directory)."""
    return d / f"{kind}-{attempt}-{hashlib.sha256(migration.encode()).hexdigest()[:10]}.json"


def journals(cfg: Config, migration: str) -> Iterator[Journal]:
    """This migration's journals in the guardian directory, oldest attempt first."""
    d = cfg.local_dir
    if not d.is_dir():
        return
    found = []
    for p in d.glob("*-*.json"):
        try:
            j = Journal.load(p)
        except (OSError, ValueError, TypeError):
            continue
        if j.migration == migration:
            found.append(j)
    yield from sorted(found, key=lambda j: (j.attempt, j.kind))


# --- the flow's side ------------------------------------------------------------------------------------------------

class Watch:
    """A running guardian, seen from the flow it guards: the heartbeat thread, the journal, and the end."""

    def __init__(self, cfg: Config, journal: Journal) -> None:
        self.journal = journal
        self.step_timeout = cfg.cutover.step_timeout
        self.step_began: float | None = None
        beat_r, self._beat_w = os.pipe()
        ready_r, ready_w = os.pipe()
        log = open(cfg.local_dir / "guardian.log", "ab")  # noqa: SIM115 (the child keeps it)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "migrator.guardian", journal.path, str(beat_r), str(ready_w)],
                stdin=subprocess.PIPE, stdout=log, stderr=log, pass_fds=(beat_r, ready_w), start_new_session=True)
        finally:
            log.close()
            os.close(beat_r)
            os.close(ready_w)
        journal.guardian = self.proc.pid
        journal.save()
        assert self.proc.stdin is not None
        self.proc.stdin.write(pickle.dumps(cfg))
        self.proc.stdin.close()
        try:
            ready, _, _ = select.select([ready_r], [], [], READY_TIMEOUT)
            said = os.read(ready_r, 1) if ready else b""
        finally:
            os.close(ready_r)
        if said != _READY:
            self.proc.kill()
            os.close(self._beat_w)
            raise MigratorError(f"the guardian did not start within {READY_TIMEOUT:.0f}s (its log: "
                                f"{cfg.local_dir / 'guardian.log'}); nothing was paused or frozen",
                                hint="Read the guardian's log, fix the cause and run the command again.")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="guardian-heartbeat", daemon=True)
        self._thread.start()

    def step(self, step: str, how: str) -> None:
        """A step started or ended: noted in the journal, and its clock (re)started for the heartbeat."""
        self.step_began = time.monotonic() if how == "started" else None
        self.journal.note(step, how)

    def _beat(self) -> None:
        """Beat while the flow is alive and no step has run past `[cutover] step_timeout`: a step blocked on a
        server that stopped answering stops the beat, and the guardian takes over as from a hung process."""
        while not self._stop.wait(HEARTBEAT):
            began = self.step_began
            if began is not None and time.monotonic() - began > self.step_timeout:
                get(phase=self.journal.kind).error(f"{self.journal.kind}.step_overran", step=self.journal.last_step,
                                                   seconds=self.step_timeout)
                return
            try:
                os.write(self._beat_w, _BEAT)
            except OSError:
                return

    def end(self, *, recorded: bool) -> None:
        """The flow finished (done, or stopped and undone): let the guardian go. When its outcome is recorded in
        the control schema the journal says "ended"; when not (the target did not answer), it stays open for the
        next re-run, which decides from the real state and records it."""
        self._stop.set()
        self._thread.join()
        if recorded:
            self.journal.outcome = "ended"
            self.journal.save()
        try:
            os.write(self._beat_w, _END)
        except OSError:
            pass
        os.close(self._beat_w)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


# --- the guardian's side ---------------------------------------------------------------------------------------------

def follow(beat_fd: int, timeout: float) -> str:
    """Wait on the heartbeat pipe: "ended" (the flow said so), "died" (the pipe closed without it) or "silent"."""
    while True:
        ready, _, _ = select.select([beat_fd], [], [], timeout)
        if not ready:
            return "silent"
        data = os.read(beat_fd, 4096)
        if not data:
            return "died"
        if _END in data:
            return "ended"


def main(argv: list[str]) -> int:
    journal_path_, beat_fd, ready_fd = argv[0], int(argv[1]), int(argv[2])
    # A hang-up, a Ctrl-C in the operator's terminal or a service manager's stop of the flow must not take the
    # guardian along before it has acted (SIGKILL still does).
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    cfg: Config = pickle.loads(sys.stdin.buffer.read())
    log = get(phase="guardian")
    j = Journal.load(journal_path_)
    os.write(ready_fd, _READY)
    os.close(ready_fd)
    log.info("guardian.watching", kind=j.kind, attempt=j.attempt, pid=j.pid)
    how = follow(beat_fd, cfg.cutover.guardian_timeout)
    if how == "ended":
        log.info("guardian.flow_ended", kind=j.kind, attempt=j.attempt)
        return 0
    died_at = time.time()
    if how == "silent":
        log.error("guardian.flow_silent", kind=j.kind, attempt=j.attempt, pid=j.pid,
                  seconds=cfg.cutover.guardian_timeout)
        try:
            os.kill(j.pid, signal.SIGKILL)  # only one of us acts
        except ProcessLookupError:
            pass
    return _take_over(cfg, journal_path_, died_at, how)


def _take_over(cfg: Config, path: str, died_at: float, how: str) -> int:
    """Resolve the attempt and record it, each time under the local lock and from the journal as it is on disk (a
    re-run may have done either meanwhile); retried while the decision cannot be made or the target does not
    answer."""
    from migrator import recovery
    from migrator.state.lock import advisory_if_reachable, local_lock

    log = get(phase="guardian")
    deadline = time.monotonic() + WRITE_BACK_FOR
    while True:
        with local_lock(cfg, wait=None), advisory_if_reachable(cfg):
            j = Journal.load(path)
            if j.outcome == "ended" or j.written_back:
                log.info("guardian.nothing_left", kind=j.kind, attempt=j.attempt, outcome=j.outcome)
                return 0
            try:
                if j.outcome is None:
                    j.died_at = died_at
                    log.error("guardian.taking_over", kind=j.kind, attempt=j.attempt, step=j.last_step, how=how)
                    recovery.resolve(cfg, j, by="the guardian")
                if recovery.write_back(cfg, j):
                    return 0
            except recovery.Undecided as exc:
                log.error("guardian.undecided", kind=j.kind, attempt=j.attempt, reason=str(exc))
        if time.monotonic() > deadline:
            log.error("guardian.gave_up", kind=j.kind, attempt=j.attempt, journal=path,
                      what_to_do=f"run `migrator {j.kind} --yes`")
            return 1
        time.sleep(2.0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
