"""Shared fixtures: a real PostgreSQL server, and throwaway source and target databases on it.

The server comes from MIGRATOR_TEST_DSN (an admin DSN, default: the local server as postgres). When that server
cannot be reached and Docker is available, a PostgreSQL container is started with testcontainers instead. Each test
gets databases of its own, dropped afterwards.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from migrator.config import Config, from_dict

DEFAULT_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
TEST_CUTOVER = {"health_seconds": 1.0}
"""What the tests' configurations set in [cutover] unless a test says otherwise: a short health gate (its default,
5 s, would add that to every cutover of the suite; tests/test_health.py watches longer where it matters)."""


def _reachable(dsn: str) -> bool:
    try:
        psycopg.connect(dsn, connect_timeout=3).close()
        return True
    except psycopg.Error:
        return False


@pytest.fixture(scope="session")
def admin_dsn() -> Iterator[str]:
    dsn = os.environ.get("MIGRATOR_TEST_DSN", DEFAULT_ADMIN_DSN)
    if _reachable(dsn) or "MIGRATOR_TEST_DSN" in os.environ or not shutil.which("docker"):
        yield dsn
        return
    from testcontainers.postgres import PostgresContainer  # optional: only for users with Docker

    with PostgresContainer("postgres:15", driver=None) as pg:
        yield pg.get_connection_url()


@pytest.fixture
def make_db(admin_dsn: str) -> Iterator[Callable[[str], str]]:
    """Create a database named after the test; returns its DSN. Dropped (with FORCE) after the test."""
    created: list[str] = []

    def make(label: str) -> str:
        name = f"mt_{label}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        return psycopg.conninfo.make_conninfo(admin_dsn, dbname=name)

    yield make
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        for name in created:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def source_dsn(make_db: Callable[[str], str]) -> str:
    return make_db("src")


@pytest.fixture
def target_dsn(make_db: Callable[[str], str]) -> str:
    return make_db("tgt")


@pytest.fixture
def make_config(source_dsn: str, target_dsn: str) -> Callable[..., Config]:
    def make(**sections: Any) -> Config:
        data: dict[str, Any] = {"source": {"dsn": source_dsn}, "target": {"dsn": target_dsn}}
        data.update(sections)
        data["cutover"] = {**TEST_CUTOVER, **data.get("cutover", {})}
        return from_dict(data, env={})

    return make


@pytest.fixture
def cfg(make_config: Callable[..., Config]) -> Config:
    return make_config(copy={"workers": 2})
