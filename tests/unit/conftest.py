"""Fixtures shared by the unit tests: real model containers on 127.0.0.1 port 0."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.unit.models.model_testing import Served, ServeModel, serve


@pytest.fixture
async def serve_model() -> AsyncIterator[ServeModel]:
    """Start model containers for one test; all are stopped after it."""
    started: list[Served] = []

    async def start(kind: str, args: dict[str, Any] | None = None, **kwargs: Any) -> Served:
        served = await serve(kind, args, **kwargs)
        started.append(served)
        return served

    yield start
    for served in started:
        await served.close()
