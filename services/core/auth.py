"""Authentication (JWT bearer tokens) and authorization (scopes) of gRPC calls.

`AuthInterceptor` is registered by `GrpcServer` when the service's `auth` settings enable it
(`RDV_<SERVICE>_AUTH__ENABLED=true`). It sits inside `ErrorInterceptor`, so what a client
sees is decided in `services.core.errors`:

- UNAUTHENTICATED: no `authorization: Bearer <jwt>` metadata, or a token that does not verify
  (signature, algorithm, issuer, audience, expiry with `leeway_s`).
- PERMISSION_DENIED: a valid token without the scope the method needs. The check runs before
  the handler, so an unknown objective and a forbidden one answer the same status and the
  same message: a caller without the scope learns nothing about which objectives exist.

Scopes (the token's `scope` claim, space-separated, or `scp`, a list), by method:

    ScoringService.Score                     score:<objective>
    ControlPlaneService.Get/List/History     control:read
    ControlPlaneService.Update               control:write:<objective>
    EvaluationService.GetEvaluationReport    evaluate:<objective>
    FeedbackService.Record                   feedback:<objective>
    KeyringService.GetSubjectKey/GetKeys     privacy:keys (the mesh's own writers and readers)
    KeyringService.Erase                     privacy:erase

A per-objective scope is also granted by `<prefix>:*` and by the bare `<prefix>` (e.g.
`control:write`: every objective). `open_methods` (health, reflection) need no token;
`local_methods` (the collector's delivery stream) need none over the Unix socket and are
refused over TCP; any other method is refused. The handler finds the caller with
`current_principal()`. Logs name the subject, the method and the missing scope, never the
token.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import grpc
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from services.core.errors import Continuation, PermissionDenied, Unauthenticated
from services.core.settings import AuthSettings

log = logging.getLogger(__name__)

BEARER = "bearer "
_UNAUTHENTICATED_MESSAGE = "a valid bearer token is required"
_DENIED_MESSAGE = "the token does not grant this call"


@dataclass(frozen=True)
class Principal:
    """The verified caller: the token's subject and the scopes it grants."""

    subject: str
    scopes: frozenset[str]

    def grants(self, prefix: str, objective: str | None) -> bool:
        """Whether `prefix` (for `objective`, when per-objective) is granted."""
        if prefix in self.scopes:
            return True
        if objective is None:
            return False
        if not objective:
            # No objective: any grant of the prefix lets the handler refuse the request itself.
            return any(scope.startswith(prefix + ":") for scope in self.scopes)
        return f"{prefix}:*" in self.scopes or f"{prefix}:{objective}" in self.scopes


_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "rendezvous_principal", default=None
)


def current_principal() -> Principal | None:
    """The verified caller of the call being handled (None when auth is off)."""
    return _principal.get()


# ---------------------------------------------------------------------------- keys and tokens


def _secret(settings: AuthSettings) -> bytes | None:
    if settings.secret is not None:
        secret = settings.secret.get_secret_value().encode()
    elif settings.secret_file is not None:
        secret = settings.secret_file.read_bytes().strip()
    else:
        return None
    if len(secret) < settings.min_secret_bytes:
        raise ValueError(f"the HS256 secret must have at least {settings.min_secret_bytes} bytes")
    return secret


def _asymmetric_algorithm(key: Any) -> str:
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        return "ES256"
    raise ValueError("the key must be an RSA (RS256) or EC P-256 (ES256) key")


class TokenVerifier:
    """Verifies bearer tokens against the configured keys, issuer and audience."""

    def __init__(self, settings: AuthSettings) -> None:
        self._settings = settings
        # Each algorithm accepted with exactly its own key: no algorithm confusion.
        self._keys: dict[str, Any] = {}
        secret = _secret(settings)
        if secret is not None:
            self._keys["HS256"] = secret
        if settings.public_key_file is not None:
            public = serialization.load_pem_public_key(settings.public_key_file.read_bytes())
            self._keys[_asymmetric_algorithm(public)] = public
        if not self._keys:
            raise ValueError("auth needs a key: secret, secret_file or public_key_file")

    def verify(self, token: str) -> Principal:
        """The token's principal; `Unauthenticated` for anything that does not verify."""
        try:
            algorithm = str(jwt.get_unverified_header(token).get("alg"))
            key = self._keys.get(algorithm)
            if key is None:
                raise jwt.InvalidAlgorithmError("algorithm not accepted")
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self._settings.audience,
                issuer=self._settings.issuer,
                leeway=self._settings.leeway_s,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.PyJWTError as exc:
            log.info("token refused", extra={"why": type(exc).__name__})
            raise Unauthenticated(_UNAUTHENTICATED_MESSAGE) from exc
        return Principal(subject=str(claims["sub"]), scopes=frozenset(_scopes(claims)))


def _scopes(claims: dict[str, Any]) -> list[str]:
    scope = claims.get("scope")
    if isinstance(scope, str):
        return scope.split()
    listed = claims.get("scp")
    if isinstance(listed, list):
        return [str(item) for item in listed]
    return []


def mint_token(settings: AuthSettings, subject: str, scopes: Iterable[str], ttl_s: float) -> str:
    """A token for `subject` with `scopes`, signed by the configured private key (RS256 /
    ES256 from `private_key_file`) or else the HS256 secret; for local use and tests."""
    now = int(time.time())
    claims = {
        "sub": subject,
        "iss": settings.issuer,
        "aud": settings.audience,
        "iat": now,
        "exp": now + int(ttl_s),
        "scope": " ".join(scopes),
    }
    if settings.private_key_file is not None:
        private = serialization.load_pem_private_key(
            settings.private_key_file.read_bytes(), password=None
        )
        return jwt.encode(claims, private, algorithm=_asymmetric_algorithm(private))  # type: ignore[arg-type]
    secret = _secret(settings)
    if secret is None:
        raise ValueError("minting needs auth.private_key_file, auth.secret or auth.secret_file")
    return jwt.encode(claims, secret, algorithm="HS256")


def write_secret(path: Path, n_bytes: int) -> None:
    """A fresh random HS256 secret at `path`, readable by its owner only."""
    import secrets

    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text(secrets.token_urlsafe(n_bytes))


# ---------------------------------------------------------------- what each method needs


@dataclass(frozen=True)
class Rule:
    """The scope a method needs; `objective` reads the request's objective (None: the scope
    is not per objective)."""

    scope: str
    objective: Callable[[Any], str] | None = None


def _field(name: str) -> Callable[[Any], str]:
    return lambda request: str(getattr(request, name))


RULES: dict[str, Rule] = {
    "/rendezvous.v1.ScoringService/Score": Rule("score", _field("objective")),
    "/rendezvous.v1.ControlPlaneService/GetObjectiveConfig": Rule("control:read"),
    "/rendezvous.v1.ControlPlaneService/ListObjectiveConfigs": Rule("control:read"),
    "/rendezvous.v1.ControlPlaneService/ListObjectiveHistory": Rule("control:read"),
    "/rendezvous.v1.ControlPlaneService/UpdateObjectiveConfig": Rule(
        "control:write", lambda request: str(request.config.objective)
    ),
    "/rendezvous.v1.EvaluationService/GetEvaluationReport": Rule("evaluate", _field("objective")),
    "/rendezvous.v1.FeedbackService/Record": Rule("feedback", _field("objective")),
    "/rendezvous.v1.KeyringService/GetSubjectKey": Rule("privacy:keys"),
    "/rendezvous.v1.KeyringService/GetKeys": Rule("privacy:keys"),
    # Not per objective: erasing a subject everywhere is one grant, the scope says it.
    "/rendezvous.v1.KeyringService/Erase": Rule("privacy:erase"),
}


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The token of an `authorization: Bearer <token>` entry, if any."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        text = value.decode() if isinstance(value, bytes) else str(value)
        if text[: len(BEARER)].lower() == BEARER:
            return text[len(BEARER) :].strip() or None
    return None


def token_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying `token` (none without one): what every client command sends."""
    return (("authorization", f"Bearer {token}"),) if token else ()


# ---------------------------------------------------------------------------- the interceptor


def _deny(principal: Principal, method: str, scope: str) -> NoReturn:
    # The log names the scope (and so the objective); the client's message never does.
    log.warning(
        "permission denied", extra={"subject": principal.subject, "method": method, "scope": scope}
    )
    raise PermissionDenied(_DENIED_MESSAGE)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Verifies the caller's token and the scope each method needs, before the handler."""

    def __init__(self, settings: AuthSettings, rules: dict[str, Rule] | None = None) -> None:
        self._verifier = TokenVerifier(settings)
        self._open = frozenset(settings.open_methods)
        self._local = frozenset(settings.local_methods)
        self._rules = RULES if rules is None else rules

    async def intercept_service(
        self,
        continuation: Continuation,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or method in self._open:
            return handler
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._guard_unary(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._guard_stream(method, handler.stream_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        # Other shapes are not served by any component: refuse rather than pass unchecked.
        return grpc.unary_unary_rpc_method_handler(self._refuse)

    async def _refuse(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        raise PermissionDenied(_DENIED_MESSAGE)

    def _authorize(
        self, method: str, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Principal | None:
        """The caller (None for a local method over the Unix socket), or raise."""
        if method in self._local:
            if context.peer().startswith("unix:"):
                return None
            log.warning("local method called over TCP", extra={"method": method})
            raise PermissionDenied(_DENIED_MESSAGE)
        token = bearer_token(context.invocation_metadata())
        if token is None:
            raise Unauthenticated(_UNAUTHENTICATED_MESSAGE)
        principal = self._verifier.verify(token)
        rule = self._rules.get(method)
        if rule is None:
            _deny(principal, method, "-")
        objective: str | None = None
        if rule.objective is not None:
            if request is None:
                # A stream's scope cannot depend on an objective: no request has arrived yet.
                _deny(principal, method, rule.scope)
            objective = rule.objective(request)
        if not principal.grants(rule.scope, objective):
            _deny(principal, method, rule.scope + (f":{objective}" if objective else ""))
        return principal

    def _guard_unary(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            token = _principal.set(self._authorize(method, request, context))
            try:
                return await behavior(request, context)
            finally:
                _principal.reset(token)

        return unary

    def _guard_stream(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def stream(
            request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            token = _principal.set(self._authorize(method, None, context))
            try:
                async for response in behavior(request_iterator, context):
                    yield response
            finally:
                _principal.reset(token)

        return stream
