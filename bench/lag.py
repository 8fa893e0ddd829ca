"""Sync lag under a steady clinical workload: `migrator sync --follow` beside writers, lag sampled every second.

    .venv/bin/python -m bench.lag [--seconds 180] [--writers 4] [--tps 75] [--scale 0.05]

Builds the synthetic PACS, prepares and copies it, starts the clinical workload (`migrator.rehearse.workload`:
studies arriving, reports, corrections, purges; `--writers` processes at `--tps` transactions/s each) and
`migrator sync --follow` in a subprocess, then samples every second the age of the oldest committed change not yet
applied (the same figure `migrator status` and `sync --check-lag` use). Prints the achieved write rate and the lag's
median, 95th percentile and maximum, then stops everything, catches up, and checks parity.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench._common import config, create_db, databases, dsn_for
from migrator import copy, prepare, sync, verify
from migrator.rehearse import pacs
from migrator.rehearse.workload import Workload, WorkloadSpec

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=180)
    ap.add_argument("--writers", type=int, default=4)
    ap.add_argument("--tps", type=float, default=75.0)
    ap.add_argument("--scale", type=float, default=0.05)
    args = ap.parse_args()
    with databases("lag_src", "lag_tgt") as names:
        src = create_db(names["lag_src"])
        create_db(names["lag_tgt"])
        pacs.build(src, scale=args.scale)
        cfg = config(names["lag_src"], names["lag_tgt"])
        prepare.prepare(cfg)
        copy.run(cfg)
        toml = Path(os.environ.get("TMPDIR", "/tmp")) / f"{names['lag_tgt']}.toml"
        toml.write_text(f'[source]\ndsn = "{dsn_for(names["lag_src"])}"\n[target]\ndsn = "{dsn_for(names["lag_tgt"])}"\n')
        workload = Workload(src, WorkloadSpec(processes=args.writers, tps=args.tps))
        workload.start()
        follower = subprocess.Popen([str(ROOT / ".venv/bin/migrator"), "--config", str(toml), "sync", "--follow"],
                                    stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        samples: list[float] = []
        try:
            t0 = time.monotonic()
            while time.monotonic() - t0 < args.seconds:
                time.sleep(1.0)
                lag = sync.lag(cfg)
                samples.append(lag.oldest_pending_seconds or 0.0)
        finally:
            stats = workload.stop()
            follower.send_signal(signal.SIGTERM)
            follower.wait(timeout=60)
        sync.sync(cfg)
        report = verify.verify(cfg)
        samples.sort()
        p95 = samples[int(0.95 * (len(samples) - 1))]
        print(f"\nworkload: {stats.committed} transactions in {stats.seconds:.0f}s "
              f"({stats.committed / max(stats.seconds, 1e-9):.0f} write transactions/s, {args.writers} writers)")
        print(f"lag over {len(samples)} samples: median {statistics.median(samples):.2f}s, p95 {p95:.2f}s, "
              f"max {samples[-1]:.2f}s  (target: < 2 s)")
        print(f"parity after catch-up: {'identical' if report.identical else 'DIFFERENT'}")
        return 0 if report.identical else 1


if __name__ == "__main__":
    sys.exit(main())
