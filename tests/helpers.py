"""Small helpers every test module shares: waiting for a condition, reading a metric,
reading what was published to a topic of the in-memory bus, judging a timed scenario."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from google.protobuf.message import Message
from prometheus_client import REGISTRY

from tests.fakes.memory_bus import MemoryBus

M = TypeVar("M", bound=Message)


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until `predicate()` holds; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


# Between two runs of a timed scenario (in_one_of), times the run's index.
IN_ONE_OF_PAUSE_S = 0.5


async def in_one_of(attempts: int, scenario: Callable[[], Awaitable[None]]) -> None:
    """Pass when one of `attempts` runs of a timed scenario holds.

    For tests whose client and server share one process and one event loop: a loaded CI
    machine can deschedule that process for tens of milliseconds, which moves the figures of
    one run, never the outcome of every run. A rule the code breaks fails each attempt;
    the failure then lists them all.
    """
    failures: list[str] = []
    for attempt in range(attempts):
        if attempt:
            # Apart in time: a stall that spoiled one run should be over by the next.
            await asyncio.sleep(IN_ONE_OF_PAUSE_S * attempt)
        try:
            await scenario()
            return
        except (AssertionError, grpc.aio.AioRpcError) as err:
            failures.append(f"{type(err).__name__}: {str(err)[:400]}")
    raise AssertionError(f"failed in all {attempts} attempts:\n" + "\n".join(failures))


def metric_value(name: str, labels: dict[str, str]) -> float:
    """The current value of a Prometheus sample (0 when it was never recorded)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def published(bus: MemoryBus, topic: str, message_type: type[M]) -> list[M]:
    """Everything published to `topic` of the in-memory bus, decoded."""
    return [message_type.FromString(raw.data) for raw in bus.messages(topic)]
