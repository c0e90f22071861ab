"""The common component lifecycle: start order, reverse stop order, owned vs given bus, and a
loop that ends by itself failing the process instead of leaving it up and useless."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.core.bus import Bus
from services.core.lifecycle import Component, serve_until_signalled
from services.core.settings import ServiceSettings


class _Recorder(Component):
    """Opens three resources and a watched loop that ends when told to."""

    uses_bus = False

    def __init__(
        self, events: list[str], *, fail_open: bool = False, hang_open: bool = False
    ) -> None:
        super().__init__(ServiceSettings(listen="127.0.0.1:0"), name="recorder")
        self.events = events
        self.fail_open = fail_open
        self.hang_open = hang_open
        self.end_loop = asyncio.Event()

    async def open(self, stack: contextlib.AsyncExitStack) -> None:
        self.events.append("open")
        for name in ("first", "second"):
            stack.callback(self.events.append, f"close {name}")

        async def loop() -> None:
            await self.end_loop.wait()

        task = self.watch(asyncio.create_task(loop(), name="recorder:loop"))

        async def cancel() -> None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self.events.append("close loop")

        stack.push_async_callback(cancel)
        if self.fail_open:
            raise RuntimeError("open failed half-way")
        if self.hang_open:
            # Like a standby that waits for an exclusive producer.
            await asyncio.Event().wait()

    async def drain(self) -> None:
        self.events.append("drain")


async def _health(endpoint: str) -> int:
    async with grpc.aio.insecure_channel(endpoint) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=2.0
        )
        return int(reply.status)


async def test_stop_closes_in_reverse_order_after_draining() -> None:
    events: list[str] = []
    component = _Recorder(events)
    await component.start()
    assert await _health(component.endpoint) == health_pb2.HealthCheckResponse.SERVING

    await component.stop()

    assert events == ["open", "drain", "close loop", "close second", "close first"]
    assert not component.failed.is_set()


async def test_a_failed_start_closes_what_it_had_opened() -> None:
    events: list[str] = []
    component = _Recorder(events, fail_open=True)

    with pytest.raises(RuntimeError, match="half-way"):
        await component.start()

    assert events == ["open", "close loop", "close second", "close first"]


async def test_a_watched_loop_that_ends_fails_the_process() -> None:
    events: list[str] = []
    built: list[_Recorder] = []

    def build() -> _Recorder:
        # Built inside the running loop, as grpc.aio needs.
        asyncio.get_running_loop()
        built.append(_Recorder(events))
        return built[0]

    serving = asyncio.create_task(serve_until_signalled(build))
    async with asyncio.timeout(10.0):
        while "open" not in events:  # noqa: ASYNC110 (the component is built inside the task)
            await asyncio.sleep(0.01)
    built[0].end_loop.set()

    status = await asyncio.wait_for(serving, 10.0)

    assert status == 1
    assert events[-1] == "close first"  # stopped in order after the failure


async def test_a_given_bus_stays_open(memory_bus: Bus) -> None:
    closed: list[str] = []

    class _OnBus(Component):
        pass

    async def close() -> None:
        closed.append("bus")

    memory_bus.close = close  # type: ignore[method-assign]
    component = _OnBus(ServiceSettings(listen="127.0.0.1:0"), name="on-bus", bus=memory_bus)
    await component.start()
    await component.stop()

    assert closed == []
    assert component.bus is memory_bus


async def test_a_signal_during_a_start_that_waits_stops_it() -> None:
    events: list[str] = []

    def build() -> _Recorder:
        asyncio.get_running_loop()
        return _Recorder(events, hang_open=True)

    serving = asyncio.create_task(serve_until_signalled(build))
    async with asyncio.timeout(10.0):
        while "open" not in events:  # noqa: ASYNC110 (the component is built inside the task)
            await asyncio.sleep(0.01)
    os.kill(os.getpid(), signal.SIGTERM)

    status = await asyncio.wait_for(serving, 10.0)

    assert status == 0
    # What the start had opened is closed, in reverse order.
    assert events[-3:] == ["close loop", "close second", "close first"]
