"""The Pulsar adapter: the bus contract over `pulsar.asyncio` (pulsar-client 3.13).

`PulsarBus` is the only bus services run on (`connect`). Every call into the client is
translated (most of them inside `_bus_errors()`), so what escapes this module is a
`BusError` (the client's exception chained as its cause), never one of the client's own.
Closing a subscription, a reader or the bus is best effort and raises nothing.

The client has defects this module works around; each workaround says which, where it is:
- a cancelled receive still takes the next message (`_keep_pending`);
- the asyncio API has no receive that returns at once (`_receive_ready_raw`);
- its acknowledge makes a future and a cross-thread callback per message, and its
  negative_acknowledge a thread-pool hop, for calls that never block (`_ack_raw`);
- an open consumer that is garbage-collected aborts the process (`PulsarBus._open`);
- the client's threads are still inside Python when its close completes (`close_grace_s`);
- pulsar.asyncio raises an exception class of its own (`_client_errors`).

`pulsar` is imported where it is used, not at the top: code that only needs the contract
(and every unit test on the in-memory twin) never loads the C++ client.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from services.core.bus import dead_letter
from services.core.bus.contract import (
    Bus,
    DeadLetterPublisher,
    M,
    Publisher,
    RawMessage,
    Reader,
    Start,
    Subscription,
    SubscriptionMode,
)
from services.core.bus.errors import BusError, PublishTimeout
from services.core.settings import PulsarSettings
from services.core.topics import Topics


def _client_errors() -> tuple[type[Exception], ...]:
    # pulsar.asyncio raises its own PulsarException, unrelated to _pulsar's (which the
    # synchronous calls underneath, e.g. negative_acknowledge, still raise).
    import pulsar
    import pulsar.asyncio

    return (pulsar.PulsarException, pulsar.asyncio.PulsarException)


def _pulsar_error(exc: Exception) -> BusError:
    return BusError(f"pulsar: {exc}")


@contextlib.contextmanager
def _bus_errors() -> Iterator[None]:
    """Turn whatever the client raises inside into a BusError."""
    try:
        yield
    except _client_errors() as exc:
        raise _pulsar_error(exc) from exc


class _PulsarPublisher(Publisher[Any]):
    def __init__(self, producer: Any, topic: str) -> None:
        self._producer = producer
        self.topic = topic

    async def _send(self, data: bytes, properties: dict[str, str], key: str | None) -> None:
        import pulsar

        try:
            await self._producer.send(data, properties=properties, partition_key=key)
        except _client_errors() as exc:
            # Only pulsar.asyncio's exception has error(); _pulsar's carries no result code.
            if getattr(exc, "error", lambda: None)() == pulsar.Result.Timeout:
                raise PublishTimeout(f"publish to {self.topic} timed out in the client") from exc
            raise _pulsar_error(exc) from exc

    async def close(self) -> None:
        with _bus_errors():
            await self._producer.close()


def _settle(future: asyncio.Future[Any], result: Any, message: Any) -> None:
    """Complete a receive started with the C++ consumer's receive_async (on the loop)."""
    import _pulsar
    import pulsar.asyncio

    if future.done():
        return
    if result == _pulsar.Result.Ok:
        future.set_result(message)
    else:
        future.set_exception(pulsar.asyncio.PulsarException(result))


def _raw_from_pulsar(message: Any) -> RawMessage:
    return RawMessage(
        data=message.data(),
        properties=message.properties(),
        key=message.partition_key() or None,
        topic=message.topic_name(),
        redelivery_count=message.redelivery_count(),
        publish_time_ms=message.publish_timestamp(),
        handle=message,
    )


def _message_id(message: Any) -> bytes:
    return bytes(message.message_id().serialize())


async def _keep_pending(owner: Any, start: Callable[[], Any]) -> Any:
    """Await the client's pending receive; a cancelled caller leaves it for the next call.

    pulsar.asyncio hands the next message to the future of the first receive, even when
    that future was cancelled (the message is then lost until the consumer closes).
    """
    if owner._pending is None:
        owner._pending = asyncio.ensure_future(start())
    pending = owner._pending
    try:
        result = await asyncio.shield(pending)
    except asyncio.CancelledError:
        if pending.done():
            owner._pending = None
        raise
    except _client_errors() as exc:
        owner._pending = None
        raise _pulsar_error(exc) from exc
    owner._pending = None
    return result


class _PulsarSubscription(Subscription[M]):
    def __init__(
        self,
        consumer: Any,
        topic: str,
        message_type: type[M],
        dead_letter_publisher: DeadLetterPublisher,
        *,
        nack_counter: dead_letter.NackCounter | None,
    ) -> None:
        super().__init__(topic, message_type, dead_letter_publisher)
        self._consumer = consumer
        self._pending: asyncio.Future[Any] | None = None
        # Set where Pulsar reports no redelivery count (see dead_letter.NackCounter).
        self._nack_counter = nack_counter

    def _counted(self, raw: RawMessage) -> RawMessage:
        if self._nack_counter is not None:
            raw.redelivery_count = self._nack_counter.redelivery_count(_message_id(raw.handle))
        return raw

    def _start_receive(self) -> asyncio.Future[Any]:
        """A receive in the C++ consumer that pulsar.asyncio wraps (its private `_consumer`),
        completed on this loop; the handle of what it returns is the C++ message.

        pulsar.asyncio's receive() is a coroutine around the same call. Called directly, a
        message the client already holds completes the future within one turn of the loop
        (the client calls back at once, on this thread), which `_receive_ready_raw` needs."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def received(result: Any, message: Any) -> None:
            # On a client thread (or this one): only hand over to the loop.
            loop.call_soon_threadsafe(_settle, future, result, message)

        with _bus_errors():
            self._consumer._consumer.receive_async(received)
        return future

    async def _receive_raw(self) -> RawMessage:
        return self._counted(_raw_from_pulsar(await _keep_pending(self, self._start_receive)))

    async def _receive_ready_raw(self) -> RawMessage | None:
        # pulsar.asyncio (3.13) has no receive that returns at once. Its C++ consumer's
        # receive(0) does, but raises a Timeout exception whenever the queue is empty, which
        # is every burst under light load (measured: 39 us of CPU each). Instead, start the
        # next receive now and give it one turn of the loop: a message the client already
        # holds has arrived by then; otherwise the receive stays pending for the next call.
        if self._pending is None:
            self._pending = self._start_receive()
            await asyncio.sleep(0)
        pending = self._pending
        if not pending.done():
            return None
        self._pending = None
        if pending.exception() is not None:
            return None  # the next receive() meets the same failure and reports it
        return self._counted(_raw_from_pulsar(pending.result()))

    async def _ack_raw(self, raw: RawMessage) -> None:
        if self._nack_counter is not None:
            self._nack_counter.acked(_message_id(raw.handle))
        # The C++ consumer's own acknowledge only queues the ack in its grouping tracker (the
        # client sends acks in groups) and never blocks; pulsar.asyncio's makes a future and
        # a cross-thread callback per message (measured: 16 us of CPU against 1.4 us).
        with _bus_errors():
            self._consumer._consumer.acknowledge(raw.handle)

    async def _nack_raw(self, raw: RawMessage) -> None:
        if self._nack_counter is not None:
            reason = self._nack_counter.nacked(_message_id(raw.handle))
            if reason is not None:
                await self._send_to_dead_letter(raw, reason)
                return
        # Non-blocking in C++; pulsar.asyncio sends it through a thread-pool hop.
        with _bus_errors():
            self._consumer._consumer.negative_acknowledge(raw.handle)

    async def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
        # Best effort: the consumer may already be closed, or the broker gone.
        with contextlib.suppress(Exception):
            await self._consumer.close()


class _PulsarReader(Reader[M]):
    def __init__(self, reader: Any, topic: str, message_type: type[M]) -> None:
        super().__init__(topic, message_type)
        self._reader = reader
        self._pending: asyncio.Future[Any] | None = None

    async def has_message_available(self) -> bool:
        with _bus_errors():
            return bool(await self._reader.has_message_available())

    async def _read_raw(self) -> RawMessage:
        return _raw_from_pulsar(await _keep_pending(self, self._reader.read_next))

    async def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
        # Best effort, as for a subscription.
        with contextlib.suppress(Exception):
            await self._reader.close()


def _security_options(settings: PulsarSettings) -> dict[str, Any]:
    """The client's authentication and TLS options from `settings` (none when unset)."""
    import pulsar

    options: dict[str, Any] = {}
    token = settings.auth_token()
    if token is not None:
        options["authentication"] = pulsar.AuthenticationToken(token)
    if settings.service_url.startswith("pulsar+ssl:"):
        options["use_tls"] = True
        options["tls_allow_insecure_connection"] = settings.tls_allow_insecure
        options["tls_validate_hostname"] = settings.tls_validate_hostname
        if settings.tls_trust_certs_file is not None:
            options["tls_trust_certs_file_path"] = str(settings.tls_trust_certs_file)
    return options


class PulsarBus(Bus):
    """The adapter over a real Apache Pulsar broker."""

    def __init__(self, settings: PulsarSettings, client_name: str = "rendezvous") -> None:
        super().__init__(settings)
        import pulsar.asyncio

        self._client_name = client_name
        # Every consumer and reader stays referenced until close(): the C++ client aborts
        # the process (std::bad_weak_ptr) when one is garbage-collected while it is open.
        self._open: list[_PulsarSubscription[Any] | _PulsarReader[Any]] = []
        # The C++ client refuses a malformed service URL with a bare ValueError.
        refused: tuple[type[Exception], ...] = (*_client_errors(), ValueError)
        try:
            self._client = pulsar.asyncio.Client(
                settings.service_url,
                # The client takes whole seconds.
                operation_timeout_seconds=max(1, int(settings.operation_timeout_s)),
                io_threads=settings.io_threads,
                message_listener_threads=settings.listener_threads,
                # Filtered in C++: a Python logger would take the GIL for every INFO line the
                # client emits, and a broker restart emits bursts of them (measured: answers
                # 20-40 ms past the SLA while they crossed into the interpreter).
                logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Warn),
                **_security_options(settings),
            )
        except refused as exc:
            raise _pulsar_error(exc) from exc
        except OSError as exc:
            raise BusError(f"pulsar: cannot read the token file: {exc}") from exc

    async def _create_publisher(
        self,
        topic: str,
        batching: bool,
        max_delay_ms: int,
        *,
        exclusive: bool = False,
        hold: int = 0,
    ) -> Publisher[Any]:
        import pulsar

        # WaitForExclusive: a second exclusive producer is not refused but parked by the broker
        # until the first one goes away, so a standby takes over the topic by itself.
        access_mode = (
            pulsar.ProducerAccessMode.WaitForExclusive
            if exclusive
            else pulsar.ProducerAccessMode.Shared
        )
        # A held publisher (see Bus.publisher) is the client's own pending queue: with no send
        # timeout (0) the producer keeps every message the broker has not confirmed and resends
        # them all, in order, each time it reconnects (the client's backoff), so nothing
        # else needs to queue them. `max_pending_messages` bounds it; a full queue refuses the
        # next send at once (block_if_queue_full would block the event loop's thread).
        with _bus_errors():
            producer = await self._client.create_producer(
                topic,
                send_timeout_millis=0 if hold else int(self.settings.send_timeout_s * 1000),
                max_pending_messages=hold or self.settings.max_pending_messages,
                batching_enabled=batching,
                batching_max_publish_delay_ms=max_delay_ms,
                block_if_queue_full=False,
                access_mode=access_mode,
            )
        return _PulsarPublisher(producer, topic)

    async def subscribe(
        self,
        topic: str,
        subscription: str,
        message_type: type[M],
        *,
        mode: SubscriptionMode = SubscriptionMode.SHARED,
        start: Start = "earliest",
    ) -> Subscription[M]:
        import pulsar

        consumer_type = {
            SubscriptionMode.SHARED: pulsar.ConsumerType.Shared,
            SubscriptionMode.EXCLUSIVE: pulsar.ConsumerType.Exclusive,
            SubscriptionMode.FAILOVER: pulsar.ConsumerType.Failover,
            SubscriptionMode.KEY_SHARED: pulsar.ConsumerType.KeyShared,
        }[mode]
        dead_letter_policy = None
        nack_counter = None
        if mode in (SubscriptionMode.SHARED, SubscriptionMode.KEY_SHARED):
            # Pulsar's own policy covers handlers that keep failing (nack loops);
            # the initial subscription keeps dead letters until someone reads them.
            dead_letter_policy = pulsar.ConsumerDeadLetterPolicy(
                max_redeliver_count=self.settings.max_redeliveries,
                dead_letter_topic=Topics.dead_letter(topic),
                initial_subscription_name=dead_letter.subscription_name(subscription),
            )
        else:
            nack_counter = dead_letter.NackCounter(self.settings.max_redeliveries)
        with _bus_errors():
            consumer = await self._client.subscribe(
                topic,
                subscription,
                consumer_type=consumer_type,
                receiver_queue_size=self.settings.receiver_queue_size,
                negative_ack_redelivery_delay_ms=self.settings.negative_ack_redelivery_delay_ms,
                initial_position=(
                    pulsar.InitialPosition.Earliest
                    if start == "earliest"
                    else pulsar.InitialPosition.Latest
                ),
                dead_letter_policy=dead_letter_policy,
                consumer_name=f"{self._client_name}-{subscription}",
            )
        opened = _PulsarSubscription(
            consumer,
            topic,
            message_type,
            self._dead_letter_publisher(topic, subscription),
            nack_counter=nack_counter,
        )
        opened.name = subscription
        self._open.append(opened)
        return opened

    def _dead_letter_publisher(self, topic: str, subscription: str) -> DeadLetterPublisher:
        """Opens the publisher of `topic`'s dead-letter topic for `subscription`; the first
        call also makes the dead letters durable."""
        durable = False

        async def open_publisher() -> Publisher[Any]:
            nonlocal durable
            if not durable:
                await self._keep_dead_letters(topic, subscription)
                durable = True
            return await self.dead_letter_publisher(topic)

        return open_publisher

    async def _keep_dead_letters(self, topic: str, subscription: str) -> None:
        """Create the durable subscription that keeps the dead letters of `subscription`.

        Retention is 0 by default: without a subscription nothing keeps dead letters (the
        native policy creates the same one, but only when it dead-letters a message itself).
        """
        import pulsar

        with _bus_errors():
            holder = await self._client.subscribe(
                Topics.dead_letter(topic),
                dead_letter.subscription_name(subscription),
                consumer_type=pulsar.ConsumerType.Shared,
                initial_position=pulsar.InitialPosition.Earliest,
            )
            await holder.close()

    async def reader(
        self,
        topic: str,
        message_type: type[M],
        *,
        start: Start = "earliest",
        compacted: bool = False,
    ) -> Reader[M]:
        import pulsar

        with _bus_errors():
            reader = await self._client.create_reader(
                topic,
                pulsar.MessageId.earliest if start == "earliest" else pulsar.MessageId.latest,
                receiver_queue_size=self.settings.receiver_queue_size,
                is_read_compacted=compacted,
            )
        opened = _PulsarReader(reader, topic, message_type)
        self._open.append(opened)
        return opened

    async def close(self) -> None:
        for opened in self._open:
            await opened.close()
        self._open.clear()
        await super().close()
        with contextlib.suppress(Exception):
            await self._client.close()
        # The close callback resolves while the client's C++ threads are still inside Python;
        # an interpreter that finalizes under them aborts or segfaults (pulsar-client 3.13:
        # 7 of 60 exits under load without this pause, 0 of 60 with it).
        await asyncio.sleep(self.settings.close_grace_s)


def connect(settings: PulsarSettings, client_name: str) -> Bus:
    """The bus services run on: always the real broker."""
    return PulsarBus(settings, client_name)
