"""The operator-action lock against a real server: while one cutover runs (here held at its go/no-go point), a second
cutover or a rollback is refused before it records an attempt or touches anything, naming the session that holds the
lock; the lock is let go when the first one ends."""

from __future__ import annotations

import threading
from collections.abc import Callable

import psycopg
import pytest

from migrator import cutover, rollback
from migrator.config import Config
from migrator.errors import Blocked
from migrator.state.lock import action_lock
from tests.helpers import fetch
from tests.test_cutover import migrated


def _in_thread(fn: Callable[[], object]) -> object:
    """What `fn` returned or raised, or "still running" after 20 s."""
    got: list[object] = []

    def call() -> None:
        try:
            got.append(fn())
        except BaseException as exc:  # noqa: B036 (handed to the caller)
            got.append(exc)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(20)
    return got[0] if got else "still running"


def test_a_second_cutover_or_a_rollback_is_refused_while_a_cutover_runs(
        make_config: Callable[..., Config], source_dsn: str, target_dsn: str) -> None:
    cfg = make_config(copy={"workers": 2}, cutover={"switch_command": "true"})
    migrated(cfg, source_dsn)
    cutover.hold(cfg)
    held = threading.Event()
    outcome: list[object] = []

    def first() -> None:
        try:
            outcome.append(cutover.run(cfg, on_step=lambda step, what: held.set() if what.startswith("held") else None))
        except BaseException as exc:  # noqa: B036 (reported to the test below)
            held.set()
            outcome.append(exc)

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert held.wait(60) and not outcome, outcome

        with pytest.raises(Blocked, match="another cutover or rollback is running") as back:
            rollback.run(cfg)
        second = _in_thread(lambda: cutover.run(cfg))  # without the lock it would wait at the hold

        assert isinstance(second, Blocked) and "another cutover or rollback is running" in str(second), second
        holders = fetch(target_dsn, "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 2")
        assert f"session {holders[0][0]} (migrator-target" in str(second) and second.exit_code == 1
        assert str(back.value).startswith("rollback refused:")
        assert fetch(target_dsn, "SELECT count(*) FROM migrator_control.cutover_attempt") == [(1,)]
    finally:
        cutover.release_hold(cfg)
        thread.join(60)
    assert [type(o).__name__ for o in outcome] == ["CutoverReport"]
    # The lock went with the first cutover: the next action takes it.
    with psycopg.connect(target_dsn, autocommit=True) as conn, action_lock(cfg, conn, "cutover"):
        pass
