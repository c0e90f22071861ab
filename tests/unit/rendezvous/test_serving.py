"""When the rendezvous says it serves, and what the collector survives.

Real gRPC servers over real sockets (TCP and the unix delivery socket) on the in-memory bus:
- health is SERVING only while a collector stream is open, and only after the warm-up;
- warm-up tasks go through the real path but never reach outcomes or the answer metrics;
- a failed ack never stops the collector's deliveries;
- a delivery stream the rendezvous side closes is reopened and what it left unanswered is
  sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rendezvous.v1 import delivery_pb2, delivery_pb2_grpc, scoring_pb2, scoring_pb2_grpc, task_pb2

from services.collector.app import Collector
from services.collector.settings import CollectorSettings
from services.core.bus import BusError, RawMessage
from services.core.mesh import to_config
from services.rendezvous.app import Rendezvous
from services.rendezvous.settings import RendezvousSettings
from tests.fakes.memory_bus import MemoryBus
from tests.helpers import metric_value
from tests.unit.rendezvous.conftest import OBJECTIVE, Script, _scripted_models

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _request() -> scoring_pb2.ScoreRequest:
    request = scoring_pb2.ScoreRequest(objective="demo")
    request.features["x"].number_value = 1.0
    return request


async def _health(endpoint: str) -> int:
    async with grpc.aio.insecure_channel(endpoint) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="rendezvous.v1.ScoringService"), timeout=2.0
        )
        return int(reply.status)


async def _becomes(endpoint: str, status: int, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while await _health(endpoint) != status:  # noqa: ASYNC110 (another server's state)
            await asyncio.sleep(0.02)


def _rendezvous(bus: MemoryBus, socket: Path, **overrides: Any) -> Rendezvous:
    settings: dict[str, Any] = {
        "instance": "rdv-test",
        "listen": "127.0.0.1:0",
        "delivery_socket": socket,
        "warmup": False,
    }
    settings.update(overrides)
    return Rendezvous(RendezvousSettings(**settings), {"demo": to_config("demo", OBJECTIVE)}, bus)


def _collector(bus: MemoryBus, socket: Path) -> Collector:
    settings = CollectorSettings(instance="rdv-test", listen="127.0.0.1:0", delivery_socket=socket)
    return Collector(settings, bus=bus)


@contextlib.asynccontextmanager
async def _models(bus: MemoryBus, script: Script) -> AsyncIterator[None]:
    models = asyncio.create_task(_scripted_models(bus, script))
    try:
        yield
    finally:
        models.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await models


def _outcomes(bus: MemoryBus) -> list[task_pb2.Outcome]:
    return [task_pb2.Outcome.FromString(r.data) for r in bus.messages(bus.topics.results("demo"))]


def _tasks(bus: MemoryBus) -> list[task_pb2.ScoringTask]:
    return [
        task_pb2.ScoringTask.FromString(r.data) for r in bus.messages(bus.topics.requests("demo"))
    ]


async def test_serving_only_while_a_collector_stream_is_open(tmp_path: Path) -> None:
    bus = MemoryBus()
    socket = tmp_path / "delivery.sock"
    rendezvous = _rendezvous(bus, socket)
    script = Script(plan={"incumbent": (2, 10.0)})
    await rendezvous.start()
    try:
        assert await _health(rendezvous.endpoint) == NOT_SERVING
        collector = _collector(bus, socket)
        async with _models(bus, script):
            await collector.start()
            await _becomes(rendezvous.endpoint, SERVING)

            await collector.stop()
            await _becomes(rendezvous.endpoint, NOT_SERVING)
            # Not serving is no reason to fail a caller: the designed answer is the default.
            async with grpc.aio.insecure_channel(rendezvous.endpoint) as channel:
                response = await scoring_pb2_grpc.ScoringServiceStub(channel).Score(_request())
            assert response.decision.source == scoring_pb2.ANSWER_SOURCE_DEFAULT

            again = _collector(bus, socket)
            await again.start()
            try:
                await _becomes(rendezvous.endpoint, SERVING)
            finally:
                await again.stop()
    finally:
        await rendezvous.stop()


async def test_warm_up_runs_the_real_path_then_serves_and_records_nothing(
    tmp_path: Path,
) -> None:
    bus = MemoryBus()
    socket = tmp_path / "delivery.sock"
    rendezvous = _rendezvous(
        bus,
        socket,
        warmup=True,
        warmup_rate=200.0,
        warmup_consecutive=30,
        warmup_consecutive_per_objective=30,
        warmup_max_s=20.0,
    )
    collector = _collector(bus, socket)
    # The warm-up requests' feature is 0.0; the incumbent answers at once.
    script = Script(plan={"incumbent": (1, 10.0)})
    answered_by_incumbent = {
        "objective": "demo",
        "source": "ANSWER_SOURCE_MODEL",
        "model": "incumbent",
        "role": "MODEL_ROLE_INCUMBENT",
    }
    answers_before = metric_value("rdv_answers_total", answered_by_incumbent)
    await rendezvous.start()
    try:
        async with _models(bus, script):
            await collector.start()
            await _becomes(rendezvous.endpoint, SERVING, timeout=20.0)
            progress = rendezvous.warmup.progress
            assert progress.state == "done"
            assert progress.consecutive >= 30
            warm_tasks = _tasks(bus)
            # The last races may still have been starting when the warm-up ended.
            assert progress.in_time <= len(warm_tasks) <= progress.sent
            assert all(task.warmup for task in warm_tasks)
            # Every enabled model warms its path; the decoy never archives a warm-up task.
            assert all(
                list(task.scorers) == ["incumbent", "challenger", "canary"] and task.skip_archive
                for task in warm_tasks
            )

            async with grpc.aio.insecure_channel(rendezvous.endpoint) as channel:
                response = await scoring_pb2_grpc.ScoringServiceStub(channel).Score(_request())
            assert response.decision.model == "incumbent"
            # Past the late grace every mailbox has closed: only the real request's outcome.
            await asyncio.sleep(0.5)
            assert [o.request_id for o in _outcomes(bus)] == [response.request_id]
            assert not _tasks(bus)[-1].warmup
            answers = metric_value("rdv_answers_total", answered_by_incumbent)
            assert answers - answers_before == 1.0
    finally:
        await collector.stop()
        await rendezvous.stop()


async def test_warm_up_gives_up_in_time_and_serves_when_no_model_answers(
    tmp_path: Path,
) -> None:
    bus = MemoryBus()
    socket = tmp_path / "delivery.sock"
    rendezvous = _rendezvous(bus, socket, warmup=True, warmup_rate=50.0, warmup_max_s=1.0)
    collector = _collector(bus, socket)
    await rendezvous.start()
    try:
        async with _models(bus, Script()):
            await collector.start()
            await _becomes(rendezvous.endpoint, SERVING, timeout=5.0)
            assert rendezvous.warmup.progress.state == "gave up (serving anyway)"
            assert rendezvous.warmup.progress.in_time == 0
    finally:
        await collector.stop()
        await rendezvous.stop()


async def test_a_failed_ack_does_not_stop_delivery(tmp_path: Path) -> None:
    bus = MemoryBus()
    socket = tmp_path / "delivery.sock"
    rendezvous = _rendezvous(bus, socket)
    collector = _collector(bus, socket)
    script = Script(plan={"incumbent": (1, 10.0)})
    failures_before = metric_value("rdv_collector_bus_errors_total", {"op": "ack"})
    await rendezvous.start()
    await collector.start()
    subscription = collector._subscription
    assert subscription is not None
    ack = subscription._ack_raw
    failed: list[RawMessage] = []

    async def fail_once(raw: RawMessage) -> None:
        if not failed:
            failed.append(raw)
            raise BusError("pulsar: AlreadyClosed")
        await ack(raw)

    subscription._ack_raw = fail_once  # type: ignore[method-assign]
    try:
        async with _models(bus, script):
            await _becomes(rendezvous.endpoint, SERVING)
            async with grpc.aio.insecure_channel(rendezvous.endpoint) as channel:
                stub = scoring_pb2_grpc.ScoringServiceStub(channel)
                responses = [await stub.Score(_request()) for _ in range(3)]
        assert failed, "the ack failure was never injected"
        assert [r.decision.model for r in responses] == ["incumbent"] * 3
        failures = metric_value("rdv_collector_bus_errors_total", {"op": "ack"})
        assert failures - failures_before == 1.0
        assert not collector.failed.is_set()
        assert await _health(rendezvous.endpoint) == SERVING
    finally:
        await collector.stop()
        await rendezvous.stop()


class _HangUpOnce(delivery_pb2_grpc.DeliveryServiceServicer):
    """A delivery service that ends its first stream without answering, then answers."""

    def __init__(self) -> None:
        self.streams: list[list[str]] = []

    async def Deliver(
        self, request_iterator: AsyncIterator[delivery_pb2.DeliverRequest], context: Any
    ) -> AsyncIterator[delivery_pb2.DeliverResponse]:
        seen: list[str] = []
        self.streams.append(seen)
        first = len(self.streams) == 1
        async for request in request_iterator:
            seen.extend(event.request_id for event in request.predictions)
            if first:
                return  # the stream ends: what was sent is unanswered
            yield delivery_pb2.DeliverResponse(
                delivery_id=request.delivery_id,
                statuses=[delivery_pb2.DELIVERY_STATUS_ACCEPTED] * len(request.predictions),
            )


async def test_a_closed_delivery_stream_is_reopened_and_what_it_left_is_resent(
    tmp_path: Path,
) -> None:
    bus = MemoryBus()
    socket = tmp_path / "delivery.sock"
    service = _HangUpOnce()
    server = grpc.aio.server()
    delivery_pb2_grpc.add_DeliveryServiceServicer_to_server(service, server)
    server.add_insecure_port(f"unix://{socket}")
    await server.start()
    collector = _collector(bus, socket)
    await collector.start()
    try:
        publisher = await bus.publisher(
            bus.topics.predictions("rdv-test"), task_pb2.PredictionEvent
        )
        await publisher.publish(task_pb2.PredictionEvent(request_id="r1", model="m"))
        async with asyncio.timeout(10.0):
            while not collector.delivered.get(delivery_pb2.DELIVERY_STATUS_ACCEPTED):  # noqa: ASYNC110
                await asyncio.sleep(0.02)

        assert len(service.streams) >= 2
        assert service.streams[0] == ["r1"]  # sent, then the stream closed unanswered
        assert service.streams[-1] == ["r1"]  # sent again on the next stream, answered
        assert not collector.failed.is_set()
        # Acknowledged once answered: nothing is left for the broker to redeliver.
        assert collector._subscription is not None
        assert not collector._subscription._unacked  # type: ignore[attr-defined]
    finally:
        await collector.stop()
        await server.stop(None)
