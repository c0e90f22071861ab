"""The mesh on a broker with TLS only and token authentication and authorization on
(issue 13, "Trust").

The module starts one broker of its own (`tools/pulsar.sh up` with `PULSAR_TLS=only` and
`PULSAR_AUTH=token`: pulsar+ssl:// and https:// with a fresh local CA, no plaintext port;
its own ports and run dir, beside the session's broker) and stops it at the end. Asserted:
the admin REST API answers only over https to a client trusting the CA, 401 without the
token and 200 with it; a client without a token, or with one the broker's key did not sign,
cannot create a producer or a reader (the broker logs the failed authentication); a client
that does not trust the CA, or speaks plaintext to the TLS port, is refused; a supervised
mesh given only the token file and the CA scores requests end to end over TLS, answered by
its model, and its outcomes reach the results topic.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from rendezvous.v1 import objective_pb2, scoring_pb2, scoring_pb2_grpc

from services.core.bus import BusError, connect
from services.core.protos import set_values
from services.core.settings import PulsarSettings
from services.supervisor.plan import free_port
from tests.conftest import REPO, PulsarBroker, broker_started
from tests.integration.supervised import RunningMesh, supervised_mesh

pytestmark = pytest.mark.integration

# Beside the session's broker (6650/8080) and its run dir; the TLS ports can be moved (a
# machine that runs several checkouts' tests at once).
RUN_DIR = REPO / ".run" / "pulsar-auth"
BROKER_ENV = {
    "PULSAR_AUTH": "token",
    "PULSAR_TLS": "only",
    "PULSAR_BROKER_TLS_PORT": os.environ.get("RDV_TEST_PULSAR_TLS_PORT", "6696"),
    "PULSAR_WEB_TLS_PORT": os.environ.get("RDV_TEST_PULSAR_WEB_TLS_PORT", "8196"),
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
        assert broker.tls_trust_certs_file is not None, "no PULSAR_TLS_TRUST_CERTS_FILE"
        yield broker


@pytest.fixture(scope="module")
def foreign_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA of another mesh: its certificates are well formed, not the broker's."""
    out = tmp_path_factory.mktemp("foreign-ca")
    subprocess.run([sys.executable, "-m", "tools.certs", "--out", str(out)], cwd=REPO, check=True)
    return out / "ca.pem"


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


def test_the_broker_serves_tls_only(auth_broker: PulsarBroker) -> None:
    tls_port, web_tls_port = BROKER_ENV["PULSAR_BROKER_TLS_PORT"], BROKER_ENV["PULSAR_WEB_TLS_PORT"]
    assert auth_broker.service_url == f"pulsar+ssl://127.0.0.1:{tls_port}"
    assert auth_broker.admin_url == f"https://127.0.0.1:{web_tls_port}"
    key = RUN_DIR / "tls" / "server-key.pem"
    assert key.stat().st_mode & 0o077 == 0, "the broker's key must be private"
    # The standalone opened no plaintext port (PULSAR_TLS=only empties both).
    config = (RUN_DIR / "standalone.conf").read_text().splitlines()
    assert {"brokerServicePort=", "webServicePort="} <= set(config)


def test_admin_api_needs_the_ca_and_the_token(auth_broker: PulsarBroker) -> None:
    url = auth_broker.admin_url + "/admin/v2/namespaces/public"
    trusting = ssl.create_default_context(cafile=str(auth_broker.tls_trust_certs_file))
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=10, context=trusting).close()
    assert refused.value.code == 401
    assert "public/default" in auth_broker.admin_get("/admin/v2/namespaces/public")
    # Not trusting the broker's CA (the system's CAs): the handshake fails.
    with pytest.raises(urllib.error.URLError) as untrusted:
        urllib.request.urlopen(url, timeout=10).close()
    assert isinstance(untrusted.value.reason, ssl.SSLCertVerificationError)
    # Plain HTTP to the https port: the broker answers with a TLS alert, not HTTP.
    with pytest.raises(http.client.BadStatusLine):
        urllib.request.urlopen(url.replace("https:", "http:", 1), timeout=10).close()


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


async def _refused(settings: PulsarSettings, topic: str) -> BusError:
    bus = connect(settings, "itest-notls")
    try:
        with pytest.raises(BusError) as refused:
            await bus.publisher(topic, objective_pb2.ObjectiveConfig)
    finally:
        await bus.close()
    return refused.value


@pytest.mark.parametrize("trust", ["system", "foreign"])
async def test_client_not_trusting_the_ca_is_refused(
    auth_broker: PulsarBroker, foreign_ca: Path, trust: str
) -> None:
    settings = auth_broker.settings(
        operation_timeout_s=REFUSED_TIMEOUT_S,
        tls_trust_certs_file=None if trust == "system" else foreign_ca,
    )
    refused = await _refused(settings, f"persistent://public/default/tls-refused-{trust}")
    # Refused at the handshake (the client checks the broker's certificate), token or not.
    assert "Handshake failed" in str(refused), refused


async def test_plaintext_client_on_the_tls_port_is_refused(auth_broker: PulsarBroker) -> None:
    plaintext = auth_broker.service_url.replace("pulsar+ssl://", "pulsar://", 1)
    settings = auth_broker.settings(operation_timeout_s=REFUSED_TIMEOUT_S, service_url=plaintext)
    await _refused(settings, "persistent://public/default/tls-refused-plaintext")


@pytest.fixture(scope="module")
def auth_mesh(
    auth_broker: PulsarBroker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningMesh]:
    document = mesh_document(f"127.0.0.1:{free_port()}")
    with supervised_mesh(auth_broker, tmp_path_factory.mktemp("authmesh"), document) as running:
        yield running


async def test_scoring_works_end_to_end_over_tls_with_the_token(auth_mesh: RunningMesh) -> None:
    # What the command-line tools read to reach the broker (PulsarSettings.for_mesh).
    state = auth_mesh.state()
    assert state["pulsar_url"].startswith("pulsar+ssl://")
    assert state["pulsar_tls_trust_certs_file"] == str(auth_mesh.broker.tls_trust_certs_file)
    answers: list[scoring_pb2.ScoreResponse] = []
    async with grpc.aio.insecure_channel(auth_mesh.endpoint) as channel:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        for index in range(REQUESTS):
            request = scoring_pb2.ScoreRequest(objective=OBJECTIVE, request_id=f"auth-{index}")
            set_values(request.features, dict.fromkeys(FEATURES, 0.01 * index))
            answers.append(await stub.Score(request, timeout=SCORE_TIMEOUT_S))
            await asyncio.sleep(0.01)
    by_model = [a for a in answers if a.decision.source == scoring_pb2.ANSWER_SOURCE_MODEL]
    # The model answers (through the broker, over TLS, with the token); the odd default is
    # tolerated.
    assert len(by_model) >= REQUESTS * 0.9, [a.decision for a in answers]
    assert {a.decision.model for a in by_model} == {MODEL}
    # And every request's outcome reached the results topic.
    outcomes = await auth_mesh.outcomes(OBJECTIVE, {a.request_id for a in answers})
    assert len(outcomes) == REQUESTS
