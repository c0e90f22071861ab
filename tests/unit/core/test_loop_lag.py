"""The event-loop lag estimate: what a request that becomes runnable now has waited."""

from __future__ import annotations

import asyncio
import time

from services.core.loop_lag import LoopLag


async def test_a_blocked_loop_is_behind_then_catches_up() -> None:
    lag = LoopLag("test", interval_s=0.01, backlog_window_s=0.005)
    try:
        await asyncio.sleep(0.03)  # idle: the probe runs on time
        assert lag.behind_s() < 0.005

        time.sleep(0.06)  # noqa: ASYNC251 (the loop is stuck on purpose: ~50 ms overdue)
        assert lag.behind_s() >= 0.04

        await asyncio.sleep(0)  # the probe runs late and records the stall ...
        await asyncio.sleep(0)
        # ... which still describes the backlog right after it, and nothing later.
        await asyncio.sleep(0.02)
        assert lag.behind_s() < 0.005
    finally:
        lag.stop()
