"""Capture cost on the legacy write path: pgbench with and without migrator's capture triggers, alternating.

    .venv/bin/python -m bench.capture [--seconds 10] [--rounds 5] [--clients 4]

Builds a PACS-like table set (study, series, instance with text UIDs, jsonb, bytea; 100k instances), then runs
pgbench custom scripts: single-row insert transactions, 10-row insert transactions (one study arriving: a study, a
series, eight instances), single-row updates; and times one UPDATE of 100k rows. Each round runs every case once
without capture and once with it (triggers installed by `triggers.install`, the delta log emptied between runs).
Prints median TPS and latency per case, the ratio of the medians, and the spread of each round's own ratio (both
modes of a round run back to back, so a round's ratio is the steadier figure on a noisy machine).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import create_db, databases, median  # noqa: E402
from migrator import catalog  # noqa: E402
from migrator.config import TableFilter  # noqa: E402
from migrator.deltalog import triggers  # noqa: E402

SCHEMA = """
CREATE TABLE study (study_uid text PRIMARY KEY, patient_id bigint, accession text, study_date timestamptz,
                    description text, meta jsonb, status text);
CREATE TABLE series (series_uid text PRIMARY KEY, study_uid text, modality text, series_number int,
                     instance_count int);
CREATE TABLE instance (id bigserial UNIQUE, sop_uid text PRIMARY KEY, series_uid text, instance_number int,
                       file_path text, file_size bigint, sha256 bytea, received_at timestamptz,
                       transfer_syntax text);
CREATE INDEX ON series (study_uid);
CREATE INDEX ON instance (series_uid);
INSERT INTO instance (sop_uid, series_uid, instance_number, file_path, file_size, sha256, received_at, transfer_syntax)
SELECT '1.2.3.4.' || g, '1.2.3.' || (g / 50), g % 50, '/store/' || g || '.dcm', 500000 + g,
       sha256(g::text::bytea), now(), '1.2.840.10008.1.2.1' FROM generate_series(1, 100000) g;
ANALYZE;
"""

SCRIPTS = {
    "insert_1row": """
INSERT INTO instance (sop_uid, series_uid, instance_number, file_path, file_size, sha256, received_at, transfer_syntax)
VALUES ('2.25.' || gen_random_uuid(), '1.2.3.9', 1, '/store/new.dcm', 524288, sha256('x'::bytea), now(), '1.2.840.10008.1.2.1');
""",
    "insert_10rows": """
\\set s random(1, 1000000000)
BEGIN;
INSERT INTO study VALUES ('2.25.' || :client_id || '.' || :s || '.' || random(), :s, 'ACC' || :s, now(), 'CT Thorax', '{"rev": 1}', 'ARRIVED');
INSERT INTO series VALUES ('2.26.' || :client_id || '.' || :s || '.' || random(), '2.25.x', 'CT', 1, 8);
INSERT INTO instance (sop_uid, series_uid, instance_number, file_path, file_size, sha256, received_at, transfer_syntax) VALUES ('2.27.' || gen_random_uuid(), '2.26.x', 1, '/s/1.dcm', 524288, sha256('1'::bytea), now(), '1.2.840.10008.1.2.1');
INSERT INTO instance (sop_uid, series_uid, instance_number, file_path, file_size, sha256, received_at, transfer_syntax) VALUES ('2.27.' || gen_random_uuid(), '2.26.x', 2, '/s/2.dcm', 524288, sha256('2'::bytea), now(), '1.2.840.10008.1.2.1');
INSERT INTO instance (sop_uid, series_uid, instance_number, file_path, file_size, sha256, received_at, transfer_syntax) VALUES ('2.27.' || gen_random_uuid(), '2.26.x', 3, '/s/3.dcm', 524288, sha256('3'::bytea), now(), '1.2.840.10008.1.2.1');
INSERT INTO instance (sop_uid, series_uid, instance_number, file_path, file_size, sha256, received_at, transfer_syntax) VALUES ('2.27.' || gen_random_uuid(), '2.26.x', 4, '/s/4.dcm', 524288, sha256('4'::bytea), now(), '1.2.840.10008.1.2.1');
INSERT INTO instance (sop_uid, series_uid, instance_number, file_path, file_size, sha256, received_at, transfer_syntax) VALUES ('2.27.' || gen_random_uuid(), '2.26.x', 5, '/s/5.dcm', 524288, sha256('5'::bytea), now(), '1.2.840.10008.1.2.1');
INSERT INTO instance (sop_uid, series_uid, instance_number, file_path, file_size, sha256, received_at, transfer_syntax) VALUES ('2.27.' || gen_random_uuid(), '2.26.x', 6, '/s/6.dcm', 524288, sha256('6'::bytea), now(), '1.2.840.10008.1.2.1');
INSERT INTO instance (sop_uid, series_uid, instance_number, file_path, file_size, sha256, received_at, transfer_syntax) VALUES ('2.27.' || gen_random_uuid(), '2.26.x', 7, '/s/7.dcm', 524288, sha256('7'::bytea), now(), '1.2.840.10008.1.2.1');
INSERT INTO instance (sop_uid, series_uid, instance_number, file_path, file_size, sha256, received_at, transfer_syntax) VALUES ('2.27.' || gen_random_uuid(), '2.26.x', 8, '/s/8.dcm', 524288, sha256('8'::bytea), now(), '1.2.840.10008.1.2.1');
END;
""",
    "update_1row": """
\\set id random(1, 100000)
UPDATE instance SET file_size = file_size + 1, received_at = now() WHERE id = :id;
""",
}


def pgbench(dsn: str, script: str, seconds: int, clients: int) -> tuple[float, float]:
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(script)
    args = [shutil.which("pgbench") or "/usr/lib/postgresql/15/bin/pgbench", "-n", "-M", "prepared",
            "-f", f.name, "-c", str(clients), "-j", str(min(clients, 2)), "-T", str(seconds),
            "-h", str(info.get("host", "127.0.0.1")), "-p", str(info.get("port", 5432)),
            "-U", str(info.get("user", "postgres")), str(info["dbname"])]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    tps = float(re.search(r"tps = ([\d.]+)", out).group(1))  # type: ignore[union-attr]
    lat = float(re.search(r"latency average = ([\d.]+) ms", out).group(1))  # type: ignore[union-attr]
    Path(f.name).unlink()
    return tps, lat


def set_capture(dsn: str, on: bool) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        tables = catalog.list_tables(conn, TableFilter(include=("public.*",)))
        if on:
            triggers.install(conn, tables)
        else:
            for t in tables:
                conn.execute(f'DROP TRIGGER IF EXISTS {triggers.ROW_TRIGGER} ON "{t.name}"')
                conn.execute(f'DROP TRIGGER IF EXISTS {triggers.TRUNCATE_TRIGGER} ON "{t.name}"')
            conn.execute("DROP SCHEMA IF EXISTS _migrator CASCADE")
        conn.execute("VACUUM ANALYZE")
        conn.execute("CHECKPOINT")


def bulk_update(dsn: str) -> float:
    with psycopg.connect(dsn) as conn:
        t0 = time.perf_counter()
        conn.execute("UPDATE instance SET file_size = file_size + 1 WHERE id <= 100000")
        conn.commit()
        return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clients", type=int, default=4)
    args = ap.parse_args()
    results: dict[tuple[str, bool], list[tuple[float, float]]] = {}
    bulk: dict[bool, list[float]] = {False: [], True: []}
    with databases("capture") as names:
        dsn = create_db(names["capture"])
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(SCHEMA)
        for r in range(args.rounds):
            for on in (False, True) if r % 2 == 0 else (True, False):
                set_capture(dsn, on)
                for case, script in SCRIPTS.items():
                    results.setdefault((case, on), []).append(pgbench(dsn, script, args.seconds, args.clients))
                bulk[on].append(bulk_update(dsn))
                print(f"round {r + 1} capture={'on' if on else 'off'} done", flush=True)
    print(f"\n{'case':<16}{'TPS off':>10}{'TPS on':>10}{'ratio':>8}{'per-round ratios':>24}{'lat off ms':>12}{'lat on ms':>11}")
    for case in SCRIPTS:
        off = results[(case, False)]
        on_ = results[(case, True)]
        t_off, t_on = median([x[0] for x in off]), median([x[0] for x in on_])
        l_off, l_on = median([x[1] for x in off]), median([x[1] for x in on_])
        # Each round runs both modes back to back, so its ratio compares like with like on a noisy machine.
        paired = sorted(b[0] / a[0] for a, b in zip(off, on_, strict=True))
        spread = f"{paired[0]:.2f}..{paired[-1]:.2f} med {median(paired):.2f}"
        print(f"{case:<16}{t_off:>10.0f}{t_on:>10.0f}{t_on / t_off:>8.2f}{spread:>24}{l_off:>12.2f}{l_on:>11.2f}")
    b_off, b_on = median(bulk[False]), median(bulk[True])
    print(f"{'update_100k':<16}{b_off:>9.2f}s{b_on:>9.2f}s{b_off / b_on:>8.2f}  (time ratio off/on)")
    print("targets: >= 0.90 for single-row transactions, >= 0.85 for 10-row transactions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
