"""The Pulsar path: an objective's request topic in, its modelling (tasks) topic out.

Replicas share one SHARED subscription per request topic, so they split the load. Each
task is handled in its own asyncio task, at most `max_in_flight` at once, so a slow
publish never holds up the receive loop and a flood never grows memory without bound.
Every task accepted goes on to the tasks topic, also one whose deadline has passed (counted
as expired): nobody waits for its answer and the runners skip it, but the decoy archives
every task accepted, and the archive is the audit and replay record. For the same reason a
publish is not cut at the task's remaining budget (measured in the promotion drill at 100
req/s, before: 19 of 2 500 tasks missing from the archive): the tasks publisher is a held one
(`Bus.publisher`'s `hold`, as many as the tasks in flight), so an enriched task waits in the
client across a broker outage and goes out when the broker is back. The message is
acknowledged only after the enriched task is on the tasks topic, and negatively
acknowledged when the publish fails (Pulsar redelivers it): a held publish fails only for
what the client will not send, so the redelivery does not put the task on the topic twice.
A request that comes again after its task was published (its acknowledgement lost with a
killed broker) is acknowledged without publishing it again: `Once` remembers the mailbox ids
published (`remember` of them; `rdv_enricher_redeliveries_skipped`).
"""

from __future__ import annotations

import contextlib
import logging
import time

from opentelemetry import trace
from rendezvous.v1 import task_pb2

from services.core.bus import (
    Bus,
    BusError,
    Envelope,
    Publisher,
    Subscription,
    SubscriptionMode,
)
from services.core.consumer import BoundedConsumer
from services.core.once import Once
from services.core.protos import seconds_until
from services.core.telemetry import counter, histogram
from services.enricher.enrich import Enricher

log = logging.getLogger(__name__)

TASKS = counter(
    "rdv_enricher_tasks",
    "Scoring tasks the enricher handled, by outcome (enriched, expired, publish_failed)",
    ("objective", "outcome"),
)
REDELIVERIES_SKIPPED = counter(
    "rdv_enricher_redeliveries_skipped",
    "Scoring tasks acknowledged without publishing them again: this process published them",
    ("objective",),
)
TASK_SECONDS = histogram(
    "rdv_enricher_task_seconds",
    "From receipt of a scoring task to its enriched task being on the tasks topic",
    ("objective",),
)


class TaskPipeline:
    """Enriches one objective's scoring tasks and publishes them to its tasks topic."""

    def __init__(
        self,
        bus: Bus,
        objective: str,
        enricher: Enricher,
        *,
        subscription: str,
        max_in_flight: int,
        retry_delay_s: float,
        remember: int,
    ) -> None:
        self.bus = bus
        self.objective = objective
        self.requests_topic = bus.topics.requests(objective)
        self.tasks_topic = bus.topics.tasks(objective)
        self._enricher = enricher
        self._subscription_name = subscription
        self._max_in_flight = max_in_flight
        self._retry_delay_s = retry_delay_s
        self.once = Once(remember, REDELIVERIES_SKIPPED.labels(objective).inc)
        self._subscription: Subscription[task_pb2.ScoringTask] | None = None
        self._publisher: Publisher[task_pb2.EnrichedTask] | None = None
        self._consumer: BoundedConsumer[task_pb2.ScoringTask] | None = None

    async def open(self) -> None:
        """Create the subscription and the publisher (from here on no task is missed)."""
        # "earliest" only matters the first time the subscription is created: tasks sent
        # before any enricher ran are then still enriched (or skipped once expired).
        self._subscription = await self.bus.subscribe(
            self.requests_topic,
            self._subscription_name,
            task_pb2.ScoringTask,
            mode=SubscriptionMode.SHARED,
            start="earliest",
        )
        # Held: an enriched task waits in the client for the broker (one per task in flight).
        self._publisher = await self.bus.publisher(
            self.tasks_topic, task_pb2.EnrichedTask, hold=self._max_in_flight
        )

    @property
    def dead_lettered(self) -> int:
        return self._subscription.dead_lettered if self._subscription is not None else 0

    async def start(self) -> None:
        """Start receiving, each task handled in its own bounded asyncio task."""
        if self._subscription is None:
            await self.open()
        subscription = self._subscription
        assert subscription is not None
        self._consumer = BoundedConsumer(
            subscription,
            # Called on receipt, so the task's latency is measured from there.
            lambda envelope: self._handle(subscription, envelope, time.monotonic()),
            max_in_flight=self._max_in_flight,
            retry_delay_s=self._retry_delay_s,
            name=f"requests:{self.objective}",
            on_receive_error=self._receive_failed,
            max_burst=self._max_in_flight,
        )
        self._consumer.start()

    def _receive_failed(self, _: Exception) -> None:
        log.exception("receiving scoring tasks failed", extra={"topic": self.requests_topic})

    async def _handle(
        self,
        subscription: Subscription[task_pb2.ScoringTask],
        envelope: Envelope[task_pb2.ScoringTask],
        received: float,
    ) -> None:
        task = envelope.message
        try:
            # The mailbox id names one accepted request; a request that comes again has it too.
            published = await self.once.run(
                task.mailbox_id, lambda: self._publish(envelope, received)
            )
            if published:
                await subscription.ack(envelope)
            else:
                await subscription.nack(envelope)
        except Exception:
            # An ack or nack to a broker that went away: Pulsar redelivers what was not acked.
            log.exception("handling a scoring task failed", extra={"topic": self.requests_topic})

    async def _publish(self, envelope: Envelope[task_pb2.ScoringTask], received: float) -> bool:
        """Enrich the task and publish it; whether the broker has it."""
        task = envelope.message
        expired = task.HasField("deadline") and seconds_until(task.deadline) <= 0
        publisher = self._publisher
        assert publisher is not None
        # Inside the message's CONSUMER span (services.core.consumer): the enriched task's
        # PRODUCER span is its child.
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attributes(
                {"rdv.objective": self.objective, "rdv.request_id": task.request.request_id}
            )
        enriched = self._enricher.enrich(task)
        try:
            # No timeout of our own: the held publisher fails only what it will not send.
            await publisher.publish(enriched, key=task.request.request_id or None)
        except BusError as exc:
            TASKS.labels(self.objective, "publish_failed").inc()
            log.warning(
                "publishing an enriched task failed; redelivery requested",
                extra={"topic": self.tasks_topic, "error": type(exc).__name__},
            )
            return False
        TASKS.labels(self.objective, "expired" if expired else "enriched").inc()
        TASK_SECONDS.labels(self.objective).observe(time.monotonic() - received)
        return True

    async def stop(self, grace_s: float) -> None:
        """Stop receiving, let in-flight tasks finish for up to `grace_s`, cancel the rest."""
        if self._consumer is not None:
            await self._consumer.stop(grace_s)
            self._consumer = None

    async def close(self) -> None:
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.close()
