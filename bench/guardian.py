"""A cutover or rollback killed at every step: how long clients wait for the guardian, and whether a re-run ends it.

    .venv/bin/python -m bench.guardian [--clients 10] [--tps 20] [--scale 0.01] [--guardian-timeout S]
                                       [--points SUBSTRING,...] [--keep]

For each fault point of `tests/killpoints.py` (every step of the cutover and of the rollback through a pooler,
`started` and `ran`, and the switch's `rewritten`): a fresh legacy database (the synthetic PACS at `--scale`, cloned
from one built at the start), prepared, copied and synced to a fresh target; a PgBouncer of its own (transaction
pooling, free port) serving `pacs`; for a rollback point, a completed cutover first. `--clients` connections then
write through the pooler (`--tps` inserts per second each, every id counted only once COMMIT returned), and
`migrator cutover --yes` (or `rollback --yes`) runs with MIGRATOR_FAULT_KILL set to the point: it SIGKILLs its own
process group there. Per point it prints the seconds from the kill until every client had completed a transaction
again (the slowest client and the median; "stuck" past guardian_timeout + 10 s), the side the pooler serves after the
guardian and whether that is the side the contract names, the exit code of `migrator <flow> --yes` run again, client
errors, and committed client transactions missing on the side served at the end (after a re-run that exited 0).

The assumptions about the mechanism (fault points, the side each resolves to, the bound, how a command is killed and
run again) are those of the tests, kept in tests/killpoints.py. Needs pgbouncer (Debian: apt-get install pgbouncer).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this directory comes first on sys.path, and its copy.py would shadow the standard library's.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import psycopg  # noqa: E402

from bench._common import ADMIN_DSN, config, create_db, drop_db, dsn_for  # noqa: E402
from bench.cutover import start_pgbouncer  # noqa: E402
from migrator import copy, cutover, pooler, prepare, sync  # noqa: E402
from migrator.rehearse import pacs  # noqa: E402
from tests import killpoints  # noqa: E402
from tests.helpers import Writers  # noqa: E402

INSERT = ("INSERT INTO public.study (study_uid, study_date, status, description) "
          "VALUES (%s, now(), 'arrived', 'bench guardian')")
IDS = "SELECT study_uid FROM public.study WHERE description = 'bench guardian'"
PROBE = "UPDATE public.study SET status = status WHERE study_uid = (SELECT min(study_uid) FROM public.study)"


@dataclass
class Outcome:
    point: str
    killed: bool
    waits: list[float | None]
    expected: str
    served: str
    paused: bool
    frozen_ok: bool | None
    """The side the contract says is frozen rejects a write (None: no side is named)."""
    rerun_exit: int | None
    lost: int
    committed: int
    errors: int

    def row(self) -> str:
        if not self.killed:
            return f"{self.point:<28} NOT KILLED (the fault point is not implemented?)"
        got = [w for w in self.waits if w is not None]
        lost = f"{self.lost:>5}" if self.rerun_exit == 0 else "    -"
        slow = "stuck" if len(got) < len(self.waits) else f"{max(got):6.2f}"
        med = f"{statistics.median(got):6.2f}" if got else "     -"
        side = self.served + ("" if self.served == self.expected else f" (expected {self.expected})")
        side += " PAUSED" if self.paused else ""
        frozen = {None: "-", True: "yes", False: "NO"}[self.frozen_ok]
        return (f"{self.point:<28} {slow:>7} {med:>7}  {side:<22} {frozen:>6}  {self.rerun_exit!s:>5}  "
                f"{lost} / {self.committed:<6} {self.errors:>6}")


HEADER = (f"{'point':<28} {'slowest':>7} {'median':>7}  {'served after guardian':<22} {'frozen':>6}  {'rerun':>5}  "
          f"{'lost / committed':<14} {'errors':>6}")


def rejects_writes(dsn: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        try:
            conn.execute(PROBE)
        except psycopg.Error as exc:
            return exc.sqlstate == "25006"
    return False


def one_point(point: str, template: str, args: argparse.Namespace, work: Path) -> Outcome:
    flow = point.split(".")[0]
    tag = uuid.uuid4().hex[:6]
    src, tgt = f"bench_gsrc_{tag}", f"bench_gtgt_{tag}"
    create_db(src, template=template)
    create_db(tgt)
    bouncer, port, databases_ini = start_pgbouncer(work, src)
    try:
        user = str(psycopg.conninfo.conninfo_to_dict(ADMIN_DSN).get("user") or "postgres")
        admin = f"postgresql://{user}@127.0.0.1:{port}/pgbouncer"
        settings: dict[str, Any] = {"pgbouncer_admin_dsn": admin, "pooler_databases": ["pacs"],
                                    "pgbouncer_ini": str(databases_ini)}
        cfg = config(src, tgt, cutover=settings)
        prepare.prepare(cfg)
        copy.run(cfg)
        sync.sync(cfg)
        if flow == "rollback":
            cutover.run(cfg)
        if args.guardian_timeout is not None:
            settings["guardian_timeout"] = args.guardian_timeout
        toml = work / "migration.toml"
        toml.write_text("\n".join(["[source]", f"dsn = {json.dumps(dsn_for(src))}", "[target]",
                                   f"dsn = {json.dumps(dsn_for(tgt))}", "[cutover]"]
                                  + [f"{k} = {json.dumps(v)}" for k, v in settings.items()]) + "\n")
        dsns = {"legacy": dsn_for(src), "target": dsn_for(tgt)}
        names = {src: "legacy", tgt: "target"}
        bound = killpoints.bound(args.guardian_timeout or 5.0)
        with Writers(f"postgresql://{user}@127.0.0.1:{port}/pacs", args.clients, INSERT,
                     interval=1.0 / args.tps) as writers:
            killed = killpoints.run(toml, flow, "--yes", **{killpoints.FAULT_ENV: point})
            if killed.returncode != -9:
                return Outcome(point, False, [], "", "", False, None, None, 0, writers.count(), len(writers.errors))
            waits = writers.resumed_after(killed.ended, bound)
            with pooler.Admin(admin) as a:
                shown = a.databases()["pacs"]
            frozen = killpoints.frozen_after_guardian(point)
            frozen_ok = None if frozen is None else rejects_writes(dsns[frozen])
            again = killpoints.rerun(toml, flow, wait=bound)
            writers.resumed_after(again.ended, bound)
        end = "target" if flow == "cutover" else "legacy"
        with psycopg.connect(dsns[end]) as conn:
            on_end = {r[0] for r in conn.execute(IDS).fetchall()}
        return Outcome(point, True, waits, killpoints.served_after_guardian(point),
                       names.get(shown.database, shown.database), shown.paused, frozen_ok, again.returncode,
                       len(writers.ids() - on_end), writers.count(), len(writers.errors))
    finally:
        bouncer.terminate()
        bouncer.wait(timeout=10)
        if not args.keep:
            drop_db(src)
            drop_db(tgt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--tps", type=float, default=20.0, help="transactions per second per client")
    ap.add_argument("--scale", type=float, default=0.01)
    ap.add_argument("--guardian-timeout", type=float, default=None,
                    help="[cutover] guardian_timeout (default: the configuration's default)")
    ap.add_argument("--points", default="", help="comma-separated substrings; only points containing one run")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    wanted = [p for p in killpoints.points("cutover") + killpoints.points("rollback")
              if not args.points or any(s in p for s in args.points.split(","))]
    template = f"bench_gtpl_{uuid.uuid4().hex[:6]}"
    create_db(template)
    outcomes: list[Outcome] = []
    try:
        t0 = time.perf_counter()
        built = pacs.build(dsn_for(template), scale=args.scale)
        print(f"built {built.total_rows:,} rows in {time.perf_counter() - t0:.1f}s; {len(wanted)} points, "
              f"{args.clients} clients at {args.tps:g} tps each", flush=True)
        for point in wanted:
            work = Path(tempfile.mkdtemp(prefix="bench_guardian_"))
            try:
                outcomes.append(one_point(point, template, args, work))
            finally:
                shutil.rmtree(work, ignore_errors=True)
            print(outcomes[-1].row(), flush=True)
    finally:
        if not args.keep:
            drop_db(template)
    print("\nseconds from the kill until every client completed a transaction again (slowest client, median):")
    print(HEADER)
    for o in outcomes:
        print(o.row())


if __name__ == "__main__":
    main()
