"""The step runner shared by cutover and rollback, without a database: what a failure at each step undoes, and in
which order; nothing once the point of no return is passed; an interrupt undoes like a failure."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
from structlog.testing import capture_logs

from migrator.errors import CutoverFailed, NoGo
from migrator.switchover import Step, StepRunner

NAMES = ("catch_up", "pause", "freeze", "drain", "switch", "resume")
UNDOABLE = {"pause", "freeze", "switch"}


class FakeRecorder:
    """Records what the runner would write to the control schema."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, ...]] = []

    def started(self, step: str) -> None:
        self.rows.append(("started", step))

    def finished(self, step: str, detail: str) -> None:
        self.rows.append(("finished", step, detail))

    def stopped(self, step: str, error: str) -> None:
        self.rows.append(("stopped", step, error))


class Flow:
    """Six steps, three with an undo; `fail_at` raises `error` inside that step; every call is journaled."""

    def __init__(self, fail_at: str | None = None, error: BaseException | None = None,
                 partial: frozenset[str] = frozenset(), point: str = "resume") -> None:
        self.fail_at = fail_at
        self.error = error or RuntimeError("boom")
        self.partial = partial
        self.point = point
        self.journal: list[str] = []

    def steps(self) -> list[Step]:
        return [Step(n, self._run(n), undo=self._undo(n) if n in UNDOABLE else None, undo_partial=n in self.partial,
                     point_of_no_return=n == self.point) for n in NAMES]

    def _run(self, name: str) -> Callable[[], str]:
        def run() -> str:
            self.journal.append(f"run {name}")
            if name == self.fail_at:
                raise self.error
            return f"{name} ok"
        return run

    def _undo(self, name: str) -> Callable[[], str]:
        def undo() -> str:
            self.journal.append(f"undo {name}")
            return f"{name} undone"
        return undo


def _expected_undos(fail_at: str) -> list[str]:
    before = NAMES[:NAMES.index(fail_at)]
    return [f"undo {n}" for n in reversed(before) if n in UNDOABLE]


@pytest.mark.parametrize("fail_at", NAMES[:NAMES.index("resume")])
def test_a_failure_undoes_exactly_the_steps_done_before_it_in_reverse(fail_at: str) -> None:
    flow, recorder = Flow(fail_at), FakeRecorder()
    runner = StepRunner("cutover", recorder)
    with pytest.raises(CutoverFailed) as caught:
        runner.run(flow.steps(), hint="try again")
    k = NAMES.index(fail_at)
    assert flow.journal == [f"run {n}" for n in NAMES[:k + 1]] + _expected_undos(fail_at)
    assert [t.step for t in runner.timings] == list(NAMES[:k])
    assert recorder.rows[-2:] == [("started", fail_at), ("stopped", fail_at, "boom")]
    assert recorder.rows.count(("stopped", fail_at, "boom")) == 1
    said = "; ".join(f"{n} undone" for n in reversed(NAMES[:k]) if n in UNDOABLE)
    assert str(caught.value) == f"cutover stopped at step {fail_at}: boom" + (f"; {said}" if said else "")
    assert caught.value.hint == "try again"


def test_a_step_that_may_have_half_happened_is_undone_first() -> None:
    flow = Flow("switch", partial=frozenset({"switch"}))
    with pytest.raises(CutoverFailed):
        StepRunner("cutover", FakeRecorder()).run(flow.steps(), hint="")
    assert flow.journal[-3:] == ["undo switch", "undo freeze", "undo pause"]


def test_a_failure_while_recording_a_step_done_still_undoes_it() -> None:
    class FailsOnFreezeDone(FakeRecorder):
        def finished(self, step: str, detail: str) -> None:
            if step == "freeze":
                raise RuntimeError("control schema unreachable")
            super().finished(step, detail)

    flow = Flow()
    with pytest.raises(CutoverFailed, match="stopped at step freeze: control schema unreachable"):
        StepRunner("cutover", FailsOnFreezeDone()).run(flow.steps(), hint="")
    assert flow.journal[-2:] == ["undo freeze", "undo pause"]


def test_a_failure_after_the_point_of_no_return_undoes_nothing_goes_forward_and_says_so() -> None:
    flow, recorder = Flow("resume", point="switch"), FakeRecorder()
    forwarded: list[str] = []
    steps = [dataclasses.replace(s, forward=lambda n=s.name: forwarded.append(n) or f"{n} forward")
             for s in flow.steps()]
    runner = StepRunner("cutover", recorder)
    with capture_logs() as logs, pytest.raises(CutoverFailed, match="after its point of no return") as caught:
        runner.run(steps, hint="", after_move_hint="the cutover stands")
    assert not [j for j in flow.journal if j.startswith("undo")]
    assert forwarded == ["resume"], "only the step not done goes forward"
    assert "resume forward" in str(caught.value) and caught.value.hint == "the cutover stands"
    assert recorder.rows[-1] == ("stopped", "resume", "boom")
    assert runner.moved
    said = [e for e in logs if e["event"] == "cutover.after_move_failed"]
    assert said and said[0]["step"] == "resume" and said[0]["log_level"] == "error"


def test_the_point_of_no_return_failing_itself_is_still_undone() -> None:
    flow = Flow("switch", point="switch")
    with pytest.raises(CutoverFailed):
        StepRunner("rollback", FakeRecorder()).run(flow.steps(), hint="")
    assert flow.journal[-2:] == ["undo freeze", "undo pause"]


@pytest.mark.parametrize("fail_at", ["pause", "drain", "switch"])
def test_an_interrupt_during_a_step_undoes_like_a_failure_and_stays_an_interrupt(fail_at: str) -> None:
    flow, recorder = Flow(fail_at, error=KeyboardInterrupt()), FakeRecorder()
    with pytest.raises(KeyboardInterrupt):
        StepRunner("rollback", recorder).run(flow.steps(), hint="")
    assert flow.journal[NAMES.index(fail_at) + 1:] == _expected_undos(fail_at)
    assert recorder.rows[-1] == ("stopped", fail_at, "KeyboardInterrupt")


def test_a_passthrough_error_is_undone_and_raised_as_it_came() -> None:
    flow = Flow("drain", error=NoGo("go/no-go refused: lag"))
    with pytest.raises(NoGo, match="refused: lag"):
        StepRunner("cutover", FakeRecorder()).run(flow.steps(), hint="", passthrough=(KeyboardInterrupt, NoGo))
    assert flow.journal[-2:] == ["undo freeze", "undo pause"]


def test_a_run_without_failure_records_every_step_and_undoes_nothing() -> None:
    flow, recorder = Flow(), FakeRecorder()
    steps: list[tuple[str, str]] = []
    runner = StepRunner("cutover", recorder, on_step=lambda n, s: steps.append((n, s)))
    runner.run(flow.steps(), hint="")
    assert flow.journal == [f"run {n}" for n in NAMES]
    assert recorder.rows == [r for n in NAMES for r in (("started", n), ("finished", n, f"{n} ok"))]
    assert steps == [p for n in NAMES for p in ((n, "running"), (n, "done"))]
    assert [(t.step, t.detail) for t in runner.timings] == [(n, f"{n} ok") for n in NAMES]
