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

A call only adds to plain numbers (the handlers run on the event loop's thread, one at a
time); `_Collector` turns them into the three families when Prometheus scrapes. With the
library's own counter, histogram and gauge (a lock per update, five a call) the interceptor
cost twice as much CPU a call (tools/rpc_metrics_cost.py's in-process figure, alternate
runs: 5.8-8.1 us against 3.1-4.0 us on this busy machine), enough to tip a unit test
that needs 80 calls to start within 50 ms.
"""

from __future__ import annotations

import asyncio
import bisect
import inspect
import itertools
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
from prometheus_client import REGISTRY
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from services.core.errors import Continuation
from services.core.telemetry import SLA_BUCKETS_S

LABELS = ("grpc_service", "grpc_method", "grpc_type")
HANDLED = "rdv_grpc_server_handled"
HANDLING_SECONDS = "rdv_grpc_server_handling_seconds"
IN_FLIGHT = "rdv_grpc_server_in_flight"
_DOCS = {
    HANDLED: "gRPC calls completed by the server, by status code",
    HANDLING_SECONDS: "Time a gRPC call spent in the server (a stream: its whole life)",
    IN_FLIGHT: "gRPC calls (and open streams) in progress",
}
# As prometheus_client writes `le` (Prometheus reads it as a number either way).
_LE = [*(repr(float(bound)) for bound in SLA_BUCKETS_S), "+Inf"]

# A path the server does not serve; any string a client sends would otherwise be a label.
UNKNOWN = "unknown"
_OK = grpc.StatusCode.OK.name
_UNKNOWN_CODE = grpc.StatusCode.UNKNOWN.name
_UNIMPLEMENTED = grpc.StatusCode.UNIMPLEMENTED.name


def split_method(path: str) -> tuple[str, str]:
    """`/pkg.Service/Method` -> (`pkg.Service`, `Method`)."""
    service, _, method = path.lstrip("/").rpartition("/")
    return service, method


class _Method:
    """One served method's numbers (per process, whatever number of servers serve it)."""

    __slots__ = ("attribute", "buckets", "codes", "in_flight", "labels", "make", "seconds", "wrap")

    def __init__(
        self, path: str, handler: grpc.RpcMethodHandler[Any, Any], attribute: str, kind: str
    ) -> None:
        self.labels = [*split_method(path), kind]
        # How its calls are wrapped, decided once: the handler's kind does not change.
        self.attribute = attribute
        self.make = _MAKERS[attribute]
        # A response stream is an async generator, or a coroutine writing with
        # context.write (grpc's own health Watch): each is wrapped as what it is.
        behavior = getattr(handler, attribute)
        self.wrap = _streamed_response if inspect.isasyncgenfunction(behavior) else _unary_response
        self.in_flight = 0
        self.codes: dict[str, int] = {}
        # Per bucket of SLA_BUCKETS_S, then +Inf: not cumulative (the collector adds up).
        self.buckets = [0] * len(_LE)
        self.seconds = 0.0

    def done(self, started: float, code: str) -> None:
        elapsed = time.perf_counter() - started
        # `le` is inclusive: the first bound at or above the time.
        self.buckets[bisect.bisect_left(SLA_BUCKETS_S, elapsed)] += 1
        self.seconds += elapsed
        self.in_flight -= 1
        self.codes[code] = self.codes.get(code, 0) + 1


# A handler's attribute, and its grpc_type; how to make a handler of that kind.
_KINDS = {
    "unary_unary": "unary",
    "unary_stream": "server_stream",
    "stream_unary": "client_stream",
    "stream_stream": "bidi_stream",
}
_MAKERS: dict[str, Callable[..., grpc.RpcMethodHandler[Any, Any]]] = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}

# Every served method's numbers, by path: process-wide, as the registry is. Only paths a
# server registered get here, so it is bounded. Calls to any other path, by count.
_METHODS: dict[str, _Method] = {}
_UNIMPLEMENTED_CALLS = [0]


def _families() -> tuple[CounterMetricFamily, HistogramMetricFamily, GaugeMetricFamily]:
    return (
        CounterMetricFamily(HANDLED, _DOCS[HANDLED], labels=[*LABELS, "grpc_code"]),
        HistogramMetricFamily(HANDLING_SECONDS, _DOCS[HANDLING_SECONDS], labels=LABELS),
        GaugeMetricFamily(IN_FLIGHT, _DOCS[IN_FLIGHT], labels=LABELS),
    )


class _Collector:
    """The three families, from the numbers, at scrape time (on the scraper's thread: each
    `list(...)` copy is one step under the GIL, so a scrape never sees a dict mid-change)."""

    def describe(self) -> list[Metric]:
        return list(_families())

    def collect(self) -> Iterator[Metric]:
        handled, seconds, in_flight = _families()
        for method in list(_METHODS.values()):
            for code, count in list(method.codes.items()):
                handled.add_metric([*method.labels, code], count)
            cumulative = itertools.accumulate(list(method.buckets))
            seconds.add_metric(
                method.labels,
                [(le, float(count)) for le, count in zip(_LE, cumulative, strict=True)],
                sum_value=method.seconds,
            )
            in_flight.add_metric(method.labels, method.in_flight)
        if _UNIMPLEMENTED_CALLS[0]:
            handled.add_metric([UNKNOWN, UNKNOWN, UNKNOWN, _UNIMPLEMENTED], _UNIMPLEMENTED_CALLS[0])
        yield from (handled, seconds, in_flight)


REGISTRY.register(_Collector())


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


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts, times and gauges every call; install it first (outermost)."""

    async def intercept_service(
        self,
        continuation: Continuation,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            # gRPC answers UNIMPLEMENTED; the path is not a label.
            _UNIMPLEMENTED_CALLS[0] += 1
            return None
        path = handler_call_details.method
        method = _METHODS.get(path)
        if method is None:
            kind = next((k for k in _KINDS if getattr(handler, k) is not None), None)
            if kind is None:
                return handler
            method = _METHODS[path] = _Method(path, handler, kind, _KINDS[kind])
        return method.make(
            method.wrap(getattr(handler, method.attribute), method),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
