"""The in-memory twin of `PulsarBus`: the bus contract in one process, for fast unit tests.

It lives with the tests, not in services/: no service runs on it. tests/contract runs the
same suite on it and on the real broker, so a unit test that relies on it relies on
behaviour the broker really has; where the two differ, that suite says so. It models what
the services depend on: shared, exclusive and failover subscriptions, redelivery of a
closed consumer's unacknowledged messages, nack redelivery with a count and a limit,
readers from either end, and (with `unavailable`) a broker that accepts nothing for a
while: a publish then waits for it, as the client does, and fails after the send timeout, or,
on a held publisher (`hold`), waits for as long as it takes and goes out once the broker is
back; one more than `hold` waiting fails at once.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from services.core.bus import (
    Bus,
    BusError,
    DeadLetterPublisher,
    M,
    Publisher,
    PublishTimeout,
    RawMessage,
    Reader,
    Start,
    Subscription,
    SubscriptionMode,
    dead_letter,
)
from services.core.settings import PulsarSettings


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
    def __init__(self, bus: MemoryBus, topic: str, hold: int) -> None:
        self._bus = bus
        self.topic = topic
        self._hold = hold
        self.waiting = 0
        self._closed = asyncio.Event()

    async def _send(self, data: bytes, properties: dict[str, str], key: str | None) -> None:
        if self._bus.unavailable:
            await self._wait_for_broker()
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

    async def _wait_for_broker(self) -> None:
        """Like the client with the broker away: keep the message until it is back, for at
        most the send timeout, or (held) for as long as it takes, `hold` messages at most."""
        if self._hold and self.waiting >= self._hold:
            raise BusError(f"pulsar: ProducerQueueIsFull ({self._hold} messages held)")
        self.waiting += 1
        try:
            if self._hold:
                await self._broker_back()
            else:
                await asyncio.wait_for(self._broker_back(), self._bus.settings.send_timeout_s)
        except TimeoutError as exc:
            raise PublishTimeout(f"publish to {self.topic} timed out in the client") from exc
        finally:
            self.waiting -= 1

    async def _broker_back(self) -> None:
        waits = [
            asyncio.ensure_future(self._bus.available.wait()),
            asyncio.ensure_future(self._closed.wait()),
        ]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        if self._closed.is_set():
            # As the client fails what it still holds when its producer closes.
            raise BusError("pulsar: AlreadyClosed")

    async def close(self) -> None:
        self._closed.set()


class _MemorySubscription(Subscription[M]):
    def __init__(
        self,
        bus: MemoryBus,
        state: _MemorySubscriptionState,
        topic: str,
        message_type: type[M],
        dead_letter_publisher: DeadLetterPublisher,
    ) -> None:
        super().__init__(topic, message_type, dead_letter_publisher)
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

    async def _receive_ready_raw(self) -> RawMessage | None:
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
            # As Pulsar's native policy does: the message as it was, no reason properties.
            publisher = await self._bus.dead_letter_publisher(self.topic)
            await publisher.publish_bytes(raw.data, dict(raw.properties), raw.key)
            dead_letter.count(self.topic, dead_letter.MAX_REDELIVERIES)
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
    def __init__(
        self,
        topic: _MemoryTopic,
        message_type: type[M],
        position: int,
        compacted: bool = False,
    ) -> None:
        super().__init__(topic.name, message_type)
        self._topic = topic
        self._position = position
        # A compacted read of what is already there: the latest message per key, in the
        # order of those latest messages (as Pulsar's compacted ledger keeps them).
        self._compacted: list[RawMessage] = []
        if compacted and position == 0:
            latest: dict[str | None, int] = {}
            for index, raw in enumerate(topic.log):
                latest.pop(raw.key, None)
                latest[raw.key] = index
            self._compacted = [topic.log[index] for index in latest.values()]
            self._position = len(topic.log)

    async def has_message_available(self) -> bool:
        return bool(self._compacted) or self._position < len(self._topic.log)

    async def _read_raw(self) -> RawMessage:
        if self._compacted:
            return self._compacted.pop(0)
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
        # Set while the broker accepts publishes; tests clear it with `unavailable`.
        self.available = asyncio.Event()
        self.available.set()

    @property
    def unavailable(self) -> bool:
        """Whether the twin behaves like a broker that accepts nothing (tests flip it)."""
        return not self.available.is_set()

    @unavailable.setter
    def unavailable(self, value: bool) -> None:
        if value:
            self.available.clear()
        else:
            self.available.set()

    def topic_state(self, topic: str) -> _MemoryTopic:
        state = self._topics.get(topic)
        if state is None:
            state = self._topics[topic] = _MemoryTopic(topic)
        return state

    def messages(self, topic: str) -> list[RawMessage]:
        """Everything ever published to `topic` (for assertions)."""
        return list(self.topic_state(topic).log)

    async def _create_publisher(
        self,
        topic: str,
        batching: bool,
        max_delay_ms: int,
        *,
        exclusive: bool = False,
        hold: int = 0,
    ) -> Publisher[Any]:
        # One process, one writer: an exclusive publisher has nobody to exclude here.
        return _MemoryPublisher(self, topic, hold)

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

        async def open_dead_letter_publisher() -> Publisher[Any]:
            return await self.dead_letter_publisher(topic)

        opened = _MemorySubscription(self, state, topic, message_type, open_dead_letter_publisher)
        opened.name = subscription
        state.members.append(opened)
        return opened

    async def reader(
        self,
        topic: str,
        message_type: type[M],
        *,
        start: Start = "earliest",
        compacted: bool = False,
    ) -> Reader[M]:
        state = self.topic_state(topic)
        position = 0 if start == "earliest" else len(state.log)
        return _MemoryReader(state, message_type, position, compacted)
