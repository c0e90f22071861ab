"""Planning again for a new version: what starts, stops and restarts, and the supervisor
applying that (processes stubbed: what matters here is which ones, in which order)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from rendezvous.v1 import objective_pb2

from services.core.mesh import Mesh
from services.supervisor import app
from services.supervisor.app import Supervised, Supervisor, SupervisorSettings
from services.supervisor.live import LiveMesh
from services.supervisor.plan import (
    Ports,
    PrivacyFiles,
    ProcessSpec,
    diff,
    model_directory,
    model_endpoints,
    plan,
    plan_control,
    plan_keyring,
)

INC = {"name": "inc", "role": "incumbent", "kind": "sum"}
DECOY = {"name": "decoy", "role": "decoy"}


def configs(
    *models: dict[str, Any], enrichment: str = "subject_state"
) -> dict[str, objective_pb2.ObjectiveConfig]:
    mesh = Mesh.model_validate(
        {
            "objectives": {
                "o": {
                    "sla_ms": 50,
                    "models": list(models),
                    "policy": [{"until_ms": 40, "accept": ["inc"]}],
                    "enrichment": enrichment,
                }
            }
        }
    )
    return mesh.objective_configs()


class Planner:
    """Plans versions one after the other with one Ports, as the supervisor does."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.ports = Ports()

    def __call__(self, planned: dict[str, objective_pb2.ObjectiveConfig]) -> list[ProcessSpec]:
        return plan(
            planned, self.state_dir, "pulsar://x", "http://x", "127.0.0.1:50051", self.ports
        )


def names(specs: list[ProcessSpec]) -> list[str]:
    return [spec.name for spec in specs]


def test_planning_again_keeps_every_process_as_it_is(tmp_path: Path) -> None:
    again = Planner(tmp_path)
    first = again(configs(INC, DECOY))
    assert not diff(first, again(configs(INC, DECOY)))


def test_a_local_model_added_starts_its_container_only(tmp_path: Path) -> None:
    again = Planner(tmp_path)
    v1 = again(configs(INC, DECOY))
    v2 = again(configs(INC, {"name": "chal", "role": "challenger", "kind": "sum"}, DECOY))
    change = diff(v1, v2)
    # The group's host stays: it follows the objective and adds the model itself.
    assert names(change.start) == ["model-chal"]
    assert not change.stop and not change.restart
    endpoints = model_endpoints(v2)
    assert endpoints["inc"] == model_endpoints(v1)["inc"]
    assert endpoints["chal"] == change.start[0].endpoint


def test_a_model_of_a_new_replica_group_brings_that_groups_hosts(tmp_path: Path) -> None:
    again = Planner(tmp_path)
    v1 = again(configs(INC, DECOY))
    big = {"name": "big", "role": "challenger", "kind": "sum", "replicas": 2}
    v2 = again(configs(INC, big, DECOY))
    change = diff(v1, v2)
    assert names(change.start) == ["model-big", "runners-o-x2-0", "runners-o-x2-1"]
    assert [s.stage for s in change.start] == sorted(s.stage for s in change.start)
    assert not change.stop and not change.restart

    # Removed again: the container and the now empty group's hosts stop.
    change = diff(v2, again(configs(INC, DECOY)))
    assert names(change.stop) == ["model-big", "runners-o-x2-0", "runners-o-x2-1"]
    assert not change.start and not change.restart


def test_a_group_of_disabled_models_has_no_host_but_keeps_its_container(tmp_path: Path) -> None:
    again = Planner(tmp_path)
    big = {"name": "big", "role": "challenger", "kind": "sum", "replicas": 2}
    v1 = again(configs(INC, big))
    change = diff(v1, again(configs(INC, {**big, "enabled": False})))
    assert names(change.stop) == ["runners-o-x2-0", "runners-o-x2-1"]
    assert not change.start and not change.restart


def test_new_container_arguments_restart_it_where_it_was(tmp_path: Path) -> None:
    again = Planner(tmp_path)
    v1 = again(configs(INC))
    v2 = again(configs({**INC, "args": {"weights": {"a": 2.0}}}))
    change = diff(v1, v2)
    assert names(change.restart) == ["model-inc"]
    assert change.restart[0].endpoint == next(s for s in v1 if s.name == "model-inc").endpoint
    assert json.loads(change.restart[0].env["RDV_MODEL_ARGS"]) == {"weights": {"a": 2.0}}


def test_an_external_model_needs_no_process(tmp_path: Path) -> None:
    again = Planner(tmp_path)
    v1 = again(configs(INC))
    external = {"name": "ext", "role": "challenger", "endpoint": "10.0.0.1:9000"}
    v2 = again(configs(INC, external))
    assert not diff(v1, v2)
    assert "ext" not in model_endpoints(v2)


def test_the_enricher_follows_enrichment(tmp_path: Path) -> None:
    again = Planner(tmp_path)
    plain = again(configs(INC, enrichment="none"))
    assert "enricher" not in names(plain)
    enriched = again(configs(INC))
    change = diff(plain, enriched)
    assert names(change.start) == ["enricher"]
    assert change.start[0].env["RDV_ENRICHER_FOLLOW"] == "true"
    assert "RDV_ENRICHER_MESH_FILE" not in change.start[0].env
    assert names(diff(enriched, again(configs(INC, enrichment="none"))).stop) == ["enricher"]


# ---------------------------------------------------------------------------- applying a change


class FakeLive(LiveMesh):
    """The configurations a test sets, planned as the real LiveMesh plans them."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__("pulsar://x", "http://x", state_dir, "127.0.0.1:50051", Ports())
        self.held: dict[str, objective_pb2.ObjectiveConfig] = {}

    def plan(self) -> list[ProcessSpec]:
        return plan(
            self.held, self.state_dir, "pulsar://x", "http://x", "127.0.0.1:50051", self.ports
        )


@pytest.fixture
def launched(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Supervised processes that only record what happened to them."""
    events: list[str] = []

    async def start(self: Supervised) -> None:
        events.append(f"start {self.spec.name}")
        self.status = "starting"

    async def stop(self: Supervised) -> None:
        events.append(f"stop {self.spec.name}")
        self.status = "stopped"

    async def wait_ready(self: Supervised) -> bool:
        self.status = "ready"
        return True

    monkeypatch.setattr(app.Supervised, "start", start)
    monkeypatch.setattr(app.Supervised, "stop", stop)
    monkeypatch.setattr(app.Supervised, "wait_ready", wait_ready)
    return events


async def test_the_supervisor_applies_a_new_version(tmp_path: Path, launched: list[str]) -> None:
    live = FakeLive(tmp_path)
    live.held = configs(INC, DECOY)
    supervisor = Supervisor(
        [],
        tmp_path / "state.json",
        facts={},
        settings=SupervisorSettings(model_stop_grace_s=0.2),
        live=live,
    )
    supervisor.phase = "ready"
    first = live.plan()
    supervisor.processes = [Supervised(spec, supervisor.settings) for spec in first]
    directory = model_directory(tmp_path)

    # v2: a new model, in a new replica group.
    big = {"name": "big", "role": "challenger", "kind": "sum", "replicas": 2}
    live.held = configs(INC, big, DECOY)
    await supervisor._changed()
    assert launched == ["start model-big", "start runners-o-x2-0", "start runners-o-x2-1"]
    assert set(json.loads(directory.read_text())) == {"inc", "big"}
    state = json.loads((tmp_path / "state.json").read_text())
    assert {"model-big", "runners-o-x2-0"} <= {p["name"] for p in state["processes"]}

    # v3: removed. Hosts stop at once; the container only after the grace.
    launched.clear()
    live.held = configs(INC, DECOY)
    await supervisor._changed()
    assert launched == ["stop runners-o-x2-0", "stop runners-o-x2-1"]
    assert set(json.loads(directory.read_text())) == {"inc"}
    await asyncio.sleep(0.4)
    assert launched[-1] == "stop model-big"
    assert "model-big" not in names([p.spec for p in supervisor.processes])

    # v4 removes chal... and v5 brings it back within the grace: it never stops.
    launched.clear()
    chal = {"name": "chal", "role": "challenger", "kind": "sum"}
    live.held = configs(INC, chal, DECOY)
    await supervisor._changed()
    assert launched == ["start model-chal"]
    live.held = configs(INC, DECOY)
    await supervisor._changed()
    live.held = configs(INC, chal, DECOY)
    await supervisor._changed()
    await asyncio.sleep(0.4)
    assert launched == ["start model-chal"]
    assert names([p.spec for p in supervisor.processes]).count("model-chal") == 1


async def test_a_new_version_leaves_the_control_component_and_the_keyring_running(
    tmp_path: Path, launched: list[str]
) -> None:
    live = FakeLive(tmp_path)
    live.held = configs(INC, DECOY)
    supervisor = Supervisor([], tmp_path / "state.json", facts={}, live=live)
    supervisor.phase = "ready"
    ports = Ports()
    first = [
        plan_control(tmp_path / "mesh.yaml", tmp_path, "p", "h", "127.0.0.1:1", ports),
        plan_keyring(PrivacyFiles.under(tmp_path), tmp_path, "p", "h", "127.0.0.1:2", ports),
        *live.plan(),
    ]
    supervisor.processes = [Supervised(spec, supervisor.settings) for spec in first]
    live.held = configs(INC, {"name": "chal", "role": "challenger", "kind": "sum"}, DECOY)
    await supervisor._changed()
    # Neither is planned from the control topic: a version must not stop them (the keyring
    # stopped at the first change made every later record withheld).
    assert launched == ["start model-chal"]
    assert {"control", "keyring"} <= set(names([p.spec for p in supervisor.processes]))
