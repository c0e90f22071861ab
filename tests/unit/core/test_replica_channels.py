"""Channels to several replicas (`services.core.channels`): the target `rendezvous up
--rendezvous-replicas` prints, round robin over the replicas whose health says SERVING, and a
call whose replica dies mid-call answered by another (the retry policy), on real loopback
servers (one in a process of its own, killed with SIGKILL)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from rendezvous.v1 import scoring_pb2, scoring_pb2_grpc

from services.core.channels import (
    aio_channel,
    balancing_options,
    replicated_target,
    sync_channel,
    target_addresses,
)
from services.core.server import GrpcServer
from services.supervisor.certs import mesh_tls
from tests.conftest import REPO
from tests.fakes.named_scorer import HOLD, NamedScorer, named_server
from tools.certs import write_loopback_certs

TIMEOUT_S = 5.0
# How long a change of a replica's health takes to reach the client's balancer (a watch
# stream per replica): generous for a loaded 2-core machine.
SETTLE_S = 5.0


def test_one_address_is_its_own_target_and_needs_no_balancing() -> None:
    assert replicated_target(["127.0.0.1:50051"]) == "127.0.0.1:50051"
    assert target_addresses("127.0.0.1:50051") == ["127.0.0.1:50051"]
    assert balancing_options("127.0.0.1:50051") == []


def test_several_addresses_make_one_round_robin_target() -> None:
    target = replicated_target(["127.0.0.1:50051", "127.0.0.1:50061"])
    assert target == "ipv4:127.0.0.1:50051,127.0.0.1:50061"
    assert target_addresses(target) == ["127.0.0.1:50051", "127.0.0.1:50061"]
    options = dict(balancing_options(target))
    assert '"round_robin"' in options["grpc.service_config"]
    assert options["grpc.default_authority"] == "127.0.0.1:50051"
    six = replicated_target(["[::1]:50051", "[::1]:50061"])
    assert six == "ipv6:[::1]:50051,[::1]:50061"
    assert target_addresses(six) == ["[::1]:50051", "[::1]:50061"]


@pytest.mark.parametrize("bad", [["localhost:1", "localhost:2"], ["127.0.0.1", "127.0.0.1:2"]])
def test_a_replica_list_takes_literal_addresses_only(bad: list[str]) -> None:
    with pytest.raises(ValueError, match="literal"):
        replicated_target(bad)


@pytest.fixture
async def replicas() -> AsyncIterator[tuple[list[NamedScorer], list[GrpcServer]]]:
    scorers = [NamedScorer("a"), NamedScorer("b")]
    servers = [named_server(scorer) for scorer in scorers]
    for server in servers:
        await server.start()
        await server.set_serving(True)
    try:
        yield scorers, servers
    finally:
        for server in servers:
            await server.stop(0)


async def _answers(stub: scoring_pb2_grpc.ScoringServiceAsyncStub, calls: int) -> Counter[str]:
    replies = [
        await stub.Score(scoring_pb2.ScoreRequest(), timeout=TIMEOUT_S) for _ in range(calls)
    ]
    return Counter(reply.request_id for reply in replies)


async def _until(stub: scoring_pb2_grpc.ScoringServiceAsyncStub, want: set[str]) -> Counter[str]:
    """Calls until the last ten were answered by exactly `want` (the balancer has caught up)."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        seen = await _answers(stub, 10)
        if set(seen) == want or time.monotonic() > deadline:
            return seen
        await asyncio.sleep(0.05)


async def test_calls_go_round_robin_and_skip_a_replica_not_serving(
    replicas: tuple[list[NamedScorer], list[GrpcServer]],
) -> None:
    _, servers = replicas
    target = replicated_target([server.endpoint for server in servers])
    async with aio_channel(target) as channel:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        assert set(await _until(stub, {"a", "b"})) == {"a", "b"}
        # Strictly alternating once both are ready.
        assert await _answers(stub, 20) == Counter({"a": 10, "b": 10})

        # Warming up (or without a collector) a rendezvous says NOT_SERVING: no calls go there.
        await servers[1].set_serving(False)
        assert set(await _until(stub, {"a"})) == {"a"}
        assert await _answers(stub, 20) == Counter({"a": 20})

        await servers[1].set_serving(True)
        assert set(await _until(stub, {"a", "b"})) == {"a", "b"}


async def test_the_blocking_channel_balances_too(
    replicas: tuple[list[NamedScorer], list[GrpcServer]],
) -> None:
    _, servers = replicas
    target = replicated_target([server.endpoint for server in servers])

    def calls() -> Counter[str]:
        # The command-line tools' channel; blocking, so off the servers' event loop.
        seen: Counter[str] = Counter()
        with sync_channel(target) as channel:
            stub = scoring_pb2_grpc.ScoringServiceStub(channel)
            deadline = time.monotonic() + SETTLE_S
            while len(seen) < 2 and time.monotonic() < deadline:
                seen[stub.Score(scoring_pb2.ScoreRequest(), timeout=TIMEOUT_S).request_id] += 1
        return seen

    assert set(await asyncio.to_thread(calls)) == {"a", "b"}


@pytest.fixture
def doomed() -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A replica in a process of its own whose answers to HOLD requests take 3 s: calls to
    it are in flight when it is killed."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.named_scorer", "doomed", "3000"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        port = process.stdout.readline().strip()
        yield process, f"127.0.0.1:{port}"
    finally:
        process.kill()
        process.wait()


async def test_a_call_in_flight_on_a_replica_killed_is_answered_by_another(
    doomed: tuple[subprocess.Popen[str], str],
) -> None:
    process, doomed_endpoint = doomed
    survivor = named_server(NamedScorer("survivor"))
    await survivor.start()
    await survivor.set_serving(True)
    try:
        target = replicated_target([doomed_endpoint, survivor.endpoint])
        async with aio_channel(target) as channel:
            stub = scoring_pb2_grpc.ScoringServiceStub(channel)
            assert set(await _until(stub, {"doomed", "survivor"})) == {"doomed", "survivor"}
            # Round robin over both: of four calls at once, two are held by the doomed one.
            hold = scoring_pb2.ScoreRequest(objective=HOLD)
            calls = [asyncio.ensure_future(stub.Score(hold, timeout=TIMEOUT_S)) for _ in range(4)]
            answered = asyncio.as_completed(calls, timeout=SETTLE_S)
            for _ in range(2):
                assert (await next(answered)).request_id == "survivor"
            assert sum(call.done() for call in calls) == 2
            started = time.monotonic()
            process.kill()
            replies = await asyncio.gather(*calls)
            # Retried on the survivor at once, not after the doomed replica's 3 s.
            assert [reply.request_id for reply in replies] == ["survivor"] * 4
            assert time.monotonic() - started < 1.0
    finally:
        await survivor.stop(0)


async def test_tls_to_several_replicas_checks_each_certificate(tmp_path: Path) -> None:
    write_loopback_certs(tmp_path, days=1)
    tls = mesh_tls(tmp_path)
    scorers = [NamedScorer("a"), NamedScorer("b")]
    servers = [named_server(scorer, tls) for scorer in scorers]
    for server in servers:
        await server.start()
        await server.set_serving(True)
    try:
        target = replicated_target([server.endpoint for server in servers])
        async with aio_channel(target, tls) as channel:
            stub = scoring_pb2_grpc.ScoringServiceStub(channel)
            assert set(await _until(stub, {"a", "b"})) == {"a", "b"}
        # Plaintext to TLS replicas: refused, as for one.
        async with aio_channel(target) as channel:
            with pytest.raises(grpc.aio.AioRpcError):
                await scoring_pb2_grpc.ScoringServiceStub(channel).Score(
                    scoring_pb2.ScoreRequest(), timeout=1.0
                )
    finally:
        for server in servers:
            await server.stop(0)
