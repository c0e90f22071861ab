"""`rendezvous.v1.ControlPlaneService`: the gRPC face of `ControlPlane`.

Errors (services/core/errors.py): INVALID_ARGUMENT with a field violation per problem,
FAILED_PRECONDITION with a PreconditionFailure for a stale `expected_version` or a model no
runner serves yet, NOT_FOUND for an unknown objective or version, UNAVAILABLE until the
plane has caught up with the topic. With auth on (services/core/auth.py) the change's author
is the token's subject, never the author the client sent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from rendezvous.v1 import control_pb2, control_pb2_grpc

from services.control.plane import ControlPlane
from services.core.auth import current_principal
from services.core.errors import InvalidArgument

SERVICE_NAME: str = control_pb2.DESCRIPTOR.services_by_name["ControlPlaneService"].full_name


def _objective(name: str) -> str:
    if not name:
        raise InvalidArgument([("objective", "the objective is required")])
    return name


class ControlPlaneServicer(control_pb2_grpc.ControlPlaneServiceServicer):
    """Reads from the plane's followers; writes through its one update path."""

    def __init__(self, plane: ControlPlane) -> None:
        self._plane = plane

    async def GetObjectiveConfig(
        self,
        request: control_pb2.GetObjectiveConfigRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> control_pb2.GetObjectiveConfigResponse:
        if request.version < 0:
            raise InvalidArgument([("version", "must be 0 (the current one) or a version")])
        config = self._plane.get(_objective(request.objective), request.version)
        return control_pb2.GetObjectiveConfigResponse(config=config)

    async def ListObjectiveConfigs(
        self,
        request: control_pb2.ListObjectiveConfigsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> control_pb2.ListObjectiveConfigsResponse:
        return control_pb2.ListObjectiveConfigsResponse(configs=self._plane.list_current())

    async def UpdateObjectiveConfig(
        self,
        request: control_pb2.UpdateObjectiveConfigRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> control_pb2.UpdateObjectiveConfigResponse:
        if not request.HasField("config"):
            raise InvalidArgument([("config", "the new configuration is required")])
        if request.expected_version < 0:
            raise InvalidArgument([("expected_version", "must not be negative")])
        principal = current_principal()
        if principal is not None:
            # With auth on, the author is who the token says, whatever the client wrote.
            request.config.change.author = principal.subject
        stored = await self._plane.update(
            request.config, request.expected_version, request.validate_only
        )
        return control_pb2.UpdateObjectiveConfigResponse(config=stored)

    async def ListObjectiveHistory(
        self,
        request: control_pb2.ListObjectiveHistoryRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> control_pb2.ListObjectiveHistoryResponse:
        versions = self._plane.history(_objective(request.objective))
        return control_pb2.ListObjectiveHistoryResponse(versions=versions)


def registrar(servicer: ControlPlaneServicer) -> Callable[[grpc.aio.Server], None]:
    def register(server: grpc.aio.Server) -> None:
        control_pb2_grpc.add_ControlPlaneServiceServicer_to_server(servicer, server)

    return register
