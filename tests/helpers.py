"""Small helpers for tests: run statements and fetch rows on a test database; clients that write continuously."""

from __future__ import annotations

import threading
import time
from typing import Any, Self

import psycopg


def run_sql(dsn: str, *statements: str) -> None:
    """Run statements in autocommit on a database (test setup and workload helpers)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for s in statements:
            conn.execute(s)  # type: ignore[arg-type]


def fetch(dsn: str, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(query, params).fetchall()  # type: ignore[arg-type]


class ClientThreads:
    """What the tests' client pools share: `n` threads each run `client(index)` until `stop` is set; entering waits
    (up to 30 s) until the clients together committed 3 transactions each, leaving lets every thread end."""

    n: int
    committed: list[Any]
    stop: threading.Event
    threads: list[threading.Thread]

    def client(self, index: int) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        for i in range(self.n):
            t = threading.Thread(target=self.client, args=(i,), daemon=True)
            t.start()
            self.threads.append(t)
        deadline = time.monotonic() + 30
        while len(self.committed) < 3 * self.n and time.monotonic() < deadline:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)


class Writers:
    """`n` clients writing continuously, each on a connection of its own: one insert per transaction, with an id no
    other transaction uses. An id is recorded, with the moment its COMMIT returned, only once COMMIT returned without
    error; on an error the client rolls back (reconnecting when its connection is gone) and goes on with a new id.

    `insert` takes the id as its one parameter. The clients are threads of the calling process, so they outlive a
    kill of another process group."""

    def __init__(self, dsn: str, n: int, insert: str, *, interval: float = 0.05, tag: str = "w") -> None:
        self.dsn, self.n, self.insert, self.interval, self.tag = dsn, n, insert, interval, tag
        self.commits: list[list[tuple[str, float]]] = [[] for _ in range(n)]
        """Per client: (id, time.monotonic() when its COMMIT returned)."""
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]

    def _run(self, index: int) -> None:
        conn: psycopg.Connection[Any] | None = None
        k = 0
        while not self.stop.is_set():
            k += 1
            uid = f"{self.tag}{index}-{k}"
            try:
                if conn is None or conn.closed:
                    # prepare_threshold=None: no server-side prepared statements, as transaction pooling requires.
                    conn = psycopg.connect(self.dsn, prepare_threshold=None, connect_timeout=5)
                conn.execute(self.insert, (uid,))  # type: ignore[arg-type]
                conn.commit()
                self.commits[index].append((uid, time.monotonic()))
            except psycopg.Error as exc:
                self.errors.append(f"{exc.sqlstate}: {str(exc).strip()[:200]}")
                try:
                    if conn is not None:
                        conn.rollback()
                except psycopg.Error:
                    conn.close()
                    conn = None
            self.stop.wait(self.interval)
        if conn is not None:
            conn.close()

    def __enter__(self) -> Writers:
        for t in self.threads:
            t.start()
        deadline = time.monotonic() + 30
        while min(len(c) for c in self.commits) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        deadline = time.monotonic() + 10  # a client still held by a paused pooler is left behind (a daemon thread)
        for t in self.threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))

    def ids(self) -> set[str]:
        return {uid for c in self.commits for uid, _ in c}

    def count(self) -> int:
        return sum(len(c) for c in self.commits)

    def resumed_after(self, moment: float, bound: float) -> list[float | None]:
        """Wait (up to `bound` seconds after `moment`) until every client has completed a transaction whose COMMIT
        returned after `moment`; per client, the seconds from `moment` to the first such COMMIT (None: none within
        the bound)."""
        def firsts() -> list[float | None]:
            return [next((t - moment for _, t in c if t > moment), None) for c in self.commits]

        while time.monotonic() < moment + bound:
            seen = firsts()
            if all(s is not None for s in seen):
                return seen
            time.sleep(0.02)
        return [s if s is not None and s <= bound else None for s in firsts()]
