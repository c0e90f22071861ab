"""The bus contract: the in-memory twin behaves like the real broker.

Every test here runs twice, on `MemoryBus` and on `PulsarBus` over the real Apache
Pulsar standalone (that parameter is marked `integration`), so a unit test that relies
on the twin relies on behaviour the broker really has. Where the two cannot behave the
same, the difference is asserted explicitly and explained next to the assertion.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from google.protobuf import struct_pb2
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from rendezvous.v1 import common_pb2, scoring_pb2, task_pb2

from services.core.bus import (
    DEAD_LETTER_REASON,
    ORIGINAL_TOPIC,
    TYPE_PROPERTY,
    Bus,
    BusError,
    Envelope,
    PublishTimeout,
    PulsarBus,
    RawMessage,
    Subscription,
    SubscriptionMode,
)
from services.core.protos import now_timestamp, timestamp_from_ns
from services.core.settings import PulsarSettings
from services.core.topics import Topics
from tests.conftest import PulsarBroker, quick_settings
from tests.fakes.memory_bus import MemoryBus

# Small, so that the redelivery-limit test takes a second, not a minute.
MAX_REDELIVERIES = 3
# Generous: the broker on a busy 2-core machine can take a while.
RECEIVE_TIMEOUT_S = 15.0
# For a message already published: on a local broker it arrives in milliseconds.
ARRIVES_S = 5.0
# How long "nothing more arrives" is watched: many nack delays (100 ms in tests).
QUIET_S = 1.5
# Simulated work per message, so that two shared consumers both get a share.
WORK_S = 0.005
SHARED_MESSAGES = 40
READER_MESSAGES = 25

UNDECODABLE = b"\x0a\xff"  # field 1, length-delimited, truncated: never parses


@pytest.fixture(params=["memory", pytest.param("pulsar", marks=pytest.mark.integration)])
def bus_settings(request: pytest.FixtureRequest) -> tuple[str, PulsarSettings]:
    """Which implementation, and its settings (the broker is only started for Pulsar)."""
    overrides: dict[str, Any] = {"max_redeliveries": MAX_REDELIVERIES}
    kind: str = request.param
    if kind == "memory":
        return kind, quick_settings(**overrides)
    broker: PulsarBroker = request.getfixturevalue("pulsar")
    return kind, broker.settings(**overrides)


@pytest.fixture
async def bus(bus_settings: tuple[str, PulsarSettings]) -> AsyncIterator[Bus]:
    kind, settings = bus_settings
    # Closing the bus closes every subscription and reader it opened (a Pulsar consumer
    # left open with a pending receive would abort the process when collected).
    instance: Bus = (
        MemoryBus(settings) if kind == "memory" else PulsarBus(settings, client_name="contract")
    )
    try:
        yield instance
    finally:
        await instance.close()


@pytest.fixture
def topic(bus: Bus, request: pytest.FixtureRequest) -> str:
    """A topic no other test (and no earlier run on the same broker) has used."""
    name = re.sub(r"[^a-z0-9]+", "-", request.node.originalname.lower()).strip("-")
    suffix = uuid.uuid4().hex[:8]
    return f"persistent://{bus.settings.tenant_namespace}/rdv.contract.{name}.{suffix}"


def scoring_task(n: int) -> task_pb2.ScoringTask:
    """A realistic task; `request_id` carries `n` so order and identity can be checked."""
    task = task_pb2.ScoringTask(
        request=scoring_pb2.ScoreRequest(
            objective="contract",
            request_id=f"req-{n:04d}",
            subject_id=f"subject-{n % 7}",
            consent=common_pb2.Consent(experimentation=common_pb2.CONSENT_DECISION_GRANTED),
        ),
        return_address="persistent://public/default/rdv.predictions.contract",
        mailbox_id=f"mailbox-{n}",
        received_time=now_timestamp(),
        deadline=timestamp_from_ns(now_timestamp().ToNanoseconds() + 50_000_000),
        objective_version=3,
    )
    task.request.features["x"].number_value = float(n)
    task.request.features["city"].string_value = "Lyon"
    task.request.features["tags"].list_value.values.add().string_value = "new"
    task.request.features["missing"].null_value = struct_pb2.NULL_VALUE
    return task


async def receive(sub: Subscription[task_pb2.ScoringTask]) -> Envelope[task_pb2.ScoringTask]:
    return await asyncio.wait_for(sub.receive(), RECEIVE_TIMEOUT_S)


async def assert_nothing_more(sub: Subscription[task_pb2.ScoringTask]) -> None:
    try:
        envelope = await asyncio.wait_for(sub.receive(), QUIET_S)
    except TimeoutError:
        return
    pytest.fail(f"unexpected message {envelope.message.request.request_id} on {sub.topic}")


async def read_raw(bus: Bus, topic: str, count: int) -> list[RawMessage]:
    """The first `count` messages of `topic` exactly as stored (no decoding, no skipping).

    The Reader API only hands out decoded messages; a dead-letter topic holds messages
    that by definition may not decode, so the assertions read the raw layer underneath.
    """
    reader = await bus.reader(topic, task_pb2.ScoringTask)
    try:
        return [await asyncio.wait_for(reader._read_raw(), RECEIVE_TIMEOUT_S) for _ in range(count)]
    finally:
        await reader.close()


async def test_round_trip_keeps_message_key_and_properties(bus: Bus, topic: str) -> None:
    sub = await bus.subscribe(topic, "round-trip", task_pb2.ScoringTask)
    publisher = await bus.publisher(topic, task_pb2.ScoringTask)
    sent = scoring_task(1)
    before_ms = int(now_timestamp().ToMilliseconds())

    await publisher.publish(sent, key="subject-1", properties={"objective": "contract"})
    envelope = await receive(sub)
    await sub.ack(envelope)

    assert envelope.message == sent
    assert envelope.key == "subject-1"
    assert envelope.properties["objective"] == "contract"
    assert envelope.properties[TYPE_PROPERTY] == "rendezvous.v1.ScoringTask"
    assert envelope.topic == topic
    assert envelope.redelivery_count == 0
    # Publish time is the broker's (or the twin's) wall clock; allow for clock granularity.
    assert before_ms - 1000 <= envelope.publish_time_ms <= before_ms + 10_000


async def test_a_topic_has_one_publisher_and_one_message_type(bus: Bus, topic: str) -> None:
    publisher = await bus.publisher(topic, task_pb2.ScoringTask)

    assert await bus.publisher(topic, task_pb2.ScoringTask) is publisher
    # Another type on the same topic would be dead-lettered by every consumer of it.
    with pytest.raises(TypeError, match="ScoringTask"):
        await bus.publisher(topic, task_pb2.PredictionEvent)
    with pytest.raises(TypeError):
        await bus.publisher(topic, task_pb2.PredictionEvent, batching=False)
    # The dead-letter topic takes the bytes of any type, through one shared publisher.
    dead_letters = await bus.dead_letter_publisher(topic)
    assert await bus.dead_letter_publisher(topic) is dead_letters
    assert dead_letters.topic == Topics.dead_letter(topic)


async def test_trace_context_continues_across_the_bus(bus: Bus, topic: str) -> None:
    sub = await bus.subscribe(topic, "trace", task_pb2.ScoringTask)
    publisher = await bus.publisher(topic, task_pb2.ScoringTask)
    # A local provider: real (recording) spans without touching the global one.
    tracer = TracerProvider().get_tracer("contract")

    with tracer.start_as_current_span("dispatch") as span:
        await publisher.publish(scoring_task(1))
    sent_context = span.get_span_context()
    envelope = await receive(sub)
    await sub.ack(envelope)

    received = trace.get_current_span(envelope.trace_context()).get_span_context()
    assert "traceparent" in envelope.properties
    assert received.is_remote
    # The message carries its PRODUCER span's context (a child of "dispatch" when the
    # process records spans, "dispatch" itself when it does not): the same trace.
    assert received.trace_id == sent_context.trace_id


async def test_publish_outside_a_span_carries_no_trace_context(bus: Bus, topic: str) -> None:
    sub = await bus.subscribe(topic, "no-trace", task_pb2.ScoringTask)
    publisher = await bus.publisher(topic, task_pb2.ScoringTask)

    await publisher.publish(scoring_task(1))
    envelope = await receive(sub)
    await sub.ack(envelope)

    assert "traceparent" not in envelope.properties
    assert not trace.get_current_span(envelope.trace_context()).get_span_context().is_valid


async def test_a_burst_takes_what_is_already_there_and_waits_only_for_the_first(
    bus: Bus, topic: str
) -> None:
    subscription = await bus.subscribe(topic, "burst", task_pb2.ScoringTask)
    publisher = await bus.publisher(topic, task_pb2.ScoringTask)
    # Published together: on Pulsar they share one batch (one broker entry).
    await asyncio.gather(*(publisher.publish(scoring_task(n)) for n in range(10)))
    await publisher.publish_bytes(UNDECODABLE, {TYPE_PROPERTY: "rendezvous.v1.ScoringTask"})
    await publisher.publish(scoring_task(10))

    taken: list[str] = []
    deadline = asyncio.get_running_loop().time() + ARRIVES_S
    while len(taken) < 11 and asyncio.get_running_loop().time() < deadline:
        burst = await asyncio.wait_for(subscription.receive_burst(4), ARRIVES_S)
        assert 1 <= len(burst) <= 4
        for envelope in burst:
            taken.append(envelope.message.request.request_id)
            await subscription.ack(envelope)

    # Every message once, in order; the undecodable one went to the dead-letter topic.
    assert taken == [scoring_task(n).request.request_id for n in range(11)]
    assert subscription.dead_lettered == 1
    # Nothing is there any more: the next burst waits for the next message.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(subscription.receive_burst(4), 0.3)
    await publisher.publish(scoring_task(11))
    [last] = await asyncio.wait_for(subscription.receive_burst(4), ARRIVES_S)
    assert last.message.request.request_id == scoring_task(11).request.request_id


async def test_shared_subscription_splits_messages_and_delivers_each_once(
    bus: Bus, topic: str
) -> None:
    replicas = [
        await bus.subscribe(topic, "runners", task_pb2.ScoringTask, mode=SubscriptionMode.SHARED)
        for _ in range(2)
    ]
    publisher = await bus.publisher(topic, task_pb2.ScoringTask)
    got: list[list[str]] = [[], []]
    all_in = asyncio.Event()

    async def replica(index: int) -> None:
        sub = replicas[index]
        while True:
            envelope = await sub.receive()
            got[index].append(envelope.message.request.request_id)
            await sub.ack(envelope)
            if sum(len(ids) for ids in got) >= SHARED_MESSAGES:
                all_in.set()
            await asyncio.sleep(WORK_S)  # the work a model runner does

    workers = [asyncio.create_task(replica(i)) for i in range(2)]
    try:
        for n in range(SHARED_MESSAGES):
            await publisher.publish(scoring_task(n))
        await asyncio.wait_for(all_in.wait(), RECEIVE_TIMEOUT_S)
        await asyncio.sleep(QUIET_S)  # room for a duplicate to show up, if there were one
    finally:
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)

    expected = {f"req-{n:04d}" for n in range(SHARED_MESSAGES)}
    delivered = got[0] + got[1]
    assert sorted(delivered) == sorted(expected), "every message exactly once"
    assert got[0] and got[1], f"both replicas share the load: {len(got[0])}/{len(got[1])}"

    # Acknowledged means done: a consumer that joins the subscription later gets nothing.
    for sub in replicas:
        await sub.close()
    latecomer = await bus.subscribe(topic, "runners", task_pb2.ScoringTask)
    await assert_nothing_more(latecomer)


async def test_exclusive_subscription_refuses_a_second_consumer(bus: Bus, topic: str) -> None:
    owner = await bus.subscribe(
        topic, "collector", task_pb2.ScoringTask, mode=SubscriptionMode.EXCLUSIVE
    )

    with pytest.raises(BusError):
        await bus.subscribe(
            topic, "collector", task_pb2.ScoringTask, mode=SubscriptionMode.EXCLUSIVE
        )

    # Once the owner leaves, the subscription can be taken again, and it still works.
    await owner.close()
    successor = await bus.subscribe(
        topic, "collector", task_pb2.ScoringTask, mode=SubscriptionMode.EXCLUSIVE
    )
    publisher = await bus.publisher(topic, task_pb2.ScoringTask)
    await publisher.publish(scoring_task(1))
    envelope = await receive(successor)
    await successor.ack(envelope)
    assert envelope.message.request.request_id == "req-0001"


async def test_nack_redelivers_with_incremented_redelivery_count(bus: Bus, topic: str) -> None:
    sub = await bus.subscribe(topic, "retry", task_pb2.ScoringTask)
    publisher = await bus.publisher(topic, task_pb2.ScoringTask)
    sent = scoring_task(1)
    await publisher.publish(sent, key="k")

    first = await receive(sub)
    await sub.nack(first)
    second = await receive(sub)
    await sub.ack(second)

    assert first.redelivery_count == 0
    assert second.redelivery_count == 1
    assert second.message == sent
    assert second.key == "k"
    await assert_nothing_more(sub)


async def test_receive_cancelled_by_a_timeout_loses_no_message(bus: Bus, topic: str) -> None:
    # Services poll with a timeout (to notice a stop request); the message that arrives
    # after a timed-out receive must go to the next receive, not vanish.
    sub = await bus.subscribe(topic, "polling", task_pb2.ScoringTask)
    publisher = await bus.publisher(topic, task_pb2.ScoringTask)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(sub.receive(), 0.2)

    await publisher.publish(scoring_task(1))
    envelope = await asyncio.wait_for(sub.receive(), ARRIVES_S)
    await sub.ack(envelope)

    assert envelope.message.request.request_id == "req-0001"


async def test_undecodable_and_mistyped_messages_go_to_the_dead_letter_topic(
    bus: Bus, topic: str
) -> None:
    sub = await bus.subscribe(topic, "enricher", task_pb2.ScoringTask)
    publisher = await bus.publisher(topic, task_pb2.ScoringTask)
    mistyped = task_pb2.PredictionEvent(request_id="req-x", model="m")
    await publisher.publish_bytes(
        UNDECODABLE, {TYPE_PROPERTY: "rendezvous.v1.ScoringTask"}, key="bad-bytes"
    )
    await publisher.publish(mistyped, key="wrong-type")  # type: ignore[arg-type]
    await publisher.publish(scoring_task(1))

    envelope = await receive(sub)  # the consumer goes on past both
    await sub.ack(envelope)

    assert envelope.message.request.request_id == "req-0001"
    assert sub.dead_lettered == 2
    undecodable, wrong_type = await read_raw(bus, Topics.dead_letter(topic), 2)
    assert undecodable.data == UNDECODABLE
    assert undecodable.key == "bad-bytes"
    assert "do not parse" in undecodable.properties[DEAD_LETTER_REASON]
    assert undecodable.properties[ORIGINAL_TOPIC] == topic
    assert wrong_type.data == mistyped.SerializeToString()
    assert wrong_type.key == "wrong-type"
    assert "rendezvous.v1.PredictionEvent" in wrong_type.properties[DEAD_LETTER_REASON]
    assert wrong_type.properties[TYPE_PROPERTY] == "rendezvous.v1.PredictionEvent"

    # Dead letters were acknowledged: they never come back; the next good message does.
    await publisher.publish(scoring_task(2))
    envelope = await receive(sub)
    await sub.ack(envelope)
    assert envelope.message.request.request_id == "req-0002"
    assert sub.dead_lettered == 2
    await assert_nothing_more(sub)


@pytest.mark.parametrize(
    "mode", [SubscriptionMode.SHARED, SubscriptionMode.FAILOVER, SubscriptionMode.EXCLUSIVE]
)
async def test_handler_failing_beyond_max_redeliveries_ends_on_the_dead_letter_topic(
    bus: Bus, topic: str, mode: SubscriptionMode
) -> None:
    # Shared: on Pulsar this is the client's native dead-letter policy; elsewhere the
    # adapter counts its own nacks (Pulsar reports redelivery_count 0 outside Shared).
    sub = await bus.subscribe(topic, "poison", task_pb2.ScoringTask, mode=mode)
    publisher = await bus.publisher(topic, task_pb2.ScoringTask)
    poison = scoring_task(666)
    await publisher.publish(poison, key="poison", properties={"objective": "contract"})

    deliveries: list[int] = []
    for _ in range(MAX_REDELIVERIES + 1):
        envelope = await receive(sub)
        assert envelope.message == poison
        deliveries.append(envelope.redelivery_count)
        await sub.nack(envelope)  # the handler failed again

    # The first delivery plus `max_redeliveries` redeliveries; the last nack dead-letters it.
    assert deliveries == list(range(MAX_REDELIVERIES + 1))
    (dead,) = await read_raw(bus, Topics.dead_letter(topic), 1)
    assert dead.data == poison.SerializeToString()
    assert dead.key == "poison"
    assert dead.properties[TYPE_PROPERTY] == "rendezvous.v1.ScoringTask"
    assert dead.properties["objective"] == "contract"
    # Documented difference: Pulsar's native policy adds its own provenance properties
    # (REAL_TOPIC, ORIGIN_MESSAGE_ID) and no rdv-dead-letter-reason; the twin adds neither.

    # The consumer goes on: the next message is the next good one, and the poison never
    # comes back.
    await publisher.publish(scoring_task(1))
    envelope = await receive(sub)
    await sub.ack(envelope)
    assert envelope.message.request.request_id == "req-0001"
    await assert_nothing_more(sub)


async def test_failover_subscription_has_one_active_consumer(bus: Bus, topic: str) -> None:
    mode = SubscriptionMode.FAILOVER
    first = await bus.subscribe(topic, "collector", task_pb2.ScoringTask, mode=mode)
    second = await bus.subscribe(topic, "collector", task_pb2.ScoringTask, mode=mode)
    publisher = await bus.publisher(topic, task_pb2.ScoringTask)
    # The active consumer gets the messages even while it is busy; the standby waits.
    got: dict[int, list[str]] = {0: [], 1: []}

    async def drain(index: int, sub: Subscription[task_pb2.ScoringTask]) -> None:
        while True:
            envelope = await sub.receive()
            got[index].append(envelope.message.request.request_id)
            await sub.ack(envelope)
            await asyncio.sleep(WORK_S)  # the delivery the collector makes

    workers = [asyncio.create_task(drain(i, sub)) for i, sub in enumerate((first, second))]
    try:
        for n in range(10):
            await publisher.publish(scoring_task(n))
        for _ in range(int(RECEIVE_TIMEOUT_S / 0.1)):
            if len(got[0]) + len(got[1]) >= 10:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(QUIET_S)
    finally:
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)

    # One active consumer at a time: whoever got the first message got an unbroken run of
    # them in order, and the other (if the broker switched the active consumer, which it may
    # do when a consumer joins) got the rest, also in order. Never interleaved.
    expected = [f"req-{n:04d}" for n in range(10)]
    active, standby = (got[0], got[1]) if got[0][:1] == ["req-0000"] else (got[1], got[0])
    assert active + standby == expected


async def test_unacked_messages_of_a_closed_consumer_go_to_the_others(bus: Bus, topic: str) -> None:
    # A model runner that dies mid-task: its replica must get the task.
    crashing = await bus.subscribe(topic, "runners", task_pb2.ScoringTask)
    publisher = await bus.publisher(topic, task_pb2.ScoringTask)
    await publisher.publish(scoring_task(1))
    taken = await receive(crashing)
    assert taken.message.request.request_id == "req-0001"

    replica = await bus.subscribe(topic, "runners", task_pb2.ScoringTask)
    await crashing.close()  # without acknowledging
    envelope = await asyncio.wait_for(replica.receive(), ARRIVES_S)
    await replica.ack(envelope)

    assert envelope.message.request.request_id == "req-0001"


async def test_reader_from_earliest_reads_everything_in_order(bus: Bus, topic: str) -> None:
    publisher = await bus.publisher(topic, task_pb2.ScoringTask)
    for n in range(READER_MESSAGES):
        await publisher.publish(scoring_task(n), key=f"objective-{n % 3}")

    reader = await bus.reader(topic, task_pb2.ScoringTask, start="earliest")
    try:
        read = [
            (await asyncio.wait_for(reader.read_next(), RECEIVE_TIMEOUT_S)).message
            for _ in range(READER_MESSAGES)
        ]
        assert not await reader.has_message_available()
    finally:
        await reader.close()

    assert [m.request.request_id for m in read] == [f"req-{n:04d}" for n in range(READER_MESSAGES)]
    assert [m.request.features["x"].number_value for m in read] == list(range(READER_MESSAGES))


async def test_reader_from_latest_sees_only_later_messages(bus: Bus, topic: str) -> None:
    publisher = await bus.publisher(topic, task_pb2.ScoringTask)
    await publisher.publish(scoring_task(1))
    reader = await bus.reader(topic, task_pb2.ScoringTask, start="latest")
    try:
        await publisher.publish(scoring_task(2))
        envelope = await asyncio.wait_for(reader.read_next(), RECEIVE_TIMEOUT_S)
    finally:
        await reader.close()
    assert envelope.message.request.request_id == "req-0002"


async def test_reader_skips_and_counts_undecodable_messages(bus: Bus, topic: str) -> None:
    publisher = await bus.publisher(topic, task_pb2.ScoringTask)
    await publisher.publish_bytes(UNDECODABLE, {TYPE_PROPERTY: "rendezvous.v1.ScoringTask"})
    await publisher.publish(scoring_task(1))

    reader = await bus.reader(topic, task_pb2.ScoringTask)
    try:
        envelope = await asyncio.wait_for(reader.read_next(), RECEIVE_TIMEOUT_S)
    finally:
        await reader.close()

    assert envelope.message.request.request_id == "req-0001"
    assert reader.skipped == 1


async def test_publish_to_an_unavailable_twin_times_out(memory_bus: MemoryBus) -> None:
    # Twin only: the broker-down case of PulsarBus is tested on the scoring path, where
    # the broker is really stopped.
    topic = f"persistent://public/default/rdv.contract.unavailable.{uuid.uuid4().hex[:8]}"
    publisher = await memory_bus.publisher(topic, task_pb2.ScoringTask)
    memory_bus.unavailable = True

    started = asyncio.get_running_loop().time()
    with pytest.raises(PublishTimeout):
        await publisher.publish(scoring_task(1), timeout=0.05)
    elapsed = asyncio.get_running_loop().time() - started

    assert elapsed < 1.0
    assert memory_bus.messages(topic) == []
