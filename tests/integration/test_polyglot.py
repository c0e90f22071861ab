"""Model containers in other languages race like any other, on the real broker.

A supervised mesh runs the Python diabetes container as the incumbent and the Go and the
TypeScript containers as challengers (each a `command` deployment, started by the supervisor
with the RDV_MODEL_* environment), all on the same ridge artifact. An A/B split of the first
policy step gives each challenger a third of the requests to answer alone, so every language
answers some; the outcomes show every container scoring every request, the three scores
equal to 1e-9.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from rendezvous.v1 import scoring_pb2, scoring_pb2_grpc

from services.core.protos import set_values
from services.demo import diabetes_dataset
from services.supervisor.plan import free_port
from tests.conftest import PulsarBroker
from tests.integration.supervised import RunningMesh, supervised_mesh

pytestmark = pytest.mark.integration

OBJECTIVE = "polyglot"
FEATURES = ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]
ARGS = {"algorithm": "ridge"}
# Model name -> the program serving it (None: the Python container of the kind).
CONTAINERS: dict[str, list[str] | None] = {
    "py-ridge": None,
    "go-ridge": ["tools/bin/rendezvous-model-go"],
    "node-ridge": ["node", "services/models/ts/dist/main.js"],
}
CHALLENGERS = [name for name, command in CONTAINERS.items() if command]
REQUESTS = 150
AGREEMENT = 1e-9


def mesh_document(listen: str) -> dict[str, Any]:
    models: list[dict[str, Any]] = []
    for name, command in CONTAINERS.items():
        model: dict[str, Any] = {
            "name": name,
            "role": "challenger" if command else "incumbent",
            "kind": "diabetes",
            "args": ARGS,
        }
        if command:
            model["command"] = command
        models.append(model)
    share = round(1 / (len(CHALLENGERS) + 1), 3)
    return {
        "rendezvous": {"listen": listen},
        "objectives": {
            OBJECTIVE: {
                "sla_ms": 150,
                "late_grace_ms": 1000,
                "enrichment": "none",
                "features": [{"name": name} for name in FEATURES],
                "models": models,
                "policy": [
                    {
                        "until_ms": 120,
                        "accept": list(CONTAINERS),
                        "shares": dict.fromkeys(CHALLENGERS, share),
                    }
                ],
                "default": {"score": 152.13},
                "sampling": {"challenger_fraction": 1.0, "archive_fraction": 0.0},
            }
        },
    }


@pytest.fixture(scope="module")
def mesh(pulsar: PulsarBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMesh]:
    root = tmp_path_factory.mktemp("polyglot")
    with supervised_mesh(pulsar, root, mesh_document(f"127.0.0.1:{free_port()}")) as running:
        yield running


async def _score_all(endpoint: str, run_id: str) -> list[scoring_pb2.ScoreResponse]:
    rows, _ = diabetes_dataset()
    async with grpc.aio.insecure_channel(endpoint) as channel:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)

        async def one(index: int) -> scoring_pb2.ScoreResponse:
            request = scoring_pb2.ScoreRequest(objective=OBJECTIVE, request_id=f"{run_id}-{index}")
            set_values(request.features, rows[index])
            response: scoring_pb2.ScoreResponse = await stub.Score(request, timeout=5.0)
            return response

        answers = []
        for index in range(REQUESTS):
            answers.append(await one(index))
            await asyncio.sleep(0.01)
        return answers


@pytest.mark.asyncio
async def test_every_language_answers_and_they_agree_to_1e_9(mesh: RunningMesh) -> None:
    processes = {p["name"]: p for p in mesh.state()["processes"]}
    for name in CHALLENGERS:
        assert processes[f"model-{name}"]["status"] == "ready"
    answers = await _score_all(mesh.endpoint, f"poly-{uuid.uuid4().hex[:6]}")
    won = Counter(a.decision.model for a in answers)
    assert sum(won.values()) == REQUESTS
    for name in CONTAINERS:
        # Each challenger answers its arm (a third); the incumbent the rest.
        assert won[name] >= REQUESTS * 0.15, won
    ids = {a.request_id for a in answers}
    outcomes = await mesh.outcomes(OBJECTIVE, ids)
    assert outcomes.keys() == ids
    for outcome in outcomes.values():
        scores = {
            c.prediction.model: c.prediction.prediction.score
            for c in outcome.candidates
            if c.prediction.WhichOneof("result") == "prediction"
        }
        assert set(scores) == set(CONTAINERS), outcome
        reference = scores["py-ridge"]
        assert all(abs(score - reference) <= AGREEMENT for score in scores.values()), scores
        versions = {c.prediction.model: c.prediction.model_version for c in outcome.candidates}
        assert all(versions.values()), versions
