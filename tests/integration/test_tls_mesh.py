"""A whole mesh on mTLS (`rendezvous supervise --tls`) on the real broker.

The supervisor makes the loopback certificates, starts every process with its
RDV_<SERVICE>_TLS__* settings and health-checks each over mTLS. A request scored through
TLS is answered by the model; a plaintext client and a TLS client without a certificate are
refused, by the rendezvous and by the control plane alike; `rendezvous score` and
`rendezvous status` find the TLS in state.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rendezvous.v1 import scoring_pb2, scoring_pb2_grpc, task_pb2

from services.core.channels import aio_channel, state_client_tls
from services.core.protos import set_values
from services.core.settings import TlsSettings
from services.demo import diabetes_rows
from services.supervisor.plan import free_port
from tests.conftest import REPO, PulsarBroker
from tests.integration.supervised import RunningMesh, supervised_mesh
from tests.integration.test_scoring_path import find

pytestmark = pytest.mark.integration

OBJECTIVE = "secure"
FEATURES = ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]
TIMEOUT_S = 10.0


def mesh_document(listen: str) -> dict[str, Any]:
    return {
        "rendezvous": {"listen": listen},
        "objectives": {
            OBJECTIVE: {
                "sla_ms": 150,
                "late_grace_ms": 1000,
                "enrichment": "none",
                "features": [{"name": name} for name in FEATURES],
                "models": [{"name": "ridge", "role": "incumbent", "kind": "diabetes"}],
                "policy": [{"until_ms": 120, "accept": ["ridge"]}],
                "default": {"score": 152.13},
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


def _request(subject: str = "") -> scoring_pb2.ScoreRequest:
    request = scoring_pb2.ScoreRequest(objective=OBJECTIVE, subject_id=subject)
    set_values(request.features, diabetes_rows()[0])
    return request


async def _score(
    endpoint: str, tls: TlsSettings | None, subject: str = ""
) -> scoring_pb2.ScoreResponse:
    async with aio_channel(endpoint, tls) as channel:
        stub: scoring_pb2_grpc.ScoringServiceAsyncStub = scoring_pb2_grpc.ScoringServiceStub(
            channel
        )
        response: scoring_pb2.ScoreResponse = await stub.Score(_request(subject), timeout=TIMEOUT_S)
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


async def test_a_subjects_outcome_is_sealed_with_a_key_fetched_over_mtls(
    mesh: RunningMesh,
) -> None:
    response = await _score(mesh.endpoint, state_client_tls(mesh.state()), subject="tls-subject")
    outcome = await find(
        mesh.broker,
        f"persistent://public/default/rdv.{OBJECTIVE}.results",
        task_pb2.Outcome,
        lambda o: o.request_id == response.request_id,
        timeout=30,
    )
    # Sealed, not withheld: the rendezvous reached the keyring over mTLS.
    assert outcome.sealed.key_id and not outcome.sealed.withheld
    # The keyring refuses a plaintext client like every other server of the mesh.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _health(mesh.keyring_endpoint, None)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("component", ["rendezvous", "control"])
async def test_a_plaintext_client_is_refused(mesh: RunningMesh, component: str) -> None:
    endpoint = mesh.endpoint if component == "rendezvous" else mesh.control_endpoint
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _health(endpoint, None)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_client_without_a_certificate_is_refused(mesh: RunningMesh) -> None:
    tls = state_client_tls(mesh.state())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _score(mesh.endpoint, TlsSettings(ca_file=tls.ca_file))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_command_line_tools_follow_the_meshs_tls(mesh: RunningMesh) -> None:
    scored = _cli(mesh, "score", "--objective", OBJECTIVE)
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["decision"]["model"] == "ridge"
    status = _cli(mesh, "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "NOT SERVING" not in status.stdout
