"""The enricher over MemoryBus: Enrich on a real gRPC server, and the Pulsar path."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from rendezvous.v1 import enricher_pb2, enricher_pb2_grpc, objective_pb2, scoring_pb2, task_pb2

from services.core.bus import TYPE_PROPERTY, BusError
from services.core.errors import Unavailable
from services.core.protos import timestamp_from_ns, values_dict
from services.core.server import GrpcServer
from services.core.settings import PulsarSettings
from services.enricher.app import EnricherComponent
from services.enricher.enrich import Enricher
from services.enricher.service import SERVICE_NAME, EnricherServicer, registrar
from services.enricher.settings import EnricherSettings
from services.enricher.store import SubjectStore
from tests.fakes.memory_bus import MemoryBus
from tests.helpers import metric_value, published, until

SECOND = 1_000_000_000


def _sdk_tracing() -> None:
    # Real spans (not the no-op API) so a test can tell a child span from its parent.
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        trace.set_tracer_provider(TracerProvider())


def _objective() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def _settings(
    objective: str, tmp_path: Path | None = None, pulsar: PulsarSettings | None = None
) -> EnricherSettings:
    return EnricherSettings(
        objectives=[objective],
        listen="127.0.0.1:0",
        instance=f"test-{uuid.uuid4().hex[:6]}",
        pulsar=pulsar or PulsarSettings(send_timeout_s=0.2, negative_ack_redelivery_delay_ms=50),
        ready_file=tmp_path / "ready.json" if tmp_path is not None else None,
        shutdown_grace_s=1.0,
    )


def _event(objective: str, subject: str, kind: str, age_s: float) -> task_pb2.SubjectEvent:
    return task_pb2.SubjectEvent(
        subject_id=subject,
        objective=objective,
        kind=kind,
        event_time=timestamp_from_ns(time.time_ns() - int(age_s * SECOND)),
    )


def _task(
    objective: str, request_id: str, subject: str, deadline_s: float = 5.0
) -> task_pb2.ScoringTask:
    return task_pb2.ScoringTask(
        request=scoring_pb2.ScoreRequest(
            objective=objective, request_id=request_id, subject_id=subject
        ),
        mailbox_id=f"mb-{request_id}",
        return_address="persistent://public/default/rdv.predictions.test",
        received_time=timestamp_from_ns(time.time_ns()),
        deadline=timestamp_from_ns(time.time_ns() + int(deadline_s * SECOND)),
    )


def _tasks_out(bus: MemoryBus, objective: str) -> list[task_pb2.EnrichedTask]:
    return published(bus, bus.topics.tasks(objective), task_pb2.EnrichedTask)


async def _publish_events(bus: MemoryBus, objective: str, subject: str) -> None:
    events = await bus.publisher(bus.topics.events(objective), task_pb2.SubjectEvent)
    for kind, age in [("view", 30.0), ("view", 20.0), ("buy", 10.0)]:
        await events.publish(_event(objective, subject, kind, age), key=subject)


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[tuple[EnricherComponent, MemoryBus, str]]:
    bus = MemoryBus(PulsarSettings(send_timeout_s=0.2, negative_ack_redelivery_delay_ms=50))
    objective = _objective()
    await _publish_events(bus, objective, "alice")
    component = EnricherComponent(_settings(objective, tmp_path), bus=bus)
    await component.start()
    try:
        yield component, bus, objective
    finally:
        await component.stop()


async def test_enrich_returns_the_state_of_events_published_before(
    running: tuple[EnricherComponent, MemoryBus, str], tmp_path: Path
) -> None:
    component, _, objective = running
    ready = json.loads((tmp_path / "ready.json").read_text())
    assert ready["endpoint"] == component.endpoint

    async with grpc.aio.insecure_channel(component.endpoint) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING

        stub = enricher_pb2_grpc.EnricherServiceStub(channel)
        task = _task(objective, "r1", "alice")
        response = await stub.Enrich(enricher_pb2.EnrichRequest(task=task))

    enriched = response.enriched_task
    assert enriched.task == task
    state = values_dict(enriched.subject_state)
    assert state["event_count"] == 3
    assert state["last_event_kind"] == "buy"
    assert state["recent_kinds"] == ["buy", "view", "view"]
    assert state["counts_by_kind"] == {"view": 2, "buy": 1}
    assert 9.0 < state["last_event_age_s"] < 15.0


async def test_enrich_follows_live_events(
    running: tuple[EnricherComponent, MemoryBus, str],
) -> None:
    component, bus, objective = running
    events = await bus.publisher(bus.topics.events(objective), task_pb2.SubjectEvent)
    await events.publish(_event(objective, "alice", "return", 0.0), key="alice")
    await until(lambda: component.store.state(objective, "alice", 0)["event_count"] == 4)

    async with grpc.aio.insecure_channel(component.endpoint) as channel:
        response = await enricher_pb2_grpc.EnricherServiceStub(channel).Enrich(
            enricher_pb2.EnrichRequest(task=_task(objective, "r2", "alice"))
        )
    assert values_dict(response.enriched_task.subject_state)["last_event_kind"] == "return"


async def test_enrich_without_task_is_invalid_argument_with_field(
    running: tuple[EnricherComponent, MemoryBus, str],
) -> None:
    component, _, _ = running
    async with grpc.aio.insecure_channel(component.endpoint) as channel:
        stub = enricher_pb2_grpc.EnricherServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Enrich(enricher_pb2.EnrichRequest())
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(error)
    assert status is not None
    violations: list[str] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations.extend(v.field for v in bad_request.field_violations)
    assert violations == ["task"]


async def test_enrich_of_an_objective_not_served_is_not_found(
    running: tuple[EnricherComponent, MemoryBus, str],
) -> None:
    component, _, _ = running
    async with grpc.aio.insecure_channel(component.endpoint) as channel:
        stub = enricher_pb2_grpc.EnricherServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Enrich(enricher_pb2.EnrichRequest(task=_task("elsewhere", "r", "alice")))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_enrich_before_the_state_caught_up_is_unavailable() -> None:
    servicer = EnricherServicer(Enricher(["o"], SubjectStore(10, 3, 8)), lambda: False)
    server = GrpcServer(
        service_names=[SERVICE_NAME], registrars=[registrar(servicer)], tcp_address="127.0.0.1:0"
    )
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.endpoint) as channel:
            stub = enricher_pb2_grpc.EnricherServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Enrich(enricher_pb2.EnrichRequest(task=_task("o", "r", "alice")))
    finally:
        await server.stop(0.5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert (
        caught.value.details()
        == Unavailable("the subject state is still catching up with the events topic").message
    )


async def test_a_task_comes_out_enriched_on_the_tasks_topic(
    running: tuple[EnricherComponent, MemoryBus, str],
) -> None:
    _sdk_tracing()
    _, bus, objective = running
    requests = await bus.publisher(bus.topics.requests(objective), task_pb2.ScoringTask)
    with trace.get_tracer("test").start_as_current_span("rendezvous.score") as parent:
        await requests.publish(_task(objective, "r1", "alice"), key="r1")
    parent_context = parent.get_span_context()

    await until(lambda: len(_tasks_out(bus, objective)) == 1)
    raw = bus.messages(bus.topics.tasks(objective))[0]
    enriched = _tasks_out(bus, objective)[0]
    assert raw.key == "r1"
    assert raw.properties[TYPE_PROPERTY] == "rendezvous.v1.EnrichedTask"
    assert enriched.task.request.request_id == "r1"
    assert enriched.task.mailbox_id == "mb-r1"
    state = values_dict(enriched.subject_state)
    assert state["event_count"] == 3
    assert state["recent_kinds"] == ["buy", "view", "view"]
    # The trace continues: same trace, a new (child) span.
    _, trace_id, span_id, _ = raw.properties["traceparent"].split("-")
    assert int(trace_id, 16) == parent_context.trace_id
    assert int(span_id, 16) != parent_context.span_id


async def test_the_grpc_and_pulsar_paths_give_the_same_state(
    running: tuple[EnricherComponent, MemoryBus, str],
) -> None:
    component, bus, objective = running
    requests = await bus.publisher(bus.topics.requests(objective), task_pb2.ScoringTask)
    await requests.publish(_task(objective, "r1", "alice"), key="r1")
    await until(lambda: len(_tasks_out(bus, objective)) == 1)
    async with grpc.aio.insecure_channel(component.endpoint) as channel:
        response = await enricher_pb2_grpc.EnricherServiceStub(channel).Enrich(
            enricher_pb2.EnrichRequest(task=_task(objective, "r2", "alice"))
        )
    via_pulsar = values_dict(_tasks_out(bus, objective)[0].subject_state)
    via_grpc = values_dict(response.enriched_task.subject_state)
    # The age grows with the clock; everything else is the same.
    assert abs(via_pulsar.pop("last_event_age_s") - via_grpc.pop("last_event_age_s")) < 1.0
    assert via_pulsar == via_grpc


async def test_an_expired_task_is_forwarded_for_the_archive_and_counted(
    running: tuple[EnricherComponent, MemoryBus, str],
) -> None:
    _, bus, objective = running
    expired_before = metric_value(
        "rdv_enricher_tasks_total", {"objective": objective, "outcome": "expired"}
    )
    requests = await bus.publisher(bus.topics.requests(objective), task_pb2.ScoringTask)
    await requests.publish(_task(objective, "old", "alice", deadline_s=-0.1), key="old")
    await requests.publish(_task(objective, "new", "alice"), key="new")

    # Runners skip the expired one; the decoy archives both.
    await until(lambda: len(_tasks_out(bus, objective)) == 2)
    assert [t.task.request.request_id for t in _tasks_out(bus, objective)] == ["old", "new"]
    expired = metric_value(
        "rdv_enricher_tasks_total", {"objective": objective, "outcome": "expired"}
    )
    assert expired == expired_before + 1


async def test_an_undecodable_request_goes_to_the_dlq_and_the_next_flows(
    running: tuple[EnricherComponent, MemoryBus, str],
) -> None:
    _, bus, objective = running
    topic = bus.topics.requests(objective)
    raw_publisher = await bus.publisher(topic, task_pb2.ScoringTask)
    await raw_publisher.publish_bytes(
        b"\xff\xff\xff not a task", {TYPE_PROPERTY: "rendezvous.v1.ScoringTask"}, key="bad"
    )
    await raw_publisher.publish(_task(objective, "good", "alice"), key="good")

    await until(lambda: len(_tasks_out(bus, objective)) == 1)
    assert _tasks_out(bus, objective)[0].task.request.request_id == "good"
    dead = bus.messages(bus.topics.dead_letter(topic))
    assert [raw.data for raw in dead] == [b"\xff\xff\xff not a task"]


def _refuse_first_publish(
    component: EnricherComponent, objective: str, monkeypatch: pytest.MonkeyPatch
) -> list[int]:
    """Make the enricher's first publish to the tasks topic fail (the client refused it)."""
    calls: list[int] = []
    topic_publisher = component._served[objective].pipeline._publisher
    assert topic_publisher is not None
    original = topic_publisher._send

    async def send(data: bytes, properties: dict[str, str], key: str | None) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise BusError("the broker refused the message")
        await original(data, properties, key)

    monkeypatch.setattr(topic_publisher, "_send", send)
    return calls


async def test_a_failed_publish_is_nacked_and_redelivered(
    running: tuple[EnricherComponent, MemoryBus, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    component, bus, objective = running
    labels = {"objective": objective, "outcome": "publish_failed"}
    failed_before = metric_value("rdv_enricher_tasks_total", labels)
    calls = _refuse_first_publish(component, objective, monkeypatch)
    requests = await bus.publisher(bus.topics.requests(objective), task_pb2.ScoringTask)
    await requests.publish(_task(objective, "r1", "alice"), key="r1")

    await until(lambda: len(_tasks_out(bus, objective)) == 1)
    assert _tasks_out(bus, objective)[0].task.request.request_id == "r1"
    assert len(calls) == 2  # refused once, then the redelivered message went through
    assert metric_value("rdv_enricher_tasks_total", labels) == failed_before + 1


async def test_a_publish_waits_for_the_broker_past_the_send_timeout_and_the_deadline(
    running: tuple[EnricherComponent, MemoryBus, str],
) -> None:
    # The broker is away longer than the send timeout (0.2 s) and the task's budget (0.1 s):
    # the held task is neither failed nor redelivered (which could publish it twice); it
    # goes out once when the broker is back, for the archive, and then it is acknowledged.
    component, bus, objective = running
    failed = {"objective": objective, "outcome": "publish_failed"}
    failed_before = metric_value("rdv_enricher_tasks_total", failed)
    requests = await bus.publisher(bus.topics.requests(objective), task_pb2.ScoringTask)
    await requests.publish(_task(objective, "r1", "alice", deadline_s=0.1), key="r1")
    bus.unavailable = True  # before the enricher got to it (the publish above did not yield)
    await asyncio.sleep(0.6)
    assert _tasks_out(bus, objective) == []

    bus.unavailable = False
    await until(lambda: len(_tasks_out(bus, objective)) == 1)
    subscription = component._served[objective].pipeline._subscription
    assert subscription is not None
    await until(lambda: not subscription._unacked)  # type: ignore[attr-defined]
    assert [t.task.request.request_id for t in _tasks_out(bus, objective)] == ["r1"]
    assert metric_value("rdv_enricher_tasks_total", failed) == failed_before


async def test_a_request_that_comes_again_is_not_published_twice(
    running: tuple[EnricherComponent, MemoryBus, str],
) -> None:
    # As after a broker killed before it stored the acknowledgement: the same request again.
    component, bus, objective = running
    skipped = {"objective": objective}
    before = metric_value("rdv_enricher_redeliveries_skipped_total", skipped)
    requests = await bus.publisher(bus.topics.requests(objective), task_pb2.ScoringTask)
    await requests.publish(_task(objective, "r1", "alice"), key="r1")
    await until(lambda: len(_tasks_out(bus, objective)) == 1)

    await requests.publish(_task(objective, "r1", "alice"), key="r1")
    await requests.publish(_task(objective, "r2", "alice"), key="r2")
    await until(lambda: len(_tasks_out(bus, objective)) == 2)
    await until(
        lambda: metric_value("rdv_enricher_redeliveries_skipped_total", skipped) == before + 1
    )
    subscription = component._served[objective].pipeline._subscription
    assert subscription is not None
    await until(lambda: not subscription._unacked)  # type: ignore[attr-defined]
    assert [t.task.request.request_id for t in _tasks_out(bus, objective)] == ["r1", "r2"]


DEMO_MESH = Path(__file__).resolve().parents[3] / "deploy" / "mesh" / "demo.yaml"


async def test_objectives_default_to_the_mesh_file() -> None:
    # Async: a component builds its grpc.aio server, which needs the running loop.
    settings = EnricherSettings(mesh_file=DEMO_MESH, listen="127.0.0.1:0")
    component = EnricherComponent(settings, bus=MemoryBus())
    assert component.objectives == ["demo"]


def test_without_objectives_or_mesh_it_refuses_to_start() -> None:
    with pytest.raises(ValueError, match="objectives"):
        EnricherComponent(EnricherSettings(listen="127.0.0.1:0"), bus=MemoryBus())


def _objective_config(
    objective: str, version: int, enrichment: objective_pb2.Enrichment.ValueType
) -> objective_pb2.ObjectiveConfig:
    return objective_pb2.ObjectiveConfig(
        objective=objective, version=version, enrichment=enrichment
    )


async def test_following_the_control_topic_it_serves_the_objectives_enriched_live() -> None:
    bus = MemoryBus(PulsarSettings(send_timeout_s=0.2, negative_ack_redelivery_delay_ms=50))
    plain, rich = _objective(), _objective()
    control = await bus.publisher(bus.topics.control(), objective_pb2.ObjectiveConfig)
    await control.publish(_objective_config(plain, 1, objective_pb2.ENRICHMENT_NONE), key=plain)
    await control.publish(
        _objective_config(rich, 1, objective_pb2.ENRICHMENT_UNSPECIFIED), key=rich
    )
    await _publish_events(bus, plain, "alice")
    settings = _settings(rich).model_copy(update={"objectives": [], "follow": True})
    component = EnricherComponent(settings, bus=bus)
    await component.start()
    try:
        assert component.objectives == [rich]
        rich_requests = await bus.publisher(bus.topics.requests(rich), task_pb2.ScoringTask)
        await rich_requests.publish(_task(rich, "r1", "bob"), key="r1")
        await until(lambda: len(_tasks_out(bus, rich)) == 1)

        # v2: the plain objective becomes enriched; its state is read before tasks flow.
        await control.publish(
            _objective_config(plain, 2, objective_pb2.ENRICHMENT_SUBJECT_STATE), key=plain
        )
        await until(lambda: component.objectives == sorted([plain, rich]))
        plain_requests = await bus.publisher(bus.topics.requests(plain), task_pb2.ScoringTask)
        await plain_requests.publish(_task(plain, "p1", "alice"), key="p1")
        await until(lambda: len(_tasks_out(bus, plain)) == 1)
        state = values_dict(_tasks_out(bus, plain)[0].subject_state)
        assert state["event_count"] == 3

        # v2 of the rich one: no enrichment any more; its requests are left alone.
        await control.publish(_objective_config(rich, 2, objective_pb2.ENRICHMENT_NONE), key=rich)
        await until(lambda: component.objectives == [plain])
        await rich_requests.publish(_task(rich, "r2", "bob"), key="r2")
        await asyncio.sleep(0.3)
        assert [t.task.request.request_id for t in _tasks_out(bus, rich)] == ["r1"]
        assert rich not in component.enricher.objectives
    finally:
        await component.stop()
