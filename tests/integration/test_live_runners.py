"""A live runner host on the real broker with real model containers: versions published on
the control topic add a model (its predictions start flowing for tasks that list it, and a
RunnerStatus says it is ready) and remove it (it stops, and is reported not ready)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
from rendezvous.v1 import control_pb2, objective_pb2, scoring_pb2, task_pb2

from services.core.bus import Bus, Reader, Subscription
from services.core.lifecycle import Component
from services.core.mesh import Mesh
from services.core.protos import set_values, timestamp_from_ns
from services.models.app import ModelContainer
from services.models.settings import ModelSettings
from services.runner.host import RunnerHost
from services.runner.settings import RunnerSettings
from tests.conftest import PulsarBroker

pytestmark = pytest.mark.integration

SECOND = 1_000_000_000
# Generous: the broker and the model start share 2 cores with everything else.
WAIT_S = 30.0
HOST = "live-host-0"


def _config(objective: str, version: int, models: list[dict[str, Any]]) -> Any:
    mesh = Mesh.model_validate(
        {
            "objectives": {
                objective: {
                    "sla_ms": 50,
                    "models": models,
                    "policy": [{"until_ms": 40, "accept": ["inc"]}],
                }
            }
        }
    )
    return mesh.objective_configs(version)[objective]


def _task(objective: str, return_address: str, *scorers: str) -> task_pb2.EnrichedTask:
    request_id = uuid.uuid4().hex
    request = scoring_pb2.ScoreRequest(objective=objective, request_id=request_id)
    set_values(request.features, {"a": 1.0, "b": 2.0})
    return task_pb2.EnrichedTask(
        task=task_pb2.ScoringTask(
            request=request,
            return_address=return_address,
            mailbox_id=f"mb-{request_id}",
            deadline=timestamp_from_ns(time.time_ns() + 30 * SECOND),
            scorers=list(scorers),
        )
    )


async def _status(
    reader: Reader[control_pb2.RunnerStatus], objective: str, model: str, *, ready: bool
) -> control_pb2.RunnerStatus:
    """The next status of `model` with `ready`, skipping everything else."""
    async with asyncio.timeout(WAIT_S):
        while True:
            envelope = await reader.read_next()
            status = envelope.message
            if (status.objective, status.model, status.ready) == (objective, model, ready):
                assert envelope.key == f"{objective}/{model}/{HOST}"
                return status


async def _answers(
    predictions: Subscription[task_pb2.PredictionEvent], count: int
) -> set[tuple[str, str]]:
    """(request id, model) of the next `count` predictions, and nothing more for a second."""
    seen: set[tuple[str, str]] = set()
    async with asyncio.timeout(WAIT_S):
        for _ in range(count):
            envelope = await predictions.receive()
            await predictions.ack(envelope)
            seen.add((envelope.message.request_id, envelope.message.model))
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(1.0):
            await predictions.receive()
    return seen


async def test_a_model_added_live_answers_and_a_model_removed_live_stops(
    pulsar: PulsarBroker, client_bus: Bus
) -> None:
    objective = f"itlive{uuid.uuid4().hex[:8]}"
    inc_model = ModelContainer(ModelSettings(kind="sum", name="inc", shutdown_grace_s=0.5))
    chal_model = ModelContainer(ModelSettings(kind="sum", name="chal", shutdown_grace_s=0.5))
    components: list[Component] = [inc_model, chal_model]
    closers: list[Any] = []
    try:
        for model in (inc_model, chal_model):
            await model.start()
        inc = {"name": "inc", "role": "incumbent", "endpoint": inc_model.endpoint}
        chal = {"name": "chal", "role": "challenger", "endpoint": chal_model.endpoint}
        control = await client_bus.publisher(
            client_bus.topics.control(), objective_pb2.ObjectiveConfig
        )
        await control.publish(_config(objective, 1, [inc]), key=objective)
        status_reader = await client_bus.reader(
            client_bus.topics.runner_status(), control_pb2.RunnerStatus, start="latest"
        )
        closers.append(status_reader.close)

        host = RunnerHost(
            RunnerSettings(
                objective=objective,
                follow=True,
                instance=HOST,
                pulsar=pulsar.settings(),
                start_position="earliest",
                shutdown_grace_s=2.0,
            )
        )
        await host.start()
        components.append(host)
        assert host.config is not None and host.config.version == 1
        assert (await _status(status_reader, objective, "inc", ready=True)).objective_version == 1

        return_address = client_bus.topics.predictions(f"itlive-{uuid.uuid4().hex[:8]}")
        predictions = await client_bus.subscribe(
            return_address, "itest", task_pb2.PredictionEvent, start="earliest"
        )
        closers.append(predictions.close)
        tasks = await client_bus.publisher(
            client_bus.topics.tasks(objective), task_pb2.EnrichedTask
        )

        # v2 adds the challenger: ready, then it scores the tasks that list it.
        await control.publish(_config(objective, 2, [inc, chal]), key=objective)
        ready = await _status(status_reader, objective, "chal", ready=True)
        assert ready.objective_version == 2 and ready.instance == HOST
        both = _task(objective, return_address, "inc", "chal")
        only_inc = _task(objective, return_address, "inc")
        for task in (both, only_inc):
            await tasks.publish(task, key=task.task.request.request_id)
        assert await _answers(predictions, 3) == {
            (both.task.request.request_id, "inc"),
            (both.task.request.request_id, "chal"),
            (only_inc.task.request.request_id, "inc"),
        }

        # v3 removes it: reported not ready, and a task that still lists it gets inc alone.
        await control.publish(_config(objective, 3, [inc]), key=objective)
        gone = await _status(status_reader, objective, "chal", ready=False)
        assert gone.objective_version == 3
        assert [runner.model for runner in host.runners] == ["inc"]
        after = _task(objective, return_address, "inc", "chal")
        await tasks.publish(after, key=after.task.request.request_id)
        assert await _answers(predictions, 1) == {(after.task.request.request_id, "inc")}
    finally:
        for close in closers:
            await close()
        for component in reversed(components):
            await component.stop()
