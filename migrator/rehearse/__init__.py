"""Rehearsal: the whole migration on throwaway databases, under a concurrent clinical write workload, timed.

`run` creates a legacy and a new database on a local server (or on MIGRATOR_REHEARSAL_DSN), builds a synthetic PACS/
OIS database in the legacy one (`pacs`), starts writer processes (`workload`) and goes through inspect → prepare →
copy → sync → cutover → verify while they write. It reports each phase's time, the write-freeze window and parity,
and is ok only if the target equals the frozen legacy database row for row and every study a writer saw committed
arrived. The writers stay on the legacy database: there are no clients to move, so the cutover runs with
`--override no-switch` (recorded with the attempt, and said in the report). The databases are dropped afterwards
unless kept.

The rehearsal on the site's own test databases (`migrator --config FILE rehearse`) is `configured.run`: which
databases it may write is `target`, its write loads `loads` (the generic one, for any schema: `plan`, `generic`,
`generic_writer`, `ledger`), what both report `report`.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from migrator import copy, cutover, gonogo, prepare, sync, verify
from migrator import inspect as inspect_mod
from migrator import report as report_mod
from migrator.config import Config, from_dict
from migrator.errors import ConnectionFailed
from migrator.log import get
from migrator.rehearse import pacs
from migrator.rehearse.report import Phase, RehearsalReport
from migrator.rehearse.workload import Workload, WorkloadSpec
from migrator.rehearse.workload import verify as workload_verify
from migrator.switchover import NOT_MOVED

__all__ = ["Phase", "RehearsalReport", "run"]

ADMIN_CANDIDATES = (
    "host=127.0.0.1 port=5432 dbname=postgres user=postgres",
    "dbname=postgres",
    "host=127.0.0.1 port=5432 dbname=postgres",
)


def _admin_dsn() -> str:
    explicit = os.environ.get("MIGRATOR_REHEARSAL_DSN")
    for dsn in ((explicit,) if explicit else ADMIN_CANDIDATES):
        try:
            psycopg.connect(dsn, connect_timeout=5).close()
            return dsn
        except psycopg.Error:
            continue
    raise ConnectionFailed(
        "no PostgreSQL server for the rehearsal",
        hint="Start the local server (pg_ctlcluster 15 main start) or set MIGRATOR_REHEARSAL_DSN to an admin DSN.",
    )


# C901: the complexity (18) is the sum of the six phase closures, each a few lines, that `run` lists as six timed
# steps; the closures fill the one report, so splitting them apart would scatter it.
def run(*, scale: float = 0.01, tps: float = 40.0, writers: int = 2, keep: bool = False,  # noqa: C901
        sync_rounds: int = 2, admin_dsn: str | None = None, write_config: bool = False,
        report_dir: Path | None = None,
        on_phase: Callable[[str], None] | None = None) -> RehearsalReport:
    """The rehearsal; with `keep` and `write_config` (the command's --keep), also a configuration file naming the kept
    databases in the working directory (`RehearsalReport.config`)."""
    log = get(phase="rehearse")
    admin = admin_dsn or _admin_dsn()
    tag = uuid.uuid4().hex[:8]
    names = (f"migrator_rehearsal_{tag}_legacy", f"migrator_rehearsal_{tag}_new")
    report = RehearsalReport(scale=scale, databases=names, kept=keep)
    with psycopg.connect(admin, autocommit=True) as conn:
        for name in names:
            conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
    source_dsn, target_dsn = (psycopg.conninfo.make_conninfo(admin, dbname=n) for n in names)
    cfg: Config = from_dict({"source": {"dsn": source_dsn}, "target": {"dsn": target_dsn},
                             "copy": {"workers": os.cpu_count() or 2}, "cutover": {"verify": "counts"}}, env={})
    workload: Workload | None = None

    def timed(name: str, fn: Callable[[], str]) -> None:
        if on_phase:
            on_phase(name)
        t0 = time.monotonic()
        detail = fn()
        report.phases.append(Phase(name, time.monotonic() - t0, detail))
        log.info("rehearse.phase", name=name, seconds=round(time.monotonic() - t0, 3))

    try:
        def build() -> str:
            b = pacs.build(source_dsn, scale=scale)
            report.rows, report.bytes = b.total_rows, b.bytes
            return f"{b.total_rows} rows in {len(b.rows)} tables"

        timed("build", build)
        workload = Workload(source_dsn, WorkloadSpec(processes=writers, tps=tps, long_transaction_seconds=3.0))
        workload.start()

        def do_inspect() -> str:
            r = inspect_mod.run(cfg)
            return f"{'ready' if r.ready else 'BLOCKERS'}; {len(r.findings)} findings"

        def do_prepare() -> str:
            r = prepare.prepare(cfg)
            return f"{len(r.tables)} tables captured"

        def do_copy() -> str:
            r = copy.run(cfg)
            return f"{r.rows} rows, {r.bytes / 1e6:.1f} MB, {r.rows / max(r.seconds, 1e-6):.0f} rows/s"

        def do_sync() -> str:
            total = 0
            for _ in range(sync_rounds):
                time.sleep(1.0)  # the clinical workload keeps writing between sync runs
                r = sync.sync(cfg, samples=True)
                total += r.events
            report.events_applied += total
            lag = sync.lag(cfg)
            return f"{total} events applied; {lag.pending_events} pending"

        def do_cutover() -> str:
            # The writers connect to the legacy database directly: there is nobody to move, and it says so.
            r = cutover.run(cfg, overrides=(gonogo.NO_SWITCH,))
            report.freeze_seconds = r.freeze_seconds
            report.events_applied += r.events_drained
            moved = "" if r.clients_moved else f"; {NOT_MOVED} (a rehearsal has none to move)"
            return f"freeze {r.freeze_seconds:.2f}s, {r.events_drained} events drained{moved}"

        def do_verify() -> str:
            assert workload is not None
            stats = workload.stop()
            report.workload = stats.to_dict()
            rep = verify.verify(cfg)
            report.parity = {"identical": rep.identical, "summary": "identical" if rep.identical else "DIFFERENT",
                             "exit_code": rep.exit_code}
            if not rep.identical:
                report.problems.append("parity found differences:\n" + rep.render_text())
            check = workload_verify(target_dsn, stats)
            report.missing_studies = len(check.missing)
            if not check.ok:
                report.problems.append(
                    f"workload ledger on the target: {len(check.missing)} committed studies missing, "
                    f"{len(check.resurrected)} purged studies present, {check.rolled_back_rows} rolled-back rows")
            return report.parity["summary"]

        timed("inspect", do_inspect)
        timed("prepare", do_prepare)
        timed("copy", do_copy)
        timed("sync", do_sync)
        timed("cutover", do_cutover)
        timed("verify", do_verify)
        report.lag = _sampled_lag(target_dsn)
        report.report = str(report_mod.write(cfg, report_dir).html)  # before the databases are dropped
        if keep and write_config:
            report.config = _write_config(tag, source_dsn, target_dsn)
        report.ok = not report.problems
    finally:
        if workload is not None:
            try:
                workload.stop()
            except Exception:  # noqa: BLE001 - stopping twice or after a failure must not hide the real error
                pass
        if not keep:
            with psycopg.connect(admin, autocommit=True) as conn:
                for name in names:
                    conn.execute(psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                                 .format(psycopg.sql.Identifier(name)))
    return report


def _sampled_lag(target_dsn: str) -> dict[str, Any]:
    """What the samples sync recorded say of the lag (the same samples `migrator console` charts)."""
    import statistics

    from migrator import state

    with psycopg.connect(target_dsn) as conn:
        lags = [s.lag_seconds or 0.0 for s in state.samples(conn)]
    return {"samples": len(lags), "median": statistics.median(lags), "worst": max(lags)} if lags else {}


def _write_config(tag: str, source_dsn: str, target_dsn: str) -> str:
    """rehearsal-<tag>.toml in the working directory, naming the kept databases with the admin DSN's parameters
    (readable by its owner only: a password in MIGRATOR_REHEARSAL_DSN would be in it too)."""
    import json
    from pathlib import Path

    path = Path(f"rehearsal-{tag}.toml")
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
        out.write(f"# The databases `migrator rehearse --keep` kept ({tag}); drop them with DROP DATABASE when done.\n"
                  f"[source]\ndsn = {json.dumps(source_dsn)}\n[target]\ndsn = {json.dumps(target_dsn)}\n")
    return str(path)
