"""The rehearsal workload's vocabulary, shared by the parent (`workload`) and its worker processes (`writers`): the
transaction kinds and their mix, what a run is asked to do (`WorkloadSpec`), what each worker reports and what the
parent merges from the reports (`WorkloadStats`), and what a database is checked against (`WorkloadCheck`)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import psycopg

ROLLED_BACK_MARKER = "rehearse: rolled back, must never be seen"
"""Written only by statements that are rolled back (whole transaction or to a savepoint)."""

FROZEN = "25006"  # read_only_sql_transaction: what a frozen legacy database answers
FROZEN_PAUSE = 0.3
"""Seconds a writer waits after the frozen database refused it, before its next transaction."""

DEFAULT_MIX: tuple[tuple[str, int], ...] = (
    ("arrive", 30),
    ("report", 20),
    ("demographics", 10),
    ("purge", 5),
    ("resend", 4),
    ("resend_split", 3),
    ("savepoint", 5),
    ("rollback", 5),
    ("treatment", 8),
    ("audit", 10),
)
KINDS = frozenset(kind for kind, _ in DEFAULT_MIX)


@dataclass(frozen=True)
class WorkloadSpec:
    processes: int = 2
    tps: float | None = 50
    """Transactions per second per process; None runs as fast as the server allows."""
    long_transaction_seconds: float = 0
    """When > 0, one extra process runs long transactions that stay open this long before committing."""
    long_transaction_pause: float = 0.5
    """Seconds between two long transactions, so that a cutover waiting for them to end gets its turn."""
    seed: int = 1
    duration: float | None = None
    """Seconds the workers run; None runs until `Workload.stop`, but never longer than `max_duration`."""
    max_duration: float = 3600
    max_transactions: int = 1_000_000
    """Per process, whatever the duration."""
    mix: tuple[tuple[str, int], ...] = DEFAULT_MIX
    """Relative weights of the transaction kinds (names from `KINDS`)."""

    def __post_init__(self) -> None:
        unknown = {kind for kind, _ in self.mix} - KINDS
        if unknown:
            raise ValueError(f"unknown workload kinds: {sorted(unknown)}")
        if self.processes < 0 or self.processes + (self.long_transaction_seconds > 0) == 0:
            raise ValueError("a workload needs at least one process")
        if not any(weight > 0 for _, weight in self.mix):
            raise ValueError("a workload needs at least one kind with a positive weight")


@dataclass(frozen=True)
class WorkloadStats:
    committed: int
    """Transactions committed (a re-insert in two transactions counts two)."""
    rolled_back: int
    """Transactions rolled back on purpose."""
    failed: dict[str, int]
    """Transactions that failed, by SQLSTATE ("connection" when there is none, "python:<type>" for a bug here)."""
    kinds: dict[str, int]
    """Units of work completed, by kind."""
    studies_present: frozenset[str]
    """Study UIDs the workload created or kept and did not remove: they must exist."""
    studies_gone: frozenset[str]
    """Study UIDs the workload removed and never re-created: they must not exist."""
    studies_unknown: frozenset[str]
    """Study UIDs whose last commit's outcome is unknown (the connection broke during COMMIT)."""
    workers_lost: int
    """Processes that never reported (killed); their ledger is missing."""
    seconds: float

    @property
    def frozen(self) -> int:
        """Writes the frozen database rejected."""
        return self.failed.get(FROZEN, 0)

    @property
    def surviving_studies(self) -> frozenset[str]:
        """The studies a target must hold after cutover (the same as `studies_present`)."""
        return self.studies_present

    def to_dict(self) -> dict[str, Any]:
        """Counts only, for reports and --json (the ledger's UIDs stay out: use `verify`)."""
        return {
            "committed": self.committed,
            "rolled_back_on_purpose": self.rolled_back,
            "failed": dict(self.failed),
            "frozen_rejections": self.frozen,
            "kinds": dict(self.kinds),
            "studies_present": len(self.studies_present),
            "studies_gone": len(self.studies_gone),
            "studies_unknown": len(self.studies_unknown),
            "workers_lost": self.workers_lost,
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class WorkloadCheck:
    missing: tuple[str, ...]
    """Ledger studies that must exist but do not."""
    resurrected: tuple[str, ...]
    """Ledger studies that were removed but exist."""
    rolled_back_rows: int
    """Rows carrying ROLLED_BACK_MARKER."""

    @property
    def ok(self) -> bool:
        return not self.missing and not self.resurrected and self.rolled_back_rows == 0


@dataclass(frozen=True)
class Survey:
    """Key ranges of the built database, so workers pick existing rows without scanning for them."""

    base_studies: int
    base_patients: int
    max_course: int


@dataclass
class Report:
    committed: int = 0
    rolled_back: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    ledger: dict[str, str] = field(default_factory=dict)
    """study_uid -> "present" | "gone" | "unknown", last commit wins (one writer per UID, see the module doc)."""


def end_failed(conn: psycopg.Connection[Any] | None, sqlstate: str | None, stop: Any) -> None:
    """A writer's transaction failed: roll it back, or close a connection that cannot (the writer reconnects); after
    the freeze's refusal, wait FROZEN_PAUSE (or until `stop`, a threading or multiprocessing Event, is set)."""
    if conn is not None:
        if conn.broken:
            conn.close()
        else:
            try:
                conn.rollback()
            except psycopg.Error:
                conn.close()
    if sqlstate == FROZEN:
        stop.wait(FROZEN_PAUSE)
