"""Helpers for model-container tests: start a real server, read rich error details."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from rendezvous.v1 import model_pb2_grpc

from services.models.app import ModelContainer
from services.models.settings import ModelSettings


@dataclass
class Served:
    """A running model container and a client stub for it."""

    container: ModelContainer
    channel: grpc.aio.Channel
    stub: model_pb2_grpc.ModelServiceAsyncStub

    async def close(self) -> None:
        await self.channel.close()
        await self.container.stop()


ServeModel = Callable[..., Awaitable[Served]]


async def serve(
    kind: str,
    args: dict[str, Any] | None = None,
    *,
    name: str = "",
    version: str = "1",
    listen: str = "127.0.0.1:0",
) -> Served:
    """Start a model container on a real socket and connect a client to it."""
    settings = ModelSettings(
        kind=kind,  # type: ignore[arg-type]
        args=args or {},
        name=name,
        version=version,
        listen=listen,
        shutdown_grace_s=0.2,
    )
    container = ModelContainer(settings)
    await container.start()
    channel = grpc.aio.insecure_channel(container.endpoint)
    return Served(container, channel, model_pb2_grpc.ModelServiceStub(channel))


def field_violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    """The google.rpc.BadRequest field violations an error carries, field -> description."""
    status = rpc_status.from_call(error)
    assert status is not None, "the error carries no google.rpc.Status"
    violations: dict[str, str] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            for violation in bad_request.field_violations:
                violations[violation.field] = violation.description
    return violations
