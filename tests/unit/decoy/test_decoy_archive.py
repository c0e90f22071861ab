"""The decoy: what an archive record keeps, and the decoy over MemoryBus."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rendezvous.v1 import common_pb2, scoring_pb2, task_pb2

from services.core.bus import TYPE_PROPERTY, BusError
from services.core.protos import set_values, timestamp_from_ns, values_dict
from services.core.settings import PulsarSettings
from services.decoy.app import DecoyComponent, default_archiving_denied
from services.decoy.archive import archive_record
from services.decoy.settings import DecoySettings
from tests.fakes.memory_bus import MemoryBus
from tests.helpers import metric_value, published, until

SECOND = 1_000_000_000
SUBJECT_PATH = "task.task.request.subject_id"


def _enriched(
    objective: str,
    request_id: str,
    *,
    subject: str = "alice",
    archiving: common_pb2.ConsentDecision.ValueType = common_pb2.CONSENT_DECISION_GRANTED,
    deadline_s: float = 5.0,
) -> task_pb2.EnrichedTask:
    request = scoring_pb2.ScoreRequest(
        objective=objective,
        request_id=request_id,
        subject_id=subject,
        consent=common_pb2.Consent(archiving=archiving),
    )
    set_values(request.features, {"bmi": 0.05, "age": 0.01})
    request.payload.data = b"raw"
    request.payload.content_type = "application/octet-stream"
    task = task_pb2.EnrichedTask(
        task=task_pb2.ScoringTask(
            request=request,
            mailbox_id=f"mb-{request_id}",
            deadline=timestamp_from_ns(time.time_ns() + int(deadline_s * SECOND)),
        ),
        enriched_time=timestamp_from_ns(time.time_ns()),
    )
    set_values(task.subject_state, {"event_count": 3, "last_event_kind": "buy"})
    return task


def test_the_record_keeps_the_task_with_the_subject_redacted() -> None:
    task = _enriched("o", "r1")
    record = archive_record(task, default_denied=False)

    assert record.redacted_fields == [SUBJECT_PATH]
    assert record.task.task.request.subject_id == ""
    assert not record.features_dropped
    assert values_dict(record.task.task.request.features) == {"bmi": 0.05, "age": 0.01}
    assert record.task.task.request.payload.data == b"raw"
    assert values_dict(record.task.subject_state) == {"event_count": 3, "last_event_kind": "buy"}
    assert record.HasField("archived_time")
    # Everything else is exactly what the models saw.
    expected = task_pb2.EnrichedTask()
    expected.CopyFrom(task)
    expected.task.request.ClearField("subject_id")
    assert record.task == expected
    # The task given is not changed.
    assert task.task.request.subject_id == "alice"


def test_denied_archiving_drops_features_payload_and_state() -> None:
    task = _enriched("o", "r1", archiving=common_pb2.CONSENT_DECISION_DENIED)
    record = archive_record(task, default_denied=False)

    assert record.features_dropped
    assert len(record.task.task.request.features) == 0
    assert not record.task.task.request.HasField("payload")
    assert len(record.task.subject_state) == 0
    assert record.redacted_fields == [SUBJECT_PATH]
    assert record.task.task.request.request_id == "r1"
    assert record.task.task.mailbox_id == "mb-r1"


def test_unspecified_consent_follows_the_objective_default() -> None:
    task = _enriched("o", "r1", archiving=common_pb2.CONSENT_DECISION_UNSPECIFIED)
    assert archive_record(task, default_denied=True).features_dropped
    assert not archive_record(task, default_denied=False).features_dropped
    granted = _enriched("o", "r2", archiving=common_pb2.CONSENT_DECISION_GRANTED)
    assert not archive_record(granted, default_denied=True).features_dropped


def test_nothing_is_listed_when_there_was_no_subject() -> None:
    record = archive_record(_enriched("o", "r1", subject=""), default_denied=False)
    assert list(record.redacted_fields) == []


# --------------------------------------------------------------------------- over MemoryBus


def _archived(bus: MemoryBus, objective: str) -> list[task_pb2.ArchiveRecord]:
    return published(bus, bus.topics.archive(objective), task_pb2.ArchiveRecord)


def _unacked(component: DecoyComponent) -> int:
    """Tasks the decoy received and has not acknowledged (or nacked) yet."""
    subscription = component._subscription
    assert subscription is not None
    return len(subscription._unacked)  # type: ignore[attr-defined]


@pytest.fixture
async def decoy(tmp_path: Path) -> AsyncIterator[tuple[DecoyComponent, MemoryBus, str]]:
    pulsar = PulsarSettings(send_timeout_s=0.2, negative_ack_redelivery_delay_ms=50)
    bus = MemoryBus(pulsar)
    objective = f"t{uuid.uuid4().hex[:10]}"
    settings = DecoySettings(
        objective=objective,
        listen="127.0.0.1:0",
        pulsar=pulsar,
        ready_file=tmp_path / "ready.json",
        shutdown_grace_s=1.0,
    )
    component = DecoyComponent(settings, bus=bus)
    await component.start()
    try:
        yield component, bus, objective
    finally:
        await component.stop()


async def test_every_task_is_archived_redacted_and_keyed_by_request(
    decoy: tuple[DecoyComponent, MemoryBus, str], tmp_path: Path
) -> None:
    component, bus, objective = decoy
    assert json.loads((tmp_path / "ready.json").read_text())["endpoint"] == component.endpoint
    async with grpc.aio.insecure_channel(component.endpoint) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING

    kept = {"objective": objective, "features_dropped": "false"}
    dropped = {"objective": objective, "features_dropped": "true"}
    tasks = await bus.publisher(bus.topics.tasks(objective), task_pb2.EnrichedTask)
    await tasks.publish(_enriched(objective, "granted"), key="granted")
    await tasks.publish(
        _enriched(objective, "denied", archiving=common_pb2.CONSENT_DECISION_DENIED), key="denied"
    )
    # Expired before the decoy saw it: archived all the same (audit and replay).
    await tasks.publish(_enriched(objective, "expired", deadline_s=-1.0), key="expired")

    await until(lambda: len(_archived(bus, objective)) == 3)
    raws = bus.messages(bus.topics.archive(objective))
    records = {record.task.task.request.request_id: record for record in _archived(bus, objective)}
    assert sorted(records) == ["denied", "expired", "granted"]
    assert sorted(raw.key or "" for raw in raws) == ["denied", "expired", "granted"]
    assert all(raw.properties[TYPE_PROPERTY] == "rendezvous.v1.ArchiveRecord" for raw in raws)
    for record in records.values():
        assert record.task.task.request.subject_id == ""
        assert list(record.redacted_fields) == [SUBJECT_PATH]
    assert not records["granted"].features_dropped
    assert values_dict(records["granted"].task.task.request.features) == {
        "bmi": 0.05,
        "age": 0.01,
    }
    assert records["denied"].features_dropped
    assert len(records["denied"].task.task.request.features) == 0
    assert len(records["denied"].task.subject_state) == 0
    assert metric_value("rdv_decoy_archived_total", kept) == 2
    assert metric_value("rdv_decoy_archived_total", dropped) == 1
    assert component.archived == 3


async def test_warm_up_tasks_are_acknowledged_and_never_archived(
    decoy: tuple[DecoyComponent, MemoryBus, str],
) -> None:
    component, bus, objective = decoy
    tasks = await bus.publisher(bus.topics.tasks(objective), task_pb2.EnrichedTask)
    warm = _enriched(objective, "warm")
    warm.task.warmup = True
    await tasks.publish(warm, key="warm")
    await tasks.publish(_enriched(objective, "real"), key="real")

    await until(lambda: len(_archived(bus, objective)) == 1)
    assert [r.task.task.request.request_id for r in _archived(bus, objective)] == ["real"]
    assert component.archived == 1
    # Both acknowledged: nothing waits for redelivery.
    subscription = component._subscription
    assert subscription is not None
    await until(lambda: not subscription._unacked)  # type: ignore[attr-defined]


async def test_a_task_sampled_out_of_the_archive_is_acknowledged_not_archived(
    decoy: tuple[DecoyComponent, MemoryBus, str],
) -> None:
    component, bus, objective = decoy
    tasks = await bus.publisher(bus.topics.tasks(objective), task_pb2.EnrichedTask)
    sampled_out = _enriched(objective, "out")
    sampled_out.task.skip_archive = True
    await tasks.publish(sampled_out, key="out")
    await tasks.publish(_enriched(objective, "in"), key="in")

    await until(lambda: len(_archived(bus, objective)) == 1)
    assert [r.task.task.request.request_id for r in _archived(bus, objective)] == ["in"]
    assert component.archived == 1
    archiver = component.archiver
    assert archiver is not None
    await until(lambda: archiver.sampled_out == 1)
    assert (
        metric_value(
            "rdv_decoy_not_archived_total", {"objective": objective, "reason": "sampled_out"}
        )
        == 1
    )
    subscription = component._subscription
    assert subscription is not None
    await until(lambda: not subscription._unacked)  # type: ignore[attr-defined]


async def test_an_undecodable_task_goes_to_the_dlq_and_the_next_is_archived(
    decoy: tuple[DecoyComponent, MemoryBus, str],
) -> None:
    _, bus, objective = decoy
    topic = bus.topics.tasks(objective)
    tasks = await bus.publisher(topic, task_pb2.EnrichedTask)
    await tasks.publish_bytes(b"\xff\xfe", {TYPE_PROPERTY: "rendezvous.v1.EnrichedTask"}, "bad")
    await tasks.publish(_enriched(objective, "good"), key="good")

    await until(lambda: len(_archived(bus, objective)) == 1)
    assert _archived(bus, objective)[0].task.task.request.request_id == "good"
    assert [raw.data for raw in bus.messages(bus.topics.dead_letter(topic))] == [b"\xff\xfe"]


async def test_a_failed_archive_publish_is_nacked_and_redelivered(
    decoy: tuple[DecoyComponent, MemoryBus, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    component, bus, objective = decoy
    assert component.archiver is not None
    archive = component.archiver.publisher
    original = archive._send
    calls: list[int] = []

    async def refuse_once(data: bytes, properties: dict[str, str], key: str | None) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise BusError("the broker refused the message")
        await original(data, properties, key)

    monkeypatch.setattr(archive, "_send", refuse_once)
    failures = {"objective": objective}
    before = metric_value("rdv_decoy_archive_failures_total", failures)
    tasks = await bus.publisher(bus.topics.tasks(objective), task_pb2.EnrichedTask)
    await tasks.publish(_enriched(objective, "r1"), key="r1")

    await until(lambda: len(_archived(bus, objective)) == 1)
    assert len(calls) == 2
    assert metric_value("rdv_decoy_archive_failures_total", failures) == before + 1


async def test_a_task_that_comes_again_is_acknowledged_without_a_second_record(
    decoy: tuple[DecoyComponent, MemoryBus, str],
) -> None:
    # As after a broker killed before it stored the acknowledgement: the same task again.
    component, bus, objective = decoy
    skipped = {"objective": objective}
    before = metric_value("rdv_decoy_redeliveries_skipped_total", skipped)
    tasks = await bus.publisher(bus.topics.tasks(objective), task_pb2.EnrichedTask)
    await tasks.publish(_enriched(objective, "r1"), key="r1")
    await until(lambda: len(_archived(bus, objective)) == 1)

    await tasks.publish(_enriched(objective, "r1"), key="r1")
    await tasks.publish(_enriched(objective, "r2"), key="r2")
    await until(lambda: len(_archived(bus, objective)) == 2)
    await until(lambda: metric_value("rdv_decoy_redeliveries_skipped_total", skipped) > before)

    archived = [r.task.task.request.request_id for r in _archived(bus, objective)]
    assert archived == ["r1", "r2"]
    assert metric_value("rdv_decoy_redeliveries_skipped_total", skipped) == before + 1
    await until(lambda: _unacked(component) == 0)


async def test_a_task_that_comes_again_while_archived_waits_for_that_record(
    decoy: tuple[DecoyComponent, MemoryBus, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    component, bus, objective = decoy
    assert component.archiver is not None
    archive = component.archiver.publisher
    original = archive._send
    release = asyncio.Event()
    sends: list[int] = []

    async def slow(data: bytes, properties: dict[str, str], key: str | None) -> None:
        sends.append(1)
        await release.wait()
        await original(data, properties, key)

    monkeypatch.setattr(archive, "_send", slow)
    tasks = await bus.publisher(bus.topics.tasks(objective), task_pb2.EnrichedTask)
    await tasks.publish(_enriched(objective, "r1"), key="r1")
    await until(lambda: len(sends) == 1)
    await tasks.publish(_enriched(objective, "r1"), key="r1")
    await until(lambda: component.archiver is not None and component.archiver.once.skipped == 1)
    release.set()

    await until(lambda: len(_archived(bus, objective)) == 1 and _unacked(component) == 0)
    assert len(sends) == 1


async def test_a_record_waits_for_the_broker_instead_of_failing(
    decoy: tuple[DecoyComponent, MemoryBus, str],
) -> None:
    # The outage outlasts the send timeout (0.2 s): the held record is neither failed nor
    # redelivered (which could archive it twice); it goes out when the broker is back.
    component, bus, objective = decoy
    failures = {"objective": objective}
    before = metric_value("rdv_decoy_archive_failures_total", failures)
    tasks = await bus.publisher(bus.topics.tasks(objective), task_pb2.EnrichedTask)
    await tasks.publish(_enriched(objective, "r1"), key="r1")
    bus.unavailable = True  # before the decoy got to it (the publish above did not yield)
    await asyncio.sleep(0.6)
    assert _archived(bus, objective) == []
    assert _unacked(component) == 1

    bus.unavailable = False
    await until(lambda: len(_archived(bus, objective)) == 1 and _unacked(component) == 0)
    assert metric_value("rdv_decoy_archive_failures_total", failures) == before


def test_the_mesh_default_consent_applies(tmp_path: Path) -> None:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(
        """
objectives:
  strict:
    sla_ms: 50
    models: [{name: m, role: incumbent}]
    policy: [{until_ms: 40, accept: [m]}]
    default_consent: {archiving: denied}
"""
    )
    assert default_archiving_denied(DecoySettings(objective="strict", mesh_file=mesh))
    # The mesh wins over the setting for an objective it names...
    assert default_archiving_denied(
        DecoySettings(objective="strict", mesh_file=mesh, default_archiving="granted")
    )
    # ...and an objective it does not name falls back to the setting.
    assert not default_archiving_denied(DecoySettings(objective="other", mesh_file=mesh))
    assert default_archiving_denied(
        DecoySettings(objective="other", mesh_file=mesh, default_archiving="denied")
    )
