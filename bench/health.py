"""The cutover's health gate, timed: from RESUME to its verdict, and from an unhealthy verdict to clients committing
again on the legacy database.

    .venv/bin/python -m bench.health [--rounds 3] [--health-seconds 5]

Each round migrates a small PACS-like schema into fresh databases on the local server and runs two cutovers through
a private PgBouncer 1.18 (transaction pooling):

- healthy: 10 clients that prepare no statement (the site declares `prepared_statements = "unused"`); the gate
  passes and the cutover stands;
- unhealthy: one server connection, 2 clients that prepare their statement once per connection as Orthanc does
  (reconnecting when their connection is lost), and 2 that prepare none; the gate's canary finds its statement gone,
  the cutover rolls back (the pooler drops the clients' connections before RESUME) and exits 4.

Printed per round: RESUME -> verdict (the gate's `decided_after`), and for the unhealthy cutover: verdict -> the
cutover's exit (the rollback done), verdict -> the first commit on the legacy database of a preparing client, and
the stateless clients' transactions refused on the way (the pooler drops every connection before RESUME). One clock:
this process's.
Needs pgbouncer (Debian: apt-get install pgbouncer).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from bench._common import config, create_db, databases
from migrator import cutover, state
from migrator.db import session
from migrator.errors import ClientsUnhealthy
from tests.test_cutover import migrated
from tests.test_health import PreparedClients
from tests.test_pgbouncer import Clients, running_bouncer


def _setup(names: dict[str, str], health_seconds: float, **cutover_settings: Any) -> tuple[Any, Any, Any]:
    src, tgt = create_db(names["src"]), create_db(names["tgt"])
    return src, tgt, lambda b, **extra: config(names["src"], names["tgt"], copy={"workers": 2}, cutover={
        **b.settings(), "health_seconds": health_seconds, **cutover_settings, **extra})


def healthy_round(health_seconds: float) -> float:
    with databases("src", "tgt") as names:
        src, tgt, make = _setup(names, health_seconds)
        with running_bouncer(src, tgt) as b:
            cfg = make(b)
            migrated(cfg, src)
            with Clients(b.client_dsn, 10):
                report = cutover.run(cfg)
            assert report.health is not None and report.health["verdict"] == "pass", report.health
            return float(report.health["decided_after"])


def unhealthy_round(health_seconds: float) -> tuple[float, float, float, float]:
    with databases("src", "tgt") as names:
        src, tgt, make = _setup(names, health_seconds, prepared_statements="unknown")
        with running_bouncer(src, tgt, entry_extra="pool_size=1") as b:
            cfg = make(b)
            migrated(cfg, src)
            started: list[float] = []

            def on_step(step: str, status: str) -> None:
                if (step, status) == ("health", "running"):
                    started.append(time.monotonic())

            with PreparedClients(b.client_dsn) as prepared, Clients(b.client_dsn, 2) as stateless:
                try:
                    cutover.run(cfg, on_step=on_step)
                    raise SystemExit("the cutover did not roll back")
                except ClientsUnhealthy as exc:
                    assert exc.rolled_back, str(exc)
                ended = time.monotonic()
                while prepared.committed_after(ended) == 0:
                    if time.monotonic() - ended > 60:
                        raise SystemExit("the preparing clients did not commit again within 60 s")
                    time.sleep(0.01)
            with session(cfg.target_dsn, role="target", autocommit=True) as t:
                health = state.attempts(t)[0]["health"]
            verdict_at = started[0] + float(health["decided_after"])
            first_prepared = min(at for at, _ in prepared.committed if at > verdict_at) - verdict_at
            return float(health["decided_after"]), first_prepared, ended - verdict_at, float(len(stateless.failed))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--health-seconds", type=float, default=5.0)
    args = ap.parse_args()
    passed, failed = [], []
    for i in range(args.rounds):
        passed.append(healthy_round(args.health_seconds))
        failed.append(unhealthy_round(args.health_seconds))
        d, p, e, s = failed[-1]
        print(f"round {i + 1}: healthy RESUME->verdict {passed[-1]:.3f}s | unhealthy RESUME->verdict {d:.3f}s, "
              f"verdict->exit {e:.3f}s, verdict->first commit on legacy of a preparing client {p:.3f}s; "
              f"stateless clients' transactions refused (their connections dropped at RESUME) {s:.0f}", flush=True)
    print(f"median over {args.rounds} rounds (health_seconds {args.health_seconds:g}): RESUME->verdict healthy "
          f"{statistics.median(passed):.3f}s, unhealthy {statistics.median(f[0] for f in failed):.3f}s; "
          f"unhealthy verdict->preparing clients commit again {statistics.median(f[1] for f in failed):.3f}s; "
          f"verdict->cutover exit (rollback done) {statistics.median(f[2] for f in failed):.3f}s")


if __name__ == "__main__":
    main()
