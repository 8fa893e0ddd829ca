"""Bulk copy: `migrator prepare` + `migrator copy` next to the best PostgreSQL's own tools do, on the same data.

    .venv/bin/python -m bench.copy [--scale 1] [--rounds 3] [--workers 2] [--two-clusters] [--methods a,b]
                                   [--compare NAME=CHECKOUT] [--keep]

Builds a PACS-like source (migrator.rehearse.pacs). Each round runs every method once, in an order rotated from
round to round, each from the same fresh state (an empty target database; migrator reads a clone of the source made
for it just before, since prepare installs capture there) to the same end state: the rows, the schema's indexes,
constraints (foreign keys validated) and triggers, and statistics for every column (pg_stats). Every phase a user pays
for is timed, from the empty target on:

- pipe (the baseline, PostgreSQL's raw tools): the schema's pre-data dumped and restored; per table
  `psql -c "COPY t TO STDOUT (FORMAT binary)" | psql -c "COPY t FROM STDIN (FORMAT binary)"`, `--workers` tables at
  a time, largest first; the post-data dumped and restored with `pg_restore -j N`; `vacuumdb --analyze-only -j N`;
- pgcopydb: `pgcopydb clone --table-jobs N --index-jobs N` (its own VACUUM ANALYZE included), if installed;
- pg_dump: `pg_dump -Fd -j N` and `pg_restore -j N`, then `vacuumdb --analyze-only -j N`;
- migrator: `migrator prepare --yes` then `migrator copy --workers N` (post-data and ANALYZE included).

After each method the target's end state is compared with the source's (per table: row count and a checksum of
every row's text; the indexes, constraints with whether they are validated, triggers, and the columns pg_stats
covers); the bench fails if any differs. Sequences are left out (a migration sets them at cutover).

Prints per method the median total, its phases' medians, the median over rounds of its time divided by the pipe's
in the same round, MB/s of table data, and the peak resident set of its largest process (a per-process bound:
migrator's coordinator and each worker are processes of their own).

migrator's modules (this checkout's and those --compare names) are byte-compiled first, as installing a wheel leaves
them.

`--two-clusters` starts two private PostgreSQL 15 clusters (initdb under a temporary directory, ports 55420 and
55421), the source in one and the targets in the other, so that reading the source and building the target's
indexes are separate servers' work (on this machine they still share its cores).
"""

from __future__ import annotations

import os
import sys

# Run as a script, bench/ comes first on sys.path and this file would shadow the standard library's `copy`.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import ADMIN_DSN, median  # noqa: E402
from migrator.rehearse import pacs  # noqa: E402
from migrator.schema import tool  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MIGRATOR = [str(ROOT / ".venv" / "bin" / "migrator")]
PG_BIN = Path("/usr/lib/postgresql/15/bin")
CLUSTER_PORTS = (55420, 55421)
METHODS = ["pipe", "pgcopydb", "pg_dump", "migrator"]
SYSTEM_SCHEMAS = ("pg_catalog", "information_schema", "pg_toast", "_migrator", "migrator_control")
"""Schemas no method copies: the system's, and migrator's capture (source) and control (target) schemas."""


# --- servers ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Server:
    admin_dsn: str

    def dsn(self, name: str) -> str:
        return psycopg.conninfo.make_conninfo(self.admin_dsn, dbname=name)

    def create(self, name: str, template: str | None = None) -> str:
        self.drop(name)
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)) + (
                sql.SQL(" TEMPLATE {}").format(sql.Identifier(template)) if template else sql.SQL("")))
        return self.dsn(name)

    def drop(self, name: str) -> None:
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@contextmanager
def private_clusters() -> Iterator[tuple[Server, Server]]:
    """Two fresh PostgreSQL 15 clusters (trust, 127.0.0.1, CLUSTER_PORTS), stopped and removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="bench-copy-clusters-"))
    shutil.chown(base, "postgres", "postgres")
    as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    started: list[Path] = []
    try:
        servers = []
        for port in CLUSTER_PORTS:
            data = base / str(port)
            subprocess.run([*as_pg, str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                            "-E", "UTF8", "--locale=C.UTF-8"], check=True, capture_output=True)
            opts = f"-p {port} -k {base} -c listen_addresses=127.0.0.1"
            subprocess.run([*as_pg, str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(base / f"{port}.log"),
                            "-w", "start"], check=True, capture_output=True)
            started.append(data)
            servers.append(Server(f"postgresql://postgres@127.0.0.1:{port}/postgres"))
        yield servers[0], servers[1]
    finally:
        for data in started:
            subprocess.run([*as_pg, str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                           capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


# --- measuring ----------------------------------------------------------------------------------------------------

@dataclass
class Run:
    seconds: float
    phases: dict[str, float]
    max_rss_kb: int
    """The largest peak resident set of one process of the method (clients only, not the servers)."""


def measured(argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> tuple[float, int, str]:
    """Run a command: its wall time, the largest peak RSS of one process in its tree, and its standard output.

    Under /usr/bin/time, which reports the largest maxrss of the processes waited for in its tree (migrator's
    coordinator waits for its workers; a child forked from this large Python process would start with maxrss at this
    process's size, while time is small). Nothing samples /proc meanwhile: on two shared cores a sampler slows what
    it measures."""
    with tempfile.NamedTemporaryFile(prefix="bench-rss-") as rss_file:
        started = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-q", "-f", "%M", "-o", rss_file.name, *argv], env=env, cwd=cwd,
                              capture_output=True)
        seconds = time.perf_counter() - started
        if proc.returncode != 0:
            raise SystemExit(f"{shlex.join(argv)} failed ({proc.returncode}):\n{proc.stderr.decode()[-3000:]}")
        max_rss = int(Path(rss_file.name).read_text().split()[-1])
    return seconds, max_rss, proc.stdout.decode()


class Phases:
    """A method's timed phases, run one after another."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self.max_rss_kb = 0
        self.outputs: dict[str, str] = {}

    def bash(self, name: str, script: str, **kwargs: Any) -> None:
        self.run(name, ["bash", "-c", "set -eo pipefail\n" + script], **kwargs)

    def run(self, name: str, argv: list[str], **kwargs: Any) -> None:
        seconds, rss, out = measured(argv, **kwargs)
        self.phases[name] = self.phases.get(name, 0.0) + seconds
        self.max_rss_kb = max(self.max_rss_kb, rss)
        self.outputs[name] = out

    def result(self) -> Run:
        return Run(sum(self.phases.values()), self.phases, self.max_rss_kb)


# --- the methods --------------------------------------------------------------------------------------------------

def tables_of(dsn: str) -> list[str]:
    """The source's tables, largest first (so the parallel copy ends with the small ones)."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT format('%%I.%%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind = 'r' AND n.nspname <> ALL (%s) ORDER BY pg_table_size(c.oid) DESC",
            (list(SYSTEM_SCHEMAS),)).fetchall()
    return [r[0] for r in rows]


def q(text: str | Path) -> str:
    return shlex.quote(str(text))


def bench_pipe(src: str, tgt: str, jobs: int, tmp: Path) -> Run:
    psql, pg_dump, pg_restore, vacuumdb = tool("psql"), tool("pg_dump"), tool("pg_restore"), tool("vacuumdb")
    p = Phases()
    pre, post = tmp / "pre.dump", tmp / "post.dump"
    p.bash("schema", f"{pg_dump} -Fc --section=pre-data --file={q(pre)} {q(src)}\n"
                     f"{pg_restore} --exit-on-error --dbname={q(tgt)} {q(pre)}")
    scripts = []
    for i, t in enumerate(tables_of(src)):
        script = tmp / f"pipe{i}.sh"
        script.write_text(
            "set -eo pipefail\n"
            f"{psql} -X -q -d {q(src)} -c {q(f'COPY {t} TO STDOUT (FORMAT binary)')} | "
            f"{psql} -X -q -d {q(tgt)} -c {q(f'COPY {t} FROM STDIN (FORMAT binary)')}\n")
        scripts.append(str(script))
    (tmp / "pipe.list").write_text("\n".join(scripts) + "\n")
    p.bash("copy", f"xargs -P {jobs} -n 1 bash < {q(tmp / 'pipe.list')}")
    p.bash("post-data", f"{pg_dump} -Fc --section=post-data --file={q(post)} {q(src)}\n"
                        f"{pg_restore} -j {jobs} --exit-on-error --dbname={q(tgt)} {q(post)}")
    p.bash("analyze", f"{vacuumdb} --analyze-only -q -j {jobs} --dbname={q(tgt)}")
    return p.result()


def bench_pg_dump(src: str, tgt: str, jobs: int, tmp: Path) -> Run:
    pg_dump, pg_restore, vacuumdb = tool("pg_dump"), tool("pg_restore"), tool("vacuumdb")
    out = tmp / "dumpdir"
    p = Phases()
    p.bash("dump", f"{pg_dump} -Fd -j {jobs} --file={q(out)} {q(src)}")
    p.bash("restore", f"{pg_restore} -j {jobs} --exit-on-error --dbname={q(tgt)} {q(out)}")
    p.bash("analyze", f"{vacuumdb} --analyze-only -q -j {jobs} --dbname={q(tgt)}")
    return p.result()


def bench_pgcopydb(src: str, tgt: str, jobs: int, tmp: Path) -> Run:
    p = Phases()
    p.run("clone", ["pgcopydb", "clone", "--source", src, "--target", tgt, "--table-jobs", str(jobs),
                    "--index-jobs", str(jobs), "--dir", str(tmp / "pgcopydb"), "--no-owner", "--no-acl"])
    return p.result()


def bench_migrator(src: str, tgt: str, jobs: int, tmp: Path, checkout: Path | None = None) -> Run:
    # No migration.toml in `tmp`: the DSNs come from the environment. Another checkout's migrator package (--compare)
    # comes first on the path, with this checkout's interpreter and libraries.
    env = {**os.environ, "MIGRATOR_SOURCE_DSN": src, "MIGRATOR_TARGET_DSN": tgt}
    if checkout is not None:
        env["PYTHONPATH"] = str(checkout)
    p = Phases()
    p.run("prepare", [*MIGRATOR, "prepare", "--yes", "--json"], env=env, cwd=tmp)
    p.run("copy", [*MIGRATOR, "copy", "--workers", str(jobs), "--json"], env=env, cwd=tmp)
    copied = json.loads(p.outputs["copy"])
    if copied.get("post_data_deferred"):
        raise SystemExit(f"migrator left post-data for sync: {copied['post_data_deferred']}")
    # The copy's own split, inside the timed copy phase (its log: data, then post-data, then ANALYZE).
    p.phases["copy"] -= copied["post_data_seconds"] + copied["analyze_seconds"]
    p.phases["post-data"] = copied["post_data_seconds"]
    p.phases["analyze"] = copied["analyze_seconds"]
    return p.result()


RUNNERS = {"pipe": bench_pipe, "pgcopydb": bench_pgcopydb, "pg_dump": bench_pg_dump, "migrator": bench_migrator}


# --- the end state ------------------------------------------------------------------------------------------------

_CATALOG = {
    "indexes": "SELECT schemaname, tablename, indexdef FROM pg_indexes WHERE schemaname <> ALL (%(skip)s)",
    "constraints": "SELECT n.nspname, t.relname, k.conname, k.contype::text, pg_get_constraintdef(k.oid), k.convalidated "
                   "FROM pg_constraint k JOIN pg_class t ON t.oid = k.conrelid "
                   "JOIN pg_namespace n ON n.oid = t.relnamespace WHERE n.nspname <> ALL (%(skip)s)",
    "triggers": "SELECT n.nspname, c.relname, g.tgname, g.tgenabled::text FROM pg_trigger g "
                "JOIN pg_class c ON c.oid = g.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE NOT g.tgisinternal AND n.nspname <> ALL (%(skip)s) AND g.tgname NOT LIKE '\\_migrator\\_%%'",
    "statistics": "SELECT schemaname, tablename, attname FROM pg_stats WHERE schemaname <> ALL (%(skip)s)",
}


def end_state(dsn: str, tables: list[str]) -> dict[str, Any]:
    """What every method must leave: per table its row count and an order-free checksum of its rows' text, and the
    catalog's indexes, constraints, triggers and analyzed columns."""
    found: dict[str, Any] = {}
    with psycopg.connect(dsn) as conn:
        for what, query in _CATALOG.items():
            found[what] = sorted(tuple(str(v) for v in r) for r in conn.execute(query, {"skip": list(SYSTEM_SCHEMAS)}))

    def rows(table: str) -> tuple[str, int, str]:
        with psycopg.connect(dsn) as conn:
            r = conn.execute(f"SELECT count(*), coalesce(sum(hashtextextended(t::text, 0)), 0) FROM ONLY {table} t"
                             ).fetchone()  # the name is format('%I.%I') from the catalog
            assert r is not None
            return table, int(r[0]), str(r[1])

    with ThreadPoolExecutor(max_workers=2) as pool:
        found["rows"] = sorted(pool.map(rows, tables))
    return found


def compare(name: str, want: dict[str, Any], got: dict[str, Any]) -> None:
    diffs = []
    for what, expected in want.items():
        have = got.get(what)
        if have != expected:
            missing = [x for x in expected if x not in have][:3] if have is not None else expected[:3]
            extra = [x for x in (have or []) if x not in expected][:3]
            diffs.append(f"{what}: missing {missing}, unexpected {extra}")
    if diffs:
        raise SystemExit(f"{name} did not end in the source's state:\n  " + "\n  ".join(diffs))


# --- main ---------------------------------------------------------------------------------------------------------

@dataclass
class Method:
    name: str
    runs: list[Run] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)


def run_rounds(source: Server, target: Server, src_db: str, args: argparse.Namespace,
               names: list[str]) -> dict[str, Method]:
    tag = uuid.uuid4().hex[:6]
    tables = tables_of(source.dsn(src_db))
    want = end_state(source.dsn(src_db), tables)
    methods = {m: Method(m) for m in names}
    for rnd in range(args.rounds):
        timings: dict[str, float] = {}
        for name in names[rnd % len(names):] + names[:rnd % len(names)]:
            tgt_db, clone = f"bench_tgt_{tag}", f"bench_srcm_{tag}"
            src = source.dsn(src_db)
            if name == "migrator" or name in args.compare:  # prepare installs capture on the source: a fresh clone
                src = source.create(clone, template=src_db)
            tgt = target.create(tgt_db)
            try:
                with tempfile.TemporaryDirectory(prefix="bench-copy-") as tmp:
                    if name in args.compare:
                        run = bench_migrator(src, tgt, args.workers, Path(tmp), args.compare[name])
                    else:
                        run = RUNNERS[name](src, tgt, args.workers, Path(tmp))
                compare(name, want, end_state(tgt, tables))
            finally:
                target.drop(tgt_db)
                if name == "migrator" or name in args.compare:
                    source.drop(clone)
            methods[name].runs.append(run)
            timings[name] = run.seconds
            phases = ", ".join(f"{k} {v:.2f}" for k, v in run.phases.items())
            print(f"round {rnd + 1} {name:<9} {run.seconds:7.2f}s ({phases})  largest process "
                  f"{run.max_rss_kb / 1024:6.1f} MB", flush=True)
        if "pipe" in timings:
            for name, secs in timings.items():
                methods[name].ratios.append(secs / timings["pipe"])
    return methods


def report(methods: dict[str, Method], data_mb: float, rounds: int) -> dict[str, Any]:
    print()
    print(f"| method | total (median of {rounds}) | phases (medians) | × raw pipe (median of per-round ratios) "
          "| MB/s | largest process |")
    print("|---|---:|---|---:|---:|---:|")
    summary: dict[str, Any] = {}
    for m in methods.values():
        secs = median([r.seconds for r in m.runs])
        phases = {k: median([r.phases.get(k, 0.0) for r in m.runs]) for k in m.runs[0].phases}
        ratio = median(m.ratios)
        rss = max(r.max_rss_kb for r in m.runs) / 1024
        print(f"| {m.name} | {secs:.2f} s | {', '.join(f'{k} {v:.2f}' for k, v in phases.items())} | {ratio:.2f} "
              f"| {data_mb / secs:.1f} | {rss:.0f} MB |")
        summary[m.name] = {"median_seconds": round(secs, 3), "ratio_to_pipe": round(ratio, 3),
                           "phases": {k: round(v, 3) for k, v in phases.items()}, "max_rss_mb": round(rss, 1),
                           "seconds": [round(r.seconds, 3) for r in m.runs],
                           "ratios": [round(r, 3) for r in m.ratios]}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="parallel jobs of every method (migrator copy --workers)")
    parser.add_argument("--two-clusters", action="store_true", help="source and target in two private clusters")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--compare", action="append", default=[], metavar="NAME=PATH",
                        help="also time the migrator of another checkout (PATH, e.g. a worktree of main) as NAME")
    parser.add_argument("--keep", action="store_true", help="keep the source database")
    args = parser.parse_args()
    args.compare = {n: Path(p).resolve() for n, p in (c.split("=", 1) for c in args.compare)}

    names = [m for m in METHODS if m in args.methods.split(",")] + list(args.compare)
    for checkout in [ROOT, *args.compare.values()]:
        # Byte-compiled, as a wheel's install leaves migrator (an editable one has no bytecode, and with
        # PYTHONDONTWRITEBYTECODE set each command would compile its modules again).
        subprocess.run([sys.executable, "-m", "compileall", "-q", "--invalidation-mode", "checked-hash",
                        str(checkout / "migrator"), str(checkout / "triggers")], check=True)
    if "pgcopydb" in names and shutil.which("pgcopydb") is None:
        print("pgcopydb: not installed (apt-get install pgcopydb); skipped")
        names.remove("pgcopydb")
    with servers(args.two_clusters) as (source, target):
        src_db = f"bench_src_{uuid.uuid4().hex[:6]}"
        try:
            t0 = time.perf_counter()
            built = pacs.build(source.create(src_db), scale=args.scale)
            with psycopg.connect(source.dsn(src_db)) as conn:
                row = conn.execute("SELECT sum(pg_table_size(c.oid)) FROM pg_class c JOIN pg_namespace n "
                                   "ON n.oid = c.relnamespace WHERE c.relkind = 'r' AND n.nspname <> ALL (%s)",
                                   (list(SYSTEM_SCHEMAS),)).fetchone()
            data_mb = float(row[0] if row and row[0] else 0) / 1e6
            where = (f"two private clusters (source :{CLUSTER_PORTS[0]}, target :{CLUSTER_PORTS[1]})"
                     if args.two_clusters else f"one server ({ADMIN_DSN})")
            print(f"source: scale {args.scale}, {built.total_rows:,} rows, {data_mb:.0f} MB of tables, built in "
                  f"{time.perf_counter() - t0:.1f}s; {where}; {args.workers} jobs per method", flush=True)
            methods = run_rounds(source, target, src_db, args, names)
            summary = report(methods, data_mb, args.rounds)
            print(json.dumps(summary))
        finally:
            if not args.keep:
                source.drop(src_db)


@contextmanager
def servers(two: bool) -> Iterator[tuple[Server, Server]]:
    if two:
        with private_clusters() as pair:
            yield pair
    else:
        shared = Server(ADMIN_DSN)
        yield shared, shared


if __name__ == "__main__":
    main()
