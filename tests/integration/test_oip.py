"""A real MLServer in the race: an `oip` challenger beside the Python diabetes incumbent.

The module starts MLServer (its own virtualenv, `make mlserver`) serving a scikit-learn
Ridge fitted on the split tools/train_diabetes.py uses, and a supervised mesh on the real
broker whose objective has two oip challengers pointing at it: `oip-ridge` (every feature:
its scores must equal scikit-learn's own predictions to 1e-6) and `oip-broken` (two features
for a ten-feature model: MLServer fails the call, and each task gets that as a ModelError).
Requests go in concurrently, so the runner's bursts become multi-row tensors.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from rendezvous.v1 import scoring_pb2, scoring_pb2_grpc, task_pb2

from services.core.bus import PulsarBus
from services.supervisor.plan import free_port
from tests.conftest import REPO, PulsarBroker
from tests.integration.supervised import RunningMesh, supervised_mesh
from tools.mlserver import MLServer, serve_mlserver

pytestmark = pytest.mark.integration

OBJECTIVE = "oipdemo"
ROWS = 24
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def mlserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MLServer]:
    with serve_mlserver(tmp_path_factory.mktemp("mlserver")) as server:
        yield server


def mesh_document(listen: str, server: MLServer) -> dict[str, Any]:
    features = server.expected()["features"]
    return {
        "rendezvous": {"listen": listen},
        "objectives": {
            OBJECTIVE: {
                "sla_ms": 400,
                "late_grace_ms": 3000,
                "enrichment": "none",
                "features": [{"name": name} for name in features],
                "models": [
                    {
                        "name": "diabetes-ridge",
                        "role": "incumbent",
                        "kind": "diabetes",
                        "args": {"algorithm": "ridge"},
                    },
                    {
                        "name": "oip-ridge",
                        "role": "challenger",
                        "kind": "oip",
                        "endpoint": server.grpc_endpoint,
                        "args": server.oip_args(),
                    },
                    {
                        "name": "oip-broken",
                        "role": "challenger",
                        "kind": "oip",
                        "endpoint": server.grpc_endpoint,
                        "args": server.oip_args(inputs=features[:2]),
                    },
                ],
                "policy": [
                    {"until_ms": 100, "accept": ["oip-ridge"]},
                    {"until_ms": 390, "accept": ["oip-ridge", "diabetes-ridge"]},
                ],
                "default": {"score": 152.0},
            }
        },
    }


@pytest.fixture(scope="module")
def mesh(
    pulsar: PulsarBroker, mlserver: MLServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningMesh]:
    document = mesh_document(f"127.0.0.1:{free_port()}", mlserver)
    # The processes import the generated code of this checkout (inference.v2 included).
    env = {"PYTHONPATH": str(REPO / "gen")}
    with supervised_mesh(pulsar, tmp_path_factory.mktemp("oipmesh"), document, env) as running:
        yield running


async def outcomes(
    broker: PulsarBroker, request_ids: set[str], timeout: float = 60.0
) -> dict[str, task_pb2.Outcome]:
    """The results topic's outcome of each request (read from the start), once every
    candidate is in (the outcome is written after the late grace)."""
    bus = PulsarBus(broker.settings(), "oip-test-reader")
    found: dict[str, task_pb2.Outcome] = {}
    try:
        reader = await bus.reader(
            f"persistent://public/default/rdv.{OBJECTIVE}.results", task_pb2.Outcome
        )
        deadline = time.monotonic() + timeout
        while set(found) != request_ids and time.monotonic() < deadline:
            try:
                envelope = await asyncio.wait_for(reader.read_next(), deadline - time.monotonic())
            except TimeoutError:
                break
            if envelope.message.request_id in request_ids:
                found[envelope.message.request_id] = envelope.message
    finally:
        await bus.close()
    assert set(found) == request_ids, f"{len(request_ids) - len(found)} outcomes missing"
    return found


def candidate(outcome: task_pb2.Outcome, model: str) -> task_pb2.PredictionEvent:
    [found] = [c.prediction for c in outcome.candidates if c.prediction.model == model]
    return found


async def test_an_oip_challenger_on_mlserver_races_with_scikit_learns_scores(
    mesh: RunningMesh, mlserver: MLServer
) -> None:
    expected = mlserver.expected()
    features: list[str] = expected["features"]
    requests = []
    for index, row in enumerate(expected["rows"][:ROWS]):
        request = scoring_pb2.ScoreRequest(
            objective=OBJECTIVE, request_id=f"oip-{index}-{time.time_ns()}"
        )
        for name, value in zip(features, row, strict=True):
            request.features[name].number_value = value
        requests.append(request)

    async with grpc.aio.insecure_channel(mesh.endpoint) as channel:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        answers = await asyncio.gather(*(stub.Score(r, timeout=5.0) for r in requests))

    # Answered by MLServer's model (or, on a slow first call, the incumbent: same Ridge).
    for answer, want in zip(answers, expected["predictions"], strict=False):
        assert answer.decision.model in ("oip-ridge", "diabetes-ridge"), answer
        assert answer.score == pytest.approx(want, abs=1e-3)
    assert any(a.decision.model == "oip-ridge" for a in answers)

    found = await outcomes(mesh.broker, {r.request_id for r in requests})
    for index, request in enumerate(requests):
        outcome = found[request.request_id]
        ridge = candidate(outcome, "oip-ridge")
        assert ridge.WhichOneof("result") == "prediction", ridge
        assert abs(ridge.prediction.score - expected["predictions"][index]) <= TOLERANCE
        assert ridge.model_version == "1"  # MLServer's version of the model
        broken = candidate(outcome, "oip-broken")
        assert broken.WhichOneof("result") == "error", broken
        assert (broken.error.grpc_code, broken.error.reason) == (13, "INTERNAL")
        assert "expecting 10 features" in broken.error.message
