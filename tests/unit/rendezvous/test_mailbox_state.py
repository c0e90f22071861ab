"""The mailbox as a state machine: random offers, duplicates, errors, time and give-ups.

Hypothesis drives one `Mailbox` per run through its public calls (start, offer, give_up,
close) on a real asyncio loop whose clock moves only when a rule says so, so the
mailbox's timers fire at their exact instants. A reference model beside it keeps what
should have happened: every first copy, when it came, whether it was late, and the
answer `decide` gives at the first instant it gives one (an arrival, a step boundary
below the SLA, the SLA) or the give-up, whichever came first.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from unittest import mock

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from rendezvous.v1 import delivery_pb2, task_pb2

from services.rendezvous import mailbox as mailbox_module
from services.rendezvous.mailbox import Mailbox
from services.rendezvous.policy import Policy, Reason, Step, Verdict, decide
from tests.unit.rendezvous.policies import POOL, Race, on_the_grid, races

T = TypeVar("T")

# Far from zero, so no clock reading is ever 0 (or mistaken for "no reading").
START_NS = 1_000 * 1_000_000_000
GAVE_UP = Verdict(None, Reason.SLA_DEFAULT, -1, "test: given up")


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock moves only on `advance_to`; timers fire at their instant."""

    def __init__(self) -> None:
        super().__init__()
        self.now_ns = START_NS
        self._pending: list[asyncio.TimerHandle] = []

    def time(self) -> float:
        return self.now_ns / 1e9

    def call_at(  # type: ignore[override]
        self, when: float, callback: Callable[..., object], *args: Any, context: Any = None
    ) -> asyncio.TimerHandle:
        handle: asyncio.TimerHandle

        def fire() -> None:
            self._pending.remove(handle)
            callback(*args)

        handle = super().call_at(when, fire, context=context)
        self._pending.append(handle)
        return handle

    def call(self, action: Callable[[], T]) -> T:
        """Run `action` inside the loop (the mailbox arms its timers on the running loop)."""

        async def inside() -> T:
            return action()

        return self.run_until_complete(inside())

    def advance_to(self, target_ns: int) -> None:
        """Move the clock to `target_ns`, stopping at every timer due on the way."""
        for _ in range(1000):
            due = [
                round(handle.when() * 1e9)
                for handle in self._pending
                if not handle.cancelled() and round(handle.when() * 1e9) <= target_ns
            ]
            if not due:
                break
            self.now_ns = max(self.now_ns, min(due))
            self.call(lambda: None)
        else:
            raise AssertionError(f"timers keep firing before {target_ns}ns")
        self.now_ns = target_ns
        self.call(lambda: None)


class ClockOf:
    """The `time` module as the mailbox sees it: the loop's clock, the rest untouched."""

    def __init__(self, loop: VirtualClockLoop) -> None:
        self._loop = loop

    def monotonic_ns(self) -> int:
        return self._loop.now_ns

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@dataclass
class Offered:
    """The reference model's record of a model's first copy."""

    event: task_pb2.PredictionEvent
    at_ms: float
    ok: bool
    late: bool


class MailboxMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = VirtualClockLoop()
        # The mailbox reads `time.monotonic_ns()`: the same virtual clock as its timers.
        self.clock = mock.patch.object(mailbox_module, "time", ClockOf(self.loop), create=True)
        self.clock.start()
        self.closed = False
        self.steps = 0
        self.sequence = 0
        self.duplicates = 0
        self.offered: dict[str, Offered] = {}
        # What the mailbox must have answered, and when (ms since the request arrived).
        self.expected: tuple[Verdict, float] | None = None
        # The first answer seen on the mailbox's future: it must never change.
        self.seen: Verdict | None = None

    def teardown(self) -> None:
        self.clock.stop()
        self.loop.close()

    @property
    def now_ms(self) -> float:
        return (self.loop.now_ns - START_NS) / 1e6

    # ------------------------------------------------------------------ the reference model

    def decide_now(self, at_ms: float) -> None:
        """What the model expects if the policy is asked at `at_ms`."""
        if self.expected is not None:
            return
        arrived = {m: o.at_ms for m, o in self.offered.items() if o.ok and not o.late}
        verdict = decide(
            self.race.policy,
            arrived,
            at_ms,
            self.race.sla,
            client_deadline=self.race.client_deadline,
        )
        if verdict is not None:
            self.expected = (verdict, at_ms)

    def instants_of_change(self, after_ms: float, upto_ms: float) -> list[float]:
        """Where the policy may change its mind without an arrival: boundaries, the SLA."""
        sla = self.race.sla
        points = {step.until_ms for step in self.race.policy.steps if step.until_ms < sla}
        return sorted(p for p in {*points, sla} if after_ms < p <= upto_ms)

    # ------------------------------------------------------------------------------ rules

    # Short accept lists: more arrivals wait for a later step, or for the SLA's canary.
    @initialize(race=races(max_accepted=2))
    def start(self, race: Race) -> None:
        self.race = race
        self.mailbox = self.loop.call(
            lambda: Mailbox(
                mailbox_id="mb-1",
                request_id="r-1",
                objective="demo",
                policy=race.policy,
                sla_ms=race.sla,
                client_deadline=race.client_deadline,
                started_ns=START_NS,
                answer=asyncio.get_running_loop().create_future(),
                # The broker took the task: a default is the policy's, not a failed dispatch.
                dispatched=True,
            )
        )
        self.answered_at: float | None = None

        def answered(future: asyncio.Future[Verdict]) -> None:
            # A done callback runs in the same turn of the virtual loop: the clock has not moved.
            if not future.cancelled() and self.answered_at is None:
                self.answered_at = self.now_ms

        self.mailbox.answer.add_done_callback(answered)
        self.loop.call(self.mailbox.start)
        self.decide_now(0.0)

    @rule(model=st.sampled_from(POOL))
    def success(self, model: str) -> None:
        self.offer(model, ok=True)

    @rule(model=st.sampled_from(POOL))
    def error(self, model: str) -> None:
        self.offer(model, ok=False)

    def offer(self, model: str, *, ok: bool) -> None:
        """Deliver a prediction (first copy or not) and check the status the mailbox gives."""
        self.steps += 1
        if self.closed:
            return  # a closed mailbox has left the registry: nothing reaches it
        self.sequence += 1
        event = task_pb2.PredictionEvent(request_id="r-1", mailbox_id="mb-1", model=model)
        if ok:
            event.prediction.score = float(self.sequence)  # tells the copies apart
        else:
            event.error.grpc_code = 14
            event.error.reason = f"UNAVAILABLE #{self.sequence}"
        status = self.loop.call(lambda: self.mailbox.offer(event))

        if model in self.offered:
            self.duplicates += 1
            assert status == delivery_pb2.DELIVERY_STATUS_DUPLICATE
            return
        late = self.expected is not None
        self.offered[model] = Offered(event, self.now_ms, ok, late)
        if late:
            assert status == delivery_pb2.DELIVERY_STATUS_LATE
            return
        assert status == delivery_pb2.DELIVERY_STATUS_ACCEPTED
        if ok:
            self.decide_now(self.now_ms)

    @rule(ms=on_the_grid(0.5, 40.0))
    def wait(self, ms: float) -> None:
        self.advance(ms)

    @rule()
    def wait_for_the_policy(self) -> None:
        """Time passes up to the next step boundary or the SLA, where a timer is due."""
        later = self.instants_of_change(self.now_ms, math.inf)
        self.advance(later[0] - self.now_ms if later else 0.5)

    def advance(self, ms: float) -> None:
        """Time passes; once closed, no timer may fire (an unanswered answer stays cancelled)."""
        self.steps += 1
        target = self.now_ms + ms
        if not self.closed:
            for instant in self.instants_of_change(self.now_ms, target):
                self.decide_now(instant)
        self.loop.advance_to(START_NS + round(target * 1e6))

    # Give-up and close wait a few steps, so that most runs race first.
    @precondition(lambda self: not self.closed and self.steps >= 8)
    @rule()
    def give_up(self) -> None:
        self.steps += 1
        self.loop.call(lambda: self.mailbox.give_up(GAVE_UP))
        if self.expected is None:
            self.expected = (GAVE_UP, self.now_ms)

    # Earlier than give_up, so that some mailboxes close unanswered; the steps after it
    # check that nothing moves any more.
    @precondition(lambda self: not self.closed and self.steps >= 5)
    @rule()
    def close(self) -> None:
        self.loop.call(self.mailbox.close)
        self.closed = True

    # ------------------------------------------------------------------------- invariants

    @invariant()
    def the_answer_is_the_models_and_never_changes(self) -> None:
        answer = self.mailbox.answer
        if self.expected is None:
            if self.closed:
                assert answer.cancelled()
            else:
                assert not answer.done()
            assert self.answered_at is None
            return
        verdict, at_ms = self.expected
        assert answer.done() and not answer.cancelled()
        assert answer.result() == verdict
        assert self.answered_at == at_ms
        if self.seen is None:
            self.seen = answer.result()
        assert answer.result() is self.seen

    @invariant()
    def arrivals_are_first_copies_marked_late_after_the_answer(self) -> None:
        arrivals = self.mailbox.arrivals
        assert set(arrivals) == set(self.offered)
        for model, offered in self.offered.items():
            arrival = arrivals[model]
            assert arrival.event == offered.event
            assert (arrival.at_ms, arrival.late) == (offered.at_ms, offered.late)
        assert self.mailbox.duplicates == self.duplicates

    @invariant()
    def an_answer_from_a_model_is_a_success_that_came_in_time(self) -> None:
        if self.expected is None or self.expected[0].model is None:
            return
        verdict, at_ms = self.expected
        assert verdict.model is not None
        offered = self.offered[verdict.model]
        assert offered.ok and not offered.late and offered.at_ms <= at_ms

    @invariant()
    def candidates_report_every_first_copy(self) -> None:
        answered_by = self.expected[0].model if self.expected is not None else None
        statuses = {
            c.prediction.model: (c.status, round(c.arrival.ToNanoseconds() / 1e6, 6))
            for c in self.mailbox.candidates(answered_by)
        }
        expected = {}
        for model, offered in self.offered.items():
            if not offered.ok:
                status = task_pb2.CANDIDATE_STATUS_ERROR
            elif offered.late:
                status = task_pb2.CANDIDATE_STATUS_LATE
            elif model == answered_by:
                status = task_pb2.CANDIDATE_STATUS_ANSWERED
            else:
                status = task_pb2.CANDIDATE_STATUS_IN_TIME
            expected[model] = (status, offered.at_ms)
        assert statuses == expected


def play(race: Race, *moves: Callable[[MailboxMachine], None]) -> MailboxMachine:
    """Run the machine through `moves` by hand, checking every invariant after each."""
    machine = MailboxMachine()
    checks = (
        machine.the_answer_is_the_models_and_never_changes,
        machine.arrivals_are_first_copies_marked_late_after_the_answer,
        machine.an_answer_from_a_model_is_a_success_that_came_in_time,
        machine.candidates_report_every_first_copy,
    )
    try:
        for move in (lambda m: m.start(race), *moves):
            move(machine)
            for check in checks:
                check()
    finally:
        machine.teardown()
    return machine


EXAMPLE = Policy(
    steps=(
        Step(20.0, ("incumbent",), "until 20ms: incumbent only"),
        Step(45.0, ("incumbent", "challenger-a"), "until 45ms: first of both"),
    ),
    sla_ms=50.0,
    canary="canary",
    prefer_canary=True,
)


def test_a_challenger_in_time_answers_at_the_step_boundary() -> None:
    machine = play(
        Race(EXAMPLE, None, False),
        lambda m: m.wait(3.0),
        lambda m: m.success("challenger-a"),
        lambda m: m.wait_for_the_policy(),
        lambda m: m.success("incumbent"),
    )
    assert machine.expected is not None
    verdict, at_ms = machine.expected
    assert (verdict.model, verdict.reason, verdict.rule_index, at_ms) == (
        "challenger-a",
        Reason.ACCEPTED,
        1,
        20.0,
    )
    assert machine.mailbox.arrivals["incumbent"].late


def test_the_canary_answers_at_the_sla_when_preferred() -> None:
    machine = play(
        Race(EXAMPLE, None, False),
        lambda m: m.success("canary"),
        lambda m: m.error("incumbent"),
        lambda m: m.wait(49.5),
        lambda m: m.wait(0.5),
    )
    assert machine.expected is not None
    verdict, at_ms = machine.expected
    assert (verdict.model, verdict.reason, at_ms) == ("canary", Reason.SLA_CANARY, 50.0)


def test_a_closed_mailbox_without_an_answer_is_cancelled_and_stays_so() -> None:
    machine = play(
        Race(EXAMPLE, None, False),
        lambda m: m.wait(10.0),
        lambda m: m.close(),
        lambda m: m.wait(40.0),
        lambda m: m.wait_for_the_policy(),
    )
    assert machine.expected is None and machine.mailbox.answer.cancelled()


MailboxMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)
TestMailboxStateMachine = MailboxMachine.TestCase
