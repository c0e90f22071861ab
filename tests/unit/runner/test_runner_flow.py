"""The model runner on a MemoryBus with real model servers: what it publishes, and when not."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import grpc
import pytest
from rendezvous.v1 import common_pb2, model_pb2, model_pb2_grpc, scoring_pb2, task_pb2

from services.core.bus import Envelope, Subscription
from services.core.protos import set_values, timestamp_from_ns
from services.runner.host import RunnerHost
from tests.fakes.memory_bus import MemoryBus
from tests.helpers import metric_value
from tests.unit.models.model_testing import ServeModel
from tests.unit.runner.conftest import StartRunner

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def make_task(
    objective: str,
    return_address: str,
    *,
    features: dict[str, Any] | None = None,
    deadline_in_s: float | None = 5.0,
    experimentation: common_pb2.ConsentDecision.ValueType = (
        common_pb2.CONSENT_DECISION_UNSPECIFIED
    ),
) -> task_pb2.EnrichedTask:
    request_id = uuid.uuid4().hex
    request = scoring_pb2.ScoreRequest(
        objective=objective,
        request_id=request_id,
        consent=common_pb2.Consent(experimentation=experimentation),
    )
    set_values(request.features, features if features is not None else {"a": 1.0, "b": 2.0})
    task = task_pb2.EnrichedTask(
        task=task_pb2.ScoringTask(
            request=request,
            return_address=return_address,
            mailbox_id=f"mbx-{request_id[:6]}",
            received_time=timestamp_from_ns(time.time_ns()),
        )
    )
    if deadline_in_s is not None:
        task.task.deadline.CopyFrom(timestamp_from_ns(time.time_ns() + int(deadline_in_s * 1e9)))
    set_values(task.subject_state, {"views": 3})
    return task


async def publish_tasks(bus: MemoryBus, objective: str, *tasks: task_pb2.EnrichedTask) -> None:
    publisher = await bus.publisher(bus.topics.tasks(objective), task_pb2.EnrichedTask)
    for task in tasks:
        await publisher.publish(
            task, key=task.task.request.request_id, properties={"traceparent": TRACEPARENT}
        )


async def listen(bus: MemoryBus) -> tuple[str, Subscription[task_pb2.PredictionEvent]]:
    return_address = bus.topics.predictions(f"rdv-{uuid.uuid4().hex[:8]}")
    subscription = await bus.subscribe(return_address, "test", task_pb2.PredictionEvent)
    return return_address, subscription


async def receive(
    subscription: Subscription[task_pb2.PredictionEvent], count: int, timeout: float = 5.0
) -> list[Envelope[task_pb2.PredictionEvent]]:
    async def take() -> list[Envelope[task_pb2.PredictionEvent]]:
        return [await subscription.receive() for _ in range(count)]

    return await asyncio.wait_for(take(), timeout)


async def nothing_more(subscription: Subscription[task_pb2.PredictionEvent]) -> bool:
    try:
        await asyncio.wait_for(subscription.receive(), 0.3)
    except TimeoutError:
        return True
    return False


def metric(name: str, **labels: str) -> float:
    return metric_value(name, labels)


async def eventually(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def test_prediction_is_published_to_the_return_address(
    bus: MemoryBus, objective: str, serve_model: ServeModel, start_runner: StartRunner
) -> None:
    model = await serve_model("sum", version="7")
    runner = await start_runner(model.container.endpoint, role="incumbent", model_version="6")
    return_address, predictions = await listen(bus)
    task = make_task(objective, return_address, features={"a": 1.5, "b": 2.5, "c": -1.0})
    before_ns = time.time_ns()

    await publish_tasks(bus, objective, task)
    [envelope] = await receive(predictions, 1)

    event = envelope.message
    assert event.WhichOneof("result") == "prediction"
    assert event.prediction.score == 3.0
    assert event.request_id == task.task.request.request_id
    assert envelope.key == event.request_id
    assert event.mailbox_id == task.task.mailbox_id
    assert event.objective == objective
    assert event.model == runner.settings.model
    assert event.model_version == "7"  # the model's own version beats the configured one
    assert event.role == common_pb2.MODEL_ROLE_INCUMBENT
    assert event.runner == runner.settings.instance
    received = event.task_received_time.ToNanoseconds()
    assert before_ns <= received <= event.predicted_time.ToNanoseconds() <= time.time_ns()
    assert event.model_latency.ToNanoseconds() > 0
    # The trace continues: the prediction carries the task's trace id.
    assert envelope.properties["traceparent"].split("-")[1] == TRACE_ID
    assert (
        metric(
            "rdv_runner_predictions_published_total",
            model=runner.settings.model,
            outcome="prediction",
        )
        == 1.0
    )


async def test_model_sees_features_subject_state_and_outputs_come_back(
    bus: MemoryBus, objective: str, serve_model: ServeModel, start_runner: StartRunner
) -> None:
    model = await serve_model("diabetes", {"algorithm": "ridge"})
    await start_runner(model.container.endpoint, model_version="1")
    return_address, predictions = await listen(bus)
    features = dict.fromkeys(["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"], 0.01)
    task = make_task(objective, return_address, features=features)

    await publish_tasks(bus, objective, task)
    [envelope] = await receive(predictions, 1)

    event = envelope.message
    assert event.prediction.outputs["model"].string_value == "ridge"
    assert event.model_version == "1"


async def test_expired_task_is_skipped_and_not_published(
    bus: MemoryBus, objective: str, serve_model: ServeModel, start_runner: StartRunner
) -> None:
    model = await serve_model("sum")
    runner = await start_runner(model.container.endpoint)
    name = runner.settings.model
    return_address, predictions = await listen(bus)
    expired = make_task(objective, return_address, deadline_in_s=-0.01)
    live = make_task(objective, return_address)

    await publish_tasks(bus, objective, expired, live)
    await eventually(lambda: metric("rdv_runner_skipped_total", model=name, reason="expired") == 1)
    [envelope] = await receive(predictions, 1)

    assert envelope.message.request_id == live.task.request.request_id
    assert await nothing_more(predictions)


async def test_task_naming_a_foreign_return_address_is_skipped(
    bus: MemoryBus, objective: str, serve_model: ServeModel, start_runner: StartRunner
) -> None:
    model = await serve_model("sum")
    runner = await start_runner(model.container.endpoint)
    foreign = "persistent://public/default/someone-elses-topic"
    watcher = await bus.subscribe(foreign, "test", task_pb2.PredictionEvent)
    await publish_tasks(bus, objective, make_task(objective, foreign))

    name = runner.settings.model
    await eventually(
        lambda: metric("rdv_runner_skipped_total", model=name, reason="bad_return_address") == 1
    )
    assert await nothing_more(watcher)


@pytest.mark.parametrize("code", ["UNAVAILABLE", "INTERNAL"])
async def test_model_error_is_published_as_an_error(
    bus: MemoryBus,
    objective: str,
    serve_model: ServeModel,
    start_runner: StartRunner,
    code: str,
) -> None:
    model = await serve_model("flaky", {"error_rate": 1.0, "error_codes": [code]})
    runner = await start_runner(model.container.endpoint, role="challenger", model_version="2")
    return_address, predictions = await listen(bus)
    task = make_task(objective, return_address)

    await publish_tasks(bus, objective, task)
    [envelope] = await receive(predictions, 1)

    event = envelope.message
    assert event.WhichOneof("result") == "error"
    assert event.error.grpc_code == grpc.StatusCode[code].value[0]
    assert event.error.reason == code
    assert "simulated" in event.error.message
    assert event.model_version == "2"  # no response, so the configured version
    assert event.role == common_pb2.MODEL_ROLE_CHALLENGER
    assert metric("rdv_runner_model_errors_total", model=runner.settings.model, code=code) == 1.0


async def test_slow_model_is_cut_at_the_deadline_and_recorded(
    bus: MemoryBus, objective: str, serve_model: ServeModel, start_runner: StartRunner
) -> None:
    model = await serve_model("flaky", {"latency_ms_median": 5000})
    await start_runner(model.container.endpoint)
    return_address, predictions = await listen(bus)
    task = make_task(objective, return_address, deadline_in_s=0.2)

    await publish_tasks(bus, objective, task)
    [envelope] = await receive(predictions, 1, timeout=2.0)

    event = envelope.message
    assert event.error.reason == "DEADLINE_EXCEEDED"
    assert event.error.grpc_code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert event.model_latency.ToNanoseconds() < 500_000_000


@pytest.mark.parametrize("role", ["challenger", "canary"])
async def test_consent_denied_skips_experimental_roles_not_the_incumbent(
    bus: MemoryBus,
    objective: str,
    serve_model: ServeModel,
    start_runner: StartRunner,
    role: str,
) -> None:
    model = await serve_model("sum")
    incumbent = await start_runner(model.container.endpoint, role="incumbent")
    experiment = await start_runner(model.container.endpoint, role=role)
    return_address, predictions = await listen(bus)
    denied = make_task(
        objective, return_address, experimentation=common_pb2.CONSENT_DECISION_DENIED
    )
    unspecified = make_task(objective, return_address)

    await publish_tasks(bus, objective, denied, unspecified)
    envelopes = await receive(predictions, 3)

    answered = {(e.message.request_id, e.message.model) for e in envelopes}
    denied_id = denied.task.request.request_id
    unspecified_id = unspecified.task.request.request_id
    assert answered == {
        (denied_id, incumbent.settings.model),
        (unspecified_id, incumbent.settings.model),
        (unspecified_id, experiment.settings.model),
    }
    assert await nothing_more(predictions)
    assert (
        metric("rdv_runner_skipped_total", model=experiment.settings.model, reason="consent_denied")
        == 1.0
    )


async def test_model_restart_costs_error_predictions_then_recovers(
    bus: MemoryBus, objective: str, serve_model: ServeModel, start_runner: StartRunner
) -> None:
    model = await serve_model("sum")
    endpoint = model.container.endpoint
    await start_runner(endpoint)
    return_address, predictions = await listen(bus)
    await publish_tasks(bus, objective, make_task(objective, return_address))
    [first] = await receive(predictions, 1)
    assert first.message.WhichOneof("result") == "prediction"

    await model.close()
    await publish_tasks(bus, objective, make_task(objective, return_address))
    [down] = await receive(predictions, 1)
    assert down.message.error.reason == "UNAVAILABLE"

    # Down long enough for gRPC's default backoff (1 s, x1.6, up to 120 s) to grow past it.
    await asyncio.sleep(2.5)
    restarted = await serve_model("sum", listen=endpoint)
    assert restarted.container.endpoint == endpoint
    started = time.monotonic()
    while True:
        await publish_tasks(bus, objective, make_task(objective, return_address))
        [event] = await receive(predictions, 1)
        if event.message.WhichOneof("result") == "prediction":
            break
        await asyncio.sleep(0.05)
    # The reconnect backoff is capped at max_reconnect_backoff_ms (1 s, +20 % jitter).
    assert time.monotonic() - started < 1.5


async def test_concurrency_bounds_calls_in_flight(
    bus: MemoryBus, objective: str, serve_model: ServeModel, start_runner: StartRunner
) -> None:
    model = await serve_model("flaky", {"latency_ms_median": 200})
    narrow = await start_runner(model.container.endpoint, concurrency=2)
    wide = await start_runner(model.container.endpoint, concurrency=6)
    return_address, predictions = await listen(bus)
    tasks = [make_task(objective, return_address) for _ in range(6)]

    await publish_tasks(bus, objective, *tasks)
    envelopes = await receive(predictions, 12, timeout=5.0)

    def span_s(runner: RunnerHost) -> float:
        events = [e.message for e in envelopes if e.message.model == runner.settings.model]
        assert len(events) == 6
        first = min(e.task_received_time.ToNanoseconds() for e in events)
        last = max(e.predicted_time.ToNanoseconds() for e in events)
        return (last - first) / 1e9

    # Two at a time: three rounds of 200 ms; six at a time: one round.
    assert span_s(narrow) >= 0.55
    assert span_s(wide) < 0.45


class _PredictOnly(model_pb2_grpc.ModelServiceServicer):
    """A model container that implements only Predict (PredictBatch is optional)."""

    def __init__(self) -> None:
        self.calls = 0

    async def Predict(
        self, request: model_pb2.PredictRequest, context: Any
    ) -> model_pb2.PredictResponse:
        self.calls += 1
        await asyncio.sleep(0.05)
        return model_pb2.PredictResponse(score=float(len(request.request_id)))

    async def PredictBatch(
        self, request: model_pb2.PredictBatchRequest, context: Any
    ) -> model_pb2.PredictBatchResponse:
        # What a container built before PredictBatch existed answers.
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
        raise AssertionError("abort raises")

    async def GetModelMetadata(
        self, request: model_pb2.GetModelMetadataRequest, context: Any
    ) -> model_pb2.GetModelMetadataResponse:
        return model_pb2.GetModelMetadataResponse(name="predict-only")


def batch_sizes(model: str) -> tuple[float, float]:
    """(model calls, tasks) the runner's batch-size histogram counted."""
    return (
        metric("rdv_runner_batch_size_count", model=model),
        metric("rdv_runner_batch_size_sum", model=model),
    )


async def test_tasks_queued_during_a_call_go_to_the_model_in_one_batch(
    bus: MemoryBus, objective: str, serve_model: ServeModel, start_runner: StartRunner
) -> None:
    model = await serve_model("flaky", {"latency_ms_median": 150, "score": 3.0})
    runner = await start_runner(model.container.endpoint, max_calls_in_flight=1)
    return_address, predictions = await listen(bus)
    first = make_task(objective, return_address)
    await publish_tasks(bus, objective, first)
    await eventually(lambda: runner.consumer is not None and runner.consumer.in_flight == 1)
    queued = [make_task(objective, return_address) for _ in range(5)]
    await publish_tasks(bus, objective, *queued)

    envelopes = await receive(predictions, 6, timeout=5.0)

    assert {e.message.request_id for e in envelopes} == {
        t.task.request.request_id for t in [first, *queued]
    }
    assert all(e.message.prediction.score == 3.0 for e in envelopes)
    # One call for the first task, one PredictBatch call for the five that queued behind it.
    assert batch_sizes(runner.settings.model) == (2.0, 6.0)


async def test_a_model_without_predict_batch_gets_one_predict_per_task(
    bus: MemoryBus, objective: str, start_runner: StartRunner
) -> None:
    servicer = _PredictOnly()
    server = grpc.aio.server()
    model_pb2_grpc.add_ModelServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        runner = await start_runner(f"127.0.0.1:{port}", max_calls_in_flight=1)
        return_address, predictions = await listen(bus)
        tasks = [make_task(objective, return_address) for _ in range(6)]
        await publish_tasks(bus, objective, *tasks)

        envelopes = await receive(predictions, 6, timeout=5.0)

        assert {e.message.WhichOneof("result") for e in envelopes} == {"prediction"}
        assert servicer.calls == 6
        assert batch_sizes(runner.settings.model)[0] == 6.0
    finally:
        await server.stop(None)


async def test_failed_publish_is_nacked_and_redelivered(
    bus: MemoryBus, objective: str, serve_model: ServeModel, start_runner: StartRunner
) -> None:
    model = await serve_model("sum")
    runner = await start_runner(model.container.endpoint, publish_timeout_s=0.1)
    name = runner.settings.model
    return_address, predictions = await listen(bus)
    task = make_task(objective, return_address)
    await publish_tasks(bus, objective, task)  # the broker takes the task ...

    bus.unavailable = True  # ... then accepts nothing more
    await eventually(lambda: metric("rdv_runner_publish_failures_total", model=name) >= 1)
    bus.unavailable = False
    [envelope] = await receive(predictions, 1)

    assert envelope.message.request_id == task.task.request.request_id
    assert envelope.message.WhichOneof("result") == "prediction"


async def test_stop_waits_for_predictions_in_flight(
    bus: MemoryBus, objective: str, serve_model: ServeModel, start_runner: StartRunner
) -> None:
    model = await serve_model("flaky", {"latency_ms_median": 300})
    runner = await start_runner(model.container.endpoint)
    return_address, predictions = await listen(bus)
    task = make_task(objective, return_address)
    await publish_tasks(bus, objective, task)
    await asyncio.sleep(0.1)  # the call is in flight

    await runner.stop()

    [envelope] = await receive(predictions, 1, timeout=0.1)
    assert envelope.message.WhichOneof("result") == "prediction"
