"""Errors a client may see, and the one interceptor that decides what it sees.

Handlers raise `ServiceError` subclasses; `ErrorInterceptor` turns them into the
right status with `google.rpc` details (BadRequest field violations, ErrorInfo
reasons), turns anything unexpected into INTERNAL with a generic message (the
real exception is logged, never sent), and answers INVALID_ARGUMENT instead of
gRPC's UNKNOWN for request bytes that do not parse.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

log = logging.getLogger(__name__)

ERROR_DOMAIN = "rendezvous.v1"

# What a server interceptor is handed: the next interceptor's (or the server's) handler lookup.
Continuation = Callable[
    [grpc.HandlerCallDetails], Awaitable["grpc.RpcMethodHandler[Any, Any] | None"]
]


class ServiceError(Exception):
    """An error meant for the client: a status, a safe message and details."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason

    def details(self) -> list[any_pb2.Any]:
        info = any_pb2.Any()
        info.Pack(error_details_pb2.ErrorInfo(reason=self.reason, domain=ERROR_DOMAIN))
        return [info]

    def to_status(self) -> grpc.Status:
        status = status_pb2.Status(
            code=self.code.value[0], message=self.message, details=self.details()
        )
        converted: grpc.Status = rpc_status.to_status(status)
        return converted


class InvalidArgument(ServiceError):
    """The request is malformed; `violations` name each offending field."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: Sequence[tuple[str, str]], message: str | None = None) -> None:
        self.violations = list(violations)
        fields = ", ".join(field for field, _ in self.violations)
        super().__init__(message or f"invalid request: {fields}")

    def details(self) -> list[any_pb2.Any]:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
                for field, description in self.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad_request)
        return [packed, *super().details()]


class NotFound(ServiceError):
    """The named resource (e.g. an objective) does not exist."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"


class ResourceExhausted(ServiceError):
    """The service sheds load; the client may retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "OVERLOADED"


class FailedPrecondition(ServiceError):
    """The request is well formed but the system is not in a state to take it (a stale
    `expected_version`, a model nobody serves yet); `violations` are (type, subject,
    description) triples sent as a google.rpc.PreconditionFailure."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"

    def __init__(
        self,
        message: str,
        violations: Sequence[tuple[str, str, str]] = (),
        *,
        reason: str | None = None,
    ) -> None:
        super().__init__(message, reason=reason)
        self.violations = list(violations)

    def details(self) -> list[any_pb2.Any]:
        failure = error_details_pb2.PreconditionFailure(
            violations=[
                error_details_pb2.PreconditionFailure.Violation(
                    type=kind, subject=subject, description=description
                )
                for kind, subject, description in self.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(failure)
        return [packed, *super().details()]


class Unauthenticated(ServiceError):
    """No bearer token, or one that does not verify (signature, issuer, audience, expiry)."""

    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDenied(ServiceError):
    """A valid token without the scope the call needs. The message never names the
    objective, so a caller cannot tell an unknown objective from a forbidden one."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class Unavailable(ServiceError):
    """The service is draining or not ready."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"


_INTERNAL_MESSAGE = "internal error"


class _Undecodable:
    """Stands in for a request whose bytes did not parse, so the handler wrapper can
    answer INVALID_ARGUMENT (gRPC itself would answer UNKNOWN)."""

    __slots__ = ("type_name",)

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name


def _tolerant(
    deserializer: Callable[[bytes], Any] | None, type_name: str
) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        if deserializer is None:
            return data
        try:
            return deserializer(data)
        except DecodeError:
            return _Undecodable(type_name)

    return deserialize


async def _abort_for(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> None:
    if isinstance(exc, ServiceError):
        await context.abort_with_status(exc.to_status())
    log.error("unhandled error in handler", exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, _INTERNAL_MESSAGE)


def _undecodable_error(request: _Undecodable) -> InvalidArgument:
    return InvalidArgument(
        [("", f"the request body is not a valid {request.type_name}")],
        message="request body does not parse",
    )


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps every failure of every handler to a status a client may see."""

    async def intercept_service(
        self,
        continuation: Continuation,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        type_name = (handler_call_details.method or "").rsplit("/", 1)[-1] + " request"
        deserialize = _tolerant(handler.request_deserializer, type_name)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary),
                request_deserializer=deserialize,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                _wrap_stream(handler.stream_stream),
                request_deserializer=deserialize,
                response_serializer=handler.response_serializer,
            )
        return handler


def _wrap_unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, _Undecodable):
            await _abort_for(context, _undecodable_error(request))
        try:
            return await behavior(request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await _abort_for(context, exc)

    return unary


def _wrap_stream(behavior: Callable[..., Any]) -> Callable[..., Any]:
    async def stream(
        request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        async def checked() -> AsyncIterator[Any]:
            async for request in request_iterator:
                if isinstance(request, _Undecodable):
                    raise _undecodable_error(request)
                yield request

        try:
            async for response in behavior(checked(), context):
                yield response
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await _abort_for(context, exc)

    return stream
