"""Per-RPC metrics of every gRPC server: calls by status code, latency, calls in flight.

`RpcMetricsInterceptor` is the outermost server interceptor `GrpcServer` installs (before the
error interceptor, so a call is counted with the status the client got, after the error
mapping). The names follow go-grpc-prometheus with our prefix, and the Go and Node model
containers export the same three (services/models/go/metrics.go, services/models/ts/src/metrics.ts):

- `rdv_grpc_server_handled_total{grpc_service, grpc_method, grpc_type, grpc_code}`: calls
  completed;
- `rdv_grpc_server_handling_seconds{grpc_service, grpc_method, grpc_type}`: a histogram of
  how long a call took in the server, from the handler's start to its last message (a
  stream: its whole life), with millisecond buckets around the 50 ms SLA (`SLA_BUCKETS_S`);
- `rdv_grpc_server_in_flight{grpc_service, grpc_method, grpc_type}`: calls (and open
  streams) running now.

`grpc_type` is unary, client_stream, server_stream or bidi_stream (latency panels take the
unary calls: a stream's time is how long it stayed open). Label values stay bounded: a
method is labelled only when the server registered it; a call to any other path (a client
may invent any) counts as `unknown`/`unknown` UNIMPLEMENTED. Codes are the 17 gRPC status
names (`INVALID_ARGUMENT`).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from prometheus_client import Counter

from services.core.errors import Continuation
from services.core.telemetry import SLA_BUCKETS_S, counter, gauge, histogram

LABELS = ("grpc_service", "grpc_method", "grpc_type")

HANDLED = counter(
    "rdv_grpc_server_handled",
    "gRPC calls completed by the server, by status code",
    (*LABELS, "grpc_code"),
)
HANDLING_SECONDS = histogram(
    "rdv_grpc_server_handling_seconds",
    "Time a gRPC call spent in the server (a stream: its whole life)",
    LABELS,
    buckets=SLA_BUCKETS_S,
)
IN_FLIGHT = gauge("rdv_grpc_server_in_flight", "gRPC calls (and open streams) in progress", LABELS)

# A path the server does not serve; any string a client sends would otherwise be a label.
UNKNOWN = "unknown"
_OK = grpc.StatusCode.OK.name
_UNKNOWN_CODE = grpc.StatusCode.UNKNOWN.name


def split_method(path: str) -> tuple[str, str]:
    """`/pkg.Service/Method` -> (`pkg.Service`, `Method`)."""
    service, _, method = path.lstrip("/").rpartition("/")
    return service, method


class _Method:
    """The labelled children of one served method, looked up once, and its calls in flight
    (one per process, whatever number of servers serve the method)."""

    __slots__ = ("_handled", "_labels", "in_flight", "latency")

    def __init__(self, service: str, method: str, kind: str) -> None:
        self._labels = (service, method, kind)
        self._handled: dict[str, Counter] = {}
        self.latency = HANDLING_SECONDS.labels(*self._labels)
        # A plain int, read at scrape time: calls run on the event loop's thread only, and
        # the gauge's own inc and dec would take its lock twice a call.
        self.in_flight = 0
        IN_FLIGHT.labels(*self._labels).set_function(lambda: self.in_flight)

    def handled(self, code: str) -> Counter:
        child = self._handled.get(code)
        if child is None:
            child = self._handled[code] = HANDLED.labels(*self._labels, code)
        return child

    def done(self, started: float, code: str) -> None:
        self.latency.observe(time.perf_counter() - started)
        self.in_flight -= 1
        self.handled(code).inc()


# Every served method's metrics, by path: process-wide, as the registry is. Only paths a
# server registered get here, so it is bounded.
_METHODS: dict[str, _Method] = {}


def _code(context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None) -> str:
    """The status the client gets: the code the handler set or aborted with, else OK after a
    return, CANCELLED or DEADLINE_EXCEEDED after a cancel, UNKNOWN after an exception."""
    code = context.code()
    if code is not None:
        return str(code.name)
    if error is None:
        return _OK
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= 0
        return grpc.StatusCode.DEADLINE_EXCEEDED.name if expired else "CANCELLED"
    return _UNKNOWN_CODE


def _unary_response(behavior: Callable[..., Any], method: _Method) -> Callable[..., Any]:
    async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        method.in_flight += 1
        started = time.perf_counter()
        try:
            response = await behavior(request, context)
        except BaseException as error:
            method.done(started, _code(context, error))
            raise
        method.done(started, _code(context, None))
        return response

    return call


def _streamed_response(behavior: Callable[..., Any], method: _Method) -> Callable[..., Any]:
    async def stream(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        method.in_flight += 1
        started = time.perf_counter()
        try:
            async for response in behavior(request, context):
                yield response
        except BaseException as error:
            method.done(started, _code(context, error))
            raise
        method.done(started, _code(context, None))

    return stream


def _wrap(behavior: Callable[..., Any], method: _Method) -> Callable[..., Any]:
    # A response stream is an async generator, or a coroutine writing with context.write
    # (grpc's own health Watch): each is wrapped as what it is.
    if inspect.isasyncgenfunction(behavior):
        return _streamed_response(behavior, method)
    return _unary_response(behavior, method)


# The handler's attribute, its grpc_type, and how to make a handler of that kind.
_KINDS: tuple[tuple[str, str, Callable[..., grpc.RpcMethodHandler[Any, Any]]], ...] = (
    ("unary_unary", "unary", grpc.unary_unary_rpc_method_handler),
    ("unary_stream", "server_stream", grpc.unary_stream_rpc_method_handler),
    ("stream_unary", "client_stream", grpc.stream_unary_rpc_method_handler),
    ("stream_stream", "bidi_stream", grpc.stream_stream_rpc_method_handler),
)


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts, times and gauges every call; install it first (outermost)."""

    def __init__(self) -> None:
        self._unimplemented = HANDLED.labels(
            UNKNOWN, UNKNOWN, UNKNOWN, grpc.StatusCode.UNIMPLEMENTED.name
        )

    async def intercept_service(
        self,
        continuation: Continuation,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            # gRPC answers UNIMPLEMENTED; the path is not a label.
            self._unimplemented.inc()
            return None
        path = handler_call_details.method or ""
        for attribute, kind, make in _KINDS:
            behavior = getattr(handler, attribute)
            if behavior is None:
                continue
            method = _METHODS.get(path)
            if method is None:
                method = _METHODS[path] = _Method(*split_method(path), kind)
            return make(
                _wrap(behavior, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
