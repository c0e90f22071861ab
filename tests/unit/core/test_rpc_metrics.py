"""Per-RPC metrics: every call counted by the status the client got, timed, gauged in flight.

A real `GrpcServer` on loopback serves a small test service through every interceptor it
installs; the assertions read the process' Prometheus registry before and after.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.core.errors import InvalidArgument
from services.core.server import GrpcServer
from tests.helpers import metric_value, until

SERVICE = "rdvtest.Metrics"
RELEASE = asyncio.Event()


def _labels(method: str, kind: str = "unary") -> dict[str, str]:
    return {"grpc_service": SERVICE, "grpc_method": method, "grpc_type": kind}


def handled(method: str, code: str, kind: str = "unary") -> float:
    return metric_value(
        "rdv_grpc_server_handled_total", {**_labels(method, kind), "grpc_code": code}
    )


def timed(method: str, kind: str = "unary") -> float:
    return metric_value("rdv_grpc_server_handling_seconds_count", _labels(method, kind))


def in_flight(method: str, kind: str = "unary") -> float:
    return metric_value("rdv_grpc_server_in_flight", _labels(method, kind))


async def _unary(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    if request == b"invalid":
        raise InvalidArgument([("request", "must not be 'invalid'")])
    if request == b"boom":
        raise RuntimeError("a bug")
    if request == b"hold":
        await RELEASE.wait()
    if request == b"sleep":
        await asyncio.sleep(5)
    return request


async def _server_stream(
    request: bytes, context: grpc.aio.ServicerContext[Any, Any]
) -> AsyncIterator[bytes]:
    for _ in range(3):
        yield request


def _register(server: grpc.aio.Server) -> None:
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE,
                {
                    "Unary": grpc.unary_unary_rpc_method_handler(_unary),
                    "Stream": grpc.unary_stream_rpc_method_handler(_server_stream),
                },
            ),
        )
    )


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    server = GrpcServer(service_names=[SERVICE], registrars=[_register], tcp_address="127.0.0.1:0")
    await server.start()
    await server.set_serving(True)
    try:
        async with grpc.aio.insecure_channel(server.endpoint) as channel:
            yield channel
    finally:
        await server.stop(0)


def _unary_call(
    channel: grpc.aio.Channel, path: str
) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
    call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(path)
    return call


async def _call(channel: grpc.aio.Channel, body: bytes, timeout: float = 5.0) -> grpc.StatusCode:
    try:
        await _unary_call(channel, f"/{SERVICE}/Unary")(body, timeout=timeout)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def test_calls_are_counted_by_the_code_the_client_got_and_each_is_timed(
    channel: grpc.aio.Channel,
) -> None:
    before = {code: handled("Unary", code) for code in ("OK", "INVALID_ARGUMENT", "INTERNAL")}
    timed_before = timed("Unary")
    codes = [await _call(channel, body) for body in (b"ok", b"ok", b"invalid", b"boom")]
    assert codes == [
        grpc.StatusCode.OK,
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        # The error interceptor's mapping of a bug, which the metrics see (they are outside).
        grpc.StatusCode.INTERNAL,
    ]
    assert handled("Unary", "OK") - before["OK"] == 2
    assert handled("Unary", "INVALID_ARGUMENT") - before["INVALID_ARGUMENT"] == 1
    assert handled("Unary", "INTERNAL") - before["INTERNAL"] == 1
    assert timed("Unary") - timed_before == 4
    assert in_flight("Unary") == 0


async def test_a_call_is_in_flight_while_its_handler_runs(channel: grpc.aio.Channel) -> None:
    RELEASE.clear()
    held = asyncio.ensure_future(_call(channel, b"hold"))
    await until(lambda: in_flight("Unary") == 1)
    RELEASE.set()
    assert await held == grpc.StatusCode.OK
    await until(lambda: in_flight("Unary") == 0)


async def test_a_call_past_its_deadline_counts_as_deadline_exceeded(
    channel: grpc.aio.Channel,
) -> None:
    before = handled("Unary", "DEADLINE_EXCEEDED")
    assert await _call(channel, b"sleep", timeout=0.05) == grpc.StatusCode.DEADLINE_EXCEEDED
    # The server cancels the handler once the deadline passed, a moment after the client.
    await until(lambda: handled("Unary", "DEADLINE_EXCEEDED") - before == 1)
    assert in_flight("Unary") == 0


async def test_an_invented_method_is_one_bounded_label(channel: grpc.aio.Channel) -> None:
    unknown = {"grpc_service": "unknown", "grpc_method": "unknown", "grpc_type": "unknown"}
    before = metric_value(
        "rdv_grpc_server_handled_total", {**unknown, "grpc_code": "UNIMPLEMENTED"}
    )
    for path in ("/made.Up/Anything", f"/{SERVICE}/Nope"):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await _unary_call(channel, path)(b"")
        assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
    after = metric_value("rdv_grpc_server_handled_total", {**unknown, "grpc_code": "UNIMPLEMENTED"})
    assert after - before == 2
    assert handled("Nope", "UNIMPLEMENTED") == 0
    assert (
        metric_value(
            "rdv_grpc_server_handled_total",
            {
                "grpc_service": "made.Up",
                "grpc_method": "Anything",
                "grpc_type": "unary",
                "grpc_code": "UNIMPLEMENTED",
            },
        )
        == 0
    )


async def test_streams_are_counted_whether_they_yield_or_write(channel: grpc.aio.Channel) -> None:
    before = handled("Stream", "OK", "server_stream")
    stream: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(
        f"/{SERVICE}/Stream"
    )
    replies = [reply async for reply in stream(b"x")]
    assert replies == [b"x"] * 3
    assert handled("Stream", "OK", "server_stream") - before == 1
    # grpc's own health Watch writes with context.write instead of yielding: still served.
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
    first = await watch.read()
    assert first.status == health_pb2.HealthCheckResponse.SERVING
    watching = {
        "grpc_service": "grpc.health.v1.Health",
        "grpc_method": "Watch",
        "grpc_type": "server_stream",
    }
    assert metric_value("rdv_grpc_server_in_flight", watching) >= 1
    watch.cancel()
