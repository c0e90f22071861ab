"""BoundedConsumer over MemoryBus: the bound, each message once, the ordered stop, failures."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable

import pytest
from rendezvous.v1 import scoring_pb2, task_pb2

from services.core.bus import BusError, Envelope, Subscription
from services.core.consumer import BoundedConsumer, Handler
from tests.fakes.memory_bus import MemoryBus
from tests.helpers import until

Task = task_pb2.ScoringTask
SUBSCRIPTION = "consumer-test"


def _task(request_id: str) -> Task:
    return Task(request=scoring_pb2.ScoreRequest(request_id=request_id))


def _id(envelope: Envelope[Task]) -> str:
    return envelope.message.request.request_id


async def _topic_with(bus: MemoryBus, *request_ids: str) -> tuple[str, Subscription[Task]]:
    """A fresh topic holding `request_ids`, and a subscription to it."""
    topic = f"consumer-{uuid.uuid4().hex}"
    subscription = await bus.subscribe(topic, SUBSCRIPTION, Task)
    publisher = await bus.publisher(topic, Task)
    for request_id in request_ids:
        await publisher.publish(_task(request_id))
    return topic, subscription


def _consumer(
    subscription: Subscription[Task],
    handler: Handler[Task],
    *,
    max_in_flight: int,
    on_receive_error: Callable[[Exception], None] | None = None,
) -> BoundedConsumer[Task]:
    return BoundedConsumer(
        subscription,
        handler,
        max_in_flight=max_in_flight,
        retry_delay_s=0.05,
        name="test:consumer",
        on_receive_error=on_receive_error,
    )


async def test_never_more_than_max_in_flight_and_each_message_once(
    memory_bus: MemoryBus,
) -> None:
    sent = [f"r{i}" for i in range(30)]
    _, subscription = await _topic_with(memory_bus, *sent)
    handled: list[str] = []
    running = 0
    peak_running = 0
    peak_in_flight = 0

    async def handle(envelope: Envelope[Task]) -> None:
        nonlocal running, peak_running, peak_in_flight
        running += 1
        peak_running = max(peak_running, running)
        peak_in_flight = max(peak_in_flight, consumer.in_flight)
        await asyncio.sleep(0.01)
        running -= 1
        handled.append(_id(envelope))
        await subscription.ack(envelope)

    consumer = _consumer(subscription, handle, max_in_flight=4)
    consumer.start()
    try:
        await until(lambda: len(handled) >= len(sent))
        await asyncio.sleep(0.05)  # room for a duplicate to show up
    finally:
        await consumer.stop(1.0)
        await subscription.close()

    # The bound was reached (30 messages were waiting) and never exceeded.
    assert peak_running == 4
    assert peak_in_flight == 4
    assert Counter(handled) == Counter(sent)
    assert consumer.in_flight == 0


async def test_stop_waits_for_handlers_that_finish_within_the_grace(
    memory_bus: MemoryBus,
) -> None:
    topic, subscription = await _topic_with(memory_bus, "a", "b", "c")
    started: list[str] = []
    finished: list[str] = []

    async def handle(envelope: Envelope[Task]) -> None:
        started.append(_id(envelope))
        await asyncio.sleep(0.3)
        finished.append(_id(envelope))
        await subscription.ack(envelope)

    consumer = _consumer(subscription, handle, max_in_flight=3)
    consumer.start()
    await until(lambda: len(started) == 3)
    assert consumer.in_flight == 3

    began = time.monotonic()
    await consumer.stop(5.0)
    elapsed = time.monotonic() - began

    assert sorted(finished) == ["a", "b", "c"]
    assert consumer.in_flight == 0
    # It waited for the handlers, not for the whole grace.
    assert elapsed < 2.0
    # Stopped means stopped receiving: a later message stays on the subscription.
    publisher = await memory_bus.publisher(topic, Task)
    await publisher.publish(_task("late"))
    await asyncio.sleep(0.1)
    assert "late" not in started
    await subscription.close()


async def test_stop_cancels_handlers_beyond_the_grace(memory_bus: MemoryBus) -> None:
    topic, subscription = await _topic_with(memory_bus, "quick", "slow-1", "slow-2")
    started: list[str] = []
    finished: list[str] = []
    cancelled: list[str] = []

    async def handle(envelope: Envelope[Task]) -> None:
        request_id = _id(envelope)
        started.append(request_id)
        try:
            await asyncio.sleep(0.05 if request_id == "quick" else 30.0)
        except asyncio.CancelledError:
            cancelled.append(request_id)
            raise
        finished.append(request_id)
        await subscription.ack(envelope)

    consumer = _consumer(subscription, handle, max_in_flight=3)
    consumer.start()
    await until(lambda: len(started) == 3)

    began = time.monotonic()
    await consumer.stop(0.3)
    elapsed = time.monotonic() - began

    assert finished == ["quick"]
    assert sorted(cancelled) == ["slow-1", "slow-2"]
    assert consumer.in_flight == 0
    assert 0.25 <= elapsed < 2.0
    # Cancelled unacknowledged: once this consumer's subscription closes, the broker
    # hands those messages to the next consumer of the subscription.
    await subscription.close()
    successor = await memory_bus.subscribe(topic, SUBSCRIPTION, Task)
    redelivered = [_id(await asyncio.wait_for(successor.receive(), 1.0)) for _ in range(2)]
    assert sorted(redelivered) == ["slow-1", "slow-2"]
    await successor.close()


async def test_a_handler_exception_is_logged_and_the_loop_goes_on(
    memory_bus: MemoryBus, caplog: pytest.LogCaptureFixture
) -> None:
    _, subscription = await _topic_with(memory_bus, "boom", "a", "b")
    handled: list[str] = []

    async def handle(envelope: Envelope[Task]) -> None:
        if _id(envelope) == "boom":
            raise RuntimeError("handler bug")
        handled.append(_id(envelope))
        await subscription.ack(envelope)

    # One slot: had the failed handler kept it, nothing after it would be handled.
    consumer = _consumer(subscription, handle, max_in_flight=1)
    with caplog.at_level(logging.ERROR, logger="services.core.consumer"):
        consumer.start()
        try:
            await until(lambda: len(handled) == 2)
        finally:
            await consumer.stop(1.0)
            await subscription.close()

    assert handled == ["a", "b"]
    [record] = [r for r in caplog.records if r.getMessage() == "task handler failed"]
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], RuntimeError)
    assert str(record.exc_info[1]) == "handler bug"


async def test_a_failed_receive_is_reported_and_receiving_resumes(
    memory_bus: MemoryBus, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, subscription = await _topic_with(memory_bus, "a", "b")
    receive = subscription.receive
    receives = 0

    async def flaky_receive() -> Envelope[Task]:
        nonlocal receives
        receives += 1
        if receives == 1:
            raise BusError("broker went away")
        return await receive()

    monkeypatch.setattr(subscription, "receive", flaky_receive)
    errors: list[Exception] = []
    handled: list[str] = []

    async def handle(envelope: Envelope[Task]) -> None:
        handled.append(_id(envelope))
        await subscription.ack(envelope)

    # One slot: had the failed receive kept it, nothing would be received after it.
    consumer = _consumer(subscription, handle, max_in_flight=1, on_receive_error=errors.append)
    consumer.start()
    try:
        await until(lambda: len(handled) == 2)
    finally:
        await consumer.stop(1.0)
        await subscription.close()

    assert [type(error) for error in errors] == [BusError]
    assert handled == ["a", "b"]
