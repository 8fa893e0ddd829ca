"""Helpers for the console's tests: a migrated pair of databases with a configuration file, a console serving it
from a thread, and HTTP calls as the page makes them."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

from migrator import config as config_mod
from migrator import copy, prepare, state, sync
from migrator.config import Config
from migrator.console import Console
from migrator.console.security import Operators
from tests.helpers import run_sql
from tests.test_cutover import SCHEMA

TOKENS = {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789ab"}


def configured(tmp_path: Path, source_dsn: str, target_dsn: str, extra: str = "") -> Config:
    """A configuration file in tmp_path (the local directory is tmp_path/.migrator) and the Config it gives."""
    path = tmp_path / "migration.toml"
    path.write_text(f"[source]\ndsn = {json.dumps(source_dsn)}\n[target]\ndsn = {json.dumps(target_dsn)}\n"
                    f"[copy]\nworkers = 1\n[console]\npoll_interval = 0.2\nsource_interval = 1.0\n"
                    f"checklist_interval = 5.0\n{extra}")
    return config_mod.load(path)


def migrated(cfg: Config, source_dsn: str, *schema: str) -> None:
    run_sql(source_dsn, *(schema or SCHEMA))
    prepare.prepare(cfg)
    copy.run(cfg)
    sync.sync(cfg, samples=True)


@contextmanager
def serving(cfg: Config, tokens: dict[str, str] | None = None) -> Iterator[Console]:
    with Console(cfg, listen="127.0.0.1:0", ops=Operators.of(tokens or TOKENS)) as console:
        yield console


def call(console: Console, path: str, body: Any = None, *, token: str | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """GET (no body) or POST (JSON body) as the page does; the status and the decoded JSON (or text)."""
    data = None if body is None else json.dumps(body).encode()
    h = {"Content-Type": "application/json"} if body is not None else {}
    if token is not None:
        h["X-Migrator-Token"] = token
    h.update(headers or {})
    req = urllib.request.Request(console.url + path.lstrip("/"), data=data, headers=h,
                                 method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            code, raw, kind = r.status, r.read().decode(), r.headers.get("content-type", "")
    except urllib.error.HTTPError as exc:
        code, raw, kind = exc.code, exc.read().decode(), exc.headers.get("content-type", "")
    return code, json.loads(raw) if kind.startswith("application/json") else raw


def act(console: Console, name: str, *, who: str = "alice", confirm: str | None = None,
        overrides: list[str] | None = None) -> tuple[int, Any]:
    from migrator.console.actions import confirmation

    return call(console, f"/api/actions/{name}", {"confirm": confirmation(console.cfg, name) if confirm is None
                                                  else confirm, "overrides": overrides or []},
                token=TOKENS[who])


def until(what: Callable[[], Any], timeout: float = 60.0, every: float = 0.1) -> Any:
    """Poll until `what()` is truthy (its value), or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        found = what()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(every)


def trail(target_dsn: str) -> list[Any]:
    from migrator import audit

    with psycopg.connect(target_dsn, autocommit=True) as conn:
        return audit.actions(state.audit_rows(conn))


def attempts(target_dsn: str) -> list[dict[str, Any]]:
    with psycopg.connect(target_dsn, autocommit=True) as conn:
        return state.attempts(conn)
