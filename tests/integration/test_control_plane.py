"""The control plane on the real broker, over real gRPC sockets.

Each test runs in a namespace of its own (the control topic's name is fixed), starts the
control component as a process would (its own Pulsar client, the admin REST API), and checks
what a client and every follower of the topic see: seeding, updates and their refusals, the
history, compaction, the runner-readiness gate, the single writer, and the CLI.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from rendezvous.v1 import control_pb2, control_pb2_grpc, objective_pb2

from services.control.admin import topic_path
from services.control.app import ControlComponent
from services.control.edits import add_model, promote, same_serving, split
from services.control.settings import ControlSettings
from services.core.bus import Bus, connect
from services.core.control_topic import ControlFollower
from services.core.protos import now_timestamp
from tests.conftest import REPO, PulsarBroker
from tests.unit.control.configs import entry

pytestmark = pytest.mark.integration

WAIT_S = 30.0
POLL_S = 0.2
CLI_TIMEOUT_S = 60.0


def admin_call(broker: PulsarBroker, method: str, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        broker.admin_url.rstrip("/") + "/admin/v2/" + path,
        data=data,
        method=method,
        headers={"Content-Type": "application/json", **broker.admin_headers()},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        raw = response.read()
    return json.loads(raw) if raw else None


async def eventually(check: Callable[[], Awaitable[Any]], what: str) -> Any:
    """`check()`'s first truthy result, polling until WAIT_S has passed."""
    deadline = time.monotonic() + WAIT_S
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(POLL_S)


@dataclass
class Plane:
    """A running control component, a client of it, and a bus in its namespace."""

    broker: PulsarBroker
    namespace: str
    component: ControlComponent
    channel: grpc.aio.Channel
    stub: control_pb2_grpc.ControlPlaneServiceAsyncStub
    bus: Bus
    ready_file: Path

    @property
    def topic(self) -> str:
        return self.bus.topics.control()

    async def get(self, objective: str = "demo", version: int = 0) -> objective_pb2.ObjectiveConfig:
        request = control_pb2.GetObjectiveConfigRequest(objective=objective, version=version)
        return (await self.stub.GetObjectiveConfig(request)).config

    async def update(
        self, config: objective_pb2.ObjectiveConfig, expected: int, action: str = "apply"
    ) -> objective_pb2.ObjectiveConfig:
        config.change.CopyFrom(
            objective_pb2.ConfigChange(author="itest", reason=f"test {action}", action=action)
        )
        request = control_pb2.UpdateObjectiveConfigRequest(config=config, expected_version=expected)
        return (await self.stub.UpdateObjectiveConfig(request)).config

    async def history(self, objective: str = "demo") -> list[objective_pb2.ObjectiveConfig]:
        request = control_pb2.ListObjectiveHistoryRequest(objective=objective)
        return list((await self.stub.ListObjectiveHistory(request)).versions)

    async def read_topic(self, *, compacted: bool) -> list[objective_pb2.ObjectiveConfig]:
        """Everything a fresh reader of the control topic gets, from the earliest message."""
        reader = await self.bus.reader(
            self.topic, objective_pb2.ObjectiveConfig, start="earliest", compacted=compacted
        )
        out: list[objective_pb2.ObjectiveConfig] = []
        try:
            async with asyncio.timeout(WAIT_S):
                while await reader.has_message_available():
                    out.append((await reader.read_next()).message)
        finally:
            await reader.close()
        return out


def control_settings(
    broker: PulsarBroker, namespace: str, mesh: Path | None, **overrides: Any
) -> ControlSettings:
    values: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "instance": f"itest-control-{uuid.uuid4().hex[:6]}",
        "mesh_file": mesh,
        "pulsar": broker.settings(tenant_namespace=namespace),
        "shutdown_grace_s": 1.0,
    }
    values.update(overrides)
    return ControlSettings(**values)


@pytest.fixture
async def plane(pulsar: PulsarBroker, tmp_path: Path) -> AsyncIterator[Plane]:
    namespace = f"public/itest-ctl-{uuid.uuid4().hex[:8]}"
    admin_call(pulsar, "PUT", f"namespaces/{namespace}")
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(yaml.safe_dump({"objectives": {"demo": entry()}}))
    ready_file = tmp_path / "control.ready.json"
    component = ControlComponent(control_settings(pulsar, namespace, mesh, ready_file=ready_file))
    await component.start()
    channel = grpc.aio.insecure_channel(component.endpoint)
    bus = connect(pulsar.settings(tenant_namespace=namespace), "itest-control-client")
    try:
        yield Plane(
            broker=pulsar,
            namespace=namespace,
            component=component,
            channel=channel,
            stub=control_pb2_grpc.ControlPlaneServiceStub(channel),
            bus=bus,
            ready_file=ready_file,
        )
    finally:
        await channel.close()
        await component.stop()
        await bus.close()


def violations(err: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(err)
    assert status is not None
    fields: list[str] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [violation.field for violation in bad.field_violations]
        if detail.Is(error_details_pb2.PreconditionFailure.DESCRIPTOR):
            failure = error_details_pb2.PreconditionFailure()
            detail.Unpack(failure)
            fields += [violation.subject for violation in failure.violations]
    return fields


async def test_seeds_serves_and_updates_with_history(plane: Plane) -> None:
    health = health_pb2_grpc.HealthStub(plane.channel)
    served = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert served.status == health_pb2.HealthCheckResponse.SERVING
    facts = json.loads(plane.ready_file.read_text())
    assert facts["endpoint"] == plane.component.endpoint
    assert facts["seeded"] == ["demo"] and facts["objectives"] == {"demo": 1}

    seed = await plane.get()
    assert (seed.version, seed.change.action, seed.change.author) == (
        1,
        "seed",
        "rendezvous-control",
    )
    listed = await plane.stub.ListObjectiveConfigs(control_pb2.ListObjectiveConfigsRequest())
    assert [config.objective for config in listed.configs] == ["demo"]

    # Another component's follower, on its own client: it must see the change live.
    seen: list[tuple[int, int]] = []
    follower = ControlFollower(plane.bus)
    follower.listen(lambda old, new: seen.append((old.version if old else 0, new.version)))
    following = asyncio.create_task(follower.run())
    try:
        async with asyncio.timeout(WAIT_S):
            await follower.caught_up.wait()
        assert follower.configs["demo"].version == 1

        stored = await plane.update(split(seed, "sum", 0.25), expected=1, action="split")
        assert stored.version == 2
        assert stored.change.previous_version == 1
        assert stored.change.author == "itest" and stored.change.action == "split"
        assert stored.change.HasField("change_time")
        # Update answers only once the plane sees its own write: Get returns it at once.
        assert await plane.get() == stored
        async with asyncio.timeout(WAIT_S):
            assert await follower.wait_for("demo", 2) == stored
        assert seen == [(1, 2)]
    finally:
        following.cancel()
        await asyncio.gather(following, return_exceptions=True)
        await follower.close()

    with pytest.raises(grpc.aio.AioRpcError) as stale:
        await plane.update(split(seed, "sum", 0.5), expected=1)
    assert stale.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "at version 2, not 1" in (stale.value.details() or "")
    assert violations(stale.value) == ["objectives/demo"]

    bad = await plane.get()
    bad.policy.steps[0].accept.append("ghost")
    del bad.policy.steps[1].accept[:]
    bad.policy.steps[1].accept.append("decoy")
    bad.sampling.archive_fraction = 1.5
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await plane.update(bad, expected=2)
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(invalid.value) == [
        "config.policy.steps[0].accept[2]",
        "config.policy.steps[1].accept[0]",
        "config.sampling.archive_fraction",
    ]
    # Nothing was published: the topic holds the seed and the split, nothing else.
    assert [c.version for c in await plane.read_topic(compacted=False)] == [1, 2]

    history = await plane.history()
    assert [(c.version, c.change.action) for c in history] == [(1, "seed"), (2, "split")]
    assert await plane.get(version=1) == seed
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await plane.get(version=9)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_the_topic_is_compacted_while_the_history_keeps_every_version(
    plane: Plane,
) -> None:
    path = topic_path(plane.topic)
    retention = await eventually(
        lambda: asyncio.to_thread(admin_call, plane.broker, "GET", f"{path}/retention"),
        "the topic's retention policy",
    )
    assert retention == {"retentionTimeInMinutes": -1, "retentionSizeInMB": -1}

    current = await plane.get()
    for version, share in zip(range(1, 5), (0.1, 0.2, 0.3, 0.4), strict=True):
        current = await plane.update(split(current, "sum", share), expected=version)
    assert current.version == 5

    async def compacted_by_the_plane() -> bool:
        stats = await asyncio.to_thread(admin_call, plane.broker, "GET", f"{path}/stats")
        return int(stats["compaction"]["lastCompactionSucceedTimestamp"]) > 0

    # The plane asked for compactions after its updates; the broker has done at least one.
    await eventually(compacted_by_the_plane, "a compaction the plane asked for")

    async def compaction_idle() -> bool:
        status = await asyncio.to_thread(admin_call, plane.broker, "GET", f"{path}/compaction")
        return bool(status["status"] != "RUNNING")

    # One more, after the last version, so the compacted ledger holds every key's latest.
    await eventually(compaction_idle, "the running compaction to end")
    await asyncio.to_thread(admin_call, plane.broker, "PUT", f"{path}/compaction")

    async def compaction_done() -> bool:
        status = await asyncio.to_thread(admin_call, plane.broker, "GET", f"{path}/compaction")
        return bool(status["status"] == "SUCCESS")

    await eventually(compaction_done, "the compaction to succeed")
    internal = await asyncio.to_thread(admin_call, plane.broker, "GET", f"{path}/internalStats")
    assert internal["compactedLedger"]["ledgerId"] >= 0

    compacted = await plane.read_topic(compacted=True)
    assert [(c.objective, c.version) for c in compacted] == [("demo", 5)]
    assert compacted[0] == current
    everything = await plane.read_topic(compacted=False)
    assert [c.version for c in everything] == [1, 2, 3, 4, 5]
    assert [c.version for c in await plane.history()] == [1, 2, 3, 4, 5]


async def test_a_policy_accepts_a_new_model_only_once_a_runner_reports_ready(
    plane: Plane,
) -> None:
    seed = await plane.get()
    added = await plane.update(add_model(seed, "newbie", kind="sum"), expected=1)
    assert added.version == 2

    accepting = split(added, "newbie", 0.1)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await plane.update(accepting, expected=2)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert violations(refused.value) == ["objectives/demo/models/newbie"]
    assert "newbie" in (refused.value.details() or "")

    statuses = await plane.bus.publisher(plane.bus.topics.runner_status(), control_pb2.RunnerStatus)

    async def report(ready: bool) -> None:
        status = control_pb2.RunnerStatus(
            objective="demo",
            model="newbie",
            instance="itest-host",
            ready=ready,
            objective_version=2,
            report_time=now_timestamp(),
        )
        await statuses.publish(status, key="demo/newbie/itest-host")

    await report(ready=False)
    await asyncio.sleep(1.0)
    with pytest.raises(grpc.aio.AioRpcError) as still:
        await plane.update(accepting, expected=2)
    assert still.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    await report(ready=True)

    async def accepted() -> objective_pb2.ObjectiveConfig | None:
        try:
            return await plane.update(accepting, expected=2)
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
            return None

    stored = await eventually(accepted, "the gate to let newbie in")
    assert stored.version == 3
    assert list(stored.policy.steps[0].accept) == ["ridge", "newbie"]


async def test_a_second_control_plane_stands_by_until_the_first_goes(
    plane: Plane, tmp_path: Path
) -> None:
    second = ControlComponent(
        control_settings(
            plane.broker,
            plane.namespace,
            None,
            standby_retry_s=0.5,
            # The client gives up waiting for exclusive access after this; the standby asks again.
            pulsar=plane.broker.settings(tenant_namespace=plane.namespace, operation_timeout_s=3),
        )
    )
    starting = asyncio.create_task(second.start())
    try:
        await asyncio.sleep(5.0)
        assert not starting.done()
        channel = grpc.aio.insecure_channel(second.endpoint)
        stub = control_pb2_grpc.ControlPlaneServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        checked = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert checked.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as standby:
            await stub.GetObjectiveConfig(control_pb2.GetObjectiveConfigRequest(objective="demo"))
        assert standby.value.code() == grpc.StatusCode.UNAVAILABLE

        promoted = await plane.update(promote(await plane.get(), "sum"), expected=1)
        await plane.component.stop()
        async with asyncio.timeout(WAIT_S):
            await starting
        got = await stub.GetObjectiveConfig(control_pb2.GetObjectiveConfigRequest(objective="demo"))
        assert got.config == promoted
        rolled = await stub.UpdateObjectiveConfig(
            control_pb2.UpdateObjectiveConfigRequest(
                config=_with_change(promoted),
                expected_version=2,
            )
        )
        assert rolled.config.version == 3
        await channel.close()
    finally:
        if not starting.done():
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
        else:
            await second.stop()


def _with_change(config: objective_pb2.ObjectiveConfig) -> objective_pb2.ObjectiveConfig:
    out = objective_pb2.ObjectiveConfig()
    out.CopyFrom(config)
    out.sampling.archive_fraction = 0.5
    out.change.CopyFrom(objective_pb2.ConfigChange(author="itest", reason="from the standby"))
    return out


async def cli(plane: Plane, *args: str) -> tuple[int, str, str]:
    """`python -m services.cli objective --target ... ARGS` as a user runs it."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli",
        "objective",
        "--target",
        plane.component.endpoint,
        *args,
        cwd=REPO,
        env={**os.environ, "RDV_AUTHOR": "cli-tester", "PYTHONPATH": f"{REPO}:{REPO / 'gen'}"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(CLI_TIMEOUT_S):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_the_cli_end_to_end(plane: Plane, tmp_path: Path) -> None:
    code, out, _ = await cli(plane, "show")
    assert code == 0
    assert out.startswith("# objective demo, version 1 (previous 0)\n")
    assert "role: incumbent" in out

    code, _, err = await cli(plane, "promote", "sum")
    assert code == 2 and "--reason" in err
    assert (await plane.get()).version == 1

    code, out, _ = await cli(plane, "promote", "sum", "--reason", "sum wins")
    assert code == 0, out
    assert "demo: version 1 -> 2 [promote]" in out
    assert "--- demo v1\n+++ demo v2\n" in out
    promoted = await plane.get()
    assert promoted.version == 2 and promoted.change.author == "cli-tester"
    assert promoted.change.reason == "sum wins"
    assert [m.name for m in promoted.models if m.role == 1] == ["sum"]

    code, _, err = await cli(plane, "split", "canary", "1.5", "--reason", "too much")
    assert code == 1
    assert "INVALID_ARGUMENT" in err
    assert "config.policy.steps[0].shares[canary]: must be in [0, 1], not 1.5" in err

    code, _, err = await cli(plane, "split", "flaky", "0.2", "--reason", "try flaky")
    assert code == 1
    assert "FAILED_PRECONDITION" in err and "objectives/demo/models/flaky" in err

    code, out, _ = await cli(plane, "rollback", "--reason", "back to ridge")
    assert code == 0, out
    assert "demo: version 2 -> 3 [rollback]" in out
    assert same_serving(await plane.get(), await plane.get(version=1))

    code, out, _ = await cli(plane, "history")
    assert code == 0
    lines = out.splitlines()[1:]
    assert [line.split()[0] for line in lines] == ["1", "2", "3"]
    assert "cli-tester" in lines[2] and "rollback" in lines[2] and "back to ridge" in lines[2]

    code, out, _ = await cli(plane, "diff", "1", "3")
    assert code == 0 and out == "versions 1 and 3 serve alike\n"
    code, out, _ = await cli(plane, "diff")
    assert code == 0 and out.startswith("--- demo v2\n+++ demo v3\n")

    # apply: `show` prints what `apply` takes; edit it and send it back.
    code, shown, _ = await cli(plane, "show")
    edited = yaml.safe_load(shown)
    edited["sla_ms"] = 60
    changed = tmp_path / "demo.yaml"
    changed.write_text(yaml.safe_dump(edited))
    code, out, _ = await cli(plane, "apply", str(changed), "--reason", "more time")
    assert code == 0, out
    assert "-sla_ms: 50.0\n+sla_ms: 60.0\n" in out
    assert (await plane.get()).version == 4
    code, _, err = await cli(plane, "apply", str(changed), "--reason", "again")
    assert code == 0  # nothing to change: no version published
    assert (await plane.get()).version == 4
