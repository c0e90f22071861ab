"""Outcomes survive a broker outage: held until the broker is back, retried when the client
fails them, bounded (count and bytes) with what is dropped beyond counted and logged, and
flushed at shutdown. `OutcomeSender` against a scripted publisher, then the rendezvous over
the in-memory bus whose broker goes away and comes back."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest
from rendezvous.v1 import scoring_pb2, task_pb2

from services.core.bus import BusError, Publisher
from services.core.mesh import to_config
from services.core.settings import PulsarSettings
from services.rendezvous.outcomes import OutcomeSender
from tests.fakes.memory_bus import MemoryBus
from tests.helpers import metric_value, published, until
from tests.unit.rendezvous.conftest import OBJECTIVE, running_mesh

TOPIC = "persistent://public/default/rdv.demo.results"


class ScriptedPublisher(Publisher[task_pb2.Outcome]):
    """Fails the first `failures` sends; holds every send while `broker_away` is clear."""

    def __init__(self, failures: int = 0) -> None:
        self.topic = TOPIC
        self.failures = failures
        self.attempts: list[float] = []
        self.sent: list[task_pb2.Outcome] = []
        self.broker_back = asyncio.Event()
        self.broker_back.set()

    async def _send(self, data: bytes, properties: dict[str, str], key: str | None) -> None:
        self.attempts.append(time.monotonic())
        await self.broker_back.wait()
        if len(self.attempts) <= self.failures:
            raise BusError("pulsar: ProducerQueueIsFull")
        self.sent.append(task_pb2.Outcome.FromString(data))

    async def close(self) -> None:
        return None


def _sender(**bounds: int) -> OutcomeSender:
    values = {"max_count": 100, "max_bytes": 1 << 20, **bounds}
    return OutcomeSender(
        max_count=values["max_count"],
        max_bytes=values["max_bytes"],
        retry_initial_s=0.05,
        retry_max_s=0.1,
    )


def _outcome(request_id: str) -> task_pb2.Outcome:
    return task_pb2.Outcome(request_id=request_id, objective="demo")


async def test_an_outcome_the_client_failed_is_retried_with_backoff_and_published_once() -> None:
    publisher = ScriptedPublisher(failures=3)
    sender = _sender()
    retried = metric_value("rdv_outcomes_total", {"result": "retried"})

    assert await sender.send(publisher, _outcome("r1"), "r1")

    assert [o.request_id for o in publisher.sent] == ["r1"]
    gaps = [b - a for a, b in zip(publisher.attempts, publisher.attempts[1:], strict=False)]
    # 0.05 s, then doubled, then capped at 0.1 s (asyncio may wake a hair early).
    assert len(gaps) == 3
    assert all(gap >= want - 0.005 for gap, want in zip(gaps, (0.05, 0.1, 0.1), strict=True))
    assert metric_value("rdv_outcomes_total", {"result": "retried"}) == retried + 3
    assert sender.count == 0


async def test_outcomes_wait_in_the_backlog_and_beyond_the_count_bound_are_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    publisher = ScriptedPublisher()
    publisher.broker_back.clear()
    sender = _sender(max_count=3)
    backlog = metric_value("rdv_outcome_backlog", {})
    dropped = metric_value("rdv_outcomes_total", {"result": "dropped"})

    with caplog.at_level(logging.WARNING, logger="services.rendezvous.outcomes"):
        waiting = [
            asyncio.create_task(sender.send(publisher, _outcome(f"r{n}"), "k")) for n in range(5)
        ]
        await asyncio.sleep(0.05)
        assert [t.result() for t in waiting if t.done()] == [False, False]
        assert sender.count == 3
        assert metric_value("rdv_outcome_backlog", {}) == backlog + 3
        assert metric_value("rdv_outcomes_total", {"result": "dropped"}) == dropped + 2
        full = [r for r in caplog.records if "backlog full" in r.getMessage()]
        assert len(full) == 1  # one line for the streak, not one per outcome

        publisher.broker_back.set()
        assert [await t for t in waiting] == [True, True, True, False, False]
        assert sorted(o.request_id for o in publisher.sent) == ["r0", "r1", "r2"]
        assert metric_value("rdv_outcome_backlog", {}) == backlog
        # The next outcome finds room, and the log says how many were dropped meanwhile.
        assert await sender.send(publisher, _outcome("r5"), "k")
    room = [r for r in caplog.records if "room again" in r.getMessage()]
    assert len(room) == 1 and room[0].__dict__["dropped"] == 2


async def test_outcomes_beyond_the_byte_bound_are_dropped() -> None:
    publisher = ScriptedPublisher()
    publisher.broker_back.clear()
    size = _outcome("r0").ByteSize()
    sender = _sender(max_bytes=2 * size)
    bytes_before = metric_value("rdv_outcome_backlog_bytes", {})

    waiting = [
        asyncio.create_task(sender.send(publisher, _outcome(f"r{n}"), "k")) for n in range(3)
    ]
    await asyncio.sleep(0.05)
    assert sender.bytes == 2 * size
    assert metric_value("rdv_outcome_backlog_bytes", {}) == bytes_before + 2 * size
    publisher.broker_back.set()
    assert [await t for t in waiting] == [True, True, False]
    assert sender.bytes == 0


async def test_flush_waits_for_the_backlog_and_close_drops_what_the_bus_fails() -> None:
    publisher = ScriptedPublisher()
    publisher.broker_back.clear()
    sender = _sender()
    waiting = asyncio.create_task(sender.send(publisher, _outcome("r1"), "k"))
    await asyncio.sleep(0)
    assert not await sender.flush(0.05)
    publisher.broker_back.set()
    assert await sender.flush(1.0)
    assert await waiting

    # At shutdown: the bus closes under an outcome still waiting; it is dropped, not retried.
    publisher = ScriptedPublisher(failures=1)
    publisher.broker_back.clear()
    waiting = asyncio.create_task(sender.send(publisher, _outcome("r2"), "k"))
    await asyncio.sleep(0)
    sender.close()
    publisher.broker_back.set()
    assert await waiting is False
    assert len(publisher.attempts) == 1
    assert sender.dropped == 1
    # And nothing new is taken once closed.
    assert await sender.send(publisher, _outcome("r3"), "k") is False


# ----------------------------------------------------------------- the rendezvous, end to end


def _request(request_id: str) -> scoring_pb2.ScoreRequest:
    request = scoring_pb2.ScoreRequest(objective="demo", request_id=request_id)
    request.features["x"].number_value = 1.0
    return request


def _outcome_ids(bus: MemoryBus) -> list[str]:
    return [o.request_id for o in published(bus, bus.topics.results("demo"), task_pb2.Outcome)]


async def test_every_outcome_of_an_outage_goes_out_once_when_the_broker_is_back(
    tmp_path: Path,
) -> None:
    # The outage (1 s) outlasts the late grace (0.3 s) and the send timeout (0.2 s).
    bus = MemoryBus(PulsarSettings(send_timeout_s=0.2))
    async with running_mesh(tmp_path, {"demo": to_config("demo", OBJECTIVE)}, bus) as mesh:
        mesh.script.plan = {"incumbent": (1, 1.0)}
        assert (await mesh.stub.Score(_request("before"))).decision.model == "incumbent"
        await until(lambda: _outcome_ids(bus) == ["before"])
        dropped = metric_value("rdv_outcomes_total", {"result": "dropped"})

        bus.unavailable = True
        ids = [f"during-{n}" for n in range(5)]
        answers = await asyncio.gather(*(mesh.stub.Score(_request(i)) for i in ids))
        assert {a.decision.reason for a in answers} == {scoring_pb2.DECISION_REASON_DISPATCH_FAILED}
        await until(lambda: mesh.rendezvous.outcomes.count == 5)
        await asyncio.sleep(1.0)
        assert _outcome_ids(bus) == ["before"]
        assert mesh.rendezvous.outcomes.count == 5

        bus.unavailable = False
        await until(lambda: len(_outcome_ids(bus)) == 6)
        await asyncio.sleep(0.2)  # nothing more comes
        assert sorted(_outcome_ids(bus)) == sorted(["before", *ids])
        assert mesh.rendezvous.outcomes.count == 0
        assert metric_value("rdv_outcomes_total", {"result": "dropped"}) == dropped


async def test_stop_flushes_the_outcomes_still_waiting_for_the_broker(tmp_path: Path) -> None:
    bus = MemoryBus(PulsarSettings(send_timeout_s=0.2))
    async with running_mesh(tmp_path, {"demo": to_config("demo", OBJECTIVE)}, bus) as mesh:
        bus.unavailable = True
        answer = await mesh.stub.Score(_request("r1"))
        assert answer.decision.reason == scoring_pb2.DECISION_REASON_DISPATCH_FAILED
        await until(lambda: mesh.rendezvous.outcomes.count == 1)

        await mesh.collector.stop()  # as at a real shutdown: no stream holds the server
        stopping = asyncio.create_task(mesh.rendezvous.stop())
        await asyncio.sleep(0.3)
        assert not stopping.done()  # waiting for the broker, within the drain budget
        bus.unavailable = False
        await stopping
    assert _outcome_ids(bus) == ["r1"]
