"""A rendezvous and its collector in-process over real sockets, with scripted models
publishing to the return address through the in-memory bus.

The scripted models behave like runners: a model the task's `scorers` do not list skips it,
and each stamps the role it was deployed with (`ROLES`), whatever the config says now."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from rendezvous.v1 import common_pb2, objective_pb2, scoring_pb2_grpc, task_pb2

from services.collector.app import Collector
from services.collector.settings import CollectorSettings
from services.core.bus import SubscriptionMode
from services.core.mesh import ObjectiveEntry, to_config
from services.rendezvous.app import Rendezvous
from services.rendezvous.settings import RendezvousSettings
from tests.fakes.memory_bus import MemoryBus

OBJECTIVE = ObjectiveEntry.model_validate(
    {
        "sla_ms": 50,
        "late_grace_ms": 300,
        "features": [{"name": "x"}, {"name": "y", "required": False}],
        "models": [
            {"name": "incumbent", "role": "incumbent"},
            {"name": "challenger", "role": "challenger"},
            {"name": "canary", "role": "canary"},
        ],
        "policy": [
            {"until_ms": 20, "accept": ["incumbent"]},
            {"until_ms": 45, "accept": ["incumbent", "challenger"]},
        ],
        "default": {"score": -1.0, "prefer_canary": False},
    }
)
ROLES = {
    "incumbent": common_pb2.MODEL_ROLE_INCUMBENT,
    "challenger": common_pb2.MODEL_ROLE_CHALLENGER,
    "challenger-b": common_pb2.MODEL_ROLE_CHALLENGER,
    "canary": common_pb2.MODEL_ROLE_CANARY,
}


@dataclass
class Script:
    """What each scripted model does: delay in ms and a score, or an error."""

    plan: dict[str, tuple[float, float | None]] = field(default_factory=dict)
    duplicate: set[str] = field(default_factory=set)


@dataclass
class Mesh:
    bus: MemoryBus
    rendezvous: Rendezvous
    collector: Collector
    stub: scoring_pb2_grpc.ScoringServiceAsyncStub
    script: Script


async def _scripted_models(bus: MemoryBus, script: Script) -> None:
    """Answer the tasks of "demo" from its request topic (enriched objective) and from its
    tasks topic (an objective without enrichment), as `script` says."""
    requests = await bus.subscribe(
        bus.topics.requests("demo"), "models", task_pb2.ScoringTask, mode=SubscriptionMode.SHARED
    )
    enriched = await bus.subscribe(
        bus.topics.tasks("demo"), "models", task_pb2.EnrichedTask, mode=SubscriptionMode.SHARED
    )

    async def answer(
        task: task_pb2.ScoringTask, model: str, delay_ms: float, score: float | None
    ) -> None:
        await asyncio.sleep(delay_ms / 1000)
        event = task_pb2.PredictionEvent(
            request_id=task.request.request_id,
            mailbox_id=task.mailbox_id,
            objective="demo",
            model=model,
            model_version="1",
            role=ROLES[model],
        )
        if score is None:
            event.error.grpc_code = grpc.StatusCode.UNAVAILABLE.value[0]
            event.error.reason = "UNAVAILABLE"
        else:
            event.prediction.score = score
        publisher = await bus.publisher(task.return_address, task_pb2.PredictionEvent)
        for _ in range(2 if model in script.duplicate else 1):
            await publisher.publish(event, key=event.request_id)

    running: set[asyncio.Task[None]] = set()

    def take(task: task_pb2.ScoringTask) -> None:
        scorers = set(task.scorers)
        for model, (delay, score) in script.plan.items():
            if scorers and model not in scorers:
                continue  # sampled out: as a runner does, skip the task
            answering = asyncio.create_task(answer(task, model, delay, score))
            running.add(answering)
            answering.add_done_callback(running.discard)

    async def from_requests() -> None:
        while True:
            envelope = await requests.receive()
            take(envelope.message)
            await requests.ack(envelope)

    async def from_tasks() -> None:
        while True:
            envelope = await enriched.receive()
            take(envelope.message.task)
            await enriched.ack(envelope)

    await asyncio.gather(from_requests(), from_tasks())


@contextlib.asynccontextmanager
async def running_mesh(
    tmp_path: Path,
    configs: Mapping[str, objective_pb2.ObjectiveConfig] | None,
    bus: MemoryBus | None = None,
) -> AsyncIterator[Mesh]:
    """A started rendezvous (static `configs`, or None: following `bus`'s control topic),
    its collector, the scripted models and a stub."""
    bus = bus or MemoryBus()
    socket = tmp_path / "delivery.sock"
    rendezvous = Rendezvous(
        RendezvousSettings(
            instance="rdv-test",
            listen="127.0.0.1:0",
            delivery_socket=socket,
            max_in_flight=50,
            max_grace_mailboxes=1000,
            # Warm-up has its own tests (test_serving.py).
            warmup=False,
            control_wait_s=5.0,
        ),
        configs,
        bus=bus,
    )
    collector = Collector(
        CollectorSettings(instance="rdv-test", listen="127.0.0.1:0", delivery_socket=socket),
        bus=bus,
    )
    script = Script()
    await rendezvous.start()
    await collector.start()
    await asyncio.wait_for(collector.connected.wait(), 5)
    models = asyncio.create_task(_scripted_models(bus, script))
    channel = grpc.aio.insecure_channel(rendezvous.server.endpoint)
    try:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        yield Mesh(bus, rendezvous, collector, stub, script)
    finally:
        models.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await models
        await channel.close()
        await collector.stop()
        await rendezvous.stop()


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    async with running_mesh(tmp_path, {"demo": to_config("demo", OBJECTIVE)}) as running:
        yield running
