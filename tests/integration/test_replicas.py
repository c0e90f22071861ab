"""Scale-out on one machine, under the real supervisor on the real broker, with load.

- Two rendezvous replicas (`--rendezvous-replicas 2`) behind the round-robin target the
  supervisor records, their tasks through the enricher to one runner host (and its decoy):
  both answer (outcomes say which instance), one killed with SIGKILL mid-load leaves the
  client answered by the other, the supervisor restarts it, and it gets calls again only
  once it is warm.
- Two runner hosts of one replica group on one shared subscription: each task goes to one
  of them and is scored once per model; one killed, the other takes every task.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from rendezvous.v1 import scoring_pb2, scoring_pb2_grpc, task_pb2

from services.core.bus import Bus
from services.core.channels import aio_channel, target_addresses
from services.supervisor.app import check_health
from services.supervisor.plan import free_port, free_port_series
from tests.conftest import PulsarBroker
from tests.integration.supervised import supervised_mesh

pytestmark = pytest.mark.integration

RATE = 40.0
SLA_MS = 50.0
CALL_TIMEOUT_S = 2.0
# Load before the kill, and after the killed process is back (a replica is dialled again
# within channels.REPLICA_MAX_RECONNECT_BACKOFF_MS of being ready).
STEADY_S = 6.0
AFTER_BACK_S = 5.0
RESTART_TIMEOUT_S = 45.0
POLL_S = 0.1
# The runner-host test is about who scores each task, not about time: a deadline no task
# misses on a busy machine (a runner skips a task past its deadline).
RUNNERS_SLA_MS = 1000.0
# How long the supervisor waits before starting a killed runner host again (the window
# in which the other host has every task).
RESTART_BACKOFF_S = 4.0
# Tasks the killed runner host held when it died are redelivered to the other after their
# deadline, and skipped: requests this close to the kill may get no prediction.
KILL_SETTLE_S = 1.0
# The results topic is read from the start: once nothing more comes for this long, it is all
# (the outcomes a killed rendezvous took with it never come).
OUTCOMES_QUIET_S = 10.0
LATE_GRACE_MS = 300
# A call sent just after the kill may still be picked for the killed replica (before the
# client saw its connection close), fail, and be retried on the other.
RETRIED_WITHIN_S = 0.5
# A rendezvous warms up before it serves (150 in-time races in a row by default): on a
# 2-core machine shared with other work that can take a minute; 30 still shows the
# restarted replica getting no calls until warm, in a test-sized time.
WARMUP = {"RDV_RENDEZVOUS_WARMUP_CONSECUTIVE": "30", "RDV_RENDEZVOUS_WARMUP_MAX_S": "20"}
PORT_STEP = 10


def _objective(
    name: str, replicas: int = 1, sla_ms: float = SLA_MS, enriched: bool = False
) -> dict[str, Any]:
    """Two models; `enriched`: tasks pass through the enricher, and the decoy archives them
    (every hop that forwards a task, or publishes for it, on the way)."""
    models = [
        {"name": model, "role": role, "kind": "sum", "replicas": replicas}
        for model, role in ((f"{name}-inc", "incumbent"), (f"{name}-chal", "challenger"))
    ]
    if enriched:
        models.append({"name": "decoy", "role": "decoy", "replicas": replicas})
    return {
        "sla_ms": sla_ms,
        "late_grace_ms": LATE_GRACE_MS,
        "enrichment": "subject_state" if enriched else "none",
        "features": [{"name": "x"}],
        "models": models,
        "policy": [{"until_ms": sla_ms - 5, "accept": [f"{name}-inc", f"{name}-chal"]}],
        "default": {"score": -1.0},
    }


@dataclass
class Call:
    request_id: str
    sent_s: float
    status: str = "pending"
    default: bool = False
    latency_ms: float = 0.0


async def _load(target: str, prefix: str, stop: asyncio.Event, into: list[Call]) -> None:
    """Open-loop Score calls at RATE over one channel to `target` until `stop`."""
    async with aio_channel(target) as channel:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)

        async def one(call: Call) -> None:
            request = scoring_pb2.ScoreRequest(objective=prefix, request_id=call.request_id)
            request.features["x"].number_value = 1.0
            try:
                response = await stub.Score(request, timeout=CALL_TIMEOUT_S)
            except grpc.aio.AioRpcError as error:
                call.status = error.code().name
                return
            call.status = "OK"
            call.latency_ms = (time.monotonic() - call.sent_s) * 1000
            call.default = response.decision.source == scoring_pb2.ANSWER_SOURCE_DEFAULT

        begin = time.monotonic()
        pending: list[asyncio.Task[None]] = []
        index = 0
        while not stop.is_set():
            await asyncio.sleep(max(0.0, begin + index / RATE - time.monotonic()))
            call = Call(f"{prefix}-{index}", time.monotonic())
            into.append(call)
            pending.append(asyncio.create_task(one(call)))
            index += 1
        await asyncio.gather(*pending)


async def _load_then_kill(
    target: str, objective: str, pid: int
) -> tuple[list[Call], asyncio.Event, asyncio.Task[None], float]:
    """Load at RATE for STEADY_S, then SIGKILL `pid` with the load going on: the calls (more
    to come), what stops the load, the load, and when the kill was."""
    calls: list[Call] = []
    stop = asyncio.Event()
    load = asyncio.create_task(_load(target, objective, stop, calls))
    await asyncio.sleep(STEADY_S)
    killed_s = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    return calls, stop, load, killed_s


class _Watch:
    """Every prediction of `objective` published to a return address from now on."""

    def __init__(self, bus: Bus, topic: str, objective: str) -> None:
        self.bus, self.topic, self.objective = bus, topic, objective
        self.request_ids: list[str] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        reader = await self.bus.reader(self.topic, task_pb2.PredictionEvent, start="latest")

        async def read() -> None:
            try:
                while True:
                    event = (await reader.read_next()).message
                    if event.objective == self.objective:
                        self.request_ids.append(event.request_id)
            finally:
                await reader.close()

        self._task = asyncio.create_task(read())

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def _until(predicate: Callable[[], Any], what: str) -> float:
    """Polls until `predicate` holds; the monotonic time it was first seen to."""
    deadline = time.monotonic() + RESTART_TIMEOUT_S
    while time.monotonic() < deadline:
        if await predicate():
            return time.monotonic()
        await asyncio.sleep(POLL_S)
    raise AssertionError(f"{what} within {RESTART_TIMEOUT_S}s")


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def _summary(phase: list[Call]) -> tuple[int, float, float]:
    """Default answers, and the client's p50 and p99 in ms, of the calls of one phase."""
    latencies = [c.latency_ms for c in phase if c.status == "OK"]
    return (
        sum(c.default for c in phase),
        round(_quantile(latencies, 0.5), 1),
        round(_quantile(latencies, 0.99), 1),
    )


async def test_two_rendezvous_replicas_one_killed_the_other_answers_and_it_rejoins(
    pulsar: PulsarBroker, client_bus: Bus, tmp_path: Path
) -> None:
    objective = f"rr{uuid.uuid4().hex[:8]}"
    document = {
        "rendezvous": {
            "listen": f"127.0.0.1:{free_port_series(2, PORT_STEP)}",
            "port_step": PORT_STEP,
        },
        "objectives": {objective: _objective(objective, enriched=True)},
    }
    # No evaluator: it is not on the answer path and would only add a process.
    env = {"RDV_SUPERVISOR_EVALUATOR_LISTEN": "", **WARMUP}
    with supervised_mesh(
        pulsar, tmp_path, document, env, supervise_args=["--rendezvous-replicas", "2"]
    ) as mesh:
        replicas = target_addresses(mesh.endpoint)
        assert mesh.endpoint.startswith("ipv4:") and len(replicas) == 2
        assert [mesh.process(f"rendezvous-{i}")["endpoint"] for i in (0, 1)] == replicas
        assert {mesh.process(f"collector-{i}")["instance"] for i in (0, 1)} == {"rdv-0", "rdv-1"}
        assert "enricher" in {p["name"] for p in mesh.state()["processes"]}
        victim = mesh.process("rendezvous-1")

        # What reaches each replica's return address from now on (both are warm by now).
        watches = [
            _Watch(client_bus, client_bus.topics.predictions(f"rdv-{i}"), objective) for i in (0, 1)
        ]
        for watch in watches:
            await watch.start()
        calls, stop, load, killed_s = await _load_then_kill(mesh.endpoint, objective, victim["pid"])

        # Back, and warm: until then it answers health NOT_SERVING (or not at all), and a
        # call sent before that moment cannot have gone to it.
        not_serving_s = killed_s

        async def restarted_and_serving() -> bool:
            nonlocal not_serving_s
            process = mesh.process("rendezvous-1")
            if process["restarts"] < 1 or process["pid"] == victim["pid"]:
                return False
            if await check_health(replicas[1]):
                return True
            not_serving_s = time.monotonic()
            return False

        serving_s = await _until(restarted_and_serving, "rendezvous-1 restarted and warm")
        await asyncio.sleep(AFTER_BACK_S)
        stop.set()
        await load
        for watch in watches:
            await watch.stop()

        # A rendezvous killed takes the outcomes of its last answers (still in their late
        # grace) with it: what there is, once nothing more comes.
        outcomes = await mesh.outcomes(
            objective, {c.request_id for c in calls if c.status == "OK"}, OUTCOMES_QUIET_S
        )
        before = [c for c in calls if c.sent_s < killed_s]
        down = [c for c in calls if killed_s <= c.sent_s < not_serving_s]
        back = [c for c in calls if c.sent_s >= serving_s]

        def instances(phase: list[Call]) -> Counter[str]:
            return Counter(
                outcomes[c.request_id].rendezvous_instance
                for c in phase
                if c.request_id in outcomes
            )

        # Only the killed replica's last answers may lack an outcome (sent within its late
        # grace, plus the call's own time, before the kill).
        lost = [c for c in calls if c.status == "OK" and c.request_id not in outcomes]
        lost_window_s = (LATE_GRACE_MS + SLA_MS) / 1000 + 0.5

        # A call in flight on the killed replica was retried on the other with the same
        # request id: its first attempt's predictions went to the killed one's address.
        sent = {c.request_id: c.sent_s for c in calls}
        retried = {
            i
            for i in watches[1].request_ids
            if i in outcomes and outcomes[i].rendezvous_instance == "rdv-0"
        }

        failed = Counter(c.status for c in calls if c.status != "OK")
        figures = {
            "calls": len(calls),
            "failed": dict(failed),
            "before the kill": dict(instances(before)),
            "killed until warm again": dict(instances(down)),
            "after": dict(instances(back)),
            "down for (s)": round(serving_s - killed_s, 1),
            "warm-up unseen by clients (s)": round(not_serving_s - killed_s, 1),
            "outcomes lost with the killed replica": len(lost),
            "calls retried on the other replica": len(retried),
            "warm-up predictions to rdv-1 / rdv-0": [
                sum(not i.startswith(objective) for i in w.request_ids) for w in reversed(watches)
            ],
            **{
                f"{name}: defaults, p50/p99 ms": _summary(phase)
                for name, phase in (("before", before), ("down", down), ("after", back))
            },
        }
        print(f"\nrendezvous replicas under load: {figures}")

        # Round robin: both answered before the kill, about half each.
        assert set(instances(before)) == {"rdv-0", "rdv-1"}, figures
        assert min(instances(before).values()) >= 0.35 * len(before), figures
        # The switch-over cost no call: those in flight on the killed replica were retried
        # on the other (channels.REPLICA_SERVICE_CONFIG), new ones went there at once.
        assert not failed, figures
        assert all(killed_s - lost_window_s <= c.sent_s < killed_s for c in lost), figures
        # While it was away, and while it warmed up again, only the other one answered: the
        # channel watches health, and a rendezvous is SERVING only once warm.
        assert len(down) >= RATE * 1.0, figures
        assert instances(down) == Counter({"rdv-0": len(down)}), figures
        # Every prediction went to the return address of the replica holding its request
        # (for a call retried, the replica that held its first attempt).
        assert all(
            outcomes[i].rendezvous_instance == "rdv-0"
            for i in watches[0].request_ids
            if i in outcomes
        ), figures
        assert all(
            killed_s - lost_window_s <= sent[i] < killed_s + RETRIED_WITHIN_S for i in retried
        ), figures
        # Its warm-up went through the whole path to its own return address; not one of its
        # warm-up predictions reached the other replica (client requests are named
        # "<objective>-<n>", warm-up ones are not).
        warmup_to = [sum(not i.startswith(objective) for i in w.request_ids) for w in watches]
        assert warmup_to[0] == 0, figures
        assert warmup_to[1] >= int(WARMUP["RDV_RENDEZVOUS_WARMUP_CONSECUTIVE"]), figures
        # Restarted by the supervisor, it rejoined and took calls again.
        assert mesh.process("rendezvous-1")["restarts"] >= 1
        assert instances(back)["rdv-1"] >= 0.2 * len(back), figures
        assert mesh.process("collector-1")["restarts"] == 0


async def test_runner_host_replicas_split_the_tasks_and_one_takes_all_when_the_other_dies(
    pulsar: PulsarBroker, tmp_path: Path
) -> None:
    objective = f"rh{uuid.uuid4().hex[:8]}"
    models = {f"{objective}-inc", f"{objective}-chal"}
    document = {
        "rendezvous": {"listen": f"127.0.0.1:{free_port()}"},
        "objectives": {objective: _objective(objective, replicas=2, sla_ms=RUNNERS_SLA_MS)},
    }
    hosts = [f"runners-{objective}-x2-{i}" for i in (0, 1)]
    env = {
        "RDV_SUPERVISOR_EVALUATOR_LISTEN": "",
        "RDV_SUPERVISOR_RESTART_BACKOFF_INITIAL_S": str(RESTART_BACKOFF_S),
        **WARMUP,
    }
    with supervised_mesh(pulsar, tmp_path, document, env) as mesh:
        assert {p["name"] for p in mesh.state()["processes"]} >= set(hosts)
        victim = mesh.process(hosts[1])

        calls, stop, load, killed_s = await _load_then_kill(mesh.endpoint, objective, victim["pid"])

        # The supervisor starts it again after RESTART_BACKOFF_S: meanwhile the other host
        # has every task.
        async def respawned() -> bool:
            return bool(mesh.process(hosts[1])["pid"] != victim["pid"])

        async def ready() -> bool:
            process = mesh.process(hosts[1])
            return bool(process["restarts"] >= 1 and process["status"] == "ready")

        await _until(respawned, f"{hosts[1]} restarted")
        # When it was exec'd, not when state.json (rewritten each second) first showed it: a
        # host can join the subscription within that second.
        respawned_s = mesh.process(hosts[1])["started_at"] - (time.time() - time.monotonic())
        await _until(ready, f"{hosts[1]} ready again")
        await asyncio.sleep(AFTER_BACK_S)
        stop.set()
        await load

        ok = {c.request_id for c in calls if c.status == "OK"}
        outcomes = await mesh.outcomes(objective, ok)

        def scored(call: Call) -> Counter[tuple[str, str]]:
            """(host, model) of every prediction the request received."""
            outcome = outcomes.get(call.request_id, task_pb2.Outcome())
            return Counter((c.prediction.runner, c.prediction.model) for c in outcome.candidates)

        # Tasks the killed host held are redelivered to the other: one it had scored but not
        # acknowledged is scored again (at least once), so requests sent around the kill may
        # have a prediction twice (the rendezvous counts and ignores the second).
        before = [c for c in calls if c.sent_s < killed_s - KILL_SETTLE_S]
        alone = [c for c in calls if killed_s + KILL_SETTLE_S <= c.sent_s < respawned_s]
        after = [c for c in calls if c.sent_s >= respawned_s]
        near = [c for c in calls if abs(c.sent_s - killed_s) < KILL_SETTLE_S]

        def per_host(phase: list[Call]) -> Counter[str]:
            return Counter(host for c in phase for host, _ in scored(c))

        figures = {
            "calls": len(calls),
            "predictions per host before the kill": dict(per_host(before)),
            "... while one was down": dict(per_host(alone)),
            "... after it came back": dict(per_host(after)),
            "requests within 1 s of the kill scored twice": sum(
                outcomes[c.request_id].duplicates > 0 for c in near if c.request_id in outcomes
            ),
            "outcomes missing": len(ok - set(outcomes)),
            "... not scored": sum(not scored(c) for c in near),
            "host down for (s)": round(respawned_s - killed_s, 1),
        }
        print(f"\nrunner host replicas under load: {figures}")

        assert len(ok) == len(calls), figures
        assert set(outcomes) == ok, figures
        for call in [*before, *after]:
            predictions = scored(call)
            # Once per model, no duplicate, both from the one host that received the task.
            assert sorted(model for _, model in predictions) == sorted(models), predictions
            assert len({host for host, _ in predictions}) == 1, predictions
            assert outcomes[call.request_id].duplicates == 0
        # The shared subscription split the tasks between the two hosts.
        assert set(per_host(before)) == set(hosts), figures
        assert min(per_host(before).values()) >= 0.25 * sum(per_host(before).values()), figures
        # One host down: the other scored every task, each once per model.
        assert len(alone) >= RATE * 1.0, figures
        for call in alone:
            assert scored(call) == Counter({(hosts[0], model): 1 for model in models}), call
        assert mesh.process(hosts[0])["restarts"] == 0
        # Restarted, the host joined the subscription again.
        assert hosts[1] in per_host(after), figures
