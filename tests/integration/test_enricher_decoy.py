"""The enricher and the decoy on the real broker: subject events in, enriched tasks out to
the models' topic, and one redacted archive record per task."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from rendezvous.v1 import common_pb2, enricher_pb2, enricher_pb2_grpc, scoring_pb2, task_pb2

from services.core.bus import Bus, Envelope, M, Subscription, SubscriptionMode
from services.core.protos import set_values, timestamp_from_ns, values_dict
from services.decoy.app import DecoyComponent
from services.decoy.settings import DecoySettings
from services.enricher.app import EnricherComponent
from services.enricher.service import SERVICE_NAME
from services.enricher.settings import EnricherSettings
from tests.conftest import PulsarBroker

pytestmark = pytest.mark.integration

SECOND = 1_000_000_000
RECEIVE_TIMEOUT_S = 20.0
SUBJECT_PATH = "task.task.request.subject_id"


def _event(objective: str, subject: str, kind: str, age_s: float) -> task_pb2.SubjectEvent:
    return task_pb2.SubjectEvent(
        subject_id=subject,
        objective=objective,
        kind=kind,
        event_time=timestamp_from_ns(time.time_ns() - int(age_s * SECOND)),
    )


def _task(
    objective: str,
    request_id: str,
    subject: str,
    archiving: common_pb2.ConsentDecision.ValueType = common_pb2.CONSENT_DECISION_GRANTED,
) -> task_pb2.ScoringTask:
    request = scoring_pb2.ScoreRequest(
        objective=objective,
        request_id=request_id,
        subject_id=subject,
        consent=common_pb2.Consent(archiving=archiving),
    )
    set_values(request.features, {"bmi": 0.06, "bp": 0.02})
    return task_pb2.ScoringTask(
        request=request,
        mailbox_id=f"mb-{request_id}",
        return_address="persistent://public/default/rdv.predictions.itest",
        received_time=timestamp_from_ns(time.time_ns()),
        # Generous: a slow CI machine must not turn this into an expiry test.
        deadline=timestamp_from_ns(time.time_ns() + 30 * SECOND),
    )


async def _receive_all(subscription: Subscription[M], count: int) -> list[Envelope[M]]:
    received: list[Envelope[M]] = []
    async with asyncio.timeout(RECEIVE_TIMEOUT_S):
        while len(received) < count:
            envelope = await subscription.receive()
            await subscription.ack(envelope)
            received.append(envelope)
    return received


async def test_enriched_tasks_carry_state_and_the_decoy_archives_each_once(
    pulsar: PulsarBroker, client_bus: Bus
) -> None:
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        trace.set_tracer_provider(TracerProvider())
    objective = f"t{uuid.uuid4().hex[:12]}"
    topics = client_bus.topics

    # Events published before the enricher starts: it must replay them (catch-up).
    events = await client_bus.publisher(topics.events(objective), task_pb2.SubjectEvent)
    for subject, kind, age in [
        ("alice", "view", 30.0),
        ("alice", "view", 20.0),
        ("alice", "buy", 10.0),
        ("bob", "view", 5.0),
    ]:
        await events.publish(_event(objective, subject, kind, age), key=subject)

    # The models' view of the tasks topic: its own subscription, independent of the decoy's.
    observer = await client_bus.subscribe(
        topics.tasks(objective), "itest-model", task_pb2.EnrichedTask, start="earliest"
    )
    archive = await client_bus.subscribe(
        topics.archive(objective),
        "itest-audit",
        task_pb2.ArchiveRecord,
        mode=SubscriptionMode.EXCLUSIVE,
        start="earliest",
    )

    enricher = EnricherComponent(
        EnricherSettings(
            objectives=[objective],
            listen="127.0.0.1:0",
            instance=f"itest-enricher-{uuid.uuid4().hex[:6]}",
            pulsar=pulsar.settings(),
            shutdown_grace_s=2.0,
        )
    )
    decoy = DecoyComponent(
        DecoySettings(
            objective=objective,
            listen="127.0.0.1:0",
            instance=f"itest-decoy-{uuid.uuid4().hex[:6]}",
            pulsar=pulsar.settings(),
            shutdown_grace_s=2.0,
        )
    )
    await enricher.start()
    await decoy.start()
    try:
        channel = grpc.aio.insecure_channel(enricher.endpoint)
        stub = enricher_pb2_grpc.EnricherServiceStub(channel)
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING

        # A live event after start is followed too.
        await events.publish(_event(objective, "bob", "buy", 1.0), key="bob")
        async with asyncio.timeout(RECEIVE_TIMEOUT_S):
            while True:
                probe = await stub.Enrich(
                    enricher_pb2.EnrichRequest(task=_task(objective, "probe", "bob"))
                )
                if values_dict(probe.enriched_task.subject_state)["event_count"] == 2:
                    break
                await asyncio.sleep(0.05)

        sent = {
            "r-alice": _task(objective, "r-alice", "alice"),
            "r-bob": _task(objective, "r-bob", "bob"),
            "r-carol": _task(objective, "r-carol", "carol"),
            "r-anon": _task(objective, "r-anon", ""),
            "r-denied": _task(
                objective, "r-denied", "alice", archiving=common_pb2.CONSENT_DECISION_DENIED
            ),
        }
        requests = await client_bus.publisher(topics.requests(objective), task_pb2.ScoringTask)
        traces: dict[str, int] = {}
        for request_id, task in sent.items():
            with trace.get_tracer("itest").start_as_current_span("rendezvous.score") as span:
                await requests.publish(task, key=request_id)
            traces[request_id] = span.get_span_context().trace_id

        # 1. Enriched tasks on the modelling topic, with each subject's state.
        enriched = {
            envelope.message.task.request.request_id: envelope
            for envelope in await _receive_all(observer, len(sent))
        }
        assert sorted(enriched) == sorted(sent)
        for request_id, envelope in enriched.items():
            assert envelope.key == request_id
            assert envelope.message.task == sent[request_id]
            traceparent = envelope.properties["traceparent"]
            assert int(traceparent.split("-")[1], 16) == traces[request_id]
        states: dict[str, dict[str, Any]] = {
            request_id: values_dict(envelope.message.subject_state)
            for request_id, envelope in enriched.items()
        }
        assert states["r-alice"]["event_count"] == 3
        assert states["r-alice"]["recent_kinds"] == ["buy", "view", "view"]
        assert states["r-alice"]["counts_by_kind"] == {"view": 2, "buy": 1}
        assert 9.0 < states["r-alice"]["last_event_age_s"] < 10.0 + RECEIVE_TIMEOUT_S
        assert states["r-bob"]["event_count"] == 2
        assert states["r-bob"]["last_event_kind"] == "buy"
        assert states["r-carol"]["event_count"] == 0
        assert states["r-carol"]["last_event_kind"] is None
        assert states["r-anon"] == {}

        # 2. A direct Enrich gives the same state as the Pulsar path.
        for request_id in ("r-alice", "r-bob", "r-carol", "r-anon"):
            response = await stub.Enrich(enricher_pb2.EnrichRequest(task=sent[request_id]))
            direct = values_dict(response.enriched_task.subject_state)
            via_pulsar = dict(states[request_id])
            if via_pulsar.get("last_event_age_s") is not None:
                # The age moves with the clock; everything else must be identical.
                assert direct["last_event_age_s"] >= via_pulsar["last_event_age_s"]
                assert direct.pop("last_event_age_s") - via_pulsar.pop("last_event_age_s") < (
                    RECEIVE_TIMEOUT_S
                )
            assert direct == via_pulsar
            assert response.enriched_task.task == sent[request_id]
        await channel.close()

        # 3. The decoy archived each task once, redacted; denied consent dropped features.
        records = [envelope.message for envelope in await _receive_all(archive, len(sent))]
        by_id = {record.task.task.request.request_id: record for record in records}
        assert sorted(by_id) == sorted(sent)
        # Nothing more arrives: one record per task.
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1.0):
                extra = await archive.receive()
                pytest.fail(f"unexpected extra record {extra.message.task.task.request.request_id}")
        for request_id, record in by_id.items():
            assert record.task.task.request.subject_id == ""
            expected_redacted = [] if request_id == "r-anon" else [SUBJECT_PATH]
            assert list(record.redacted_fields) == expected_redacted
            assert record.HasField("archived_time")
            # Exactly what the models saw, but for the redacted subject.
            seen = task_pb2.EnrichedTask()
            seen.CopyFrom(enriched[request_id].message)
            seen.task.request.ClearField("subject_id")
            if request_id == "r-denied":
                assert record.features_dropped
                assert len(record.task.task.request.features) == 0
                assert len(record.task.subject_state) == 0
            else:
                assert not record.features_dropped
                assert record.task == seen
        assert decoy.archived == len(sent)

        # 4. On the broker: replicas share "enricher" and "decoy"; the events reader
        # leaves no durable cursor behind.
        requests_stats, tasks_stats, events_stats = await asyncio.gather(
            *(
                asyncio.to_thread(pulsar.topic_stats, topic)
                for topic in (
                    topics.requests(objective),
                    topics.tasks(objective),
                    topics.events(objective),
                )
            )
        )
        assert "enricher" in requests_stats["subscriptions"]
        assert "decoy" in tasks_stats["subscriptions"]
        event_subscriptions = events_stats["subscriptions"]
        assert event_subscriptions
        assert not any(sub.get("isDurable", True) for sub in event_subscriptions.values())
    finally:
        await decoy.stop()
        await enricher.stop()
        await observer.close()
        await archive.close()
