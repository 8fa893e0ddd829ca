"""What `migrator console` costs the legacy database with ten viewers, and how soon a step shows in the browser.

    .venv/bin/python -m bench.console [--viewers 10] [--seconds 60] [--scale 0.002] [--screenshot FILE] [--keep]

1. Cost. The synthetic PACS at `--scale` is prepared, copied and synced; then nothing else touches the legacy
   database (no workload, no sync: what it sees is the console's; VACUUM ANALYZE first, so that autovacuum, whose
   transactions count too, has nothing to do on the new tables). Three windows of `--seconds` each: none (the
   console not running: the server's own background), one viewer, `--viewers` viewers, each viewer an open
   server-sent event stream read to the end. The console runs with the default [console] intervals. Per window the
   legacy database's transactions (pg_stat_database xact_commit + xact_rollback: every statement the console and
   the go/no-go send there runs in autocommit, so one transaction is one statement) and sessions opened, per
   second, read from another database once the console has stopped (a backend reports its counts when it ends);
   and the console's own count of the statements its session sent.
2. Delay. With the console and a headless Chromium (Debian's chromium, Selenium) on the page, `migrator cutover`
   and then `migrator rollback` run as commands (`--override no-switch`); the page notes when it first shows each
   step's start and end (window.migratorSeen) and the control schema has when each was recorded (started_at,
   finished_at, the target's clock; same host). Prints the delay per step and its median and maximum.
   `--screenshot FILE` keeps the page after the rollback (the README's picture is one).
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
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from typing import Any  # noqa: E402

import psycopg  # noqa: E402

from bench._common import ADMIN_DSN, create_db, databases, dsn_for  # noqa: E402
from migrator import config as config_mod  # noqa: E402
from migrator import copy, prepare, state, sync  # noqa: E402
from migrator.console import Console  # noqa: E402
from migrator.console.poller import CountingCursor  # noqa: E402
from migrator.console.security import Operators  # noqa: E402
from migrator.rehearse import pacs  # noqa: E402


def counts(name: str) -> tuple[int, int]:
    """(transactions, sessions) of database `name`, read from the admin database."""
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        row = conn.execute("SELECT xact_commit + xact_rollback, sessions FROM pg_stat_database WHERE datname = %s",
                           (name,)).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def viewer(url: str, stop: threading.Event, events: list[int]) -> None:
    with urllib.request.urlopen(url + "api/events", timeout=60) as stream:
        while not stop.is_set():
            line = stream.readline()
            if not line:
                return
            if line.startswith(b"data: "):
                events.append(1)


def window(cfg: config_mod.Config, source: str, viewers: int, seconds: float) -> dict[str, Any]:
    """The legacy database's transactions and sessions per second while `viewers` watch (0: no console)."""
    before = counts(source)
    sent0 = CountingCursor.sent
    events: list[int] = []
    if viewers == 0:
        time.sleep(seconds)
    else:
        console = Console(cfg, listen="127.0.0.1:0", ops=Operators.of({"bench": "bench-token-0123456789"}))
        console.start()
        stop = threading.Event()
        threads = [threading.Thread(target=viewer, args=(console.url, stop, events), daemon=True)
                   for _ in range(viewers)]
        for t in threads:
            t.start()
        time.sleep(seconds)
        stop.set()
        console.stop()
    time.sleep(1.5)  # backends report their counts as they end
    after = counts(source)
    return {"viewers": viewers, "seconds": seconds, "transactions_per_s": (after[0] - before[0]) / seconds,
            "sessions_per_s": (after[1] - before[1]) / seconds, "console_statements": CountingCursor.sent - sent0,
            "events_received": len(events)}


def browser() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1500"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def delays(cfg: config_mod.Config, target: str, screenshot: str | None) -> dict[str, Any]:
    """Run a cutover and a rollback as commands while the page watches; each step's delay to the screen."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIGRATOR_")}
    exe = str(Path(sys.executable).with_name("migrator"))
    console = Console(cfg, listen="127.0.0.1:0", ops=Operators.of({"bench": "bench-token-0123456789"})).start()
    driver = browser()
    try:
        driver.get(console.url)
        time.sleep(2)
        for flow in ("cutover", "rollback"):
            done = subprocess.run([exe, "--config", str(cfg.path), flow, "--yes", "--override", "no-switch"],
                                  env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr[-2000:]
            time.sleep(2)
        seen = driver.execute_script("return window.migratorSeen")
        if screenshot:
            driver.save_screenshot(screenshot)
    finally:
        driver.quit()
        console.stop()
    with psycopg.connect(dsn_for(target), autocommit=True) as conn:
        attempts = state.attempts(conn)
    rows = []
    for a in attempts:
        for s in a["steps"]:
            for edge, at in (("started", s["started_at"]), ("finished", s["finished_at"])):
                shown = seen.get(f"{a['id']}:{s['step']}:{edge}")
                if at is not None and shown is not None:
                    rows.append((f"{a['kind']} {s['step']} {edge}", shown / 1000 - at.timestamp()))
    values = [d for _, d in rows]
    return {"steps": rows, "median": statistics.median(values), "max": max(values), "n": len(values),
            "missed": sum(1 for a in attempts for s in a["steps"] for e in ("started", "finished")
                          if f"{a['id']}:{s['step']}:{e}" not in seen)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--viewers", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--scale", type=float, default=0.002)
    ap.add_argument("--screenshot", default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    with databases("console_src", "console_tgt", keep=args.keep) as names, tempfile.TemporaryDirectory() as tmp:
        source, target = names["console_src"], names["console_tgt"]
        create_db(source)
        create_db(target)
        path = Path(tmp) / "migration.toml"
        path.write_text(f"[source]\ndsn = {json.dumps(dsn_for(source))}\n[target]\ndsn = {json.dumps(dsn_for(target))}\n"
                        "[copy]\nworkers = 2\n")
        cfg = config_mod.load(path)
        pacs.build(dsn_for(source), scale=args.scale)
        prepare.prepare(cfg)
        copy.run(cfg)
        sync.sync(cfg, samples=True)
        # Autovacuum would analyze the freshly loaded tables within minutes, in the windows below: do it now.
        with psycopg.connect(dsn_for(source), autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE")
        time.sleep(2)
        print(f"legacy database: {source}; console intervals: target {cfg.console.poll_interval}s, legacy "
              f"{cfg.console.source_interval}s, checklist {cfg.console.checklist_interval}s")
        print(f"{'viewers':>8} {'seconds':>8} {'xact/s':>8} {'sessions/s':>11} {'console stmts':>14} {'events':>7}")
        for n in (0, 1, args.viewers):
            w = window(cfg, source, n, args.seconds)
            print(f"{w['viewers']:>8} {w['seconds']:>8.0f} {w['transactions_per_s']:>8.2f} {w['sessions_per_s']:>11.2f} "
                  f"{w['console_statements']:>14} {w['events_received']:>7}", flush=True)
        d = delays(cfg, target, args.screenshot)
        for what, seconds in d["steps"]:
            print(f"  {what:<34} {seconds:6.3f}s")
        print(f"step shown in the browser after it was recorded: median {d['median']:.3f}s, max {d['max']:.3f}s "
              f"over {d['n']} step starts and ends ({d['missed']} not seen)")


if __name__ == "__main__":
    main()
