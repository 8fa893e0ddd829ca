"""What arming the rollback adds to the cutover's client-visible pause, for a schema of many tables.

    .venv/bin/python -m bench.arm [--tables 300] [--rounds 3]

The cutover installs the rollback's capture on the target. Installed inside the pause, that is a trigger function
and five triggers per table, one transaction each. Staged before the pause (triggers disabled) it leaves only the
enabling to the pause. Each round times, on a fresh database with N small keyed tables: `triggers.install` with the
triggers enabled (what the pause paid before), then on another fresh database `triggers.install(enabled=False)`
(outside the pause now) followed by what `rollback.arm` does inside it: list the tables, `triggers.install`
(which finds them staged) and `triggers.enable_triggers`. Prints medians and the ratio.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import create_db, databases, median, timed  # noqa: E402
from migrator import catalog  # noqa: E402
from migrator.config import TableFilter  # noqa: E402
from migrator.deltalog import triggers  # noqa: E402
from migrator.log import configure  # noqa: E402


def fresh(name: str, tables: int) -> str:
    dsn = create_db(name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in range(tables):
            conn.execute(sql.SQL("CREATE TABLE {} (id bigint PRIMARY KEY, uid text NOT NULL, note text, n int)")
                         .format(sql.Identifier(f"t{i:04d}")))
    return dsn


def arm_inside_pause(conn: psycopg.Connection[object]) -> int:
    tables = catalog.list_tables(conn, TableFilter(include=("public.*",)))
    triggers.install(conn, tables, enabled=False)
    return triggers.enable_triggers(conn, tables)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tables", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    configure(level="warning")
    inside_before: list[float] = []
    staged: list[float] = []
    inside_now: list[float] = []
    with databases("arm_a", "arm_b") as names:
        for r in range(args.rounds):
            dsn = fresh(names["arm_a"], args.tables)
            with psycopg.connect(dsn, autocommit=True) as conn:
                tables = catalog.list_tables(conn, TableFilter(include=("public.*",)))
                inside_before.append(timed(lambda conn=conn, tables=tables: triggers.install(conn, tables))[0])
            dsn = fresh(names["arm_b"], args.tables)
            with psycopg.connect(dsn, autocommit=True) as conn:
                tables = catalog.list_tables(conn, TableFilter(include=("public.*",)))
                staged.append(timed(lambda conn=conn, tables=tables:
                                    triggers.install(conn, tables, enabled=False))[0])
                # What rollback.arm does inside the pause: list the tables, install (every table is staged, so
                # this only re-runs capture.sql), enable.
                inside_now.append(timed(lambda conn=conn: arm_inside_pause(conn))[0])
            print(f"round {r + 1}: install in the pause {inside_before[-1]:.2f}s; staged {staged[-1]:.2f}s, "
                  f"then enabled in the pause {inside_now[-1]:.3f}s", flush=True)
    before, now = median(inside_before), median(inside_now)
    print(f"\n{args.tables} tables: the pause paid {before:.2f}s to install the rollback's capture; it now pays "
          f"{now:.3f}s to enable it ({before / now:.0f}x less); staging before the pause takes {median(staged):.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
