"""The collector sidecar.

Consumes its rendezvous instance's prediction topic (the return address) and
streams every prediction over the instance's unix-domain socket: one long-lived
`Deliver` stream, not a connection per message. A Pulsar message is
acknowledged only after the rendezvous answered for it; when the stream breaks
(the rendezvous restarts), the unanswered ones are sent again first on the next
stream, and if the collector itself dies Pulsar redelivers them. Receiving
pauses while `max_unanswered` predictions wait for an answer, so a stalled
rendezvous never makes the collector buffer without bound.
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
from services.core.bus import Bus, Envelope, Subscription, SubscriptionMode, connect
from services.core.server import GrpcServer, run, write_ready_file
from services.core.telemetry import counter

log = logging.getLogger(__name__)

DELIVERED = counter(
    "rdv_collector_delivered", "Predictions answered by the rendezvous", ("status",)
)
STREAM_BREAKS = counter("rdv_collector_stream_breaks", "Delivery streams that ended abnormally")

Pending = Envelope[task_pb2.PredictionEvent]


class Collector:
    """Bridges the return-address topic to the rendezvous' delivery socket."""

    def __init__(self, settings: CollectorSettings, bus: Bus | None = None) -> None:
        self.settings = settings
        self.bus = bus or connect(settings.pulsar, f"collector-{settings.instance}")
        self.topic = self.bus.topics.predictions(settings.instance)
        self.server = GrpcServer(
            service_names=[],
            registrars=[],
            tcp_address=settings.listen,
            max_message_bytes=settings.max_message_bytes,
        )
        self.delivered: dict[int, int] = {}
        self.connected = asyncio.Event()
        self._subscription: Subscription[task_pb2.PredictionEvent] | None = None
        # Received, not yet sent on a stream; bounded together with the unanswered ones.
        self._outbox: asyncio.Queue[Pending] = asyncio.Queue()
        self._window = asyncio.Semaphore(settings.max_unanswered)
        self._resend: deque[Pending] = deque()
        self._next_id = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    async def start(self) -> None:
        # Failover: a standby collector for the same instance takes over if this one dies.
        self._subscription = await self.bus.subscribe(
            self.topic,
            self.settings.subscription,
            task_pb2.PredictionEvent,
            mode=SubscriptionMode.FAILOVER,
            start="earliest",
        )
        await self.server.start()
        self._tasks = [asyncio.create_task(self._pump()), asyncio.create_task(self._run())]
        write_ready_file(self.settings.ready_file, endpoint=self.server.endpoint, topic=self.topic)

    async def stop(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.server.stop(self.settings.shutdown_grace_s)
        if self._subscription is not None:
            await self._subscription.close()
        await self.bus.close()

    async def _pump(self) -> None:
        """Receive from Pulsar into the outbox; never cancelled mid-receive except at stop,
        because a receive abandoned halfway would strand a message in the client."""
        assert self._subscription is not None
        while True:
            await self._window.acquire()
            self._outbox.put_nowait(await self._subscription.receive())

    async def _run(self) -> None:
        backoff = self.settings.reconnect_initial_s
        while not self._stopping:
            try:
                await self._stream_once()
            except (grpc.aio.AioRpcError, ConnectionError, OSError, TimeoutError) as exc:
                STREAM_BREAKS.inc()
                log.warning("delivery stream broke", extra={"error": type(exc).__name__})
            if self.connected.is_set():
                backoff = self.settings.reconnect_initial_s
            self.connected.clear()
            await self.server.set_serving(False)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.settings.reconnect_max_s)

    async def _next(self) -> Pending:
        return self._resend.popleft() if self._resend else await self._outbox.get()

    async def _stream_once(self) -> None:
        assert self._subscription is not None
        subscription = self._subscription
        async with grpc.aio.insecure_channel(f"unix://{self.settings.delivery_socket}") as channel:
            await asyncio.wait_for(channel.channel_ready(), self.settings.reconnect_max_s)
            call = delivery_pb2_grpc.DeliveryServiceStub(channel).Deliver()
            unanswered: dict[int, Pending] = {}
            self.connected.set()
            await self.server.set_serving(True)
            log.info("delivery stream open", extra={"socket": str(self.settings.delivery_socket)})

            async def send() -> None:
                while True:
                    envelope = await self._next()
                    self._next_id += 1
                    unanswered[self._next_id] = envelope
                    await call.write(
                        delivery_pb2.DeliverRequest(
                            delivery_id=self._next_id, prediction=envelope.message
                        )
                    )

            async def receive() -> None:
                while True:
                    response: Any = await call.read()
                    if response is grpc.aio.EOF:
                        raise ConnectionError("the rendezvous closed the delivery stream")
                    envelope = unanswered.pop(response.delivery_id, None)
                    if envelope is None:
                        continue
                    await subscription.ack(envelope)
                    self._window.release()
                    self.delivered[response.status] = self.delivered.get(response.status, 0) + 1
                    DELIVERED.labels(delivery_pb2.DeliveryStatus.Name(response.status)).inc()

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


def main() -> None:
    settings = CollectorSettings()  # type: ignore[call-arg]  # instance comes from the env
    with contextlib.suppress(KeyboardInterrupt):
        run("collector", settings, lambda: Collector(settings))
