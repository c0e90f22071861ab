"""Mailboxes: one per in-flight request, where its predictions meet its policy.

A mailbox records every prediction delivered for its request (first copy
only: Pulsar delivers at least once), re-evaluates the policy at each arrival
and at each step boundary (a loop timer, not a task per request), resolves
the caller's future exactly once, and keeps collecting late predictions for a
grace window before it is closed and its outcome is published.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from rendezvous.v1 import delivery_pb2, scoring_pb2, task_pb2

from services.core.protos import duration_from_seconds, duration_ms
from services.rendezvous.policy import Policy, Reason, Verdict, decide, next_wakeup

DISPATCH_FAILED_RULE = "dispatch failed: default"


@dataclass(slots=True)
class Arrival:
    """One prediction as it reached the mailbox."""

    event: task_pb2.PredictionEvent
    at_ms: float
    late: bool


@dataclass(slots=True)
class Mailbox:
    """The race for one request."""

    mailbox_id: str
    request_id: str
    objective: str
    policy: Policy
    sla_ms: float
    client_deadline: bool
    started_ns: int
    answer: asyncio.Future[Verdict]
    arrivals: dict[str, Arrival] = field(default_factory=dict)
    arrived_ok: dict[str, float] = field(default_factory=dict)
    duplicates: int = 0
    # A warm-up race: answered like any other, never recorded as traffic.
    warmup: bool = False
    # Set to the path's own latency (arrival less the model's time) at the first arrival.
    first_arrival: asyncio.Future[float] | None = None
    # False until the broker took the task: no prediction can come before that, so a
    # default then is a failed dispatch, not a slow model.
    dispatched: bool = False
    # Wall-clock arrival, for the outcome record (the race itself runs on the monotonic clock).
    received_ns: int = 0
    # The answer the client got, kept for the outcome (None if the client went away first).
    response: scoring_pb2.ScoreResponse | None = None
    # The request's subject, whose key seals the outcome ("" : nobody, the outcome stays
    # readable). Held in memory only, never written.
    subject_id: str = ""
    # Told of each first copy's arrival: (model, ms since receipt, late); the metrics.
    on_arrival: Callable[[str, float, bool], None] | None = None
    _timer: asyncio.TimerHandle | None = None

    def elapsed_ms(self, now_ns: int | None = None) -> float:
        return ((now_ns or time.monotonic_ns()) - self.started_ns) / 1e6

    @property
    def answered(self) -> bool:
        return self.answer.done()

    def start(self) -> None:
        """Arm the first boundary timer; an answer can come only from here or `offer`."""
        self._evaluate()

    def offer(self, event: task_pb2.PredictionEvent) -> delivery_pb2.DeliveryStatus.ValueType:
        if event.model in self.arrivals:
            self.duplicates += 1
            return delivery_pb2.DELIVERY_STATUS_DUPLICATE
        now = self.elapsed_ms()
        late = self.answered
        self.arrivals[event.model] = Arrival(event, now, late)
        if self.on_arrival is not None:
            self.on_arrival(event.model, now, late)
        if self.first_arrival is not None and not self.first_arrival.done():
            self.first_arrival.set_result(now - duration_ms(event.model_latency))
        if late:
            return delivery_pb2.DELIVERY_STATUS_LATE
        if event.WhichOneof("result") == "prediction":
            self.arrived_ok[event.model] = now
            self._evaluate(now)
        return delivery_pb2.DELIVERY_STATUS_ACCEPTED

    def give_up(self, verdict: Verdict) -> None:
        """End the race now with `verdict` (e.g. the request could not be dispatched)."""
        self._resolve(verdict)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.answer.done():
            self.answer.cancel()

    def _evaluate(self, now: float | None = None) -> None:
        if self.answered:
            return
        now = self.elapsed_ms() if now is None else now
        verdict = decide(
            self.policy, self.arrived_ok, now, self.sla_ms, client_deadline=self.client_deadline
        )
        if verdict is not None:
            if verdict.model is None and not self.dispatched:
                verdict = Verdict(None, Reason.DISPATCH_FAILED, -1, DISPATCH_FAILED_RULE)
            self._resolve(verdict)
            return
        self._arm(next_wakeup(self.policy, now, self.sla_ms) - now)

    def _arm(self, delay_ms: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(
            max(delay_ms, 0.0) / 1000, self._evaluate
        )

    def _resolve(self, verdict: Verdict) -> None:
        if self.answer.done():
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.answer.set_result(verdict)

    def candidates(self, answered_by: str | None) -> list[task_pb2.Candidate]:
        out = []
        for model, arrival in self.arrivals.items():
            if arrival.event.WhichOneof("result") == "error":
                status = task_pb2.CANDIDATE_STATUS_ERROR
            elif arrival.late:
                status = task_pb2.CANDIDATE_STATUS_LATE
            elif model == answered_by:
                status = task_pb2.CANDIDATE_STATUS_ANSWERED
            else:
                status = task_pb2.CANDIDATE_STATUS_IN_TIME
            out.append(
                task_pb2.Candidate(
                    prediction=arrival.event,
                    arrival=duration_from_seconds(arrival.at_ms / 1000),
                    status=status,
                )
            )
        return out


class MailboxRegistry:
    """Every open mailbox of this rendezvous instance, by mailbox id."""

    def __init__(self) -> None:
        self._open: dict[str, Mailbox] = {}

    def __len__(self) -> int:
        return len(self._open)

    def add(self, mailbox: Mailbox) -> None:
        self._open[mailbox.mailbox_id] = mailbox

    def remove(self, mailbox_id: str) -> Mailbox | None:
        return self._open.pop(mailbox_id, None)

    def offer(self, event: task_pb2.PredictionEvent) -> delivery_pb2.DeliveryStatus.ValueType:
        mailbox = self._open.get(event.mailbox_id)
        if mailbox is None or mailbox.request_id != event.request_id:
            # Closed, or from before a restart: counted by the caller's delivery metric.
            return delivery_pb2.DELIVERY_STATUS_UNKNOWN_MAILBOX
        return mailbox.offer(event)
