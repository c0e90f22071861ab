"""Model runners on the real broker with real model containers: replicas of one model
split the tasks, every distinct model answers every task, all on the return address."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter

import pytest
from rendezvous.v1 import common_pb2, scoring_pb2, task_pb2
from sklearn.datasets import load_diabetes

from services.core.bus import Bus, Envelope, Subscription
from services.core.lifecycle import Component
from services.core.protos import set_values, timestamp_from_ns
from services.models.app import ModelContainer
from services.models.diabetes import DiabetesArtifact, artifact_path
from services.models.settings import ModelSettings
from services.runner.host import RunnerHost
from services.runner.settings import RunnerSettings
from tests.conftest import PulsarBroker

pytestmark = pytest.mark.integration

SECOND = 1_000_000_000
TASKS = 100
RECEIVE_TIMEOUT_S = 30.0
SHARED_MODEL = "feature-sum"
OTHER_MODEL = "diabetes-ridge"


def _tasks(objective: str, return_address: str) -> list[task_pb2.EnrichedTask]:
    data = load_diabetes()
    tasks = []
    for index in range(TASKS):
        request_id = f"req-{index:03d}-{uuid.uuid4().hex[:6]}"
        request = scoring_pb2.ScoreRequest(objective=objective, request_id=request_id)
        set_values(
            request.features,
            dict(zip(data.feature_names, (float(x) for x in data.data[index]), strict=True)),
        )
        task = task_pb2.EnrichedTask(
            task=task_pb2.ScoringTask(
                request=request,
                return_address=return_address,
                mailbox_id=f"mb-{request_id}",
                received_time=timestamp_from_ns(time.time_ns()),
                # Generous: a slow machine must not turn this into an expiry test.
                deadline=timestamp_from_ns(time.time_ns() + 60 * SECOND),
            )
        )
        tasks.append(task)
    return tasks


async def _receive(
    subscription: Subscription[task_pb2.PredictionEvent], count: int
) -> list[Envelope[task_pb2.PredictionEvent]]:
    received: list[Envelope[task_pb2.PredictionEvent]] = []
    async with asyncio.timeout(RECEIVE_TIMEOUT_S):
        while len(received) < count:
            envelope = await subscription.receive()
            await subscription.ack(envelope)
            received.append(envelope)
    return received


async def test_replicas_split_tasks_and_every_model_answers_every_task(
    pulsar: PulsarBroker, client_bus: Bus
) -> None:
    objective = f"itrunner{uuid.uuid4().hex[:8]}"
    sum_model = ModelContainer(
        ModelSettings(kind="sum", name=SHARED_MODEL, version="3", shutdown_grace_s=0.5)
    )
    ridge_model = ModelContainer(
        ModelSettings(
            kind="diabetes",
            name=OTHER_MODEL,
            version="5",
            args={"algorithm": "ridge"},
            shutdown_grace_s=0.5,
        )
    )
    components: list[Component] = [sum_model, ridge_model]
    predictions: Subscription[task_pb2.PredictionEvent] | None = None
    try:
        for model in (sum_model, ridge_model):
            await model.start()

        def runner(model: str, role: str, endpoint: str, instance: str) -> RunnerHost:
            return RunnerHost(
                RunnerSettings(
                    objective=objective,
                    model=model,
                    role=role,  # type: ignore[arg-type]
                    endpoint=endpoint,
                    instance=instance,
                    pulsar=pulsar.settings(),
                    start_position="earliest",
                    shutdown_grace_s=2.0,
                )
            )

        replicas = [
            runner(SHARED_MODEL, "challenger", sum_model.endpoint, f"{SHARED_MODEL}-{i}")
            for i in range(2)
        ]
        other = runner(OTHER_MODEL, "incumbent", ridge_model.endpoint, f"{OTHER_MODEL}-0")
        for started in [*replicas, other]:
            await started.start()
            components.append(started)

        return_address = client_bus.topics.predictions(f"itest-{uuid.uuid4().hex[:8]}")
        predictions = await client_bus.subscribe(
            return_address, "itest", task_pb2.PredictionEvent, start="earliest"
        )
        tasks = _tasks(objective, return_address)
        publisher = await client_bus.publisher(
            client_bus.topics.tasks(objective), task_pb2.EnrichedTask
        )
        for task in tasks:
            await publisher.publish(task, key=task.task.request.request_id)

        envelopes = await _receive(predictions, 2 * len(tasks))

        events = [envelope.message for envelope in envelopes]
        by_task = {task.task.request.request_id: task for task in tasks}
        answers = Counter((event.request_id, event.model) for event in events)
        assert set(answers) == {(rid, m) for rid in by_task for m in (SHARED_MODEL, OTHER_MODEL)}
        assert set(answers.values()) == {1}, "a task was answered twice by one model"
        assert all(envelope.key == envelope.message.request_id for envelope in envelopes)
        assert all(event.WhichOneof("result") == "prediction" for event in events)

        shared = Counter(event.runner for event in events if event.model == SHARED_MODEL)
        assert set(shared) == {replica.settings.instance for replica in replicas}
        assert all(count > 0 for count in shared.values()), shared
        assert {event.runner for event in events if event.model == OTHER_MODEL} == {
            other.settings.instance
        }

        ridge = DiabetesArtifact.load(artifact_path("ridge"))
        for event in events:
            features = {
                name: value.number_value
                for name, value in by_task[event.request_id].task.request.features.items()
            }
            assert event.objective == objective
            assert event.mailbox_id == f"mb-{event.request_id}"
            if event.model == SHARED_MODEL:
                assert event.role == common_pb2.MODEL_ROLE_CHALLENGER
                assert event.model_version == "3"
                assert event.prediction.score == pytest.approx(sum(features.values()))
            else:
                assert event.role == common_pb2.MODEL_ROLE_INCUMBENT
                assert event.model_version == "5"
                assert event.prediction.score == pytest.approx(ridge.predict_row(features))

        # Nothing else arrives: no duplicates once every task was acknowledged.
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1.0):
                await predictions.receive()
    finally:
        # An unclosed Pulsar consumer that is garbage-collected can abort the process.
        if predictions is not None:
            await predictions.close()
        for component in reversed(components):
            await component.stop()
