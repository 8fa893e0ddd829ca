"""Cutover through PgBouncer under steady client load: the client-visible pause, client latency and client errors.

    .venv/bin/python -m bench.cutover [--scale 1] [--clients 20] [--tps 10] [--keep]

Builds the synthetic PACS at `--scale` (1 ≈ 1.5 M rows) as the legacy database, prepares, copies and syncs it to a
new database, and starts a PgBouncer of its own (transaction pooling, free port) serving `pacs` -> legacy. `--clients`
connections then write through the pooler, each `--tps` short transactions per second (a study arrives: one study row
and one audit row), while `migrator cutover --yes --json` runs as an operator would run it (a subprocess). Prints the
client-visible pause (PAUSE → RESUME), the write freeze, each step, the longest client transaction while the cutover
ran, and client errors; then checks that every committed client transaction is on the new database.
Targets (issue 6): pause ≤ 5 s, 0 client errors. Needs pgbouncer (Debian: apt-get install pgbouncer).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this directory comes first on sys.path, and its copy.py would shadow the standard library's.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import psycopg  # noqa: E402

from bench._common import ADMIN_DSN, config, create_db, databases, dsn_for  # noqa: E402
from migrator import copy, pooler, prepare, sync  # noqa: E402
from migrator.rehearse import pacs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def start_pgbouncer(work: Path, legacy_db: str) -> tuple[subprocess.Popen[bytes], int, Path]:
    exe = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not os.access(exe, os.X_OK):
        sys.exit("pgbouncer is not installed (apt-get install pgbouncer)")
    info = psycopg.conninfo.conninfo_to_dict(ADMIN_DSN)
    user = str(info.get("user") or "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    work.chmod(0o777)
    databases_ini = work / "databases.ini"
    databases_ini.write_text(f"[databases]\npacs = host={info.get('host', '127.0.0.1')} "
                             f"port={info.get('port', 5432)} dbname={legacy_db}\n")
    (work / "users.txt").write_text(f'"{user}" ""\n')
    ini = work / "pgbouncer.ini"
    ini.write_text("\n".join([
        "[pgbouncer]", "listen_addr = 127.0.0.1", f"listen_port = {port}", "unix_socket_dir =",
        "auth_type = trust", f"auth_file = {work / 'users.txt'}", f"admin_users = {user}",
        "pool_mode = transaction", "default_pool_size = 10", "max_client_conn = 200",
        f"logfile = {work / 'pgbouncer.log'}", f"%include {databases_ini}", ""]))
    for f in work.iterdir():
        f.chmod(0o644)
    cmd = [exe] + (["-u", "postgres"] if os.geteuid() == 0 else []) + [str(ini)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            pooler.Admin(f"postgresql://{user}@127.0.0.1:{port}/pgbouncer", connect_timeout=1).close()
            return proc, port, databases_ini
        except Exception:
            time.sleep(0.1)
    proc.kill()
    sys.exit("pgbouncer did not start")


class Load:
    """Client connections through the pooler, each running short write transactions at a steady rate."""

    def __init__(self, dsn: str, clients: int, tps: float) -> None:
        self.dsn, self.clients, self.interval = dsn, clients, 1.0 / tps
        self.stop = threading.Event()
        self.done: list[tuple[str, float, float]] = []  # (uid, wall-clock start, seconds)
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, index: int) -> None:
        with psycopg.connect(self.dsn, prepare_threshold=None) as conn:
            n = 0
            while not self.stop.is_set():
                n += 1
                uid = f"2.25.bench.{index}.{n}"
                t0 = time.time()
                try:
                    conn.execute("INSERT INTO public.study (study_uid, study_date, status, description) "
                                 "VALUES (%s, now(), 'arrived', 'bench cutover')", (uid,))
                    conn.execute("INSERT INTO public.audit_event (event_time, actor, action, object_uid) "
                                 "VALUES (now(), 'bench', 'arrive', %s)", (uid,))
                    conn.commit()
                    self.done.append((uid, t0, time.time() - t0))
                except psycopg.Error as exc:
                    self.errors.append(f"{exc.sqlstate}: {str(exc).strip()[:200]}")
                    conn.rollback()
                self.stop.wait(max(0.0, self.interval - (time.time() - t0)))

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--tps", type=float, default=10.0, help="transactions per second per client")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_pgbouncer_"))
    bouncer: subprocess.Popen[bytes] | None = None
    with databases("cutsrc", "cuttgt", keep=args.keep) as names:
        try:
            src, tgt = names["cutsrc"], names["cuttgt"]
            create_db(src)
            create_db(tgt)
            t0 = time.perf_counter()
            built = pacs.build(dsn_for(src), scale=args.scale)
            print(f"built {built.total_rows:,} rows ({built.bytes / 1e6:.0f} MB) in {time.perf_counter() - t0:.1f}s",
                  flush=True)
            bouncer, port, databases_ini = start_pgbouncer(work, src)
            user = str(psycopg.conninfo.conninfo_to_dict(ADMIN_DSN).get("user") or "postgres")
            admin = f"postgresql://{user}@127.0.0.1:{port}/pgbouncer"
            cutover_settings: dict[str, Any] = {"pgbouncer_admin_dsn": admin, "pooler_databases": ["pacs"],
                                                "pgbouncer_ini": str(databases_ini), "verify": "counts"}
            cfg = config(src, tgt, cutover=cutover_settings)
            load = Load(f"postgresql://{user}@127.0.0.1:{port}/pacs", args.clients, args.tps)
            load.start()
            t0 = time.perf_counter()
            prepare.prepare(cfg)
            copy.run(cfg)
            sync.sync(cfg)
            print(f"prepared, copied and synced under load in {time.perf_counter() - t0:.1f}s", flush=True)
            time.sleep(3.0)
            sync.sync(cfg)  # as `sync --follow` would have kept it: seconds behind

            toml = work / "migration.toml"
            toml.write_text("\n".join([
                "[source]", f"dsn = {json.dumps(dsn_for(src))}", "[target]", f"dsn = {json.dumps(dsn_for(tgt))}",
                "[cutover]"] + [f"{k} = {json.dumps(v)}" for k, v in cutover_settings.items()]) + "\n")
            env = {k: v for k, v in os.environ.items() if not k.startswith("MIGRATOR_")}
            started = time.time()
            proc = subprocess.run([str(ROOT / ".venv/bin/migrator"), "--config", str(toml), "--log-json",
                                   "cutover", "--yes", "--json"], env=env, capture_output=True, text=True)
            ended = time.time()
            time.sleep(3.0)  # clients go on, on the new database
            load.finish()
            if proc.returncode != 0:
                print(proc.stderr[-3000:])
                sys.exit(f"cutover failed (exit {proc.returncode})")
            report = json.loads(proc.stdout)
            during = [s for _, t, s in load.done if t + s >= started and t <= ended]
            with psycopg.connect(dsn_for(tgt)) as conn:
                on_target = {r[0] for r in conn.execute(
                    "SELECT study_uid FROM public.study WHERE description = 'bench cutover'").fetchall()}
            missing = [u for u, _, _ in load.done if u not in on_target]

            print(f"\ncutover through PgBouncer, scale {args.scale:g}, {args.clients} clients at {args.tps:g} tps each")
            for s in report["steps"]:
                print(f"  {s['step']:<10} {s['seconds']:8.3f}s  {s['detail'] or ''}")
            print(f"client-visible pause (PAUSE -> RESUME): {report['pause_seconds']:.3f}s   (target <= 5 s)")
            print(f"write freeze on the legacy database:    {report['freeze_seconds']:.3f}s")
            print(f"cutover command, wall clock:            {ended - started:.3f}s")
            print(f"longest client transaction during it:   {max(during) if during else float('nan'):.3f}s "
                  f"({len(during)} transactions overlapped the command)")
            print(f"client transactions committed: {len(load.done)}, client errors: {len(load.errors)}   "
                  "(target 0)")
            print(f"committed transactions missing on the new database: {len(missing)}")
            for e in load.errors[:5]:
                print("  error:", e)
        finally:
            if bouncer is not None:
                bouncer.terminate()
                bouncer.wait(timeout=10)
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
