"""Client interceptors adding `authorization: Bearer <token>` to every unary call.

Used through `services.core.client` (kept apart so that the `rendezvous` command imports
grpc only when a command makes a call).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import grpc


def _with_token(metadata: Any, token: str) -> list[tuple[str, str]]:
    kept = [(key, value) for key, value in (metadata or ()) if key.lower() != "authorization"]
    return [*kept, ("authorization", f"Bearer {token}")]


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


class SyncBearer(grpc.UnaryUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        details = _CallDetails(
            client_call_details.method,
            client_call_details.timeout,
            _with_token(client_call_details.metadata, self._token),
            client_call_details.credentials,
            client_call_details.wait_for_ready,
            getattr(client_call_details, "compression", None),
        )
        return continuation(details, request)


class AioBearer(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        details = grpc.aio.ClientCallDetails(
            client_call_details.method,
            client_call_details.timeout,
            grpc.aio.Metadata(*_with_token(client_call_details.metadata, self._token)),
            client_call_details.credentials,
            client_call_details.wait_for_ready,
        )
        return await continuation(details, request)
