"""The auth interceptor over a real loopback grpc.aio server: tokens, scopes, open methods."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import SecretStr, ValidationError
from rendezvous.v1 import control_pb2, control_pb2_grpc, scoring_pb2, scoring_pb2_grpc

from services import cli
from services.control.plane import ControlPlane
from services.control.service import SERVICE_NAME as CONTROL_SERVICE
from services.control.service import ControlPlaneServicer
from services.control.service import registrar as control_registrar
from services.control.settings import ControlSettings
from services.core import client
from services.core.auth import mint_token, token_metadata
from services.core.errors import NotFound
from services.core.server import GrpcServer
from services.core.settings import AuthSettings

SECRET = "s" * 40
SCORING_SERVICE = scoring_pb2.DESCRIPTOR.services_by_name["ScoringService"].full_name


class _Scoring(scoring_pb2_grpc.ScoringServiceServicer):
    """Knows one objective, `demo`; NOT_FOUND for any other, as the rendezvous does."""

    async def Score(
        self, request: scoring_pb2.ScoreRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> scoring_pb2.ScoreResponse:
        if request.objective != "demo":
            raise NotFound(f"unknown objective {request.objective!r}")
        return scoring_pb2.ScoreResponse(request_id="answered")


class _Plane:
    """Stands in for ControlPlane.update: keeps what it was asked to publish."""

    def __init__(self) -> None:
        self.published: list[Any] = []

    async def update(self, config: Any, expected_version: int, validate_only: bool) -> Any:
        self.published.append(config)
        return config


def _add_scoring(server: grpc.aio.Server) -> None:
    scoring_pb2_grpc.add_ScoringServiceServicer_to_server(_Scoring(), server)


@pytest.fixture
async def served() -> AsyncIterator[tuple[str, _Plane]]:
    plane = _Plane()
    server = GrpcServer(
        service_names=[SCORING_SERVICE, CONTROL_SERVICE],
        registrars=[
            _add_scoring,
            control_registrar(ControlPlaneServicer(cast(ControlPlane, plane))),
        ],
        tcp_address="127.0.0.1:0",
        auth=AuthSettings(enabled=True, secret=SecretStr(SECRET)),
    )
    await server.start()
    try:
        yield server.endpoint, plane
    finally:
        await server.stop(0.5)


def _token(*scopes: str, secret: str = SECRET, **overrides: Any) -> str:
    now = int(time.time())
    claims = {
        "sub": "alice",
        "iss": "rendezvous",
        "aud": "rendezvous",
        "iat": now,
        "exp": now + 60,
        "scope": " ".join(scopes),
        **overrides,
    }
    return jwt.encode(claims, secret, algorithm="HS256")


async def _score(endpoint: str, objective: str, token: str | None) -> scoring_pb2.ScoreResponse:
    async with grpc.aio.insecure_channel(endpoint) as channel:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        return await stub.Score(
            scoring_pb2.ScoreRequest(objective=objective), metadata=token_metadata(token)
        )


async def _refused(endpoint: str, objective: str, token: str | None) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _score(endpoint, objective, token)
    return caught.value


async def test_a_token_with_the_scope_scores(served: tuple[str, _Plane]) -> None:
    endpoint, _ = served
    assert (await _score(endpoint, "demo", _token("score:demo"))).request_id == "answered"
    assert (await _score(endpoint, "demo", _token("score:*"))).request_id == "answered"


@pytest.mark.parametrize(
    "token",
    [
        None,
        "not-a-jwt",
        _token("score:demo", secret="another secret of forty bytes, all wrong!"),
        _token("score:demo", exp=int(time.time()) - 3600),
        _token("score:demo", aud="elsewhere"),
        _token("score:demo", iss="someone-else"),
        jwt.encode({"sub": "alice", "scope": "score:demo"}, SECRET, algorithm="HS256"),
    ],
    ids=["none", "garbage", "wrong-signature", "expired", "audience", "issuer", "no-claims"],
)
async def test_no_or_a_bad_token_is_unauthenticated(
    served: tuple[str, _Plane], token: str | None
) -> None:
    err = await _refused(served[0], "demo", token)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert err.details() == "a valid bearer token is required"


async def test_expiry_has_a_small_leeway(served: tuple[str, _Plane]) -> None:
    token = _token("score:demo", exp=int(time.time()) - 5)
    assert (await _score(served[0], "demo", token)).request_id == "answered"


async def test_a_token_without_the_scope_is_denied(served: tuple[str, _Plane]) -> None:
    err = await _refused(served[0], "demo", _token("score:other", "control:read"))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_unknown_and_forbidden_objectives_look_the_same(
    served: tuple[str, _Plane],
) -> None:
    token = _token("score:other")
    existing = await _refused(served[0], "demo", token)
    unknown = await _refused(served[0], "no-such-objective", token)
    assert existing.code() == unknown.code() == grpc.StatusCode.PERMISSION_DENIED
    assert existing.details() == unknown.details()
    assert "demo" not in (existing.details() or "")
    existing_trailers = dict(existing.trailing_metadata() or ())
    unknown_trailers = dict(unknown.trailing_metadata() or ())
    assert existing_trailers == unknown_trailers
    # With the scope, the handler's own NOT_FOUND comes through.
    allowed = await _refused(served[0], "no-such-objective", _token("score:*"))
    assert allowed.code() == grpc.StatusCode.NOT_FOUND


async def test_health_and_reflection_stay_open(served: tuple[str, _Plane]) -> None:
    async with grpc.aio.insecure_channel(served[0]) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_control_update_needs_write_and_records_the_subject(
    served: tuple[str, _Plane],
) -> None:
    endpoint, plane = served
    config = control_pb2.UpdateObjectiveConfigRequest(expected_version=1)
    config.config.objective = "demo"
    config.config.change.author = "mallory"
    async with grpc.aio.insecure_channel(endpoint) as channel:
        stub = control_pb2_grpc.ControlPlaneServiceStub(channel)
        for scopes in (("control:read",), ("control:write:other",)):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.UpdateObjectiveConfig(config, metadata=token_metadata(_token(*scopes)))
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert plane.published == []
        for scopes in (("control:write:demo",), ("control:write",)):
            reply = await stub.UpdateObjectiveConfig(
                config, metadata=token_metadata(_token(*scopes))
            )
            assert reply.config.change.author == "alice"
    assert [c.change.author for c in plane.published] == ["alice", "alice"]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _hs256_by_hand(claims: dict[str, Any], key: bytes) -> str:
    """An HS256 token keyed with anything (PyJWT itself refuses a PEM key as a secret)."""
    claims = {**claims, "exp": int(time.time()) + 60}
    signing_input = (
        _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        + "."
        + _b64(json.dumps(claims).encode())
    )
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def _write_key_pair(tmp_path: Path, private: Any) -> tuple[Path, Path]:
    private_file, public_file = tmp_path / "key.pem", tmp_path / "key.pub"
    private_file.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public_file.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private_file, public_file


@pytest.mark.parametrize(
    "private",
    [
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ec.generate_private_key(ec.SECP256R1()),
    ],
    ids=["RS256", "ES256"],
)
async def test_public_key_tokens_verify_and_hs256_does_not(tmp_path: Path, private: Any) -> None:
    private_file, public_file = _write_key_pair(tmp_path, private)
    verifying = AuthSettings(enabled=True, public_key_file=public_file)
    server = GrpcServer(
        service_names=[SCORING_SERVICE],
        registrars=[_add_scoring],
        tcp_address="127.0.0.1:0",
        auth=verifying,
    )
    await server.start()
    try:
        minting = AuthSettings(private_key_file=private_file)
        good = mint_token(minting, "bob", ["score:demo"], ttl_s=60)
        assert (await _score(server.endpoint, "demo", good)).request_id == "answered"
        # Algorithm confusion: an HS256 token keyed with the public key's bytes is refused.
        forged = _hs256_by_hand(
            {"sub": "bob", "iss": "rendezvous", "aud": "rendezvous", "scope": "score:demo"},
            public_file.read_bytes(),
        )
        err = await _refused(server.endpoint, "demo", forged)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await server.stop(0.5)


def test_auth_is_off_by_default_and_on_needs_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not ControlSettings().auth.enabled
    with pytest.raises(ValidationError):
        AuthSettings(enabled=True)
    monkeypatch.setenv("RDV_CONTROL_AUTH__ENABLED", "true")
    monkeypatch.setenv("RDV_CONTROL_AUTH__SECRET", SECRET)
    settings = ControlSettings()
    assert settings.auth.enabled
    assert settings.auth.secret is not None


def test_a_short_secret_is_refused() -> None:
    with pytest.raises(ValueError):
        mint_token(AuthSettings(secret=SecretStr("short")), "alice", [], ttl_s=60)


async def test_client_channels_send_the_token_from_the_environment(
    served: tuple[str, _Plane],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    endpoint, _ = served
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET)
    argv = ["token", "--subject", "carol", "--scope", "score:demo", "--ttl", "5m"]
    assert cli.main([*argv, "--secret-file", str(secret_file)]) == 0
    minted = capsys.readouterr().out.strip()
    monkeypatch.setenv(client.TOKEN_ENV, minted)
    request = scoring_pb2.ScoreRequest(objective="demo")
    async with client.aio_channel(endpoint) as channel:
        reply = await scoring_pb2_grpc.ScoringServiceStub(channel).Score(request)
    assert reply.request_id == "answered"

    def blocking_score() -> str:
        with client.channel(endpoint) as blocking:
            return str(scoring_pb2_grpc.ScoringServiceStub(blocking).Score(request).request_id)

    # The blocking channel (the objective commands') in a thread: the server shares this loop.
    assert await asyncio.to_thread(blocking_score) == "answered"
    monkeypatch.delenv(client.TOKEN_ENV)
    async with client.aio_channel(endpoint) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await scoring_pb2_grpc.ScoringServiceStub(channel).Score(request)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
