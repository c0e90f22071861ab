"""A live runner host on a MemoryBus with real model containers: it follows its objective on
the control topic, adds, removes, updates and replaces runners as versions arrive, and
reports each model it serves on the runner-status topic."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from rendezvous.v1 import common_pb2, control_pb2, objective_pb2, task_pb2

from services.core.bus import Subscription
from services.core.mesh import Mesh
from services.runner.host import RunnerHost
from services.runner.live import write_model_directory
from services.runner.settings import RunnerDeployment, RunnerSettings
from tests.fakes.memory_bus import MemoryBus
from tests.helpers import metric_value, published, until
from tests.unit.models.model_testing import ServeModel
from tests.unit.runner.test_runner_flow import listen, make_task, nothing_more, publish_tasks

HOST = "host-0"
StartHost = Callable[..., Awaitable[RunnerHost]]


def config(
    objective: str, version: int, models: list[dict[str, Any]]
) -> objective_pb2.ObjectiveConfig:
    """An objective configuration as the control component publishes it."""
    accept = [m["name"] for m in models if m["role"] == "incumbent"]
    mesh = Mesh.model_validate(
        {
            "objectives": {
                objective: {
                    "sla_ms": 50,
                    "models": models,
                    "policy": [{"until_ms": 40, "accept": accept}],
                }
            }
        }
    )
    return mesh.objective_configs(version)[objective]


async def publish_config(bus: MemoryBus, cfg: objective_pb2.ObjectiveConfig) -> None:
    publisher = await bus.publisher(bus.topics.control(), objective_pb2.ObjectiveConfig)
    await publisher.publish(cfg, key=cfg.objective)


def statuses(bus: MemoryBus) -> list[control_pb2.RunnerStatus]:
    return published(bus, bus.topics.runner_status(), control_pb2.RunnerStatus)


def last_status(bus: MemoryBus, model: str) -> control_pb2.RunnerStatus | None:
    mine = [s for s in statuses(bus) if s.model == model]
    return mine[-1] if mine else None


def reported(bus: MemoryBus, model: str, *, ready: bool, version: int) -> Callable[[], bool]:
    def check() -> bool:
        status = last_status(bus, model)
        return status is not None and (status.ready, status.objective_version) == (ready, version)

    return check


async def answers(
    predictions: Subscription[task_pb2.PredictionEvent], count: int
) -> set[tuple[str, str]]:
    """(request id, model) of the next `count` predictions, then checks nothing else came."""
    async with asyncio.timeout(5.0):
        events = [(await predictions.receive()).message for _ in range(count)]
    assert await nothing_more(predictions)
    return {(event.request_id, event.model) for event in events}


def scored(objective: str, return_address: str, *scorers: str) -> tuple[str, task_pb2.EnrichedTask]:
    task = make_task(objective, return_address)
    task.task.scorers.extend(scorers)
    return task.task.request.request_id, task


@pytest.fixture
async def start_host(bus: MemoryBus, objective: str) -> AsyncIterator[StartHost]:
    hosts: list[RunnerHost] = []

    async def start(**overrides: Any) -> RunnerHost:
        fields: dict[str, Any] = {
            "objective": objective,
            "follow": True,
            "instance": HOST,
            "listen": "127.0.0.1:0",
            "start_position": "earliest",
            "shutdown_grace_s": 2.0,
            "model_start_timeout_s": 5.0,
            "model_poll_s": 0.05,
            "config_timeout_s": 5.0,
        }
        fields.update(overrides)
        host = RunnerHost(RunnerSettings(**fields), bus=bus)
        await host.start()
        hosts.append(host)
        return host

    yield start
    for host in hosts:
        await host.stop()


async def test_models_added_updated_and_removed_live(
    bus: MemoryBus, objective: str, serve_model: ServeModel, start_host: StartHost
) -> None:
    inc_model = await serve_model("sum")
    chal_model = await serve_model("sum")
    inc = {"name": "inc", "role": "incumbent", "endpoint": inc_model.container.endpoint}
    chal = {"name": "chal", "role": "challenger", "endpoint": chal_model.container.endpoint}
    await publish_config(bus, config(objective, 1, [inc]))
    host = await start_host()
    assert [r.model for r in host.runners] == ["inc"]
    await until(reported(bus, "inc", ready=True, version=1))
    assert last_status(bus, "inc") is not None
    assert last_status(bus, "inc").instance == HOST  # type: ignore[union-attr]
    [status_raw] = bus.messages(bus.topics.runner_status())
    assert status_raw.key == f"{objective}/inc/{HOST}"
    return_address, predictions = await listen(bus)

    # v1: a task that lists a challenger the host does not run yet is scored by inc alone.
    first, task = scored(objective, return_address, "inc", "chal")
    await publish_tasks(bus, objective, task)
    assert await answers(predictions, 1) == {(first, "inc")}

    # v2 adds the challenger: it joins the fan-out, then it is reported ready.
    await publish_config(bus, config(objective, 2, [inc, chal]))
    await until(reported(bus, "chal", ready=True, version=2))
    assert reported(bus, "inc", ready=True, version=2)()
    both, task_both = scored(objective, return_address, "inc", "chal")
    only_inc, task_inc = scored(objective, return_address, "inc")
    await publish_tasks(bus, objective, task_both, task_inc)
    assert await answers(predictions, 3) == {(both, "inc"), (both, "chal"), (only_inc, "inc")}
    skipped = {"model": "chal", "reason": "not_a_scorer"}
    await until(lambda: metric_value("rdv_runner_skipped_total", skipped) >= 1)

    # v3 makes it a canary: the same runner, its events carry the new role.
    runner = host.runner("chal")
    await publish_config(bus, config(objective, 3, [inc, {**chal, "role": "canary"}]))
    await until(reported(bus, "chal", ready=True, version=3))
    assert host.runner("chal") is runner
    rid, task = scored(objective, return_address, "chal")
    await publish_tasks(bus, objective, task)
    async with asyncio.timeout(5.0):
        event = (await predictions.receive()).message
    assert (event.request_id, event.model, event.role) == (
        rid,
        "chal",
        common_pb2.MODEL_ROLE_CANARY,
    )

    # v4 removes it: it leaves the fan-out and is reported not ready.
    await publish_config(bus, config(objective, 4, [inc]))
    await until(reported(bus, "chal", ready=False, version=4))
    assert [r.model for r in host.runners] == ["inc"]
    assert reported(bus, "inc", ready=True, version=4)()
    after, task = scored(objective, return_address, "inc", "chal")
    await publish_tasks(bus, objective, task)
    assert await answers(predictions, 1) == {(after, "inc")}

    # At stop, every model it serves is reported not ready.
    await host.stop()
    assert reported(bus, "inc", ready=False, version=4)()


async def test_a_removed_model_finishes_its_calls_in_flight(
    bus: MemoryBus, objective: str, serve_model: ServeModel, start_host: StartHost
) -> None:
    slow = await serve_model("flaky", {"latency_ms_median": 300})
    inc = await serve_model("sum")
    models = [
        {"name": "inc", "role": "incumbent", "endpoint": inc.container.endpoint},
        {"name": "slow", "role": "challenger", "endpoint": slow.container.endpoint},
    ]
    await publish_config(bus, config(objective, 1, models))
    host = await start_host()
    return_address, predictions = await listen(bus)
    rid, task = scored(objective, return_address, "slow")
    await publish_tasks(bus, objective, task)
    await until(lambda: (r := host.runner("slow")) is not None and r.calls_in_flight == 1)

    await publish_config(bus, config(objective, 2, models[:1]))

    async with asyncio.timeout(5.0):
        event = (await predictions.receive()).message
    assert (event.request_id, event.model, event.WhichOneof("result")) == (
        rid,
        "slow",
        "prediction",
    )
    await until(reported(bus, "slow", ready=False, version=2))
    consumer = host.consumer
    assert consumer is not None
    await until(lambda: consumer.in_flight == 0)


async def test_a_local_model_is_found_in_the_model_directory_and_a_new_endpoint_replaces_it(
    bus: MemoryBus,
    objective: str,
    serve_model: ServeModel,
    start_host: StartHost,
    tmp_path: Path,
) -> None:
    directory = tmp_path / "models.json"
    inc = await serve_model("sum")
    inc_entry = {"name": "inc", "role": "incumbent", "endpoint": inc.container.endpoint}
    await publish_config(bus, config(objective, 1, [inc_entry]))
    host = await start_host(model_directory=directory)

    # v2 adds a model the supervisor runs: no endpoint until the supervisor writes it.
    local = {"name": "local", "role": "challenger", "kind": "sum"}
    await publish_config(bus, config(objective, 2, [inc_entry, local]))
    await asyncio.sleep(0.3)
    assert host.runner("local") is None
    first = await serve_model("sum")
    write_model_directory(directory, {"local": first.container.endpoint})
    await until(reported(bus, "local", ready=True, version=2))
    runner = host.runner("local")
    assert runner is not None
    assert runner.client.endpoint == first.container.endpoint

    # v3 gives it an endpoint of its own: a new runner on the new address.
    second = await serve_model("sum")
    await publish_config(
        bus, config(objective, 3, [inc_entry, {**local, "endpoint": second.container.endpoint}])
    )
    await until(reported(bus, "local", ready=True, version=3))
    replaced = host.runner("local")
    assert replaced is not None and replaced is not runner
    assert replaced.client.endpoint == second.container.endpoint
    return_address, predictions = await listen(bus)
    rid, task = scored(objective, return_address, "local")
    await publish_tasks(bus, objective, task)
    assert await answers(predictions, 1) == {(rid, "local")}


async def test_a_model_that_never_answers_is_not_served_and_reported_not_ready(
    bus: MemoryBus, objective: str, serve_model: ServeModel, start_host: StartHost
) -> None:
    inc = await serve_model("sum")
    inc_entry = {"name": "inc", "role": "incumbent", "endpoint": inc.container.endpoint}
    await publish_config(bus, config(objective, 1, [inc_entry]))
    host = await start_host(model_start_timeout_s=0.5)
    dead = {"name": "dead", "role": "challenger", "endpoint": "127.0.0.1:1"}
    await publish_config(bus, config(objective, 2, [inc_entry, dead]))
    await until(reported(bus, "dead", ready=False, version=2))
    assert [r.model for r in host.runners] == ["inc"]


async def test_a_host_serves_its_replica_group_and_the_decoy_of_its_group(
    bus: MemoryBus, objective: str, serve_model: ServeModel, start_host: StartHost
) -> None:
    model = await serve_model("sum")
    endpoint = model.container.endpoint
    models: list[dict[str, Any]] = [
        {"name": "inc", "role": "incumbent", "endpoint": endpoint, "replicas": 2},
        {"name": "chal", "role": "challenger", "endpoint": endpoint},
        {"name": "decoy", "role": "decoy"},
    ]
    await publish_config(bus, config(objective, 1, models))
    single = await start_host(instance="h-x1")
    double = await start_host(instance="h-x2", replicas=2)
    assert [r.model for r in single.runners] == ["chal"]
    assert [r.model for r in double.runners] == ["inc"]
    assert single.archiver is not None and double.archiver is None
    assert (single.settings.subscription, double.settings.subscription) == (
        "runners",
        "runners-x2",
    )

    # The decoy moves to the other group: the archive follows it.
    moved: list[dict[str, Any]] = [*models[:2], {"name": "decoy", "role": "decoy", "replicas": 2}]
    await publish_config(bus, config(objective, 2, moved))
    await until(lambda: double.archiver is not None and single.archiver is None)
    return_address, _ = await listen(bus)
    archived = make_task(objective, return_address)
    sampled_out = make_task(objective, return_address)
    sampled_out.task.skip_archive = True
    await publish_tasks(bus, objective, archived, sampled_out)
    await until(lambda: double.archiver is not None and double.archiver.sampled_out == 1)
    records = published(bus, bus.topics.archive(objective), task_pb2.ArchiveRecord)
    assert [r.task.task.request.request_id for r in records] == [archived.task.request.request_id]


def test_live_settings_take_the_objective_only() -> None:
    with pytest.raises(ValueError, match="live runner host"):
        RunnerSettings(objective="o", follow=True, model="m", role="incumbent", endpoint="x:1")
    assert RunnerSettings(objective="o", follow=True, replicas=3).subscription == "runners-x3"


async def test_the_static_mode_still_serves_its_deployments(
    bus: MemoryBus, objective: str, serve_model: ServeModel
) -> None:
    model = await serve_model("sum")
    host = RunnerHost(
        RunnerSettings(
            objective=objective,
            deployments=[
                RunnerDeployment(
                    objective=objective,
                    model="m",
                    role="incumbent",
                    endpoint=model.container.endpoint,
                )
            ],
            listen="127.0.0.1:0",
            start_position="earliest",
        ),
        bus=bus,
    )
    await host.start()
    try:
        assert [r.model for r in host.runners] == ["m"]
        assert host.follower is None
        assert not statuses(bus)
        return_address, predictions = await listen(bus)
        task = make_task(objective, return_address)
        rid = task.task.request.request_id
        await publish_tasks(bus, objective, task)
        assert await answers(predictions, 1) == {(rid, "m")}
    finally:
        await host.stop()
