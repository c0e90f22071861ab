"""The collector sidecar.

Consumes its rendezvous instance's prediction topic (the return address) and
streams every prediction over the instance's unix-domain socket: one long-lived
`Deliver` stream, not a connection per message. A Pulsar message is
acknowledged only after the rendezvous answered for it; when the stream breaks
(the rendezvous restarts), the unanswered ones are sent again first on the next
stream, and if the collector itself dies Pulsar redelivers them. Receiving
pauses while `max_unanswered` predictions wait for an answer, so a stalled
rendezvous never makes the collector buffer without bound.

Predictions travel in bursts: what the client already holds is received at once, and
everything waiting to be sent goes in one DeliverRequest (up to `max_burst`), answered by
one DeliverResponse. Under light load a burst is one prediction; under load the stream
costs one write and one read per burst instead of per prediction.

Each prediction's delivery is a CONSUMER span, from its receipt to the rendezvous' answer
for it (`rdv.delivery_status`: accepted, late, duplicate, unknown mailbox); the stream
itself is not traced (it lives as long as the collector).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import Any

import grpc
from rendezvous.v1 import delivery_pb2, delivery_pb2_grpc, task_pb2

from services.collector.settings import CollectorSettings
from services.core.bus import Bus, BusError, Envelope, Subscription, SubscriptionMode
from services.core.consumer import Window
from services.core.lifecycle import Component, cancel_and_wait, run
from services.core.telemetry import counter, histogram
from services.core.tracing import consumer_span

log = logging.getLogger(__name__)

DELIVERED = counter(
    "rdv_collector_delivered", "Predictions answered by the rendezvous", ("status",)
)
BURST_SIZE = histogram(
    "rdv_collector_burst_size",
    "Predictions per DeliverRequest",
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
STREAM_BREAKS = counter("rdv_collector_stream_breaks", "Delivery streams that ended abnormally")
BUS_ERRORS = counter("rdv_collector_bus_errors", "Receives and acks the broker failed", ("op",))

Pending = Envelope[task_pb2.PredictionEvent]


class Collector(Component):
    """Bridges the return-address topic to the rendezvous' delivery socket."""

    # SERVING only while a delivery stream is open.
    serving_once_started = False

    def __init__(self, settings: CollectorSettings, bus: Bus | None = None) -> None:
        super().__init__(settings, name=f"collector-{settings.instance}", bus=bus)
        self.settings: CollectorSettings = settings
        self.delivered: dict[int, int] = {}
        self.connected = asyncio.Event()
        self._subscription: Subscription[task_pb2.PredictionEvent] | None = None
        # Received, not yet sent on a stream; bounded together with the unanswered ones.
        self._outbox: asyncio.Queue[list[Pending]] = asyncio.Queue()
        self._window = Window(settings.max_unanswered)
        self._resend: deque[Pending] = deque()
        self._next_id = 0

    @property
    def topic(self) -> str:
        return self.bus.topics.predictions(self.settings.instance)

    async def open(self, stack: contextlib.AsyncExitStack) -> None:
        # Failover: a standby collector for the same instance takes over if this one dies.
        subscription = await self.bus.subscribe(
            self.topic,
            self.settings.subscription,
            task_pb2.PredictionEvent,
            mode=SubscriptionMode.FAILOVER,
            start="earliest",
        )
        self._subscription = subscription
        stack.push_async_callback(subscription.close)
        loops = [
            self.watch(asyncio.create_task(self._pump(subscription), name="collector:pump")),
            self.watch(asyncio.create_task(self._run(subscription), name="collector:deliver")),
        ]
        stack.push_async_callback(cancel_and_wait, loops)

    def facts(self) -> dict[str, Any]:
        return {"topic": self.topic}

    async def _pump(self, subscription: Subscription[task_pb2.PredictionEvent]) -> None:
        """Receive from Pulsar into the outbox; never cancelled mid-receive except at stop,
        because a receive abandoned halfway would strand a message in the client."""
        while True:
            room = await self._window.wait()
            try:
                burst = await subscription.receive_burst(min(room, self.settings.max_burst))
            except BusError:
                # The broker went away: the client reconnects by itself; keep asking.
                BUS_ERRORS.labels("receive").inc()
                log.warning("receiving predictions failed; retrying", exc_info=True)
                await asyncio.sleep(self.settings.reconnect_initial_s)
                continue
            for envelope in burst:
                # Ended when the rendezvous has answered for it (see _stream_once).
                envelope.span = consumer_span(
                    subscription.topic,
                    subscription.name,
                    len(envelope.raw.data),
                    envelope.trace_context(),
                    _span_attributes(envelope.message),
                )
            self._window.take(len(burst))
            self._outbox.put_nowait(burst)

    async def _run(self, subscription: Subscription[task_pb2.PredictionEvent]) -> None:
        backoff = self.settings.reconnect_initial_s
        while True:
            try:
                await self._stream_once(subscription)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Whatever broke the stream, the next one resends what was unanswered.
                STREAM_BREAKS.inc()
                log.warning("delivery stream broke", extra={"error": type(exc).__name__})
            if self.connected.is_set():
                backoff = self.settings.reconnect_initial_s
            self.connected.clear()
            await self.server.set_serving(False)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.settings.reconnect_max_s)

    async def _next_burst(self) -> list[Pending]:
        """What to send next: unanswered ones from a broken stream first, then everything
        received so far, up to max_burst; waits only when there is nothing at all."""
        limit = self.settings.max_burst
        burst: list[Pending] = []
        while self._resend and len(burst) < limit:
            burst.append(self._resend.popleft())
        if not burst:
            burst = await self._outbox.get()
        while len(burst) < limit and not self._outbox.empty():
            burst.extend(self._outbox.get_nowait())
        return burst

    async def _stream_once(self, subscription: Subscription[task_pb2.PredictionEvent]) -> None:
        async with grpc.aio.insecure_channel(f"unix://{self.settings.delivery_socket}") as channel:
            await asyncio.wait_for(channel.channel_ready(), self.settings.reconnect_max_s)
            call = delivery_pb2_grpc.DeliveryServiceStub(channel).Deliver()
            unanswered: dict[int, Pending] = {}
            self.connected.set()
            await self.server.set_serving(True)
            log.info("delivery stream open", extra={"socket": str(self.settings.delivery_socket)})

            async def send() -> None:
                while True:
                    burst = await self._next_burst()
                    first = self._next_id + 1
                    BURST_SIZE.observe(len(burst))
                    for envelope in burst:
                        self._next_id += 1
                        unanswered[self._next_id] = envelope
                    await call.write(
                        delivery_pb2.DeliverRequest(
                            delivery_id=first, predictions=[e.message for e in burst]
                        )
                    )

            async def receive() -> None:
                while True:
                    response: Any = await call.read()
                    if response is grpc.aio.EOF:
                        raise ConnectionError("the rendezvous closed the delivery stream")
                    for offset, status in enumerate(response.statuses):
                        envelope = unanswered.pop(response.delivery_id + offset, None)
                        if envelope is None:
                            continue
                        self._window.give(1)
                        try:
                            await subscription.ack(envelope)
                        except BusError:
                            # Delivered but not acknowledged: Pulsar redelivers it later and
                            # the rendezvous counts it as a duplicate or a closed mailbox.
                            BUS_ERRORS.labels("ack").inc()
                            log.warning("acknowledging a prediction failed", exc_info=True)
                        self.delivered[status] = self.delivered.get(status, 0) + 1
                        name = delivery_pb2.DeliveryStatus.Name(status)
                        DELIVERED.labels(name).inc()
                        span = envelope.span
                        if span is not None:
                            # What the rendezvous did with it: accepted, late, duplicate...
                            span.set_attribute("rdv.delivery_status", name)
                            span.end()

            sender = asyncio.create_task(send())
            reader = asyncio.create_task(receive())
            try:
                done, _ = await asyncio.wait({sender, reader}, return_when=asyncio.FIRST_EXCEPTION)
                for finished in done:
                    finished.result()
            finally:
                for task in (sender, reader):
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
                call.cancel()
                # Sent but never answered: first in line on the next stream, in order.
                self._resend.extendleft(reversed([unanswered[k] for k in sorted(unanswered)]))


def _span_attributes(event: task_pb2.PredictionEvent) -> dict[str, str | int]:
    return {"rdv.request_id": event.request_id, "rdv.model": event.model}


def main() -> None:
    settings = CollectorSettings()  # type: ignore[call-arg]  # instance comes from the env
    with contextlib.suppress(KeyboardInterrupt):
        run("collector", settings, lambda: Collector(settings))
