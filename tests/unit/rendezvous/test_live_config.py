"""The rendezvous follows the control topic: new versions apply to new requests, a request
in flight keeps the version it started with, and the answer speaks for its version.

Real gRPC sockets; the control topic, the request and task topics on the in-memory bus.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from rendezvous.v1 import common_pb2, objective_pb2, scoring_pb2, task_pb2

from services.core.mesh import ObjectiveEntry, to_config
from services.core.protos import duration_ms
from services.rendezvous.answer import answer
from services.rendezvous.app import Rendezvous
from services.rendezvous.mailbox import Arrival
from services.rendezvous.policy import Reason, Verdict
from services.rendezvous.settings import RendezvousSettings
from tests.fakes.memory_bus import MemoryBus
from tests.helpers import metric_value, published, until
from tests.unit.rendezvous.conftest import Mesh, running_mesh

INCUMBENT = common_pb2.MODEL_ROLE_INCUMBENT
CHALLENGER = common_pb2.MODEL_ROLE_CHALLENGER


def config(version: int, name: str = "demo", **overrides: Any) -> objective_pb2.ObjectiveConfig:
    """Version 1: the incumbent alone for 250 ms, then either model."""
    document: dict[str, Any] = {
        "sla_ms": 300,
        "late_grace_ms": 50,
        "features": [{"name": "x"}],
        "models": [
            {"name": "incumbent", "role": "incumbent"},
            {"name": "challenger", "role": "challenger"},
        ],
        "policy": [
            {"until_ms": 250, "accept": ["incumbent"]},
            {"until_ms": 290, "accept": ["incumbent", "challenger"]},
        ],
    }
    document.update(overrides)
    out = to_config(name, ObjectiveEntry.model_validate(document), version)
    out.change.previous_version = version - 1
    out.change.action = "seed" if version == 1 else "apply"
    out.change.author = "test"
    return out


def promoted(version: int) -> objective_pb2.ObjectiveConfig:
    """The challenger promoted (and a new challenger added): it alone for 250 ms."""
    out = config(
        version,
        models=[
            {"name": "incumbent", "role": "challenger"},
            {"name": "challenger", "role": "incumbent"},
            {"name": "newcomer", "role": "challenger"},
        ],
        policy=[
            {"until_ms": 250, "accept": ["challenger"]},
            {"until_ms": 290, "accept": ["challenger", "incumbent", "newcomer"]},
        ],
    )
    out.change.action = "promote"
    return out


async def publish(bus: MemoryBus, config: objective_pb2.ObjectiveConfig) -> None:
    """What the control component does: one message per version, keyed by objective."""
    publisher = await bus.publisher(bus.topics.control(), objective_pb2.ObjectiveConfig)
    await publisher.publish(config, key=config.objective)


def request(request_id: str, objective: str = "demo") -> scoring_pb2.ScoreRequest:
    out = scoring_pb2.ScoreRequest(objective=objective, request_id=request_id)
    out.features["x"].number_value = 1.0
    return out


def tasks_of(mesh: Mesh, objective: str = "demo") -> dict[str, task_pb2.ScoringTask]:
    topic = mesh.bus.topics.requests(objective)
    return {t.request.request_id: t for t in published(mesh.bus, topic, task_pb2.ScoringTask)}


def outcomes_of(mesh: Mesh) -> dict[str, task_pb2.Outcome]:
    topic = mesh.bus.topics.results("demo")
    return {o.request_id: o for o in published(mesh.bus, topic, task_pb2.Outcome)}


async def seeded_bus(*configs: objective_pb2.ObjectiveConfig) -> MemoryBus:
    bus = MemoryBus()
    for each in configs:
        await publish(bus, each)
    return bus


async def applied(mesh: Mesh, version: int, objective: str = "demo") -> None:
    def holds() -> bool:
        held = mesh.rendezvous.objectives.get(objective)
        return held is not None and held.version >= version

    await until(holds)


async def test_follows_the_topic_from_its_latest_version(tmp_path: Path) -> None:
    # Versions 1 and 2 on the topic before the start: the compacted read gives version 2.
    bus = await seeded_bus(config(1), config(2, late_grace_ms=60))
    async with running_mesh(tmp_path, None, bus) as mesh:
        assert mesh.rendezvous.following
        mesh.script.plan = {"incumbent": (2, 1.0)}
        response = await mesh.stub.Score(request("first"))
        assert (response.decision.model, response.objective_version) == ("incumbent", 2)
        assert tasks_of(mesh)["first"].objective_version == 2
        assert metric_value("rdv_objective_version", {"objective": "demo"}) == 2.0
        assert mesh.rendezvous.facts()["objective_versions"] == {"demo": 2}


async def test_a_new_version_decides_new_requests_and_one_in_flight_keeps_its_own(
    tmp_path: Path,
) -> None:
    bus = await seeded_bus(config(1))
    async with running_mesh(tmp_path, None, bus) as mesh:
        # Version 1 waits for the incumbent (120 ms); version 2 takes the challenger (5 ms).
        mesh.script.plan = {"incumbent": (120, 1.0), "challenger": (5, 2.0)}
        in_flight = asyncio.ensure_future(mesh.stub.Score(request("before")))
        await until(lambda: "before" in tasks_of(mesh))

        await publish(bus, promoted(2))
        await applied(mesh, 2)
        after = await mesh.stub.Score(request("after"))
        before = await in_flight

        # The request that started under version 1 is decided by it from start to finish.
        assert (before.decision.model, before.objective_version) == ("incumbent", 1)
        assert before.decision.role == INCUMBENT
        assert duration_ms(before.elapsed) >= 120
        # The new one by version 2: the promoted model answers, as the incumbent, although
        # its (scripted) runner still stamps the role it was deployed with.
        assert (after.decision.model, after.objective_version) == ("challenger", 2)
        assert after.decision.role == INCUMBENT
        assert duration_ms(after.elapsed) < 100

        tasks = tasks_of(mesh)
        assert (tasks["before"].objective_version, list(tasks["before"].scorers)) == (
            1,
            ["incumbent", "challenger"],
        )
        assert (tasks["after"].objective_version, list(tasks["after"].scorers)) == (
            2,
            ["incumbent", "challenger", "newcomer"],
        )
        await until(lambda: {"before", "after"} <= set(outcomes_of(mesh)))
        outcomes = outcomes_of(mesh)
        assert outcomes["before"].response.objective_version == 1
        assert outcomes["after"].response.objective_version == 2
        challenger_event = next(
            c.prediction for c in outcomes["after"].candidates if c.prediction.model == "challenger"
        )
        assert challenger_event.role == CHALLENGER
        assert metric_value("rdv_objective_version", {"objective": "demo"}) == 2.0

        # An older (or repeated) version changes nothing.
        assert not await mesh.rendezvous.apply_config(config(1))
        assert not await mesh.rendezvous.apply_config(promoted(2))
        assert mesh.rendezvous.objectives["demo"].version == 2


async def test_a_new_objective_is_served_once_its_publishers_are_open(tmp_path: Path) -> None:
    bus = await seeded_bus(config(1))
    async with running_mesh(tmp_path, None, bus) as mesh:
        other = config(
            1,
            name="other",
            sla_ms=30,
            enrichment="none",
            policy=[{"until_ms": 20, "accept": ["incumbent"]}],
        )
        await publish(bus, other)
        await applied(mesh, 1, "other")
        # No model serves "other" here: the designed answer, and the task where it belongs.
        response = await mesh.stub.Score(request("o-1", "other"))
        assert response.decision.reason == scoring_pb2.DECISION_REASON_SLA_DEFAULT
        assert response.objective_version == 1
        enriched = published(bus, bus.topics.tasks("other"), task_pb2.EnrichedTask)
        assert [e.task.request.request_id for e in enriched] == ["o-1"]


async def test_an_enrichment_change_switches_the_topic_new_tasks_go_to(tmp_path: Path) -> None:
    bus = await seeded_bus(config(1))
    async with running_mesh(tmp_path, None, bus) as mesh:
        mesh.script.plan = {"incumbent": (2, 1.0)}
        assert (await mesh.stub.Score(request("enriched"))).objective_version == 1
        await publish(bus, config(2, enrichment="none"))
        await applied(mesh, 2)
        response = await mesh.stub.Score(request("direct"))
        assert (response.decision.model, response.objective_version) == ("incumbent", 2)
        assert set(tasks_of(mesh)) == {"enriched"}
        direct = published(bus, bus.topics.tasks("demo"), task_pb2.EnrichedTask)
        assert [(e.task.request.request_id, e.task.objective_version) for e in direct] == [
            ("direct", 2)
        ]


def settings(tmp_path: Path, **overrides: Any) -> RendezvousSettings:
    values: dict[str, Any] = {
        "instance": "rdv-test",
        "listen": "127.0.0.1:0",
        "delivery_socket": tmp_path / "delivery.sock",
        "warmup": True,
    }
    values.update(overrides)
    return RendezvousSettings(**values)


async def test_start_waits_for_the_first_objective(tmp_path: Path) -> None:
    bus = MemoryBus()
    rendezvous = Rendezvous(settings(tmp_path, control_wait_s=5.0), None, bus)
    starting = asyncio.create_task(rendezvous.start())
    await asyncio.sleep(0.2)
    assert not starting.done()
    await publish(bus, config(1))
    await asyncio.wait_for(starting, 5.0)
    try:
        assert rendezvous.objectives["demo"].version == 1
        # The warm-up covers the objectives held at start.
        assert [c.objective for c in rendezvous.warmup.configs] == ["demo"]
    finally:
        await rendezvous.stop()


async def test_start_fails_when_the_topic_holds_no_objective(tmp_path: Path) -> None:
    rendezvous = Rendezvous(settings(tmp_path, control_wait_s=0.2), None, MemoryBus())
    expected = r"no objective on \S*rdv\.control\.objectives after 0\.2s"
    with pytest.raises(RuntimeError, match=expected):
        await rendezvous.start()


def test_the_answer_takes_the_role_from_the_deciding_version() -> None:
    event = task_pb2.PredictionEvent(model="challenger", model_version="7", role=CHALLENGER)
    event.prediction.score = 0.5
    verdict = Verdict("challenger", Reason.ACCEPTED, 0, "until 250ms: challenger only")
    arrivals = {"challenger": Arrival(event, 3.0, False)}
    response = answer("r", promoted(2), verdict, arrivals, 0.003)
    assert (response.decision.role, response.objective_version) == (INCUMBENT, 2)
    # A model the version does not list keeps the role its runner stamped.
    event.model = "stranger"
    stranger = answer(
        "r",
        promoted(2),
        Verdict("stranger", Reason.ACCEPTED, 0, "until 250ms: stranger only"),
        {"stranger": Arrival(event, 3.0, False)},
        0.003,
    )
    assert stranger.decision.role == CHALLENGER
