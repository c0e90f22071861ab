"""The control plane on the in-memory bus: seeding, the update path and its refusals.

The broker-specific parts (exclusive producer, retention, compaction, compacted reads on
Pulsar) are in tests/integration/test_control_plane.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from rendezvous.v1 import control_pb2, objective_pb2

from services.control.app import ControlComponent
from services.control.edits import promote, same_serving, split
from services.control.followers import RunnerFollower
from services.control.settings import ControlSettings
from services.core.errors import FailedPrecondition, InvalidArgument, NotFound
from services.core.protos import now_timestamp
from tests.fakes.memory_bus import MemoryBus
from tests.unit.control.configs import config, entry


class FakeAdmin:
    """Records what the plane asks of the broker's admin API."""

    def __init__(self) -> None:
        self.prepared: list[tuple[str, int]] = []
        self.compactions: list[str] = []

    async def prepare(self, topic: str, compaction_threshold_bytes: int) -> None:
        self.prepared.append((topic, compaction_threshold_bytes))

    async def compact(self, topic: str) -> None:
        self.compactions.append(topic)


def write_mesh(path: Path, **objectives: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({"objectives": objectives}))
    return path


async def start(bus: MemoryBus, mesh: Path | None, **overrides: Any) -> ControlComponent:
    settings = ControlSettings(
        listen="127.0.0.1:0", mesh_file=mesh, pulsar=bus.settings, **overrides
    )
    component = ControlComponent(settings, bus=bus, admin=FakeAdmin())
    await component.start()
    return component


@pytest.fixture
async def control(memory_bus: MemoryBus, tmp_path: Path) -> AsyncIterator[ControlComponent]:
    component = await start(memory_bus, write_mesh(tmp_path / "mesh.yaml", demo=entry()))
    yield component
    await component.stop()


def published(bus: MemoryBus) -> list[objective_pb2.ObjectiveConfig]:
    return [
        objective_pb2.ObjectiveConfig.FromString(raw.data)
        for raw in bus.messages(bus.topics.control())
    ]


def change(built: objective_pb2.ObjectiveConfig, action: str = "apply") -> None:
    built.change.CopyFrom(
        objective_pb2.ConfigChange(author="alice", reason="because", action=action)
    )


async def report_ready(
    bus: MemoryBus, runners: RunnerFollower, objective: str, model: str, ready: bool = True
) -> None:
    """Publish a host's status as a runner host does; return once the plane has taken it."""
    publisher = await bus.publisher(bus.topics.runner_status(), control_pb2.RunnerStatus)
    status = control_pb2.RunnerStatus(
        objective=objective,
        model=model,
        instance="host-1",
        ready=ready,
        report_time=now_timestamp(),
    )
    key = f"{objective}/{model}/host-1"
    await publisher.publish(status, key=key)
    async with asyncio.timeout(5):
        await runners.wait_until(lambda: runners.statuses.get(key) == status)


async def test_seeds_version_one_from_the_mesh_file(
    control: ControlComponent, memory_bus: MemoryBus
) -> None:
    [seed] = published(memory_bus)
    assert seed.version == 1 and seed.objective == "demo"
    assert seed.change.action == "seed"
    assert seed.change.author == "rendezvous-control"
    assert "mesh.yaml" in seed.change.reason
    assert seed.change.previous_version == 0
    assert control.facts()["seeded"] == ["demo"]
    assert control.plane.admin.prepared == [(memory_bus.topics.control(), 1024 * 1024)]  # type: ignore[attr-defined]
    assert memory_bus.messages(memory_bus.topics.control())[0].key == "demo"


async def test_a_restart_does_not_seed_again_and_reports_a_differing_mesh_file(
    memory_bus: MemoryBus, tmp_path: Path, control: ControlComponent
) -> None:
    current = control.plane.get("demo")
    promoted = promote(current, "sum")
    change(promoted, "promote")
    await control.plane.update(promoted, expected_version=1)
    await control.stop()
    again = await start(memory_bus, write_mesh(tmp_path / "mesh.yaml", demo=entry()))
    try:
        assert [c.version for c in published(memory_bus)] == [1, 2]
        assert again.facts()["seeded"] == []
        assert again.facts()["mesh_file_differs"] == ["demo"]
        assert again.facts()["objectives"] == {"demo": 2}
    finally:
        await again.stop()


async def test_update_bumps_the_version_and_stamps_the_change(
    control: ControlComponent, memory_bus: MemoryBus
) -> None:
    new = split(control.plane.get("demo"), "sum", 0.25)
    change(new, "split")
    stored = await control.plane.update(new, expected_version=1)
    assert stored.version == 2
    assert stored.change.previous_version == 1
    assert stored.change.author == "alice" and stored.change.action == "split"
    assert stored.change.HasField("change_time")
    # Answered only once the plane's own readers see it: Get and history return it at once.
    assert control.plane.get("demo") == stored
    assert [c.version for c in control.plane.history("demo")] == [1, 2]
    assert control.plane.get("demo", version=1).change.action == "seed"
    assert published(memory_bus)[-1] == stored
    # A compaction is asked for after every version: the seed's, then this one's.
    assert control.plane.admin.compactions == [memory_bus.topics.control()] * 2  # type: ignore[attr-defined]


async def test_a_stale_expected_version_names_the_current_one(
    control: ControlComponent, memory_bus: MemoryBus
) -> None:
    new = split(control.plane.get("demo"), "sum", 0.25)
    change(new)
    await control.plane.update(new, expected_version=1)
    with pytest.raises(FailedPrecondition, match="at version 2, not 1"):
        await control.plane.update(new, expected_version=1)
    assert len(published(memory_bus)) == 2


async def test_an_invalid_config_publishes_nothing(
    control: ControlComponent, memory_bus: MemoryBus
) -> None:
    new = control.plane.get("demo")
    bad = objective_pb2.ObjectiveConfig()
    bad.CopyFrom(new)
    bad.policy.steps[0].accept[:] = ["ghost"]
    bad.ClearField("change")
    with pytest.raises(InvalidArgument) as raised:
        await control.plane.update(bad, expected_version=1)
    assert [field for field, _ in raised.value.violations] == [
        "config.policy.steps[0].accept[0]",
        "config.change.author",
        "config.change.reason",
    ]
    assert len(published(memory_bus)) == 1


async def test_validate_only_answers_the_would_be_config_and_publishes_nothing(
    control: ControlComponent, memory_bus: MemoryBus
) -> None:
    new = split(control.plane.get("demo"), "sum", 0.25)
    change(new)
    would = await control.plane.update(new, expected_version=1, validate_only=True)
    assert would.version == 2 and same_serving(would, new)
    assert len(published(memory_bus)) == 1
    assert control.plane.get("demo").version == 1


async def test_a_policy_may_accept_a_new_model_only_once_a_runner_is_ready(
    control: ControlComponent, memory_bus: MemoryBus
) -> None:
    # flaky is deployed but no step accepts it yet.
    new = split(control.plane.get("demo"), "flaky", 0.1)
    change(new)
    with pytest.raises(FailedPrecondition, match="flaky") as raised:
        await control.plane.update(new, expected_version=1)
    assert raised.value.violations[0][:2] == ("RUNNER_NOT_READY", "objectives/demo/models/flaky")
    await report_ready(memory_bus, control.plane.runners, "demo", "flaky", ready=False)
    await report_ready(memory_bus, control.plane.runners, "other", "flaky", ready=True)
    with pytest.raises(FailedPrecondition):
        await control.plane.update(new, expected_version=1)
    await report_ready(memory_bus, control.plane.runners, "demo", "flaky", ready=True)
    stored = await control.plane.update(new, expected_version=1)
    assert stored.version == 2


async def test_the_gate_can_be_turned_off(memory_bus: MemoryBus, tmp_path: Path) -> None:
    component = await start(
        memory_bus, write_mesh(tmp_path / "m.yaml", demo=entry()), require_ready_runners=False
    )
    try:
        new = split(component.plane.get("demo"), "flaky", 0.1)
        change(new)
        assert (await component.plane.update(new, expected_version=1)).version == 2
    finally:
        await component.stop()


async def test_a_new_objective_starts_at_version_one(control: ControlComponent) -> None:
    new = config("fresh")
    with pytest.raises(FailedPrecondition, match="at version 0, not 1"):
        await control.plane.update(new, expected_version=1)
    stored = await control.plane.update(new, expected_version=0)
    assert stored.version == 1 and stored.change.previous_version == 0
    assert [c.objective for c in control.plane.list_current()] == ["demo", "fresh"]


async def test_unknown_objectives_and_versions_are_not_found(control: ControlComponent) -> None:
    with pytest.raises(NotFound):
        control.plane.get("ghost")
    with pytest.raises(NotFound):
        control.plane.get("demo", version=7)
    with pytest.raises(NotFound):
        control.plane.history("ghost")


async def test_without_a_mesh_file_it_seeds_nothing(memory_bus: MemoryBus) -> None:
    component = await start(memory_bus, None)
    try:
        assert component.plane.list_current() == []
        assert published(memory_bus) == []
    finally:
        await component.stop()
