"""Small helpers for tests: run statements and fetch rows on a test database."""

from __future__ import annotations

from typing import Any

import psycopg


def run_sql(dsn: str, *statements: str) -> None:
    """Run statements in autocommit on a database (test setup and workload helpers)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for s in statements:
            conn.execute(s)  # type: ignore[arg-type]


def fetch(dsn: str, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(query, params).fetchall()  # type: ignore[arg-type]
