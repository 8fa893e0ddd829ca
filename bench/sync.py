"""Replay throughput: `migrator sync --until-caught-up` on ~1 M mixed events, next to a plain executemany upsert.

    .venv/bin/python -m bench.sync [--events 1000000] [--scale 0.05]

Builds a PACS-like source, prepares and copies it, clones the target (CREATE DATABASE ... TEMPLATE) for the
baseline, then fills the delta log with inserts, updates and deletes of `instance` rows in transactions of 1000
events. The baseline reads the same events with the rows' current state and applies them one statement per event
with executemany (INSERT ... ON CONFLICT DO UPDATE / DELETE) into the clone; migrator applies them with `sync --until-caught-up` in
a subprocess. Both targets are checked equal to the source afterwards. Prints events/s and the ratio.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import config, create_db, databases, dsn_for  # noqa: E402
from migrator import copy, db, prepare  # noqa: E402
from migrator.rehearse import pacs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def make_events(dsn: str, total: int, per_txn: int = 1000) -> int:
    """Inserts, updates and deletes on public.instance, `per_txn` events per transaction; returns events written."""
    written = 0
    i = 0
    with psycopg.connect(dsn, autocommit=False) as conn:
        while written < total:
            kind = i % 5
            if kind in (0, 1):  # a batch of arriving instances
                conn.execute(
                    "INSERT INTO public.instance (sop_uid, series_uid, instance_number, file_path, file_size, sha256, "
                    "received_at, transfer_syntax) SELECT 'bench.' || %(i)s || '.' || g, NULL, g, "
                    "'/store/bench/' || %(i)s || '/' || g || '.dcm', 500000 + g, sha256(g::text::bytea), now(), "
                    "'1.2.840.10008.1.2.1' FROM generate_series(1, %(n)s) g", {"i": i, "n": per_txn})
            elif kind in (2, 3):  # reports: updates of existing rows
                conn.execute(
                    "UPDATE public.instance SET file_size = file_size + 1, received_at = now() WHERE sop_uid IN "
                    "(SELECT sop_uid FROM public.instance TABLESAMPLE SYSTEM (5) LIMIT %(n)s)", {"n": per_txn})
            else:  # purge
                conn.execute(
                    "DELETE FROM public.instance WHERE sop_uid IN "
                    "(SELECT sop_uid FROM public.instance TABLESAMPLE SYSTEM (5) LIMIT %(n)s)", {"n": per_txn})
            conn.commit()
            written = conn.execute("SELECT count(*) FROM _migrator.delta_log").fetchone()[0]  # type: ignore[index]
            i += 1
    return written


def baseline(source_dsn: str, target_dsn: str) -> tuple[float, int]:
    """One statement per event, executemany: the naive replay (an upsert of the row's current state, or a delete)."""
    cols = ["sop_uid", "series_uid", "instance_number", "file_path", "file_size", "sha256", "received_at",
            "transfer_syntax"]
    upsert = (f"INSERT INTO public.instance ({', '.join(cols)}) VALUES ({', '.join(['%s'] * len(cols))}) "
              f"ON CONFLICT (sop_uid) DO UPDATE SET " + ", ".join(f"{c} = excluded.{c}" for c in cols[1:]))
    delete = "DELETE FROM public.instance WHERE sop_uid = %s"
    t0 = time.perf_counter()
    n = 0
    with db.session(source_dsn, role="source") as src, db.session(target_dsn, role="target") as tgt:
        tgt.execute("SET session_replication_role = replica")
        with src.cursor(name="events") as cur:
            cur.itersize = 10000
            cur.execute(f"SELECT e.key[1], i.sop_uid IS NOT NULL, {', '.join('i.' + c for c in cols)} "
                        "FROM _migrator.delta_log e LEFT JOIN public.instance i ON i.sop_uid = e.key[1] "
                        "WHERE e.rel = 'public.instance'::regclass")
            while rows := cur.fetchmany(10000):
                ups = [r[2:] for r in rows if r[1]]
                dels = [(r[0],) for r in rows if not r[1]]
                with tgt.cursor() as tc:
                    if ups:
                        tc.executemany(upsert, ups)
                    if dels:
                        tc.executemany(delete, dels)
                n += len(rows)
        tgt.commit()
    return time.perf_counter() - t0, n


def compare(a: str, b: str) -> bool:
    q = "SELECT count(*), md5(string_agg(md5(t::text), '' ORDER BY sop_uid COLLATE \"C\")) FROM public.instance t"
    with db.session(a, role="source") as x, db.session(b, role="target") as y:
        return x.execute(q).fetchone() == y.execute(q).fetchone()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--scale", type=float, default=0.05)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    with databases("src", "tgt", "base", keep=args.keep) as names:
        src = create_db(names["src"])
        tgt = create_db(names["tgt"])
        print(f"building source at scale {args.scale} ...", flush=True)
        pacs.build(src, scale=args.scale)
        cfg = config(names["src"], names["tgt"])
        prepare.prepare(cfg)
        copy.run(cfg)
        base = create_db(names["base"], template=names["tgt"])
        print(f"writing ~{args.events} events ...", flush=True)
        events = make_events(src, args.events)
        print(f"{events} events in the delta log", flush=True)
        b_sec, b_n = baseline(src, base)
        toml = Path(os.environ.get("TMPDIR", "/tmp")) / f"{names['tgt']}.toml"
        toml.write_text(f'[source]\ndsn = "{dsn_for(names["src"])}"\n[target]\ndsn = "{dsn_for(names["tgt"])}"\n')
        t0 = time.perf_counter()
        subprocess.run([str(ROOT / ".venv/bin/migrator"), "--config", str(toml), "sync", "--until-caught-up"],
                       check=True, stderr=subprocess.DEVNULL)
        m_sec = time.perf_counter() - t0
        ok_m, ok_b = compare(src, tgt), compare(src, base)
        print(f"\nevents: {events}")
        print(f"baseline executemany upsert: {b_sec:8.2f}s  {b_n / b_sec:10.0f} events/s  equal={ok_b}")
        print(f"migrator sync:               {m_sec:8.2f}s  {events / m_sec:10.0f} events/s  equal={ok_m}")
        print(f"ratio migrator/baseline time: {m_sec / b_sec:.3f}  (target: >= 60000 events/s)")
        return 0 if ok_m else 1


if __name__ == "__main__":
    sys.exit(main())
