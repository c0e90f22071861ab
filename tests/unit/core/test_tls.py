"""TLS and mTLS on real loopback servers: the server credentials GrpcServer builds and the
channels `services.core.channels` opens (handshakes that succeed with the right CA, fail with
a wrong one, and an mTLS server refusing a client without a certificate)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError
from pydantic_settings import SettingsConfigDict

from services.core.channels import aio_channel, mesh_client_tls, sync_channel
from services.core.server import GrpcServer, server_credentials
from services.core.settings import ServiceSettings, TlsSettings
from services.supervisor.certs import CA_CERT, client_only, mesh_tls
from tools.certs import write_loopback_certs

TIMEOUT_S = 5.0


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    write_loopback_certs(out, days=1)
    return out


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Certificates of another CA: a server or client nobody here should trust."""
    out = tmp_path_factory.mktemp("other")
    write_loopback_certs(out, days=1)
    return out


async def _serve(tls: TlsSettings) -> AsyncIterator[str]:
    server = GrpcServer(service_names=[], registrars=[], tcp_address="127.0.0.1:0", tls=tls)
    await server.start()
    await server.set_serving(True)
    try:
        yield server.endpoint
    finally:
        await server.stop(0)


@pytest.fixture
async def tls_server(certs: Path) -> AsyncIterator[str]:
    """Server-side TLS only: any client trusting the CA may call."""
    tls = mesh_tls(certs)
    async for endpoint in _serve(TlsSettings(cert_file=tls.cert_file, key_file=tls.key_file)):
        yield endpoint


@pytest.fixture
async def mtls_server(certs: Path) -> AsyncIterator[str]:
    async for endpoint in _serve(mesh_tls(certs)):
        yield endpoint


async def _check(endpoint: str, tls: TlsSettings | None) -> int:
    async with aio_channel(endpoint, tls) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S
        )
        return int(reply.status)


async def test_tls_handshake_with_the_right_ca(tls_server: str, certs: Path) -> None:
    tls = TlsSettings(ca_file=certs / CA_CERT)
    assert await _check(tls_server, tls) == health_pb2.HealthCheckResponse.SERVING


async def test_tls_handshake_fails_with_a_wrong_ca(tls_server: str, other_certs: Path) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _check(tls_server, TlsSettings(ca_file=other_certs / CA_CERT))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_plaintext_client_is_refused_by_a_tls_server(tls_server: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _check(tls_server, None)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mtls_serves_a_client_with_a_certificate(mtls_server: str, certs: Path) -> None:
    tls = client_only(mesh_tls(certs))
    assert await _check(mtls_server, tls) == health_pb2.HealthCheckResponse.SERVING


async def test_mtls_refuses_a_client_without_a_certificate(mtls_server: str, certs: Path) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _check(mtls_server, TlsSettings(ca_file=certs / CA_CERT))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mtls_refuses_a_client_certificate_of_another_ca(
    mtls_server: str, certs: Path, other_certs: Path
) -> None:
    foreign = mesh_tls(other_certs)
    tls = TlsSettings(
        ca_file=certs / CA_CERT,
        client_cert_file=foreign.client_cert_file,
        client_key_file=foreign.client_key_file,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _check(mtls_server, tls)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_the_blocking_channel_speaks_mtls_too(mtls_server: str, certs: Path) -> None:
    # The server lives on this loop: the blocking call runs on a worker thread.
    def check() -> int:
        with sync_channel(mtls_server, client_only(mesh_tls(certs))) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S
            )
            return int(reply.status)

    assert await asyncio.to_thread(check) == health_pb2.HealthCheckResponse.SERVING


def test_plaintext_is_the_default() -> None:
    settings = ServiceSettings()
    assert not settings.tls.server_enabled and not settings.tls.client_enabled
    assert server_credentials(settings.tls) is None


def test_tls_settings_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, certs: Path
) -> None:
    class _Probe(ServiceSettings):
        model_config = SettingsConfigDict(env_prefix="RDV_PROBE_")

    for key, value in mesh_tls(certs).env().items():
        monkeypatch.setenv(f"RDV_PROBE_{key}", value)
    assert _Probe().tls == mesh_tls(certs)


@pytest.mark.parametrize(
    "fields",
    [
        {"cert_file": "server.pem"},
        {"client_cert_file": "client.pem", "ca_file": "ca.pem"},
        {"client_ca_file": "ca.pem"},
        {"client_cert_file": "c.pem", "client_key_file": "k.pem"},
    ],
)
def test_incomplete_tls_settings_are_refused(fields: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        TlsSettings.model_validate(fields)


def test_an_unreadable_file_is_a_clear_error(tmp_path: Path) -> None:
    tls = TlsSettings(cert_file=tmp_path / "none.pem", key_file=tmp_path / "none-key.pem")
    with pytest.raises(ValueError, match=r"cannot read the TLS server key \(tls.key_file\)"):
        server_credentials(tls)


def test_the_tools_read_the_running_meshs_tls(tmp_path: Path, certs: Path) -> None:
    assert mesh_client_tls(tmp_path) == TlsSettings()
    tls = client_only(mesh_tls(certs))
    (tmp_path / "state.json").write_text(f'{{"tls": {tls.model_dump_json()}}}')
    assert mesh_client_tls(tmp_path) == tls
