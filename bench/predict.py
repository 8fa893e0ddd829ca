"""The report's prediction checked against reality: rehearse the synthetic PACS at `--small` (0.1), predict cutover
night for `--large` (1) with `migrator report`, then migrate `--large` (the same rehearsal: copy, sync, cutover
under the same write workload) and print predicted and measured copy time and freeze window side by side.

    .venv/bin/python -m bench.predict [--runs 3] [--small 0.1] [--large 1] [--production dsn|figures]

The large run goes first; its legacy database is "production": the prediction reads it as `[rehearsal]
production_dsn` (or, with `--production figures`, is given its tables' size as `migrator inspect` measures it and
its rows). Then the small rehearsal and its report, with `production_write_rate` set to the small run's measured
rate, since both runs have the same workload. `--runs N` repeats the pair N times and prints each run's errors, the
medians and the load average, so that the machine's noise is visible beside the model's error. Both runs' databases
are dropped afterwards; the reports stay in build/predict-reports.
"""

from __future__ import annotations

import argparse
import os
import statistics
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


def _one(args: argparse.Namespace) -> dict[str, Any]:
    """One run: the large rehearsal measured, then the small one's report predicting it."""
    runs: list[Any] = []
    load = [os.getloadavg()[0]]
    try:
        large, large_source, large_target = _rehearse(args.large, args.writers, args.tps)
        runs.append(large)
        base = {"copy": {"workers": os.cpu_count() or 2}, "cutover": {"verify": "counts"}}
        measured = report.gather(from_dict({"source": {"dsn": large_source}, "target": {"dsn": large_target}, **base},
                                           env={}))
        sized = inspect_mod.run(from_dict({"source": {"dsn": large_source}, "target": {"dsn": large_target}},
                                          env={}))
        load.append(os.getloadavg()[0])
        small, small_source, small_target = _rehearse(args.small, args.writers, args.tps)
        runs.append(small)
        probe = report.gather(from_dict({"source": {"dsn": small_source}, "target": {"dsn": small_target}, **base},
                                        env={}))
        rate = probe["sync"]["applied_per_second_median"] or 1.0
        production = ({"production_dsn": large_source} if args.production == "dsn" else
                      {"production_bytes": float(sized.total_bytes), "production_rows": float(large.rows)})
        cfg = from_dict({"source": {"dsn": small_source}, "target": {"dsn": small_target}, **base,
                         "rehearsal": {**production, "production_write_rate": rate}}, env={})
        written = report.write(cfg, OUT)
        load.append(os.getloadavg()[0])
    finally:
        _drop(*runs)
    p = written.data["prediction"]
    parts = {x["part"]: x for x in p["copy"]["parts"]}
    real_parts = measured["copy"]["parts"] or {}
    freeze_parts = {x["part"]: x for x in p["freeze"]["parts"]}
    real_attempt = measured["attempts"][-1]
    real_steps = {s["step"]: s["seconds"] for s in real_attempt["steps"]}
    return {"small_rows": small.rows, "large_rows": large.rows, "large_bytes": sized.total_bytes,
            "report": str(written.html), "load": load,
            "copy": (p["copy"].get("seconds"), p["copy"].get("low_seconds"), p["copy"].get("high_seconds"),
                     measured["copy"]["seconds"]),
            "freeze": (p["freeze"].get("seconds"), p["freeze"].get("low_seconds"), p["freeze"].get("high_seconds"),
                       measured["last_attempt"]["freeze_seconds"]),
            "copy_parts": {name: (parts[name]["measured"], parts[name]["predicted"],
                                  real_parts.get(key)) for name, key in (
                ("setup", "setup_seconds"), ("rows", "rows_seconds"), ("post-data", "post_data_seconds"),
                ("ANALYZE", "analyze_seconds")) if name in parts},
            "freeze_parts": {name: (freeze_parts[name]["measured"], freeze_parts[name]["predicted"], real)
                             for name, real in (("drain", real_steps.get("drain")),
                                                ("verify", real_steps.get("verify"))) if name in freeze_parts},
            "assumptions": {part: p[part]["assumptions"] for part in ("copy", "freeze")}}


def _error(predicted: float | None, real: float | None) -> float | None:
    return (predicted - real) / real * 100 if predicted is not None and real else None


def _pct(value: float | None) -> str:
    return "?" if value is None else f"{value:+.0f}%"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=float, default=0.1)
    parser.add_argument("--large", type=float, default=1.0)
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--tps", type=float, default=40.0)
    parser.add_argument("--runs", type=int, default=3, help="independent runs (medians and each run's error)")
    parser.add_argument("--production", choices=("figures", "dsn"), default="dsn",
                        help="give the large run's size as [rehearsal] production_dsn (read from its catalog) or as "
                             "production_bytes/production_rows")
    args = parser.parse_args()
    results = []
    for i in range(args.runs):
        r = _one(args)
        results.append(r)
        print(f"run {i + 1}: copy predicted {r['copy'][0]:.2f} s (range {r['copy'][1]:.2f}-{r['copy'][2]:.2f}), "
              f"measured {r['copy'][3]:.2f} s, error {_pct(_error(r['copy'][0], r['copy'][3]))}; freeze predicted "
              f"{r['freeze'][0]:.2f} s (range {r['freeze'][1]:.2f}-{r['freeze'][2]:.2f}), measured "
              f"{r['freeze'][3]:.2f} s, error {_pct(_error(r['freeze'][0], r['freeze'][3]))}; load average "
              + "/".join(f"{x:.1f}" for x in r["load"]), flush=True)
        for kind in ("copy_parts", "freeze_parts"):
            print("   " + "; ".join(f"{name} {small:.2f} -> predicted {pred:.2f}, measured "
                                    f"{'?' if real is None else f'{real:.2f}'}"
                                    for name, (small, pred, real) in r[kind].items()), flush=True)
    last = results[-1]
    print(f"\nrehearsal at scale {args.small} ({last['small_rows']} rows) predicting scale {args.large} "
          f"({last['large_rows']} rows, {last['large_bytes'] / 1e6:.0f} MB of tables), {args.runs} run(s); "
          f"last report: {last['report']}")
    print(f"{'figure':<16}{'predicted':>12}{'measured':>12}{'error':>9}   (medians; errors of each run)")
    for name, key in (("copy time s", "copy"), ("freeze window s", "freeze")):
        pred = statistics.median(r[key][0] for r in results)
        real = statistics.median(r[key][3] for r in results)
        each = ", ".join(_pct(_error(r[key][0], r[key][3])) for r in results)
        print(f"{name:<16}{pred:>12.2f}{real:>12.2f}{_pct(_error(pred, real)):>9}   ({each})")
    print("load average (1 min) during the runs: " + ", ".join(f"{min(r['load']):.1f}-{max(r['load']):.1f}"
                                                            for r in results))
    for part in ("copy", "freeze"):
        for a in last["assumptions"][part]:
            print(f"  {part}: {a}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
