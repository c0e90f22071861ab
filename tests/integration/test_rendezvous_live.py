"""The rendezvous follows the real control topic (a compacted Pulsar read) and switches the
version new requests are decided by, over a real gRPC socket.

No models run: every answer is the designed default at the SLA, which makes the version that
decided it visible in the answer itself (its default score) as well as in its
`objective_version`; the tasks published on the real request topic carry the same version
and that version's sampling decision.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import grpc
import pytest
from rendezvous.v1 import objective_pb2, scoring_pb2, scoring_pb2_grpc, task_pb2

from services.core.bus import Bus
from services.core.mesh import ObjectiveEntry, to_config
from services.rendezvous.app import Rendezvous
from services.rendezvous.settings import RendezvousSettings
from tests.conftest import PulsarBroker

pytestmark = pytest.mark.integration

SWITCH_TIMEOUT_S = 10.0


def config(
    objective: str, version: int, default: float, challengers: float
) -> objective_pb2.ObjectiveConfig:
    entry = ObjectiveEntry.model_validate(
        {
            "sla_ms": 60,
            "late_grace_ms": 10,
            "features": [{"name": "x"}],
            "models": [
                {"name": "incumbent", "role": "incumbent"},
                {"name": "challenger", "role": "challenger"},
            ],
            "policy": [{"until_ms": 50, "accept": ["incumbent", "challenger"]}],
            "default": {"score": default},
            "sampling": {"challenger_fraction": challengers, "archive_fraction": 1.0},
        }
    )
    out = to_config(objective, entry, version)
    out.change.previous_version = version - 1
    out.change.action = "seed" if version == 1 else "apply"
    return out


async def test_follows_the_control_topic_and_switches_versions(
    pulsar: PulsarBroker, client_bus: Bus, tmp_path: Path
) -> None:
    objective = f"itlive{uuid.uuid4().hex[:8]}"
    control = await client_bus.publisher(client_bus.topics.control(), objective_pb2.ObjectiveConfig)
    await control.publish(config(objective, 1, default=-1.0, challengers=1.0), key=objective)
    tasks = await client_bus.subscribe(
        client_bus.topics.requests(objective), "itest", task_pb2.ScoringTask
    )
    rendezvous = Rendezvous(
        RendezvousSettings(
            instance=f"itlive-{uuid.uuid4().hex[:6]}",
            listen="127.0.0.1:0",
            delivery_socket=tmp_path / "delivery.sock",
            pulsar=pulsar.settings(),
            warmup=False,
            control_wait_s=30.0,
        ),
        None,
    )
    await rendezvous.start()
    try:
        async with grpc.aio.insecure_channel(rendezvous.endpoint) as channel:
            stub = scoring_pb2_grpc.ScoringServiceStub(channel)

            def score(
                request_id: str,
            ) -> grpc.aio.UnaryUnaryCall[scoring_pb2.ScoreRequest, scoring_pb2.ScoreResponse]:
                request = scoring_pb2.ScoreRequest(objective=objective, request_id=request_id)
                request.features["x"].number_value = 1.0
                return stub.Score(request, timeout=5.0)

            first = await score("v1-request")
            assert (first.objective_version, first.score) == (1, -1.0)
            task = (await asyncio.wait_for(tasks.receive(), 10.0)).message
            assert (task.request.request_id, task.objective_version) == ("v1-request", 1)
            assert list(task.scorers) == ["incumbent", "challenger"]

            # Version 2: another default, and no challenger scores any request.
            await control.publish(
                config(objective, 2, default=-2.0, challengers=0.0), key=objective
            )
            published = time.monotonic()
            switched = None
            async with asyncio.timeout(SWITCH_TIMEOUT_S):
                n = 0
                while switched is None:
                    response = await score(f"probe-{n}")
                    n += 1
                    # One version decides each answer: its version and its default agree.
                    assert (response.objective_version, response.score) in {(1, -1.0), (2, -2.0)}
                    if response.objective_version == 2:
                        switched = time.monotonic() - published
            print(f"answers switched to version 2 {switched * 1000:.0f} ms after the publish")

            second = await score("v2-request")
            assert (second.objective_version, second.score) == (2, -2.0)
            async with asyncio.timeout(10.0):
                while True:
                    envelope = await tasks.receive()
                    await tasks.ack(envelope)
                    if envelope.message.request.request_id == "v2-request":
                        break
            assert envelope.message.objective_version == 2
            assert list(envelope.message.scorers) == ["incumbent"]
    finally:
        await rendezvous.stop()
        await tasks.close()
