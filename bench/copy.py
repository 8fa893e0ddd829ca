"""Bulk copy: `migrator copy` next to a raw psql COPY pipe, pg_dump/pg_restore and pgcopydb, on the same data.

    .venv/bin/python -m bench.copy [--scale 1] [--rounds 3] [--workers 2] [--keep]

Builds a PACS-like source (migrator.rehearse.pacs) and a clone of it for migrator (CREATE DATABASE ... TEMPLATE, so
the baselines read a database without capture triggers), then runs rounds; each round times every method once into
a fresh target, in an order rotated from round to round:

- migrator: `migrator prepare` (not timed), then `migrator copy --json` (timed: data, post-data indexes and
  constraints, ANALYZE);
- pipe: the schema's pre-data restored first (not timed), then per table, one after another,
  `psql -c "COPY t TO STDOUT" | psql -c "COPY t FROM STDIN"`, then `pg_restore --section=post-data` (timed);
- pg_dump: `pg_dump -Fd -j2` into a temporary directory and `pg_restore -j2` from it (timed together);
- pgcopydb: `pgcopydb clone --table-jobs 2 --index-jobs 2` when the binary exists (skipped otherwise).

Prints per method the median seconds, MB/s and rows/s (of the tables' heap and TOAST size and row count), the peak
RSS of the largest process in its process tree and the sampled peak RSS of the whole tree (client processes only,
not the servers), and the median over rounds of its time divided by the pipe's time in the same round.
"""

from __future__ import annotations

import os
import sys

# Run as a script, bench/ comes first on sys.path and this file would shadow the standard library's `copy`.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import psycopg  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import ADMIN_DSN, create_db, databases, dsn_for, median  # noqa: E402
from migrator.rehearse import pacs  # noqa: E402
from migrator.schema import tool  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MIGRATOR = [str(ROOT / ".venv" / "bin" / "migrator")]


@dataclass
class Run:
    seconds: float
    max_rss_kb: int
    tree_rss_kb: int


@dataclass
class Method:
    name: str
    runs: list[Run] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)


def _tree_rss_kb(root: int) -> int:
    """Sum of VmRSS of `root` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                ppid, kb = 0, 0
                for line in f:
                    if line.startswith("PPid:"):
                        ppid = int(line.split()[1])
                    elif line.startswith("VmRSS:"):
                        kb = int(line.split()[1])
        except OSError:
            continue
        children.setdefault(ppid, []).append(int(entry))
        rss[int(entry)] = kb
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total


def run_measured(args: list[str] | str, env: dict[str, str] | None = None, shell: bool = False,
                 cwd: Path | None = None) -> Run:
    """Run a command; its wall time, the largest maxrss in its tree and the sampled peak of the tree's sum.

    The command runs under /usr/bin/time: a child forked from this (large) Python process would start with its
    maxrss already at this process's size; time is small, so its children's maxrss is theirs.
    """
    argv = ["bash", "-c", args] if shell else args
    assert isinstance(argv, list)
    with tempfile.NamedTemporaryFile(prefix="bench-rss-") as rss_file:
        started = time.perf_counter()
        proc = subprocess.Popen(["/usr/bin/time", "-q", "-f", "%M", "-o", rss_file.name, *argv], env=env, cwd=cwd,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        peak = [0]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.1):
                peak[0] = max(peak[0], _tree_rss_kb(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, err = proc.communicate()
        seconds = time.perf_counter() - started
        done.set()
        sampler.join()
        if proc.returncode != 0:
            raise SystemExit(f"{args!r} failed ({proc.returncode}):\n{err.decode()[-3000:]}")
        max_rss = int(Path(rss_file.name).read_text().split()[-1])
    return Run(seconds, max_rss, peak[0])


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, **extra}


def bench_migrator(source: str, target: str, workers: int, tmp: Path) -> Run:
    # No migration.toml in `tmp`: the DSNs come from the environment.
    env = _env(MIGRATOR_SOURCE_DSN=dsn_for(source), MIGRATOR_TARGET_DSN=dsn_for(target))
    subprocess.run([*MIGRATOR, "prepare", "--yes", "--json"], env=env, cwd=tmp, check=True, capture_output=True)
    return run_measured([*MIGRATOR, "copy", "--workers", str(workers), "--json"], env=env, cwd=tmp)


def tables_of(dsn: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema', '_migrator') "
            "ORDER BY pg_table_size(c.oid) DESC").fetchall()
    return [r[0] for r in rows]


def bench_pipe(source: str, target: str, tmp: Path) -> Run:
    psql, pg_dump, pg_restore = tool("psql"), tool("pg_dump"), tool("pg_restore")
    src, tgt = dsn_for(source), dsn_for(target)
    pre, post = tmp / "pre.dump", tmp / "post.dump"
    subprocess.run([pg_dump, "-Fc", "--section=pre-data", f"--file={pre}", src], check=True)
    subprocess.run([pg_dump, "-Fc", "--section=post-data", f"--file={post}", src], check=True)
    subprocess.run([pg_restore, "--exit-on-error", f"--dbname={tgt}", str(pre)], check=True)
    script = tmp / "pipe.sh"
    lines = ["set -eo pipefail"]
    for t in tables_of(src):
        lines.append(f"{psql} -X -q -d '{src}' -c 'COPY {t} TO STDOUT' | {psql} -X -q -d '{tgt}' -c 'COPY {t} FROM STDIN'")
    lines.append(f"{pg_restore} --exit-on-error --dbname='{tgt}' {post}")
    script.write_text("\n".join(lines) + "\n")
    return run_measured(["bash", str(script)])


def bench_pg_dump(source: str, target: str, tmp: Path) -> Run:
    pg_dump, pg_restore = tool("pg_dump"), tool("pg_restore")
    out = tmp / "dumpdir"
    shutil.rmtree(out, ignore_errors=True)
    cmd = (f"{pg_dump} -Fd -j2 --file={out} '{dsn_for(source)}' && "
           f"{pg_restore} -j2 --exit-on-error --dbname='{dsn_for(target)}' {out}")
    return run_measured(cmd, shell=True)


def bench_pgcopydb(source: str, target: str, tmp: Path) -> Run:
    work = tmp / "pgcopydb"
    shutil.rmtree(work, ignore_errors=True)
    return run_measured(["pgcopydb", "clone", "--source", dsn_for(source), "--target", dsn_for(target),
                         "--table-jobs", "2", "--index-jobs", "2", "--dir", str(work), "--no-owner", "--no-acl"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="migrator copy --workers")
    parser.add_argument("--keep", action="store_true", help="keep the source databases")
    args = parser.parse_args()

    have_pgcopydb = shutil.which("pgcopydb") is not None
    if not have_pgcopydb:
        print("pgcopydb: not installed (apt-get install pgcopydb); skipped")
    with databases("src", "srcm", keep=args.keep) as names:
        t0 = time.perf_counter()
        built = pacs.build(create_db(names["src"]), scale=args.scale)
        create_db(names["srcm"], template=names["src"])
        with psycopg.connect(dsn_for(names["src"])) as conn:
            row = conn.execute(
                "SELECT sum(pg_table_size(c.oid)) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')").fetchone()
        data_mb = float(row[0] if row else 0) / 1e6
        rows = built.total_rows
        print(f"source: scale {args.scale}, {rows:,} rows, {data_mb:.0f} MB of tables "
              f"({built.bytes / 1e6:.0f} MB database), built in {time.perf_counter() - t0:.1f}s; server {ADMIN_DSN}")
        methods = {m: Method(m) for m in ["migrator", "pipe", "pg_dump", *(["pgcopydb"] if have_pgcopydb else [])]}
        order = list(methods)
        for rnd in range(args.rounds):
            timings: dict[str, float] = {}
            rotated = order[rnd % len(order):] + order[:rnd % len(order)]
            for name in rotated:
                with databases("tgt") as tnames, tempfile.TemporaryDirectory(prefix="bench-copy-") as tmpdir:
                    create_db(tnames["tgt"])
                    tmp = Path(tmpdir)
                    if name == "migrator":
                        run = bench_migrator(names["srcm"], tnames["tgt"], args.workers, tmp)
                    elif name == "pipe":
                        run = bench_pipe(names["src"], tnames["tgt"], tmp)
                    elif name == "pg_dump":
                        run = bench_pg_dump(names["src"], tnames["tgt"], tmp)
                    else:
                        run = bench_pgcopydb(names["src"], tnames["tgt"], tmp)
                methods[name].runs.append(run)
                timings[name] = run.seconds
                print(f"round {rnd + 1} {name:<9} {run.seconds:7.2f}s  max RSS {run.max_rss_kb / 1024:6.1f} MB  "
                      f"tree RSS {run.tree_rss_kb / 1024:6.1f} MB", flush=True)
            for name, secs in timings.items():
                methods[name].ratios.append(secs / timings["pipe"])
        print()
        print(f"{'method':<10} {'median s':>9} {'MB/s':>7} {'rows/s':>10} {'max RSS MB':>11} {'tree RSS MB':>12} "
              f"{'× pipe':>7}")
        summary: dict[str, dict[str, Any]] = {}
        for m in methods.values():
            secs = median([r.seconds for r in m.runs])
            ratio = median(m.ratios)
            max_rss = max(r.max_rss_kb for r in m.runs) / 1024
            tree = max(r.tree_rss_kb for r in m.runs) / 1024
            print(f"{m.name:<10} {secs:9.2f} {data_mb / secs:7.1f} {rows / secs:10,.0f} {max_rss:11.1f} "
                  f"{tree:12.1f} {ratio:7.3f}")
            summary[m.name] = {"median_seconds": round(secs, 3), "ratio_to_pipe": round(ratio, 3),
                               "max_rss_mb": round(max_rss, 1), "tree_rss_mb": round(tree, 1),
                               "seconds": [round(r.seconds, 3) for r in m.runs]}
        if "pgcopydb" in summary:
            print(f"migrator / pgcopydb: {summary['migrator']['median_seconds'] / summary['pgcopydb']['median_seconds']:.3f}")
        print(f"migrator / pg_dump+pg_restore: "
              f"{summary['migrator']['median_seconds'] / summary['pg_dump']['median_seconds']:.3f}")
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
