"""The Pulsar adapter lets no client exception out: every failing client call is a BusError.

The client is replaced by a stub whose chosen calls fail the way pulsar-client 3.13 fails
(pulsar.asyncio's own PulsarException from the asyncio API, a _pulsar exception from the
synchronous calls underneath), so every call site is exercised without a broker; the
integration suite shows the same on the real one (an ack on a closed consumer).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pulsar
import pulsar.asyncio
import pytest
from rendezvous.v1 import task_pb2

from services.core.bus import (
    TYPE_PROPERTY,
    Bus,
    BusError,
    Envelope,
    PublishTimeout,
    PulsarBus,
    RawMessage,
)
from services.core.settings import PulsarSettings

TOPIC = "persistent://public/default/rdv.unit.errors"
Task = task_pb2.ScoringTask

ASYNCIO_ERROR = pulsar.asyncio.PulsarException(pulsar.Result.AlreadyClosed)
SYNC_ERROR = pulsar.AlreadyClosed("AlreadyClosed")


class _Message:
    """What the stub's receive and read return: a message that does not decode."""

    def data(self) -> bytes:
        return b"\x0a\xff"

    def properties(self) -> dict[str, str]:
        return {TYPE_PROPERTY: Task.DESCRIPTOR.full_name}

    def partition_key(self) -> str:
        return ""

    def topic_name(self) -> str:
        return TOPIC

    def redelivery_count(self) -> int:
        return 0

    def publish_timestamp(self) -> int:
        return 0

    def message_id(self) -> Any:
        return self

    def serialize(self) -> bytes:
        return b"id"


class _CppConsumer:
    """The C++ consumer under pulsar.asyncio's (its `_consumer`), whose non-blocking calls
    the adapter makes directly: synchronous, and receive_async calls back."""

    def __init__(self, fails: Callable[[str, tuple[Any, ...]], bool], exc: Exception) -> None:
        self._fails = fails
        self._exc = exc

    def receive_async(self, callback: Callable[[Any, Any], None]) -> None:
        if self._fails("receive", ()):
            raise self._exc
        callback(pulsar.Result.Ok, _Message())

    def acknowledge(self, *args: Any) -> None:
        if self._fails("acknowledge", args):
            raise self._exc

    def negative_acknowledge(self, *args: Any) -> None:
        if self._fails("negative_acknowledge", args):
            raise self._exc


class _Stub:
    """A client, producer, consumer or reader: each call fails if `fails(name, args)`."""

    def __init__(self, fails: Callable[[str, tuple[Any, ...]], bool], exc: Exception) -> None:
        self._fails = fails
        self._exc = exc
        self._consumer = _CppConsumer(fails, exc)

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        async def call(*args: Any, **kwargs: Any) -> Any:
            if self._fails(name, args):
                raise self._exc
            if name in ("receive", "read_next"):
                return _Message()
            return _Stub(self._fails, self._exc)

        return call


@pytest.fixture(params=[ASYNCIO_ERROR, SYNC_ERROR], ids=["asyncio-exception", "sync-exception"])
def client_error(request: pytest.FixtureRequest) -> Exception:
    error: Exception = request.param
    return error


def _bus(
    monkeypatch: pytest.MonkeyPatch, fails: Callable[[str, tuple[Any, ...]], bool], exc: Exception
) -> PulsarBus:
    monkeypatch.setattr(pulsar.asyncio, "Client", lambda *args, **kwargs: _Stub(fails, exc))
    return PulsarBus(PulsarSettings(close_grace_s=0), "unit")


def _envelope() -> Envelope[task_pb2.ScoringTask]:
    raw = RawMessage(b"", {}, None, TOPIC, 0, 0, handle=_Message())
    return Envelope.of(Task(), raw)


async def _publish(bus: Bus) -> None:
    await (await bus.publisher(TOPIC, Task)).publish(Task())


async def _close_publisher(bus: Bus) -> None:
    await (await bus.publisher(TOPIC, Task)).close()


async def _receive(bus: Bus) -> None:
    await (await bus.subscribe(TOPIC, "s", Task)).receive()


async def _ack(bus: Bus) -> None:
    await (await bus.subscribe(TOPIC, "s", Task)).ack(_envelope())


async def _nack(bus: Bus) -> None:
    await (await bus.subscribe(TOPIC, "s", Task)).nack(_envelope())


async def _read(bus: Bus) -> None:
    await (await bus.reader(TOPIC, Task)).read_next()


async def _has_message_available(bus: Bus) -> None:
    await (await bus.reader(TOPIC, Task)).has_message_available()


# (what fails, the call into the client that fails, which of its arguments say so). The
# stub's messages do not decode, so a receive also takes the dead-letter road: it keeps
# dead letters (a subscription on <topic>-DLQ), publishes the dead letter and acks it.
OPERATIONS: list[tuple[str, Callable[[Bus], Awaitable[None]], str, str]] = [
    ("create a producer", _publish, "create_producer", ""),
    ("send", _publish, "send", ""),
    ("close a producer", _close_publisher, "close", ""),
    ("subscribe", _receive, "subscribe", ""),
    ("receive", _receive, "receive", ""),
    ("acknowledge", _ack, "acknowledge", ""),
    ("negative acknowledge", _nack, "negative_acknowledge", ""),
    ("create a reader", _read, "create_reader", ""),
    ("read", _read, "read_next", ""),
    ("has a message available", _has_message_available, "has_message_available", ""),
    ("keep dead letters", _receive, "subscribe", "-DLQ"),
    ("publish a dead letter", _receive, "send", ""),
    ("acknowledge a dead letter", _receive, "acknowledge", ""),
]


@pytest.mark.parametrize(
    ("operation", "failing", "argument"),
    [(op, failing, argument) for _, op, failing, argument in OPERATIONS],
    ids=[name for name, *_ in OPERATIONS],
)
async def test_a_failing_client_call_raises_bus_error_caused_by_the_client_error(
    monkeypatch: pytest.MonkeyPatch,
    client_error: Exception,
    operation: Callable[[Bus], Awaitable[None]],
    failing: str,
    argument: str,
) -> None:
    def fails(name: str, args: tuple[Any, ...]) -> bool:
        return name == failing and (not argument or any(argument in str(a) for a in args))

    bus = _bus(monkeypatch, fails, client_error)
    try:
        with pytest.raises(BusError) as caught:
            await operation(bus)
    finally:
        await bus.close()
    assert caught.value.__cause__ is client_error


async def test_a_client_send_timeout_is_a_publish_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    timeout = pulsar.asyncio.PulsarException(pulsar.Result.Timeout)
    bus = _bus(monkeypatch, lambda name, _: name == "send", timeout)
    try:
        with pytest.raises(PublishTimeout):
            await _publish(bus)
    finally:
        await bus.close()


async def test_closing_raises_nothing_when_every_close_fails(
    monkeypatch: pytest.MonkeyPatch, client_error: Exception
) -> None:
    bus = _bus(monkeypatch, lambda name, _: name == "close", client_error)
    subscription = await bus.subscribe(TOPIC, "s", Task)
    reader = await bus.reader(TOPIC, Task)
    await bus.publisher(TOPIC, Task)

    await subscription.close()
    await reader.close()
    await bus.close()  # closes them again, the publisher and the client


def test_a_malformed_service_url_is_a_bus_error() -> None:
    with pytest.raises(BusError) as caught:
        PulsarBus(PulsarSettings(service_url="bogus://127.0.0.1:6650"), "unit")
    assert isinstance(caught.value.__cause__, ValueError)


async def test_a_held_publisher_is_the_clients_queue_without_a_send_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What Bus.publisher's `hold` relies on: the client keeps what the broker has not
    # confirmed, with no send timeout, `hold` messages at most, refusing (not blocking) beyond.
    created: list[dict[str, Any]] = []

    class _Client(_Stub):
        async def create_producer(self, topic: str, **options: Any) -> _Stub:
            created.append(options)
            return _Stub(lambda *_: False, SYNC_ERROR)

    monkeypatch.setattr(
        pulsar.asyncio, "Client", lambda *args, **kwargs: _Client(lambda *_: False, SYNC_ERROR)
    )
    bus = PulsarBus(PulsarSettings(close_grace_s=0, send_timeout_s=5.0), "unit")
    try:
        await bus.publisher(TOPIC, Task)
        await bus.publisher(TOPIC, Task, hold=300)
    finally:
        await bus.close()

    plain, held = created
    assert (plain["send_timeout_millis"], plain["max_pending_messages"]) == (5000, 1000)
    assert (held["send_timeout_millis"], held["max_pending_messages"]) == (0, 300)
    assert held["block_if_queue_full"] is False
