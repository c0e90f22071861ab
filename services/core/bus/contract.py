"""The bus contract: what services publish, receive and read with, whatever the broker.

Every message on a topic is one serialized protobuf. Each carries properties:
`rdv-type` (the message's full proto name, checked on receipt) and the W3C trace
context of the PRODUCER span that published it, so a trace continues across the broker.

`Bus` hands out `Publisher`s, `Subscription`s and `Reader`s; an adapter (`pulsar.py`)
implements the few abstract steps that touch a broker, and everything a service can
observe beyond those steps is decided here, once: decoding, the dead-letter step for a
message that cannot be decoded (the policy itself is `dead_letter.py`), publish budgets
and the shared publisher per topic. tests/contract runs one suite against every
implementation, the real broker included.

Publishes are bounded: a caller on the request path passes its remaining budget.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Generic, Literal, TypeVar

from google.protobuf.message import DecodeError, Message
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, StatusCode

from services.core.bus import dead_letter
from services.core.bus.errors import BusError, PublishTimeout
from services.core.settings import PulsarSettings
from services.core.telemetry import counter, extract, inject
from services.core.topics import Topics
from services.core.tracing import in_span, producer_span

M = TypeVar("M", bound=Message)

TYPE_PROPERTY = "rdv-type"
# The W3C trace context property (the propagator's name for it).
TRACEPARENT = "traceparent"

PUBLISH_FAILURES = counter("rdv_publish_failures", "Publishes that failed or timed out", ("topic",))

Start = Literal["earliest", "latest"]


class SubscriptionMode(Enum):
    """How consumers of one subscription share its messages."""

    SHARED = "shared"  # replicas split the load (model runners, enrichers)
    EXCLUSIVE = "exclusive"  # one consumer owns the subscription
    FAILOVER = "failover"  # one active consumer, standbys take over (collector)
    KEY_SHARED = "key_shared"  # per-key ordering across replicas


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
    # The CONSUMER span of this message's processing, once a consumer opened one
    # (services.core.tracing.consumer_span): the work on the message continues it.
    span: Span | None = field(default=None, repr=False)

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
        """The context work on this message continues: its processing span when a consumer
        opened one, else the publisher's span the message's properties carry."""
        if self.span is not None:
            return in_span(self.span)
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
        context: otel_context.Context | None = None,
    ) -> None:
        """Publish and wait for the broker's receipt, at most `timeout` seconds.

        Inside a trace (`context`, default the current one; else the trace the given
        properties' `traceparent` names) the publish is a PRODUCER span of it, and the message
        carries that span's context. Outside any trace (the control topic, status reports) it
        starts none: no span, no trace context."""
        data = message.SerializeToString()
        if context is None and properties and TRACEPARENT in properties:
            context = extract(properties)
        if not trace.get_current_span(context).get_span_context().is_valid:
            await self.publish_bytes(data, message_properties(message, properties), key, timeout)
            return
        with producer_span(self.topic, len(data), context) as span:
            try:
                await self.publish_bytes(
                    data, message_properties(message, properties), key, timeout
                )
            except BusError as exc:
                span.set_status(StatusCode.ERROR, type(exc).__name__)
                raise

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


# Opens (on first use) the publisher of a subscription's dead-letter topic.
DeadLetterPublisher = Callable[[], Awaitable[Publisher[Any]]]


class Subscription(abc.ABC, Generic[M]):
    """Receives one message type; undecodable messages go to the dead-letter topic."""

    def __init__(
        self,
        topic: str,
        message_type: type[M],
        dead_letter_publisher: DeadLetterPublisher,
    ) -> None:
        self.topic = topic
        self.message_type = message_type
        self._dead_letter_publisher = dead_letter_publisher
        self.dead_lettered = 0
        # The subscription's name, for the spans of what it consumes (set by the bus).
        self.name = ""

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
            raw = await self._receive_ready_raw()
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

    async def _receive_ready_raw(self) -> RawMessage | None:
        """A message the client already holds, or None; never waits for one to arrive."""
        return None

    async def _send_to_dead_letter(self, raw: RawMessage, reason: str) -> None:
        publisher = await self._dead_letter_publisher()
        await dead_letter.publish(publisher, raw, reason)
        # Acknowledged only once the dead letter is stored: when the publish fails, the
        # message stays unacknowledged on its own topic instead of being lost.
        await self._ack_raw(raw)
        self.dead_lettered += 1
        dead_letter.sent(self.topic, publisher.topic, raw, reason)

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
                dead_letter.count(self.topic, dead_letter.UNDECODABLE_READ)
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
        self._publishers: dict[tuple[str, bool, int, bool, int], Publisher[Any]] = {}
        # The message type each topic's publishers were asked for (see `publisher`).
        self._topic_types: dict[str, type[Message]] = {}
        self._publisher_lock = asyncio.Lock()

    async def publisher(
        self,
        topic: str,
        message_type: type[M],
        *,
        batching: bool | None = None,
        max_delay_ms: int | None = None,
        exclusive: bool = False,
        hold: int = 0,
    ) -> Publisher[M]:
        """A publisher for `topic`, shared by every caller in this process.

        With `exclusive` the publisher is the topic's only one (Pulsar's WaitForExclusive
        access mode): the call waits, as a standby, for as long as another process holds the
        topic, so a second writer of a single-writer topic (the control topic) cannot write.

        With `batching` (default: `settings.batching`, true) and `batching_max_delay_ms` 0,
        the client's I/O thread sends the batch as soon as it gets to it: a lone message
        leaves at once (measured: the same round trip as unbatched), while a burst published
        in one turn of the event loop costs the broker one entry instead of one per message.
        Without it every message is its own entry. `max_delay_ms` (default:
        `settings.batching_max_delay_ms`) lets a batch wait that long for more messages: what a
        few producers of one process publish to one topic within it shares one broker entry,
        one dispatch and one receive at the other end.

        With `hold` > 0 the publisher keeps up to `hold` messages the broker has not confirmed
        for as long as the broker is away, and sends them when it is back (no send timeout): a
        publish without a `timeout` ends when the broker has the message, however long the
        outage, and fails only when `hold` messages are already waiting (at once) or when the
        bus closes; either way the client no longer holds the message and will not send it.
        Without `hold`, a publish fails after `settings.send_timeout_s` with the broker away,
        and a caller's shorter `timeout` only stops the wait: the client may still send the
        message it gave up on (a duplicate, if the caller then tries again).

        A topic carries one message type: asking for it with another type than before raises
        TypeError. Keying the cache by type as well would hand out a second publisher that
        quietly puts a second type on the topic, and every consumer of the topic would send
        those messages to its dead-letter topic; failing at the call that mixes them is safer.
        (`dead_letter_publisher` asks with `Message` itself: a dead-letter topic takes the
        bytes of whatever could not be handled, and nothing else publishes there.)
        """
        if batching is None:
            batching = self.settings.batching
        if max_delay_ms is None:
            max_delay_ms = self.settings.batching_max_delay_ms
        if hold < 0:
            raise ValueError(f"hold must be >= 0, not {hold}")
        cache_key = (topic, batching, max_delay_ms, exclusive, hold)
        existing = self._publishers.get(cache_key)
        if existing is not None:
            self._check_topic_type(topic, message_type)
            return existing
        async with self._publisher_lock:
            self._check_topic_type(topic, message_type)
            existing = self._publishers.get(cache_key)
            if existing is None:
                existing = await self._create_publisher(
                    topic, batching, max_delay_ms, exclusive=exclusive, hold=hold
                )
                self._publishers[cache_key] = existing
                self._topic_types[topic] = message_type
        return existing

    def _check_topic_type(self, topic: str, message_type: type[Message]) -> None:
        known = self._topic_types.get(topic)
        if known is not None and known is not message_type:
            # __name__, not DESCRIPTOR: `Message` itself (dead-letter topics) has no descriptor.
            raise TypeError(
                f"{topic} already has a publisher of {known.__name__}, "
                f"not {message_type.__name__}: a topic carries one message type"
            )

    async def dead_letter_publisher(self, topic: str) -> Publisher[Any]:
        return await self.publisher(Topics.dead_letter(topic), Message)

    @abc.abstractmethod
    async def _create_publisher(
        self,
        topic: str,
        batching: bool,
        max_delay_ms: int,
        *,
        exclusive: bool = False,
        hold: int = 0,
    ) -> Publisher[Any]: ...

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
        self,
        topic: str,
        message_type: type[M],
        *,
        start: Start = "earliest",
        compacted: bool = False,
    ) -> Reader[M]:
        """A reader from `start`. `compacted`: of a keyed topic's compacted part, only the
        latest message per key (Pulsar's topic compaction), then everything after it."""

    async def close(self) -> None:
        for publisher in list(self._publishers.values()):
            with contextlib.suppress(Exception):
                await publisher.close()
        self._publishers.clear()
        self._topic_types.clear()
