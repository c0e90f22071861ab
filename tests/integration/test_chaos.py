"""The fault matrix's short version (`make chaos` runs the whole one): on the real broker,
under 50 req/s, `kill -9` of the collector and of the models' runner host. Every request is
answered (but for load shed by design, at most 1 %), every accepted request has its outcome
and its archive record (nothing lost, no duplicate), and the answers look as before the fault
within the phase."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import PulsarBroker
from tools.bench.environment import Broker
from tools.chaos.run import markdown, matrix

pytestmark = pytest.mark.integration

RATE = 50.0
PHASE_S = 15.0
LEAD_S = 4.0


@pytest.mark.asyncio
async def test_killed_collector_and_runner_host_lose_nothing(
    pulsar: PulsarBroker, tmp_path: Path
) -> None:
    broker = Broker(pulsar.service_url, pulsar.admin_url, 0, owned=False, env=dict(os.environ))
    result = await matrix(
        broker, tmp_path, ["collector", "runner-host"], RATE, PHASE_S, LEAD_S, soak_s=0
    )
    print(markdown(result))
    for row in result["faults"]:
        assert row["requests"] >= RATE * PHASE_S * 0.9, row
        # The one refusal by design: load shed (RESOURCE_EXHAUSTED) when the loop falls
        # behind, e.g. under the burst of predictions a restarted collector delivers.
        assert set(row["errors"]) <= {"RESOURCE_EXHAUSTED"}, (row["name"], row["errors"])
        assert row["answered_pct"] >= 99.0, (row["name"], row["errors"])
        assert row["outcomes_lost"] == 0, row
        assert row["archive_lost"] == 0, row
        assert row["duplicate_outcomes"] == 0, row
        assert row["recovery_s"] is not None and row["recovery_s"] < PHASE_S - LEAD_S, row
