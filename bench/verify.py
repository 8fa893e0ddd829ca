"""Row parity throughput: `migrator verify` on a PACS-like database of ~1.5 M rows, next to a plain SQL md5 aggregate.

    .venv/bin/python -m bench.verify [--scale 1] [--keep]

Builds the synthetic PACS (`migrator.rehearse.pacs.build`) into a source database and clones it as the target
(CREATE DATABASE ... TEMPLATE). The baseline, run in the same round on the same server, is what one would write by
hand: per table, `md5(string_agg(md5(row::text), '' ORDER BY key))` on both sides at once, tables one after the
other. Then `migrator verify --json` runs in a subprocess on the clean pair, and again after one row of
public.instance was changed on the target, which it must report by its key; and once more clean with `--buckets
hashes` (sequential scans only, what a large table whose heap does not follow its key gets). Prints rows/s per side
and the ratios (verify against the baseline; locating the bad row against the clean pass).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import create_db, databases, dsn_for, timed  # noqa: E402
from migrator import catalog, db  # noqa: E402
from migrator.config import TableFilter  # noqa: E402
from migrator.rehearse import pacs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BAD_KEY = pacs.SERIES_UID_ROOT + "4242.3"


def baseline(source_dsn: str, target_dsn: str) -> dict[str, str]:
    """md5 of the ordered concatenation of row md5s, per table, both sides at once; returns the tables that differ."""
    with db.session(source_dsn, role="source") as conn:
        tables = catalog.list_tables(conn, TableFilter())
    differ = {}
    for t in tables:
        order = sql.SQL(", ").join(sql.Identifier(c) for c in t.key) if t.key else sql.SQL("1")
        query = sql.SQL("SELECT md5(string_agg(h, '' ORDER BY {order})) FROM "
                        "(SELECT md5(r::text) AS h, {cols} FROM ONLY {t} AS r) AS s").format(
            order=order if t.key else sql.SQL("h"), t=t.ident,
            cols=sql.SQL(", ").join(sql.Identifier(c) for c in t.key) if t.key else sql.SQL("1 AS one"))
        out: dict[str, str] = {}

        def run(side: str, dsn: str, q: sql.Composed = query, out: dict[str, str] = out) -> None:
            with db.session(dsn, role=side) as conn:
                row = conn.execute(q).fetchone()
                out[side] = str(row[0] if row else None)

        threads = [threading.Thread(target=run, args=("source", source_dsn)),
                   threading.Thread(target=run, args=("target", target_dsn))]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if out["source"] != out["target"]:
            differ[t.display] = "different"
    return differ


def verify(config: Path, *options: str) -> dict[str, object]:
    done = subprocess.run([str(ROOT / ".venv" / "bin" / "migrator"), "--config", str(config), "--log-level",
                           "warning", "verify", "--json", *options], capture_output=True, text=True)
    if done.returncode not in (0, 1):
        raise SystemExit(f"migrator verify failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    with databases("vsrc", "vtgt", keep=args.keep) as names, tempfile.TemporaryDirectory() as tmp:
        create_db(names["vsrc"])
        built = pacs.build(dsn_for(names["vsrc"]), scale=args.scale)
        create_db(names["vtgt"], template=names["vsrc"])
        with psycopg.connect(dsn_for(names["vtgt"]), autocommit=True) as conn:
            conn.execute("ANALYZE")
        rows = built.total_rows
        config = Path(tmp) / "migration.toml"
        config.write_text(f'[source]\ndsn = "{dsn_for(names["vsrc"])}"\n[target]\ndsn = "{dsn_for(names["vtgt"])}"\n')
        print(f"built {rows:,} rows ({built.bytes / 1e6:.0f} MB) in {built.seconds:.1f}s; target cloned")

        base_s, differ = timed(lambda: baseline(dsn_for(names["vsrc"]), dsn_for(names["vtgt"])))
        assert not differ, differ
        clean_s, clean = timed(lambda: verify(config))
        assert clean["exit_code"] == 0, clean
        hashes_s, hashes = timed(lambda: verify(config, "--buckets", "hashes"))
        assert hashes["exit_code"] == 0, hashes

        with psycopg.connect(dsn_for(names["vtgt"]), autocommit=True) as conn:
            conn.execute("UPDATE public.instance SET file_size = file_size + 1 WHERE sop_uid = %s", (BAD_KEY,))
        bad_s, bad = timed(lambda: verify(config))
        tables = {t["name"]: t for t in bad["tables"]}  # type: ignore[attr-defined]
        found = tables["public.instance"]["differences"]
        assert bad["exit_code"] == 1 and found == [{"kind": "different", "key": {"sop_uid": BAD_KEY}}], found
        located_base_s, _ = timed(lambda: baseline(dsn_for(names["vsrc"]), dsn_for(names["vtgt"])))

    print(f"baseline (md5 aggregate per table, both sides at once): {base_s:7.2f}s  {rows / base_s:10,.0f} rows/s per side")
    print(f"migrator verify, clean:                                 {clean_s:7.2f}s  {rows / clean_s:10,.0f} rows/s per side"
          f"  ({base_s / clean_s:.2f}x the baseline's speed)")
    print(f"migrator verify --buckets hashes, clean:                {hashes_s:7.2f}s  {rows / hashes_s:10,.0f} rows/s per side"
          f"  ({base_s / hashes_s:.2f}x the baseline's speed; sequential scans only)")
    print(f"migrator verify, one bad row located by key:            {bad_s:7.2f}s  "
          f"({bad_s / clean_s:.2f}x the clean pass; target <= 2x)")
    inst = tables["public.instance"]
    print(f"  public.instance: {inst['ranges']} ranges, {inst['ranges_different']} differed, {inst['passes']} pass(es);"
          f" the baseline only says the table differs ({located_base_s:.2f}s)")


if __name__ == "__main__":
    main()
