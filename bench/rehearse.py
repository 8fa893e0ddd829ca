"""A rehearsal at the sizes hospitals have: the synthetic PACS at `--scale`, through the rehearsal on configured test
databases (`migrator --config FILE rehearse --workload pacs`), with the largest resident memory of its processes.

    .venv/bin/python -m bench.rehearse [--scale 3] [--writers 2] [--tps 20] [--sync-seconds 30] [--keep]

Builds the synthetic PACS into a fresh legacy database (scale 1 ≈ 1.5 M rows and 450 MB; scale 50 ≈ 75 M rows, about
22 GB on each side, hours on this machine), writes a rehearsal configuration declaring the two databases test
databases, and runs `migrator rehearse` with it as a subprocess: inspect, prepare, copy, sync under the workload, live
verify, cutover, verify, cleanup. Prints the build's time and size, the rehearsal's phases, and the largest resident
set of migrator's processes (the command and every process it waited for: copy workers, writers), which must not
grow with the scale. The databases are dropped afterwards unless `--keep`.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from bench._common import create_db, databases, dsn_for
from migrator.rehearse import pacs

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=3.0)
    ap.add_argument("--writers", type=int, default=2)
    ap.add_argument("--tps", type=float, default=20.0)
    ap.add_argument("--sync-seconds", type=float, default=30.0)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    with databases("reh_src", "reh_tgt", keep=args.keep) as names:
        src = create_db(names["reh_src"])
        create_db(names["reh_tgt"])
        t0 = time.monotonic()
        built = pacs.build(src, scale=args.scale)
        print(f"build: scale {args.scale}, {built.total_rows:,} rows, {built.bytes / 1e9:.2f} GB in "
              f"{time.monotonic() - t0:.1f} s")
        config = Path("/tmp") / f"{names['reh_tgt']}.toml"
        config.write_text(f'[source]\ndsn = "{dsn_for(names["reh_src"])}"\n[target]\ndsn = "{dsn_for(names["reh_tgt"])}"\n'
                          f"[rehearsal]\ntest_databases = true\nsync_seconds = {args.sync_seconds}\n")
        t0 = time.monotonic()
        run = subprocess.run([str(ROOT / ".venv/bin/migrator"), "--log-level", "warning", "--config", str(config),
                              "rehearse", "--workload", "pacs", "--writers", str(args.writers),
                              "--workload-tps", str(args.tps), "--json"],
                             capture_output=True, text=True, stdin=subprocess.DEVNULL)
        seconds = time.monotonic() - t0
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        config.unlink()
        if run.returncode not in (0, 1):
            print(run.stderr[-3000:], file=sys.stderr)
            return run.returncode
        report = json.loads(run.stdout)
        for phase in report["phases"]:
            print(f"  {phase['name']:<11} {phase['seconds']:9.2f}s  {phase['detail']}")
        print(f"rehearsal: {'OK' if report['ok'] else 'FAILED'} in {seconds:.1f} s; freeze "
              f"{report['freeze_seconds'] or 0:.2f} s; largest resident set of migrator's processes {peak_mb:.0f} MB")
        for problem in report["problems"]:
            print(f"PROBLEM: {problem}")
        return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
