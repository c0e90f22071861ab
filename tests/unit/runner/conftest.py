"""Fixtures for runner tests: a MemoryBus, real model servers, runners on top of them."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from services.runner.host import RunnerHost
from services.runner.settings import RunnerSettings
from tests.fakes.memory_bus import MemoryBus

StartRunner = Callable[..., Awaitable[RunnerHost]]


@pytest.fixture
def bus(memory_bus: MemoryBus) -> MemoryBus:
    """The in-memory bus (short nack redelivery delay) the runners and the test share."""
    return memory_bus


@pytest.fixture
def objective() -> str:
    return f"obj-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def start_runner(bus: MemoryBus, objective: str) -> AsyncIterator[StartRunner]:
    """Start runners on the test's bus; each gets a unique model name unless given one."""
    started: list[RunnerHost] = []

    async def start(endpoint: str, **overrides: Any) -> RunnerHost:
        fields: dict[str, Any] = {
            "objective": objective,
            "model": f"model-{uuid.uuid4().hex[:8]}",
            "role": "incumbent",
            "endpoint": endpoint,
            "listen": "127.0.0.1:0",
            "start_position": "earliest",
            "shutdown_grace_s": 2.0,
        }
        fields.update(overrides)
        runner = RunnerHost(RunnerSettings(**fields), bus=bus)
        await runner.start()
        started.append(runner)
        return runner

    yield start
    for runner in started:
        await runner.stop()
