"""The runner host: one process, one subscription, every hosted model and the decoy.

A host serves the deployments of one objective that scale together (the same replica
count). It receives each task once, from one SHARED subscription on the objective's tasks
topic (replicas of the host split the load), and hands every burst to each hosted
`ModelRunner` and, when the decoy is hosted here, to the `Archiver`. The task is
acknowledged once every runner is done with it (published, or skipped) and its archive
record is on the archive topic; if any of them failed it is negatively acknowledged and
redelivered (what was already published then arrives again and is counted as a duplicate).
On a small machine that is one receive, one ack and one broker dispatch per task instead
of one per model and one more for the decoy.

The host serves gRPC health (+ reflection), SERVING once subscribed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from rendezvous.v1 import task_pb2

from services.core.bus import Bus, Envelope, Subscription, SubscriptionMode
from services.core.consumer import BoundedConsumer
from services.core.lifecycle import Component
from services.core.telemetry import counter
from services.decoy.archive import Archiver
from services.runner.runner import ModelRunner
from services.runner.settings import RunnerSettings

log = logging.getLogger(__name__)

RECEIVE_ERRORS = counter("rdv_runner_receive_errors", "Failed receives from the bus", ("host",))
REDELIVERIES = counter(
    "rdv_runner_redeliveries_requested",
    "Tasks negatively acknowledged because a runner or the archive failed",
    ("objective",),
)


class RunnerHost(Component):
    """A Component: the hosted runners, the hosted archive, one subscription."""

    def __init__(self, settings: RunnerSettings, bus: Bus | None = None) -> None:
        super().__init__(settings, name=f"runner-host-{settings.instance}", bus=bus)
        self.settings: RunnerSettings = settings
        self.objective = settings.host_objective()
        self.runners: list[ModelRunner] = []
        self.archiver: Archiver | None = None
        self._subscription: Subscription[task_pb2.EnrichedTask] | None = None
        self._consumer: BoundedConsumer[task_pb2.EnrichedTask] | None = None
        self._redeliveries = REDELIVERIES.labels(self.objective)

    @property
    def consumer(self) -> BoundedConsumer[task_pb2.EnrichedTask] | None:
        return self._consumer

    async def open(self, stack: contextlib.AsyncExitStack) -> None:
        settings = self.settings
        bus = self.bus
        self.runners = [ModelRunner(hosted, bus) for hosted in settings.hosted()]
        for runner in self.runners:
            stack.push_async_callback(runner.close)
        if settings.archive:
            publisher = await bus.publisher(
                bus.topics.archive(self.objective), task_pb2.ArchiveRecord
            )
            self.archiver = Archiver(
                publisher,
                self.objective,
                default_denied=settings.default_archiving == "denied",
                publish_timeout_s=settings.pulsar.send_timeout_s,
            )
        subscription = await bus.subscribe(
            bus.topics.tasks(self.objective),
            settings.subscription,
            task_pb2.EnrichedTask,
            mode=SubscriptionMode.SHARED,
            # The archive keeps every task ever accepted, also those published before any
            # host ran; models only care about live tasks (expired ones are skipped anyway).
            start="earliest" if settings.archive else settings.start_position,
        )
        self._subscription = subscription
        stack.push_async_callback(subscription.close)
        # One burst is handed to every runner at once; each runner batches and bounds its
        # own calls, so bursts themselves are bounded only by the messages in flight.
        consumer = BoundedConsumer(
            subscription,
            burst_handler=self._handle_burst,
            max_in_flight=settings.concurrency,
            retry_delay_s=settings.receive_retry_s,
            name=f"runners:{self.objective}",
            on_receive_error=self._receive_failed,
            max_burst=settings.max_batch,
            max_bursts_in_flight=settings.concurrency,
        )
        self._consumer = consumer
        consumer.start()
        stack.push_async_callback(consumer.stop, settings.shutdown_grace_s)

    def facts(self) -> dict[str, Any]:
        return {
            "objective": self.objective,
            "subscription": self.settings.subscription,
            "models": [runner.model for runner in self.runners],
            "archive": self.archiver is not None,
        }

    def _receive_failed(self, _: Exception) -> None:
        if self.stopping:
            return
        RECEIVE_ERRORS.labels(self.name).inc()
        log.exception("receive failed", extra={"objective": self.objective})

    async def _handle_burst(self, envelopes: list[Envelope[task_pb2.EnrichedTask]]) -> None:
        subscription = self._subscription
        assert subscription is not None  # the consumer exists only once subscribed
        received_ns = time.time_ns()
        jobs = [runner.handle(envelopes, received_ns) for runner in self.runners]
        if self.archiver is not None:
            jobs.append(self.archiver.archive(envelopes))
        results = await asyncio.gather(*jobs, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                # A bug must not strand tasks unacknowledged: they are redelivered (and after
                # max_redeliveries the broker dead-letters them).
                log.error("handling tasks failed", exc_info=result)
        for index, envelope in enumerate(envelopes):
            done = all(not isinstance(r, BaseException) and r[index] for r in results)
            try:
                if done:
                    await subscription.ack(envelope)
                else:
                    self._redeliveries.inc()
                    await subscription.nack(envelope)
            except Exception:
                # The broker redelivers what it did not see acknowledged: a duplicate, not a loss.
                log.warning("ack/nack failed", exc_info=True, extra={"objective": self.objective})
