"""The mesh on a broker with token authentication and authorization on (issue 13, "Trust").

The module starts a broker of its own (`tools/pulsar.sh up` with `PULSAR_AUTH=token`, its
own ports and run dir, beside the session's broker) and stops it at the end. Asserted: the
admin REST API answers 401 without the token and 200 with it; a client without a token, or
with one the broker's key did not sign, cannot create a producer or a reader (the broker
logs the failed authentication); a supervised mesh given only the token file scores
requests end to end, answered by its model.
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from rendezvous.v1 import objective_pb2, scoring_pb2, scoring_pb2_grpc

from services.core.bus import BusError, connect
from services.core.protos import set_values
from services.supervisor.plan import free_port
from tests.conftest import REPO, PulsarBroker, broker_started
from tests.integration.supervised import RunningMesh, supervised_mesh

pytestmark = pytest.mark.integration

# Beside the session's broker (6650/8080) and its run dir.
RUN_DIR = REPO / ".run" / "pulsar-auth"
BROKER_ENV = {
    "PULSAR_AUTH": "token",
    "PULSAR_BROKER_PORT": "6696",
    "PULSAR_WEB_PORT": "8196",
    "PULSAR_RUN_DIR": str(RUN_DIR),
}
# A refused client retries its connection until the operation timeout, then fails.
REFUSED_TIMEOUT_S = 2.0
OBJECTIVE = "authdemo"
MODEL = "ridge-auth"
FEATURES = ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]
REQUESTS = 20
SCORE_TIMEOUT_S = 5.0
# A JWT signed with some other key: well formed, not the broker's.
FOREIGN_TOKEN = (
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJyZW5kZXp2b3VzIn0."
    "c2lnbmVkLXdpdGgtc29tZS1vdGhlci1rZXktbm90LXRoZS1icm9rZXJz"
)


@pytest.fixture(scope="module")
def auth_broker() -> Iterator[PulsarBroker]:
    with broker_started(BROKER_ENV) as broker:
        assert broker.token_file is not None, "tools/pulsar.sh env printed no PULSAR_TOKEN_FILE"
        assert broker.token_file.stat().st_mode & 0o077 == 0, "the token must be private"
        yield broker


def mesh_document(listen: str) -> dict[str, Any]:
    return {
        "rendezvous": {"listen": listen},
        "objectives": {
            OBJECTIVE: {
                "sla_ms": 1000,
                "late_grace_ms": 1000,
                "features": [{"name": name} for name in FEATURES],
                "models": [
                    {
                        "name": MODEL,
                        "role": "incumbent",
                        "kind": "diabetes",
                        "args": {"algorithm": "ridge"},
                    }
                ],
                "policy": [{"until_ms": 900, "accept": [MODEL]}],
                "default": {"score": 152.13},
            }
        },
    }


def test_admin_api_needs_the_token(auth_broker: PulsarBroker) -> None:
    url = auth_broker.admin_url + "/admin/v2/namespaces/public"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=10).close()
    assert refused.value.code == 401
    assert "public/default" in auth_broker.admin_get("/admin/v2/namespaces/public")


@pytest.mark.parametrize(
    "credentials",
    [{"token_file": None}, {"token_file": None, "token": FOREIGN_TOKEN}],
    ids=["no-token", "foreign-token"],
)
async def test_client_without_a_valid_token_is_refused(
    auth_broker: PulsarBroker, credentials: dict[str, Any]
) -> None:
    log = RUN_DIR / "logs" / "stdout.log"
    logged = log.read_text(errors="replace").count("Failed to authenticate")
    settings = auth_broker.settings(operation_timeout_s=REFUSED_TIMEOUT_S, **credentials)
    bus = connect(settings, "itest-noauth")
    topic = f"persistent://public/default/auth-refused-{credentials.get('token') is None}"
    try:
        with pytest.raises(BusError):
            await bus.publisher(topic, objective_pb2.ObjectiveConfig)
        with pytest.raises(BusError):
            await bus.reader(topic, objective_pb2.ObjectiveConfig)
    finally:
        await bus.close()
    # Refused for its credentials, not for some other reason.
    assert log.read_text(errors="replace").count("Failed to authenticate") > logged


@pytest.fixture(scope="module")
def auth_mesh(
    auth_broker: PulsarBroker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningMesh]:
    document = mesh_document(f"127.0.0.1:{free_port()}")
    with supervised_mesh(auth_broker, tmp_path_factory.mktemp("authmesh"), document) as running:
        yield running


async def test_scoring_works_end_to_end_with_the_token(auth_mesh: RunningMesh) -> None:
    answers: list[scoring_pb2.ScoreResponse] = []
    async with grpc.aio.insecure_channel(auth_mesh.endpoint) as channel:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        for index in range(REQUESTS):
            request = scoring_pb2.ScoreRequest(objective=OBJECTIVE, request_id=f"auth-{index}")
            set_values(request.features, dict.fromkeys(FEATURES, 0.01 * index))
            answers.append(await stub.Score(request, timeout=SCORE_TIMEOUT_S))
            await asyncio.sleep(0.01)
    by_model = [a for a in answers if a.decision.source == scoring_pb2.ANSWER_SOURCE_MODEL]
    # The model answers (through the broker, with the token); the odd default is tolerated.
    assert len(by_model) >= REQUESTS * 0.9, [a.decision for a in answers]
    assert {a.decision.model for a in by_model} == {MODEL}
