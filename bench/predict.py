"""The report's prediction checked against reality: rehearse the synthetic PACS at `--small` (0.1), predict cutover
night for `--large` (1) with `migrator report`, then migrate `--large` (the same rehearsal: copy, sync, cutover
under the same write workload) and print predicted and measured copy time and freeze window side by side.

    .venv/bin/python -m bench.predict [--small 0.1] [--large 1] [--writers 2] [--tps 40]

The large run goes first (its tables' size, as `migrator inspect` measures it, and its rows are the "production"
figures the prediction is given); then the small rehearsal and its report, with those figures in `[rehearsal]` and
`production_write_rate` set to the small run's measured rate, since both runs have the same workload. Both runs'
databases are dropped afterwards; the reports stay in build/predict-reports.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from bench._common import ADMIN_DSN
from migrator import inspect as inspect_mod
from migrator import rehearse, report
from migrator.config import from_dict

OUT = Path(__file__).resolve().parent.parent / "build" / "predict-reports"


def _rehearse(scale: float, writers: int, tps: float) -> tuple[Any, str, str]:
    with tempfile.TemporaryDirectory() as home:
        cwd = Path.cwd()
        os.chdir(home)  # the kept rehearsal's configuration file goes there, and away with it
        try:
            r = rehearse.run(scale=scale, tps=tps, writers=writers, keep=True, admin_dsn=ADMIN_DSN, report_dir=OUT)
        finally:
            os.chdir(cwd)
    assert r.databases is not None
    source, target = (psycopg.conninfo.make_conninfo(ADMIN_DSN, dbname=n) for n in r.databases)
    return r, source, target


def _drop(*reports: Any) -> None:
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        for r in reports:
            for name in r.databases or ():
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=float, default=0.1)
    parser.add_argument("--large", type=float, default=1.0)
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--tps", type=float, default=40.0)
    args = parser.parse_args()
    runs: list[Any] = []
    try:
        large, large_source, large_target = _rehearse(args.large, args.writers, args.tps)
        runs.append(large)
        base = {"copy": {"workers": os.cpu_count() or 2}, "cutover": {"verify": "counts"}}
        measured = report.gather(from_dict({"source": {"dsn": large_source}, "target": {"dsn": large_target}, **base},
                                           env={}))
        sized = inspect_mod.run(from_dict({"source": {"dsn": large_source}, "target": {"dsn": large_target}},
                                          env={}))
        small, small_source, small_target = _rehearse(args.small, args.writers, args.tps)
        runs.append(small)
        probe = report.gather(from_dict({"source": {"dsn": small_source}, "target": {"dsn": small_target}, **base},
                                        env={}))
        rate = probe["sync"]["applied_per_second_median"] or 1.0
        cfg = from_dict({"source": {"dsn": small_source}, "target": {"dsn": small_target}, **base,
                         "rehearsal": {"production_bytes": float(sized.total_bytes),
                                       "production_rows": float(large.rows), "production_write_rate": rate}}, env={})
        written = report.write(cfg, OUT)
    finally:
        _drop(*runs)
    p = written.data["prediction"]
    m_copy, m_freeze = measured["copy"]["seconds"], measured["last_attempt"]["freeze_seconds"]
    print(f"rehearsal at scale {args.small} ({small.rows} rows) predicting scale {args.large} "
          f"({large.rows} rows, {sized.total_bytes / 1e6:.0f} MB of tables); report: {written.html}")
    print(f"{'figure':<16}{'predicted':>12}{'measured':>12}{'error':>9}")
    for name, predicted, real in (("copy time s", p["copy"].get("seconds"), m_copy),
                                  ("freeze window s", p["freeze"].get("seconds"), m_freeze)):
        error = f"{(predicted - real) / real * 100:+.0f}%" if predicted is not None and real else "?"
        print(f"{name:<16}{predicted or float('nan'):>12.2f}{real or float('nan'):>12.2f}{error:>9}")
    for part in ("copy", "freeze"):
        for a in p[part]["assumptions"]:
            print(f"  {part}: {a}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
