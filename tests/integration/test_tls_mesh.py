"""A whole mesh on mTLS (`rendezvous supervise --tls`) on the real broker.

The supervisor makes the loopback certificates, starts every process with its
RDV_<SERVICE>_TLS__* settings and health-checks each over mTLS, the Go and the Node model
containers (`command` deployments) included. A request scored through TLS is answered by
the model, and its outcome holds the Go and the Node challengers' scores (their runner
reached them over mTLS); a plaintext client and a TLS client without a certificate are
refused by the rendezvous, the control plane and the Go and Node containers alike;
`rendezvous score` and `rendezvous status` find the TLS in state.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rendezvous.v1 import scoring_pb2, scoring_pb2_grpc

from services.core.channels import aio_channel, state_client_tls
from services.core.protos import set_values
from services.core.settings import TlsSettings
from services.demo import diabetes_rows
from services.supervisor.plan import free_port
from tests.conftest import REPO, PulsarBroker
from tests.integration.supervised import RunningMesh, supervised_mesh

pytestmark = pytest.mark.integration

SERVING = health_pb2.HealthCheckResponse.SERVING

OBJECTIVE = "secure"
FEATURES = ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]
TIMEOUT_S = 10.0
# Challengers in other languages (model name -> the program the supervisor runs): they score
# every request beside the incumbent, which alone answers.
POLYGLOT = {
    "go-ridge": ["tools/bin/rendezvous-model-go"],
    "node-ridge": ["node", "services/models/ts/dist/main.js"],
}
CONTAINERS = ["model-go-ridge", "model-node-ridge"]
REQUESTS = 5
AGREEMENT = 1e-9


def mesh_document(listen: str) -> dict[str, Any]:
    challengers = [
        {"name": name, "role": "challenger", "kind": "diabetes", "command": command}
        for name, command in POLYGLOT.items()
    ]
    return {
        "rendezvous": {"listen": listen},
        "objectives": {
            OBJECTIVE: {
                "sla_ms": 150,
                "late_grace_ms": 1000,
                "enrichment": "none",
                "features": [{"name": name} for name in FEATURES],
                "models": [
                    {"name": "ridge", "role": "incumbent", "kind": "diabetes"},
                    *challengers,
                ],
                "policy": [{"until_ms": 120, "accept": ["ridge"]}],
                "default": {"score": 152.13},
                "sampling": {"challenger_fraction": 1.0, "archive_fraction": 0.0},
            }
        },
    }


@pytest.fixture(scope="module")
def mesh(pulsar: PulsarBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMesh]:
    root = tmp_path_factory.mktemp("tls")
    document = mesh_document(f"127.0.0.1:{free_port()}")
    args = ["--tls", "--certs-dir", str(root / "certs")]
    with supervised_mesh(pulsar, root, document, supervise_args=args) as running:
        yield running


def _request(index: int = 0) -> scoring_pb2.ScoreRequest:
    request = scoring_pb2.ScoreRequest(objective=OBJECTIVE, request_id=f"tls-{uuid.uuid4()}")
    set_values(request.features, diabetes_rows()[index])
    return request


async def _score(
    endpoint: str, tls: TlsSettings | None, index: int = 0
) -> scoring_pb2.ScoreResponse:
    async with aio_channel(endpoint, tls) as channel:
        stub: scoring_pb2_grpc.ScoringServiceAsyncStub = scoring_pb2_grpc.ScoringServiceStub(
            channel
        )
        response: scoring_pb2.ScoreResponse = await stub.Score(_request(index), timeout=TIMEOUT_S)
        return response


async def _health(endpoint: str, tls: TlsSettings | None) -> int:
    async with aio_channel(endpoint, tls) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S
        )
        return int(reply.status)


def _cli(mesh: RunningMesh, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "--state-dir", str(mesh.state_dir), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_state_records_the_client_tls(mesh: RunningMesh) -> None:
    tls = state_client_tls(mesh.state())
    assert tls.client_enabled and tls.client_cert_file is not None
    assert not tls.server_enabled
    assert Path(str(tls.ca_file)).exists()


async def test_a_request_is_scored_through_mtls(mesh: RunningMesh) -> None:
    response = await _score(mesh.endpoint, state_client_tls(mesh.state()))
    assert response.decision.model == "ridge"


async def test_the_go_and_node_challengers_score_over_mtls(mesh: RunningMesh) -> None:
    tls = state_client_tls(mesh.state())
    answers = [await _score(mesh.endpoint, tls, index) for index in range(REQUESTS)]
    assert {a.decision.model for a in answers} == {"ridge"}
    outcomes = await mesh.outcomes(OBJECTIVE, {a.request_id for a in answers})
    assert len(outcomes) == REQUESTS
    for outcome in outcomes.values():
        scores = {
            c.prediction.model: c.prediction.prediction.score
            for c in outcome.candidates
            if c.prediction.WhichOneof("result") == "prediction"
        }
        # Every container scored it: the runner reached Go and Node over mTLS.
        assert set(scores) == {"ridge", *POLYGLOT}, outcome
        assert all(abs(score - scores["ridge"]) <= AGREEMENT for score in scores.values())


def _endpoint(mesh: RunningMesh, component: str) -> str:
    if component == "rendezvous":
        return mesh.endpoint
    if component == "control":
        return mesh.control_endpoint
    return str(mesh.process(component)["endpoint"])


@pytest.mark.parametrize("component", ["rendezvous", "control", *CONTAINERS])
async def test_a_plaintext_client_is_refused(mesh: RunningMesh, component: str) -> None:
    endpoint = _endpoint(mesh, component)
    # The same endpoint answers a client with the mesh's certificate.
    assert await _health(endpoint, state_client_tls(mesh.state())) == SERVING
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _health(endpoint, None)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_client_without_a_certificate_is_refused(mesh: RunningMesh) -> None:
    tls = state_client_tls(mesh.state())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _score(mesh.endpoint, TlsSettings(ca_file=tls.ca_file))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("component", CONTAINERS)
async def test_a_container_refuses_a_client_without_a_certificate(
    mesh: RunningMesh, component: str
) -> None:
    tls = state_client_tls(mesh.state())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _health(_endpoint(mesh, component), TlsSettings(ca_file=tls.ca_file))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_command_line_tools_follow_the_meshs_tls(mesh: RunningMesh) -> None:
    scored = _cli(mesh, "score", "--objective", OBJECTIVE)
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["decision"]["model"] == "ridge"
    status = _cli(mesh, "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "NOT SERVING" not in status.stdout
