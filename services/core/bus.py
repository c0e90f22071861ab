"""The Pulsar adapter: typed asyncio publishers, subscriptions and readers.

Every message on a topic is one serialized protobuf. Each carries properties:
`rdv-type` (the message's full proto name, checked on receipt) and the W3C trace
context of the span that published it, so a trace continues across the broker.

Two implementations share one contract (tests/contract):
- `PulsarBus`, over `pulsar.asyncio`, the only one services run on;
- `MemoryBus`, an in-process twin for fast unit tests of service logic.

A message that cannot be decoded will never succeed, so a subscription sends it
straight to its dead-letter topic (`<topic>-DLQ`) with the reason, counts it,
acknowledges it and carries on. A message whose handler keeps failing is
negatively acknowledged; after `max_redeliveries` it goes to the same topic.
Publishes are bounded: a caller on the request path passes its remaining budget.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Generic, Literal, TypeVar

from google.protobuf.message import DecodeError, Message
from opentelemetry import context as otel_context

from services.core.settings import PulsarSettings
from services.core.telemetry import counter, extract, inject
from services.core.topics import Topics

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

TYPE_PROPERTY = "rdv-type"
DEAD_LETTER_REASON = "rdv-dead-letter-reason"
ORIGINAL_TOPIC = "rdv-original-topic"

DEAD_LETTERS = counter(
    "rdv_dead_letters", "Messages sent to a dead-letter topic", ("topic", "reason")
)
PUBLISH_FAILURES = counter("rdv_publish_failures", "Publishes that failed or timed out", ("topic",))

Start = Literal["earliest", "latest"]


class SubscriptionMode(Enum):
    """How consumers of one subscription share its messages."""

    SHARED = "shared"  # replicas split the load (model runners, enrichers)
    EXCLUSIVE = "exclusive"  # one consumer owns the subscription
    FAILOVER = "failover"  # one active consumer, standbys take over (collector)
    KEY_SHARED = "key_shared"  # per-key ordering across replicas


class BusError(Exception):
    """The broker refused or failed an operation."""


class PublishTimeout(BusError):
    """A publish did not complete within its budget."""


@dataclass(slots=True)
class RawMessage:
    """A message as the broker delivered it, before decoding."""

    data: bytes
    properties: dict[str, str]
    key: str | None
    topic: str
    redelivery_count: int
    publish_time_ms: int
    handle: Any = None


@dataclass(slots=True)
class Envelope(Generic[M]):
    """A decoded message and what came with it."""

    message: M
    properties: Mapping[str, str]
    key: str | None
    topic: str
    redelivery_count: int
    publish_time_ms: int
    raw: RawMessage = field(repr=False)

    @classmethod
    def of(cls, message: M, raw: RawMessage) -> Envelope[M]:
        return cls(
            message=message,
            properties=raw.properties,
            key=raw.key,
            topic=raw.topic,
            redelivery_count=raw.redelivery_count,
            publish_time_ms=raw.publish_time_ms,
            raw=raw,
        )

    def trace_context(self) -> otel_context.Context:
        return extract(self.properties)


def decode(message_type: type[M], raw: RawMessage) -> M | str:
    """The decoded message, or the reason it cannot be decoded."""
    expected = message_type.DESCRIPTOR.full_name
    declared = raw.properties.get(TYPE_PROPERTY)
    if declared is not None and declared != expected:
        return f"type {declared!r} where {expected!r} was expected"
    try:
        return message_type.FromString(raw.data)
    except DecodeError:
        return f"bytes do not parse as {expected}"


def message_properties(message: Message, extra: Mapping[str, str] | None) -> dict[str, str]:
    properties = inject(dict(extra) if extra else None)
    properties[TYPE_PROPERTY] = message.DESCRIPTOR.full_name
    return properties


class Publisher(abc.ABC, Generic[M]):
    """Publishes one message type to one topic."""

    topic: str

    async def publish(
        self,
        message: M,
        *,
        key: str | None = None,
        properties: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> None:
        """Publish and wait for the broker's receipt, at most `timeout` seconds."""
        data = message.SerializeToString()
        await self.publish_bytes(data, message_properties(message, properties), key, timeout)

    async def publish_bytes(
        self,
        data: bytes,
        properties: dict[str, str],
        key: str | None = None,
        timeout: float | None = None,
    ) -> None:
        try:
            if timeout is None:
                await self._send(data, properties, key)
            else:
                await asyncio.wait_for(self._send(data, properties, key), timeout)
        except TimeoutError as exc:
            PUBLISH_FAILURES.labels(self.topic).inc()
            raise PublishTimeout(f"publish to {self.topic} exceeded {timeout}s") from exc
        except BusError:
            PUBLISH_FAILURES.labels(self.topic).inc()
            raise

    @abc.abstractmethod
    async def _send(self, data: bytes, properties: dict[str, str], key: str | None) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...


class Subscription(abc.ABC, Generic[M]):
    """Receives one message type; undecodable messages go to the dead-letter topic."""

    def __init__(
        self,
        topic: str,
        message_type: type[M],
        dead_letter: Callable[[], Any],
    ) -> None:
        self.topic = topic
        self.message_type = message_type
        self._dead_letter_publisher = dead_letter
        self.dead_lettered = 0

    async def receive(self) -> Envelope[M]:
        while True:
            envelope = await self._accept(await self._receive_raw())
            if envelope is not None:
                return envelope

    async def receive_burst(self, max_messages: int) -> list[Envelope[M]]:
        """One message (waiting for it), then up to `max_messages - 1` more that are already
        here, without waiting. Under light load that is one message, as `receive()`; when
        messages queue up, a consumer takes them together and pays its per-step costs
        (a model call, a stream write, a broker entry) once per burst."""
        burst = [await self.receive()]
        while len(burst) < max_messages:
            raw = self._receive_ready_raw()
            if raw is None:
                break
            envelope = await self._accept(raw)
            if envelope is not None:
                burst.append(envelope)
        return burst

    async def _accept(self, raw: RawMessage) -> Envelope[M] | None:
        """The decoded message, or None when it went to the dead-letter topic."""
        decoded = decode(self.message_type, raw)
        if isinstance(decoded, str):
            await self._send_to_dead_letter(raw, decoded)
            return None
        return Envelope.of(decoded, raw)

    def _receive_ready_raw(self) -> RawMessage | None:
        """A message the client already holds, or None; never waits."""
        return None

    async def _send_to_dead_letter(self, raw: RawMessage, reason: str) -> None:
        publisher: Publisher[Any] = await self._dead_letter_publisher()
        properties = dict(raw.properties)
        properties[DEAD_LETTER_REASON] = reason
        properties[ORIGINAL_TOPIC] = raw.topic
        await publisher.publish_bytes(raw.data, properties, raw.key)
        await self._ack_raw(raw)
        self.dead_lettered += 1
        DEAD_LETTERS.labels(self.topic, "undecodable").inc()
        log.warning(
            "message sent to dead-letter topic",
            extra={"topic": raw.topic, "dead_letter_topic": publisher.topic, "reason": reason},
        )

    async def ack(self, envelope: Envelope[M]) -> None:
        await self._ack_raw(envelope.raw)

    async def nack(self, envelope: Envelope[M]) -> None:
        """Ask for redelivery later; after too many, the message is dead-lettered."""
        await self._nack_raw(envelope.raw)

    @abc.abstractmethod
    async def _receive_raw(self) -> RawMessage: ...

    @abc.abstractmethod
    async def _ack_raw(self, raw: RawMessage) -> None: ...

    @abc.abstractmethod
    async def _nack_raw(self, raw: RawMessage) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...


class Reader(abc.ABC, Generic[M]):
    """Reads a topic from a position, without a subscription (e.g. the control topic)."""

    def __init__(self, topic: str, message_type: type[M]) -> None:
        self.topic = topic
        self.message_type = message_type
        self.skipped = 0

    async def read_next(self) -> Envelope[M]:
        while True:
            raw = await self._read_raw()
            decoded = decode(self.message_type, raw)
            if isinstance(decoded, str):
                # A reader owns no subscription to dead-letter from: skip and count.
                self.skipped += 1
                DEAD_LETTERS.labels(self.topic, "undecodable-read").inc()
                continue
            return Envelope.of(decoded, raw)

    @abc.abstractmethod
    async def has_message_available(self) -> bool: ...

    @abc.abstractmethod
    async def _read_raw(self) -> RawMessage: ...

    @abc.abstractmethod
    async def close(self) -> None: ...


class Bus(abc.ABC):
    """Where services get publishers, subscriptions and readers."""

    def __init__(self, settings: PulsarSettings) -> None:
        self.settings = settings
        self.topics = Topics(settings.tenant_namespace)
        self._publishers: dict[tuple[str, bool], Publisher[Any]] = {}
        self._publisher_lock = asyncio.Lock()

    async def publisher(
        self, topic: str, message_type: type[M], *, batching: bool | None = None
    ) -> Publisher[M]:
        """A publisher for `topic`, shared by every caller in this process.

        With `batching` (default: `settings.batching`, true) and `batching_max_delay_ms` 0,
        the client's I/O thread sends the batch as soon as it gets to it: a lone message
        leaves at once (measured: the same round trip as unbatched), while a burst published
        in one turn of the event loop costs the broker one entry instead of one per message.
        Without it every message is its own entry.
        """
        if batching is None:
            batching = self.settings.batching
        cache_key = (topic, batching)
        existing = self._publishers.get(cache_key)
        if existing is not None:
            return existing
        async with self._publisher_lock:
            existing = self._publishers.get(cache_key)
            if existing is None:
                existing = await self._create_publisher(topic, batching)
                self._publishers[cache_key] = existing
        return existing

    async def dead_letter_publisher(self, topic: str) -> Publisher[Any]:
        return await self.publisher(Topics.dead_letter(topic), Message)

    @abc.abstractmethod
    async def _create_publisher(self, topic: str, batching: bool) -> Publisher[Any]: ...

    @abc.abstractmethod
    async def subscribe(
        self,
        topic: str,
        subscription: str,
        message_type: type[M],
        *,
        mode: SubscriptionMode = SubscriptionMode.SHARED,
        start: Start = "earliest",
    ) -> Subscription[M]: ...

    @abc.abstractmethod
    async def reader(
        self, topic: str, message_type: type[M], *, start: Start = "earliest"
    ) -> Reader[M]: ...

    async def close(self) -> None:
        for publisher in list(self._publishers.values()):
            with contextlib.suppress(Exception):
                await publisher.close()
        self._publishers.clear()


# --------------------------------------------------------------------------- Pulsar


def _client_errors() -> tuple[type[Exception], ...]:
    # pulsar.asyncio raises its own PulsarException, unrelated to _pulsar's.
    import pulsar
    import pulsar.asyncio

    return (pulsar.PulsarException, pulsar.asyncio.PulsarException)


def _pulsar_error(exc: Exception) -> BusError:
    return BusError(f"pulsar: {exc}")


class _PulsarPublisher(Publisher[Any]):
    def __init__(self, producer: Any, topic: str) -> None:
        self._producer = producer
        self.topic = topic

    async def _send(self, data: bytes, properties: dict[str, str], key: str | None) -> None:
        import pulsar

        try:
            await self._producer.send(data, properties=properties, partition_key=key)
        except _client_errors() as exc:
            if getattr(exc, "error", lambda: None)() == pulsar.Result.Timeout:
                raise PublishTimeout(f"publish to {self.topic} timed out in the client") from exc
            raise _pulsar_error(exc) from exc

    async def close(self) -> None:
        await self._producer.close()


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
        dead_letter: Callable[[], Any],
        *,
        count_redeliveries: bool,
        max_redeliveries: int,
    ) -> None:
        super().__init__(topic, message_type, dead_letter)
        self._consumer = consumer
        self._pending: asyncio.Future[Any] | None = None
        # Pulsar counts redeliveries only on Shared/Key_Shared subscriptions; elsewhere
        # this consumer counts its own nacks so that the redelivery limit still holds.
        self._count_redeliveries = count_redeliveries
        self._max_redeliveries = max_redeliveries
        self._nacks: dict[bytes, int] = {}

    async def _receive_raw(self) -> RawMessage:
        raw = _raw_from_pulsar(await _keep_pending(self, self._consumer.receive))
        if self._count_redeliveries:
            raw.redelivery_count = self._nacks.get(raw.handle.message_id().serialize(), 0)
        return raw

    def _receive_ready_raw(self) -> RawMessage | None:
        if self._pending is not None:
            # A receive is outstanding in the client: the next message is promised to it.
            return None
        try:
            # The client's own queue, timeout 0: returns at once, raises when it is empty.
            message = self._consumer._consumer.receive(0)
        except _client_errors():
            return None
        raw = _raw_from_pulsar(message)
        if self._count_redeliveries:
            raw.redelivery_count = self._nacks.get(message.message_id().serialize(), 0)
        return raw

    async def _ack_raw(self, raw: RawMessage) -> None:
        if self._count_redeliveries:
            self._nacks.pop(raw.handle.message_id().serialize(), None)
        await self._consumer.acknowledge(raw.handle)

    async def _nack_raw(self, raw: RawMessage) -> None:
        if self._count_redeliveries:
            message_id = raw.handle.message_id().serialize()
            attempts = self._nacks.get(message_id, 0) + 1
            if attempts > self._max_redeliveries:
                self._nacks.pop(message_id, None)
                await self._send_to_dead_letter(raw, f"failed {attempts} deliveries")
                return
            self._nacks[message_id] = attempts
        await self._consumer.negative_acknowledge(raw.handle)

    async def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
        with contextlib.suppress(Exception):
            await self._consumer.close()


class _PulsarReader(Reader[M]):
    def __init__(self, reader: Any, topic: str, message_type: type[M]) -> None:
        super().__init__(topic, message_type)
        self._reader = reader
        self._pending: asyncio.Future[Any] | None = None

    async def has_message_available(self) -> bool:
        return bool(await self._reader.has_message_available())

    async def _read_raw(self) -> RawMessage:
        return _raw_from_pulsar(await _keep_pending(self, self._reader.read_next))

    async def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
        with contextlib.suppress(Exception):
            await self._reader.close()


class PulsarBus(Bus):
    """The adapter over a real Apache Pulsar broker."""

    def __init__(self, settings: PulsarSettings, client_name: str = "rendezvous") -> None:
        super().__init__(settings)
        import pulsar.asyncio

        self._client_name = client_name
        # Every consumer and reader stays referenced until close(): the C++ client aborts
        # the process (std::bad_weak_ptr) when one is garbage-collected while it is open.
        self._open: list[_PulsarSubscription[Any] | _PulsarReader[Any]] = []
        self._client = pulsar.asyncio.Client(
            settings.service_url,
            operation_timeout_seconds=max(1, int(settings.operation_timeout_s)),
            io_threads=settings.io_threads,
            message_listener_threads=settings.listener_threads,
            # Filtered in C++: a Python logger would take the GIL for every INFO line the
            # client emits, and a broker restart emits bursts of them (measured: answers
            # 20-40 ms past the SLA while they crossed into the interpreter).
            logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Warn),
        )

    async def _create_publisher(self, topic: str, batching: bool) -> Publisher[Any]:
        try:
            producer = await self._client.create_producer(
                topic,
                send_timeout_millis=int(self.settings.send_timeout_s * 1000),
                batching_enabled=batching,
                batching_max_publish_delay_ms=self.settings.batching_max_delay_ms,
                block_if_queue_full=False,
            )
        except _client_errors() as exc:
            raise _pulsar_error(exc) from exc
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
        dead_letter_topic = Topics.dead_letter(topic)
        dead_letter_policy = None
        if mode in (SubscriptionMode.SHARED, SubscriptionMode.KEY_SHARED):
            # Pulsar's own policy covers handlers that keep failing (nack loops);
            # the initial subscription keeps dead letters until someone reads them.
            dead_letter_policy = pulsar.ConsumerDeadLetterPolicy(
                max_redeliver_count=self.settings.max_redeliveries,
                dead_letter_topic=dead_letter_topic,
                initial_subscription_name=f"{subscription}-dlq",
            )
        try:
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
        except _client_errors() as exc:
            raise _pulsar_error(exc) from exc

        durable = False

        async def dead_letter() -> Publisher[Any]:
            nonlocal durable
            if not durable:
                # Retention is 0 by default: without a subscription nothing keeps dead letters.
                holder = await self._client.subscribe(
                    dead_letter_topic,
                    f"{subscription}-dlq",
                    consumer_type=pulsar.ConsumerType.Shared,
                    initial_position=pulsar.InitialPosition.Earliest,
                )
                await holder.close()
                durable = True
            return await self.dead_letter_publisher(topic)

        opened = _PulsarSubscription(
            consumer,
            topic,
            message_type,
            dead_letter,
            count_redeliveries=dead_letter_policy is None,
            max_redeliveries=self.settings.max_redeliveries,
        )
        self._open.append(opened)
        return opened

    async def reader(
        self, topic: str, message_type: type[M], *, start: Start = "earliest"
    ) -> Reader[M]:
        import pulsar

        try:
            reader = await self._client.create_reader(
                topic,
                pulsar.MessageId.earliest if start == "earliest" else pulsar.MessageId.latest,
                receiver_queue_size=self.settings.receiver_queue_size,
            )
        except _client_errors() as exc:
            raise _pulsar_error(exc) from exc
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


# --------------------------------------------------------------------------- in-memory twin


class _MemoryTopic:
    def __init__(self, name: str) -> None:
        self.name = name
        self.log: list[RawMessage] = []
        self.subscriptions: dict[str, _MemorySubscriptionState] = {}
        self.appended = asyncio.Condition()


class _MemorySubscriptionState:
    def __init__(self, mode: SubscriptionMode) -> None:
        self.mode = mode
        self.queue: asyncio.Queue[RawMessage] = asyncio.Queue()
        self.consumers = 0
        # Open consumers in subscription order; on FAILOVER only the first one receives.
        self.members: list[Any] = []
        self.changed = asyncio.Condition()


class _MemoryPublisher(Publisher[Any]):
    def __init__(self, bus: MemoryBus, topic: str) -> None:
        self._bus = bus
        self.topic = topic

    async def _send(self, data: bytes, properties: dict[str, str], key: str | None) -> None:
        if self._bus.unavailable:
            # Like a broker that is down: the send never completes within any budget.
            await asyncio.Event().wait()
        topic = self._bus.topic_state(self.topic)
        raw = RawMessage(
            data=data,
            properties=dict(properties),
            key=key,
            topic=self.topic,
            redelivery_count=0,
            publish_time_ms=int(time.time() * 1000),
        )
        topic.log.append(raw)
        for state in topic.subscriptions.values():
            state.queue.put_nowait(raw)
        async with topic.appended:
            topic.appended.notify_all()

    async def close(self) -> None:
        return None


class _MemorySubscription(Subscription[M]):
    def __init__(
        self,
        bus: MemoryBus,
        state: _MemorySubscriptionState,
        topic: str,
        message_type: type[M],
        dead_letter: Callable[[], Any],
    ) -> None:
        super().__init__(topic, message_type, dead_letter)
        self._bus = bus
        self._state = state
        self._closed = False
        # Delivered, not yet acknowledged: redelivered to the others when this one closes.
        self._unacked: list[RawMessage] = []

    async def _receive_raw(self) -> RawMessage:
        if self._state.mode is SubscriptionMode.FAILOVER:
            async with self._state.changed:
                await self._state.changed.wait_for(lambda: self._state.members[:1] == [self])
        raw = await self._state.queue.get()
        self._unacked.append(raw)
        return raw

    def _receive_ready_raw(self) -> RawMessage | None:
        if self._state.mode is SubscriptionMode.FAILOVER and self._state.members[:1] != [self]:
            return None
        try:
            raw = self._state.queue.get_nowait()
        except asyncio.QueueEmpty:
            return None
        self._unacked.append(raw)
        return raw

    def _settle(self, raw: RawMessage) -> None:
        for index, pending in enumerate(self._unacked):
            if pending is raw:
                del self._unacked[index]
                return

    async def _ack_raw(self, raw: RawMessage) -> None:
        self._settle(raw)

    async def _nack_raw(self, raw: RawMessage) -> None:
        self._settle(raw)
        redelivered = RawMessage(
            data=raw.data,
            properties=raw.properties,
            key=raw.key,
            topic=raw.topic,
            redelivery_count=raw.redelivery_count + 1,
            publish_time_ms=raw.publish_time_ms,
        )
        if redelivered.redelivery_count > self._bus.settings.max_redeliveries:
            publisher = await self._bus.dead_letter_publisher(self.topic)
            await publisher.publish_bytes(raw.data, dict(raw.properties), raw.key)
            DEAD_LETTERS.labels(self.topic, "max-redeliveries").inc()
            return
        delay = self._bus.settings.negative_ack_redelivery_delay_ms / 1000
        asyncio.get_running_loop().call_later(delay, self._state.queue.put_nowait, redelivered)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._state.consumers -= 1
            for raw in self._unacked:
                self._state.queue.put_nowait(raw)
            self._unacked.clear()
            async with self._state.changed:
                self._state.members.remove(self)
                self._state.changed.notify_all()


class _MemoryReader(Reader[M]):
    def __init__(self, topic: _MemoryTopic, message_type: type[M], position: int) -> None:
        super().__init__(topic.name, message_type)
        self._topic = topic
        self._position = position

    async def has_message_available(self) -> bool:
        return self._position < len(self._topic.log)

    async def _read_raw(self) -> RawMessage:
        async with self._topic.appended:
            await self._topic.appended.wait_for(lambda: self._position < len(self._topic.log))
        raw = self._topic.log[self._position]
        self._position += 1
        return raw

    async def close(self) -> None:
        return None


class MemoryBus(Bus):
    """An in-process twin of `PulsarBus` with the same contract, for unit tests."""

    def __init__(self, settings: PulsarSettings | None = None) -> None:
        super().__init__(settings or PulsarSettings())
        self._topics: dict[str, _MemoryTopic] = {}
        # Tests flip this to behave like a broker that accepts nothing.
        self.unavailable = False

    def topic_state(self, topic: str) -> _MemoryTopic:
        state = self._topics.get(topic)
        if state is None:
            state = self._topics[topic] = _MemoryTopic(topic)
        return state

    def messages(self, topic: str) -> list[RawMessage]:
        """Everything ever published to `topic` (for assertions)."""
        return list(self.topic_state(topic).log)

    async def _create_publisher(self, topic: str, batching: bool) -> Publisher[Any]:
        return _MemoryPublisher(self, topic)

    async def subscribe(
        self,
        topic: str,
        subscription: str,
        message_type: type[M],
        *,
        mode: SubscriptionMode = SubscriptionMode.SHARED,
        start: Start = "earliest",
    ) -> Subscription[M]:
        state_topic = self.topic_state(topic)
        state = state_topic.subscriptions.get(subscription)
        if state is None:
            state = _MemorySubscriptionState(mode)
            if start == "earliest":
                for raw in state_topic.log:
                    state.queue.put_nowait(raw)
            state_topic.subscriptions[subscription] = state
        if state.mode is SubscriptionMode.EXCLUSIVE and state.consumers > 0:
            raise BusError(f"subscription {subscription!r} on {topic} is exclusive and taken")
        state.consumers += 1

        async def dead_letter() -> Publisher[Any]:
            return await self.dead_letter_publisher(topic)

        opened = _MemorySubscription(self, state, topic, message_type, dead_letter)
        state.members.append(opened)
        return opened

    async def reader(
        self, topic: str, message_type: type[M], *, start: Start = "earliest"
    ) -> Reader[M]:
        state = self.topic_state(topic)
        return _MemoryReader(state, message_type, 0 if start == "earliest" else len(state.log))


def connect(settings: PulsarSettings, client_name: str) -> Bus:
    """The bus services run on: always the real broker."""
    return PulsarBus(settings, client_name)
