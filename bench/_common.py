"""Shared pieces of the benchmarks: throwaway databases on the local server, timing, printing ratios."""

from __future__ import annotations

import os
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql

from migrator.config import Config, from_dict

ADMIN_DSN = os.environ.get("MIGRATOR_BENCH_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


def dsn_for(name: str) -> str:
    return psycopg.conninfo.make_conninfo(ADMIN_DSN, dbname=name)


def create_db(name: str, template: str | None = None) -> str:
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        if template:
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template)))
        else:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return dsn_for(name)


def drop_db(name: str) -> None:
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@contextmanager
def databases(*labels: str, keep: bool = False) -> Iterator[dict[str, str]]:
    """Fresh databases named bench_<label>_<tag>; yields label -> name; dropped afterwards unless kept."""
    tag = uuid.uuid4().hex[:6]
    names = {label: f"bench_{label}_{tag}" for label in labels}
    try:
        yield names
    finally:
        if not keep:
            for name in names.values():
                drop_db(name)


def config(source: str, target: str, **sections: Any) -> Config:
    data: dict[str, Any] = {"source": {"dsn": dsn_for(source)}, "target": {"dsn": dsn_for(target)}}
    data.update(sections)
    return from_dict(data, env={})


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
