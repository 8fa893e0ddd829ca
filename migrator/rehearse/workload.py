"""A concurrent clinical write workload against the legacy database, for rehearsals, scenario tests and benchmarks.

Each worker is a separate OS process (multiprocessing, 'spawn') with its own connection that plays the application:
short transactions (studies arriving, reports, demographic corrections that may change a study's UID, purges,
studies re-sent under the same UID, radiotherapy courses, audit events with exact duplicates), some rolled back on
purpose, at a bounded rate, until `Workload.stop` or a deadline. With `long_transaction_seconds` one more process
keeps opening a transaction, writing, sleeping that long and committing, so that some commits arrive late.

Workers deliberately do not pin session settings the way migrator does: they use different DateStyle, TimeZone and
extra_float_digits, as the several applications writing into a real PACS do, so capture must not depend on them.
Database errors (a frozen database, lock timeouts, conflicts between workers) are counted by SQLSTATE and the worker
carries on; a worker never crashes on a database error.

The ledger says which studies must exist once the workload's changes have all arrived, and which must not. A worker
records a study as present when a commit creates it (arrival, re-insert, new UID of a renamed study) and as gone when
a commit removes it (purge, old UID of a rename, first half of a re-insert in two transactions). Only the worker
that created a study removes or re-creates it; studies of the built database (`pacs.STUDY_UID_ROOT`) may be removed
by any worker but are never re-created. So each UID's history is written by one process, and the ledgers merge
without ordering. Rolled-back writes carry `ROLLED_BACK_MARKER`, so `verify` can tell if one ever shows up.

The vocabulary (spec, stats, check) is in `spec`, the worker processes in `writers`; this module starts and stops
them, merges their ledgers and checks a database against the result. Scripts that start a workload need the usual
`if __name__ == "__main__":` guard ('spawn' re-imports the main module).
"""

from __future__ import annotations

import multiprocessing
import queue
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import psycopg

from migrator import log
from migrator.db import describe_dsn
from migrator.errors import ConnectionFailed, MigratorError
from migrator.rehearse.pacs import STUDY_UID_ROOT
from migrator.rehearse.spec import (
    DEFAULT_MIX,
    FROZEN,
    KINDS,
    ROLLED_BACK_MARKER,
    Report,
    Survey,
    WorkloadCheck,
    WorkloadSpec,
    WorkloadStats,
)
from migrator.rehearse.writers import worker_main

__all__ = ["DEFAULT_MIX", "FROZEN", "KINDS", "ROLLED_BACK_MARKER", "Workload", "WorkloadCheck", "WorkloadSpec",
           "WorkloadStats", "verify"]


class Workload:
    """Worker processes writing into the legacy database; `with Workload(dsn, spec) as w:` starts and stops them."""

    def __init__(self, dsn: str, spec: WorkloadSpec | None = None) -> None:
        self.dsn = dsn
        self.spec = spec or WorkloadSpec()
        self._ctx = multiprocessing.get_context("spawn")
        self._processes: list[Any] = []
        self._reports: list[Report] = []
        self._stop_event: Any = None
        self._queue: Any = None
        self._started = 0.0
        self.stats: WorkloadStats | None = None
        self._log = log.get(phase="rehearse", step="workload", database=describe_dsn(dsn))

    def start(self, ready_timeout: float = 60) -> None:
        """Start the workers and return once every one of them is connected and writing.

        Starting a process with 'spawn' takes a while (longer on a busy machine); waiting here means that a caller
        who lets the workload run for some seconds gets that many seconds of writes.
        """
        if self._processes:
            raise RuntimeError("the workload is already started")
        survey = _survey(self.dsn)
        self._stop_event = self._ctx.Event()
        self._queue = self._ctx.Queue()
        ready = self._ctx.Semaphore(0)
        roles = ["short"] * self.spec.processes + (["long"] if self.spec.long_transaction_seconds > 0 else [])
        for index, role in enumerate(roles):
            process = self._ctx.Process(
                target=worker_main,
                args=(self.dsn, self.spec, index, role, survey, self._stop_event, ready, self._queue),
                name=f"rehearse-workload-{index}",
                daemon=True,
            )
            process.start()
            self._processes.append(process)
        deadline = time.monotonic() + ready_timeout
        waiting = len(roles)
        while waiting:
            if ready.acquire(timeout=0.2):
                waiting -= 1
            elif time.monotonic() > deadline or any(p.exitcode not in (None, 0) for p in self._processes):
                self.stop()
                raise ConnectionFailed(
                    f"the workload's processes did not all connect to {describe_dsn(self.dsn)} "
                    f"within {ready_timeout} s"
                )
        self._started = time.monotonic()
        self._log.info("rehearse.workload_started", processes=len(roles), tps=self.spec.tps,
                       long_transaction_seconds=self.spec.long_transaction_seconds)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the workers to finish on their own (duration or count reached); True when they all have."""
        deadline = None if timeout is None else time.monotonic() + timeout
        return self._collect(deadline)

    def stop(self, timeout: float = 30) -> WorkloadStats:
        """Ask the workers to finish their current transaction, collect their reports and join them."""
        if self.stats is not None:
            return self.stats
        if not self._processes:
            raise RuntimeError("the workload was never started")
        self._stop_event.set()
        deadline = time.monotonic() + timeout
        self._collect(deadline)
        for process in self._processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.terminate()
                process.join(5)
        self._queue.close()
        self._queue.join_thread()
        self.stats = _merge(self._reports, len(self._processes), time.monotonic() - self._started)
        self._log.info("rehearse.workload_stopped", committed=self.stats.committed, rolled_back=self.stats.rolled_back,
                       failed=self.stats.failed, frozen=self.stats.frozen, workers_lost=self.stats.workers_lost,
                       studies_present=len(self.stats.studies_present), studies_gone=len(self.stats.studies_gone))
        return self.stats

    def _collect(self, deadline: float | None) -> bool:
        while len(self._reports) < len(self._processes):
            wait = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
            if wait <= 0:
                return False
            try:
                self._reports.append(self._queue.get(timeout=wait))
            except queue.Empty:
                if not any(p.is_alive() for p in self._processes):
                    try:  # a report may still be in the pipe after its sender exited
                        self._reports.append(self._queue.get(timeout=0.5))
                    except queue.Empty:
                        return False
        return True

    def __enter__(self) -> Workload:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._processes and self.stats is None:
            self.stop()


def verify(dsn: str, stats: WorkloadStats) -> WorkloadCheck:
    """Check a database (the legacy one, or the target after cutover) against the workload's ledger and markers."""
    try:
        with psycopg.connect(dsn, autocommit=True, application_name="migrator-rehearse-verify") as conn:
            missing = conn.execute(
                "SELECT u FROM unnest(%s::text[]) AS u"
                " WHERE NOT EXISTS (SELECT 1 FROM public.study s WHERE s.study_uid = u) ORDER BY u",
                (sorted(stats.studies_present),),
            ).fetchall()
            resurrected = conn.execute(
                "SELECT study_uid FROM public.study WHERE study_uid = ANY(%s::text[]) ORDER BY study_uid",
                (sorted(stats.studies_gone),),
            ).fetchall()
            marked = conn.execute(_COUNT_MARKED, {"m": ROLLED_BACK_MARKER}).fetchone()
    except psycopg.Error as exc:
        raise MigratorError(f"cannot check the workload's ledger in {describe_dsn(dsn)}: {exc.sqlstate}") from exc
    assert marked is not None
    return WorkloadCheck(tuple(r[0] for r in missing), tuple(r[0] for r in resurrected), int(marked[0]))


_COUNT_MARKED = """
SELECT (SELECT count(*) FROM public.patient WHERE family_name = %(m)s)
     + (SELECT count(*) FROM public.study WHERE description = %(m)s OR accession = %(m)s)
     + (SELECT count(*) FROM public.series WHERE body_part = %(m)s)
     + (SELECT count(*) FROM public.instance WHERE transfer_syntax = %(m)s)
     + (SELECT count(*) FROM oncology."Treatment Course" WHERE notes = %(m)s)
     + (SELECT count(*) FROM public.audit_event WHERE action = %(m)s)
"""


def _survey(dsn: str) -> Survey:
    try:
        with psycopg.connect(dsn, autocommit=True, application_name="migrator-rehearse-workload") as conn:
            row = conn.execute(
                """
                SELECT (SELECT coalesce(max(substr(study_uid, length(%(root)s) + 1)::bigint), 0)
                          FROM public.study WHERE starts_with(study_uid, %(root)s)),
                       (SELECT coalesce(max(patient_id), 0) FROM public.patient WHERE starts_with(mrn, 'MRN')),
                       (SELECT coalesce(max(course_id), 0) FROM oncology."Treatment Course")
                """,
                {"root": STUDY_UID_ROOT},
            ).fetchone()
    except psycopg.Error as exc:
        raise ConnectionFailed(
            f"cannot start the workload on {describe_dsn(dsn)}: {exc.sqlstate or 'connection failed'}",
            hint=None if exc.sqlstate is None else "The workload needs a database built by rehearse.pacs.build.",
        ) from exc
    assert row is not None
    return Survey(int(row[0]), int(row[1]), int(row[2]))


def _merge(reports: Sequence[Report], processes: int, seconds: float) -> WorkloadStats:
    failed: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    states: dict[str, set[str]] = {}
    for report in reports:
        failed.update(report.failed)
        kinds.update(report.kinds)
        for uid, state in report.ledger.items():
            states.setdefault(uid, set()).add(state)
    # Two workers disagreeing about one UID would be a bug in the ownership rules; never claim either outcome then.
    final = {uid: s.pop() if len(s) == 1 else "unknown" for uid, s in states.items()}
    return WorkloadStats(
        committed=sum(r.committed for r in reports),
        rolled_back=sum(r.rolled_back for r in reports),
        failed=dict(failed),
        kinds=dict(kinds),
        studies_present=frozenset(u for u, s in final.items() if s == "present"),
        studies_gone=frozenset(u for u, s in final.items() if s == "gone"),
        studies_unknown=frozenset(u for u, s in final.items() if s == "unknown"),
        workers_lost=processes - len(reports),
        seconds=seconds,
    )
