"""The generic workload: writers derived from the catalog, for any schema (`rehearse --workload generic`).

`GenericWorkload` plans what may be written (`plan`), starts writer processes (`generic_writer`: updates of existing
rows, copies of existing rows under new keys, deletes of their own copies, at `--rate` transactions per second over
all writers), stops them, and checks a database against what they saw committed (`check`): every row a writer
inserted is there with the row it wrote, every copy it deleted is not, every column it updated holds the value it
set, and every row image of a table without a key is there as often as the writer last counted it. The ledgers are
files (`ledger`), read back in batches: memory stays bounded however long the rehearsal runs. What the schema
refused (a check, a unique index the copy did not renew, a type's range) is counted by table, kind and SQLSTATE and
reported, never fatal. Keys, digests and counts only: no row value leaves a database.
"""

from __future__ import annotations

import multiprocessing
import queue
import shutil
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from migrator import catalog, db, log
from migrator.config import TableFilter
from migrator.errors import ConnectionFailed, MigratorError
from migrator.rehearse.generic_writer import GenericSpec, WriterReport, writer_main
from migrator.rehearse.ledger import GONE, PRESENT, Key, Ledger
from migrator.rehearse.plan import TablePlan, plan
from migrator.rehearse.spec import FROZEN

CHECK_BATCH = 500
SAMPLED_KEYS = 20_000
"""Rows a writer samples over all tables at most (per table: this divided by the tables, 10 to 200)."""
REFUSED_CLASSES = ("22", "23", "42")
"""SQLSTATE classes of a write the schema refused: data exceptions, integrity constraints, rules and privileges."""

__all__ = ["GenericCheck", "GenericSpec", "GenericStats", "GenericWorkload"]


@dataclass(frozen=True)
class GenericStats:
    committed: int
    writes: dict[str, int]
    """Writes committed by kind (update, insert, delete)."""
    refused: dict[str, dict[str, int]]
    """"schema.table kind" -> {SQLSTATE: transactions} that the schema refused (classes 22, 23, 42)."""
    failed: dict[str, int]
    """Other failures by SQLSTATE (lock timeouts, conflicts, lost connections), the freeze's rejections apart."""
    frozen: int
    """Writes the frozen legacy database rejected."""
    skipped: dict[str, str]
    """"schema.table kind" -> why the workload does not write it so."""
    tables: int
    workers_lost: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "generic", "committed": self.committed, "writes": self.writes, "refused": self.refused,
                "failed": self.failed, "frozen_rejections": self.frozen, "skipped": self.skipped,
                "tables": self.tables, "workers_lost": self.workers_lost, "seconds": round(self.seconds, 3)}

    def render_text(self) -> str:
        w = self.writes
        lines = [f"workload (generic, {self.tables} tables): {self.committed} transactions committed "
                 f"({w.get('update', 0)} updates, {w.get('insert', 0)} inserted copies, {w.get('delete', 0)} "
                 f"deletes), {self.frozen} rejected by the freeze"]
        for where, states in sorted(self.refused.items()):
            lines.append(f"  refused by the schema: {where}: "
                         + ", ".join(f"{n} x SQLSTATE {s}" for s, n in sorted(states.items())))
        if self.failed:
            lines.append("  other failures: " + ", ".join(f"{n} x {s}" for s, n in sorted(self.failed.items())))
        for where, why in sorted(self.skipped.items()):
            lines.append(f"  not written: {where}: {why}")
        return "\n".join(lines)


@dataclass
class GenericCheck:
    checked: int = 0
    """Writes compared (rows inserted or deleted, columns updated, row images counted)."""
    missing: int = 0
    """Rows inserted, or updated, that are not there."""
    different: int = 0
    """Rows inserted, or columns updated, that hold something else than the writer committed."""
    resurrected: int = 0
    """Copies deleted that are there."""
    miscounted: int = 0
    """Row images (tables without a key) whose count differs."""
    superseded: int = 0
    """Writes the target does not hold as committed, where the legacy database holds what the target holds: changed
    since by something else (a trigger of another table, another client); parity judges those rows."""
    unknown: int = 0
    """Writes whose commit's outcome the writer could not know (not compared)."""
    by_table: dict[str, int] = field(default_factory=dict)
    """Problems by table."""

    @property
    def ok(self) -> bool:
        return not (self.missing or self.different or self.resurrected or self.miscounted)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "checked": self.checked, "missing": self.missing, "different": self.different,
                "resurrected": self.resurrected, "miscounted": self.miscounted, "superseded": self.superseded,
                "unknown": self.unknown,
                "by_table": self.by_table}

    def render_text(self) -> str:
        if self.ok:
            return (f"every committed workload write present ({self.checked} compared; {self.superseded} changed since "
                    f"on the legacy database too, {self.unknown} of unknown outcome)")
        return (f"{self.missing} inserted rows missing, {self.different} rows or columns different, "
                f"{self.resurrected} deleted rows present, {self.miscounted} row images miscounted, of "
                f"{self.checked} compared; by table: {self.by_table}")


class GenericWorkload:
    """Writer processes on the legacy database; `start`, `request_stop` (no wait), `stop`, then `check` a database."""

    def __init__(self, dsn: str, tables: TableFilter, spec: GenericSpec) -> None:
        self.dsn, self.tables, self.spec = dsn, tables, spec
        self._ctx = multiprocessing.get_context("spawn")
        self._processes: list[Any] = []
        self._reports: list[WriterReport] = []
        self._dir = Path(tempfile.mkdtemp(prefix="migrator-workload-"))
        self._stop_event: Any = None
        self._queue: Any = None
        self._started = 0.0
        self.plans: list[TablePlan] = []
        self.stats: GenericStats | None = None
        self._log = log.get(phase="rehearse", step="workload", database=db.describe_dsn(dsn))

    def start(self, ready_timeout: float = 120) -> None:
        """Plan, start the writers, and return once each has sampled its rows and is writing."""
        with db.session(self.dsn, role="source") as conn:
            tables = catalog.list_tables(conn, self.tables)
            conn.commit()
            self.plans = plan(conn, tables)
        if not any(p.updates or not p.no_insert for p in self.plans):
            raise MigratorError("the generic workload finds nothing it can write in the legacy database",
                                hint="Use --workload-command with the site's own load tool, or include tables "
                                     "with a key ([tables] include).")
        per_table = max(10, min(200, SAMPLED_KEYS // max(1, len(self.plans))))
        spec = GenericSpec(**{**self.spec.__dict__, "sample": min(self.spec.sample, per_table)})
        self._stop_event, self._queue = self._ctx.Event(), self._ctx.Queue()
        ready = self._ctx.Semaphore(0)
        tag = uuid.uuid4().hex[:4]
        for index in range(spec.writers):
            process = self._ctx.Process(
                target=writer_main, name=f"rehearse-generic-{index}", daemon=True,
                args=(self.dsn, self.plans, spec, index, tag, str(self._ledger(index)), self._stop_event, ready,
                      self._queue))
            process.start()
            self._processes.append(process)
        deadline = time.monotonic() + ready_timeout
        waiting = spec.writers
        while waiting:
            if ready.acquire(timeout=0.2):
                waiting -= 1
            elif time.monotonic() > deadline or any(p.exitcode not in (None, 0) for p in self._processes):
                self.stop()
                raise ConnectionFailed(f"the workload's writers did not all start on {db.describe_dsn(self.dsn)} "
                                       f"within {ready_timeout:g} s")
        self._started = time.monotonic()
        self._log.info("rehearse.workload_started", kind="generic", writers=spec.writers, rate=spec.rate,
                       tables=len(self.plans))

    def _ledger(self, index: int) -> Path:
        return self._dir / f"writer-{index}.sqlite"

    def remove_ledgers(self) -> None:
        """Remove the writers' ledger files (after the check)."""
        shutil.rmtree(self._dir, ignore_errors=True)

    def request_stop(self) -> None:
        if self._stop_event is not None:
            self._stop_event.set()

    def stop(self, timeout: float = 30) -> GenericStats:
        """Stop the writers (each finishes its transaction), collect their reports, join them."""
        if self.stats is not None:
            return self.stats
        self.request_stop()
        deadline = time.monotonic() + timeout
        while len(self._reports) < len(self._processes) and time.monotonic() < deadline:
            try:
                self._reports.append(self._queue.get(timeout=0.2))
            except queue.Empty:
                if not any(p.is_alive() for p in self._processes):
                    break
        for process in self._processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.terminate()
                process.join(5)
        if self._queue is not None:
            self._queue.close()
            self._queue.join_thread()
        self.stats = self._merge(time.monotonic() - self._started if self._started else 0.0)
        self._log.info("rehearse.workload_stopped", kind="generic", committed=self.stats.committed,
                       writes=self.stats.writes, frozen=self.stats.frozen, workers_lost=self.stats.workers_lost)
        return self.stats

    def _merge(self, seconds: float) -> GenericStats:
        writes: Counter[str] = Counter()
        refused: dict[str, Counter[str]] = {}
        failed: Counter[str] = Counter()
        frozen = 0
        for report in self._reports:
            writes.update(report.writes)
            for where, n in report.failed.items():
                table, kind, state = where.rsplit("|", 2)
                if state == FROZEN:
                    frozen += n
                elif state[:2] in REFUSED_CLASSES:
                    refused.setdefault(f"{table} {kind}", Counter())[state] += n
                else:
                    failed[state] += n
        skipped = {f"{p.display} {kind}": why for p in self.plans
                   for kind, why in (("insert", p.no_insert), ("update", p.no_update)) if why}
        return GenericStats(sum(r.committed for r in self._reports), dict(writes),
                            {k: dict(v) for k, v in refused.items()}, dict(failed), frozen, skipped, len(self.plans),
                            len(self._processes) - len(self._reports), seconds)

    def check(self, dsn: str, legacy_dsn: str) -> GenericCheck:
        """Compare what the writers committed with the database at `dsn` (the target after cutover); the writers
        must have stopped. Where the two differ, the legacy database (frozen, or no longer written) is read too: when
        it holds what the target holds, something else changed the row after the writer (a trigger, another
        client), and the write is counted as superseded rather than lost."""
        result = GenericCheck()
        try:
            with db.session(dsn, role="target", autocommit=True, application_name="migrator-rehearse-verify") as conn, \
                    db.session(legacy_dsn, role="source", autocommit=True,
                               application_name="migrator-rehearse-verify") as legacy:
                for index in range(len(self._processes)):
                    path = self._ledger(index)
                    if path.exists():
                        ledger = Ledger(path)
                        try:
                            _Checker(self.plans, conn, legacy, result).run(ledger)
                        finally:
                            ledger.close()
        except psycopg.Error as exc:
            raise MigratorError(f"cannot check the workload's writes: {exc.sqlstate or 'connection failed'}") from exc
        return result


class _Checker:
    """One ledger against the target, and the legacy database where the target disagrees with the ledger."""

    def __init__(self, plans: list[TablePlan], target: psycopg.Connection[Any], legacy: psycopg.Connection[Any],
                 result: GenericCheck) -> None:
        self.plans, self.target, self.legacy, self.result = plans, target, legacy, result

    def run(self, ledger: Ledger) -> None:
        self.result.unknown += ledger.unknown_count()
        whole = sql.SQL("md5(x::text)")
        for tbl, rows in ledger.inserted_rows(CHECK_BATCH):
            p = self.plans[tbl]
            keys = [k for k, _, state in rows if state in (PRESENT, GONE)]
            found = _rows(self.target, p, keys, whole)
            suspects = {}
            for key, digest, state in rows:
                if state == PRESENT and found.get(key, "") != digest:
                    suspects[key] = "missing" if key not in found else "different"
                elif state == GONE and key in found:
                    suspects[key] = "resurrected"
            self.result.checked += len(keys)
            self._judge(p, suspects, found, whole)
        for (tbl, column), updated in ledger.updated_rows(CHECK_BATCH):
            p = self.plans[tbl]
            value = sql.SQL("md5(x.{}::text)").format(sql.Identifier(column))
            found = _rows(self.target, p, [k for k, _ in updated], value)
            suspects = {key: "missing" if key not in found else "different"
                        for key, digest in updated if found.get(key, "") != digest}
            self.result.checked += len(updated)
            self._judge(p, suspects, found, value)
        for tbl, images in ledger.image_rows(CHECK_BATCH):
            p = self.plans[tbl]
            counts = _counts(self.target, p, [i for i, _ in images])
            wrong = [i for i, expected in images if counts.get(i, 0) != expected]
            self.result.checked += len(images)
            on_legacy = _counts(self.legacy, p, wrong) if wrong else {}
            for image in wrong:
                self._count(p, "superseded" if on_legacy.get(image, 0) == counts.get(image, 0) else "miscounted")

    def _judge(self, p: TablePlan, suspects: dict[Key, str], found: dict[Key, Any], digest: sql.Composable) -> None:
        """A write the target does not hold as the ledger says is lost unless the legacy database agrees with the
        target (then something changed the row after the writer, and parity judges it)."""
        if not suspects:
            return
        on_legacy = _rows(self.legacy, p, list(suspects), digest)
        for key, what in suspects.items():
            same = (key in on_legacy) == (key in found) and on_legacy.get(key) == found.get(key)
            self._count(p, "superseded" if same else what)

    def _count(self, p: TablePlan, what: str) -> None:
        setattr(self.result, what, getattr(self.result, what) + 1)
        if what != "superseded":
            self.result.by_table[p.display] = self.result.by_table.get(p.display, 0) + 1


def _counts(conn: psycopg.Connection[Any], p: TablePlan, images: list[str]) -> dict[str, int]:
    rows = conn.execute(sql.SQL("SELECT md5(x::text), count(*) FROM {} AS x WHERE md5(x::text) = ANY(%s) GROUP BY 1")
                        .format(p.ident), (images,)).fetchall()
    return {r[0]: int(r[1]) for r in rows}


def _rows(conn: psycopg.Connection[Any], p: TablePlan, keys: list[Key], digest: sql.Composable) -> dict[Key, Any]:
    """key -> digest of the rows of `keys` that exist (keys as text; the server reads them as the columns' types)."""
    if not keys:
        return {}
    columns = sql.SQL(", ").join(sql.SQL("x.{}").format(sql.Identifier(k)) for k in p.key)
    as_text = sql.SQL(", ").join(sql.SQL("x.{}::text").format(sql.Identifier(k)) for k in p.key)
    one = sql.SQL("({})").format(sql.SQL(", ").join(sql.Placeholder() for _ in p.key))
    query = sql.SQL("SELECT {}, {} FROM {} AS x WHERE ({}) IN ({})").format(
        as_text, digest, p.ident, columns, sql.SQL(", ").join(one for _ in keys))
    rows = conn.execute(query, [v for k in keys for v in k]).fetchall()
    return {tuple(r[:-1]): r[-1] for r in rows}
