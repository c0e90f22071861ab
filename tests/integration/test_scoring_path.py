"""The scoring path end to end: the real supervisor runs every component as its own
process against the real broker; requests go in over real gRPC sockets.

Scenario objectives use the flaky model with fixed latencies so each race has a
known winner:

    hops     incumbent 2 ms (echoes the subject state), challenger 2 ms, decoy
    slowinc  incumbent 32 ms, challenger 3 ms       -> challenger at the step boundary (25 ms)
    alllate  both 300 ms (past the deadline)        -> the default at the SLA
    failing  incumbent always errors, challenger 3 ms -> challenger (enrichment: none)

The broker test runs last: it kills the session's broker and restarts it on its data.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from rendezvous.v1 import common_pb2, scoring_pb2, scoring_pb2_grpc, task_pb2

from services.core.bus import PulsarBus
from services.core.protos import duration_ms, from_value, now_timestamp
from services.rendezvous.settings import RendezvousSettings
from services.supervisor.plan import free_port
from tests.conftest import REPO, PulsarBroker
from tests.helpers import in_one_of
from tests.integration.supervised import RunningMesh, supervised_mesh

pytestmark = pytest.mark.integration

M = TypeVar("M", bound=Message)

SLA_MS = 60.0
# What the machine may add to an SLA between the server's answer and the client's receipt.
CLIENT_MARGIN_MS = 40.0
MAX_IN_FLIGHT = 10


def _flaky(name: str, role: str, latency_ms: float, **args: Any) -> dict[str, Any]:
    return {
        "name": name,
        "role": role,
        "kind": "flaky",
        "args": {"latency_ms_median": latency_ms, **args},
    }


def _objective(models: list[dict[str, Any]], grace_ms: float, default: float) -> dict[str, Any]:
    incumbent, challenger = models[0]["name"], models[1]["name"]
    return {
        "sla_ms": SLA_MS,
        "late_grace_ms": grace_ms,
        "features": [{"name": "x"}],
        "models": models,
        "policy": [
            {"until_ms": 25, "accept": [incumbent]},
            {"until_ms": 55, "accept": [incumbent, challenger]},
        ],
        "default": {"score": default},
    }


def mesh_document(listen: str) -> dict[str, Any]:
    return {
        "rendezvous": {"listen": listen},
        "objectives": {
            "hops": _objective(
                [
                    _flaky("echo-incumbent", "incumbent", 2, score=1.0, echo_subject_state=True),
                    _flaky("hops-challenger", "challenger", 2, score=2.0),
                    {"name": "decoy", "role": "decoy"},
                ],
                grace_ms=6000,
                default=-1.0,
            ),
            "slowinc": _objective(
                [
                    _flaky("slow-incumbent", "incumbent", 32, score=1.0),
                    _flaky("quick-challenger", "challenger", 3, score=2.0),
                ],
                grace_ms=1500,
                default=-1.0,
            ),
            "alllate": _objective(
                [
                    _flaky("late-incumbent", "incumbent", 300, score=1.0),
                    _flaky("late-challenger", "challenger", 300, score=2.0),
                ],
                grace_ms=500,
                default=7.0,
            ),
            "failing": {
                **_objective(
                    [
                        _flaky("broken-incumbent", "incumbent", 1, error_rate=1.0),
                        _flaky("backup-challenger", "challenger", 3, score=2.0),
                    ],
                    grace_ms=500,
                    default=-1.0,
                ),
                "enrichment": "none",
            },
        },
    }


@pytest.fixture(scope="module")
def mesh(pulsar: PulsarBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMesh]:
    document = mesh_document(f"127.0.0.1:{free_port()}")
    env = {"RDV_RENDEZVOUS_MAX_IN_FLIGHT": str(MAX_IN_FLIGHT)}
    with supervised_mesh(pulsar, tmp_path_factory.mktemp("mesh"), document, env) as running:
        yield running


# ----------------------------------------------------------------------------- helpers


def request(objective: str, x: float = 1.0, **fields: Any) -> scoring_pb2.ScoreRequest:
    out = scoring_pb2.ScoreRequest(objective=objective, **fields)
    out.features["x"].number_value = x
    return out


async def score(
    mesh: RunningMesh, req: scoring_pb2.ScoreRequest, timeout: float = 5.0
) -> tuple[scoring_pb2.ScoreResponse, float]:
    """The response and the milliseconds the client waited for it."""
    async with grpc.aio.insecure_channel(mesh.endpoint) as channel:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        started = time.monotonic()
        response = await stub.Score(req, timeout=timeout)
        return response, (time.monotonic() - started) * 1000


async def find(
    broker: PulsarBroker,
    topic: str,
    message_type: type[M],
    predicate: Callable[[M], bool],
    timeout: float = 20.0,
) -> M:
    """The first message on `topic` (read from the start) that satisfies `predicate`."""
    bus = PulsarBus(broker.settings(), "test-reader")
    try:
        reader = await bus.reader(topic, message_type)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                envelope = await asyncio.wait_for(reader.read_next(), deadline - time.monotonic())
            except TimeoutError:
                break
            if predicate(envelope.message):
                return envelope.message
        raise AssertionError(f"no matching {message_type.__name__} on {topic} in {timeout}s")
    finally:
        await bus.close()


async def outcome(mesh: RunningMesh, objective: str, request_id: str) -> task_pb2.Outcome:
    topic = f"persistent://public/default/rdv.{objective}.results"
    return await find(
        mesh.broker, topic, task_pb2.Outcome, lambda o: o.request_id == request_id, timeout=30
    )


async def outcomes_of(
    mesh: RunningMesh, objective: str, ids: set[str], timeout: float = 30.0
) -> dict[str, task_pb2.Outcome]:
    """The outcomes of the requests `ids`, read from the results topic as they are published
    (each leaves its late grace after the answer)."""
    topic = f"persistent://public/default/rdv.{objective}.results"
    bus = PulsarBus(mesh.broker.settings(), "test-outcomes")
    found: dict[str, task_pb2.Outcome] = {}
    try:
        reader = await bus.reader(topic, task_pb2.Outcome)
        deadline = time.monotonic() + timeout
        while found.keys() != ids and time.monotonic() < deadline:
            try:
                envelope = await asyncio.wait_for(reader.read_next(), deadline - time.monotonic())
            except TimeoutError:
                break
            if envelope.message.request_id in ids:
                found[envelope.message.request_id] = envelope.message
    finally:
        await bus.close()
    assert found.keys() == ids, f"{len(ids - found.keys())} outcomes missing"
    return found


def statuses(result: task_pb2.Outcome) -> dict[str, int]:
    return {c.prediction.model: c.status for c in result.candidates}


def assert_late(result: task_pb2.Outcome, model: str, response: scoring_pb2.ScoreResponse) -> None:
    """`model`'s candidate arrived after the answer: LATE for a prediction, ERROR for the
    model's error (on a busy machine a late model's call can run out of the task's deadline;
    its error is delivered and recorded all the same)."""
    [candidate] = [c for c in result.candidates if c.prediction.model == model]
    assert duration_ms(candidate.arrival) > duration_ms(response.elapsed), candidate
    expected = (
        task_pb2.CANDIDATE_STATUS_LATE
        if candidate.prediction.WhichOneof("result") == "prediction"
        else task_pb2.CANDIDATE_STATUS_ERROR
    )
    assert candidate.status == expected, candidate


# ----------------------------------------------------------------------------- the hops


async def test_one_request_through_every_hop(mesh: RunningMesh) -> None:
    subject = f"alice-{uuid.uuid4().hex[:8]}"  # the events topic outlives test runs
    bus = PulsarBus(mesh.broker.settings(), "test-events")
    events = await bus.publisher(bus.topics.events("hops"), task_pb2.SubjectEvent)
    for kind in ("view", "purchase"):
        await events.publish(
            task_pb2.SubjectEvent(
                subject_id=subject, objective="hops", kind=kind, event_time=now_timestamp()
            ),
            key=subject,
        )
    await bus.close()

    # The enricher follows the events topic live; poll until it has both events.
    state: dict[str, Any] = {}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        response, _ = await score(mesh, request("hops", subject_id=subject))
        state = (
            from_value(response.outputs["subject_state"])
            if "subject_state" in response.outputs
            else {}
        )
        if state.get("event_count") == 2:
            break
        await asyncio.sleep(0.2)
    # The enrichment reached the model: it echoes the state it was given.
    assert state["event_count"] == 2
    assert state["last_event_kind"] == "purchase"
    assert response.decision.model == "echo-incumbent"
    assert response.decision.source == scoring_pb2.ANSWER_SOURCE_MODEL
    assert response.decision.role == common_pb2.MODEL_ROLE_INCUMBENT

    sealed = await find(
        mesh.broker,
        "persistent://public/default/rdv.hops.archive",
        task_pb2.ArchiveRecord,
        lambda r: r.task.task.request.request_id == response.request_id,
    )
    # Sealed under the subject's key: nothing of the subject's data readable around it.
    assert sealed.HasField("sealed") and not sealed.task.task.request.features
    [archived] = await mesh.open_records([sealed])
    assert archived.task.task.request.subject_id == ""  # PII redacted in the archive
    assert "task.task.request.subject_id" in archived.redacted_fields
    assert archived.task.task.request.features["x"].number_value == 1.0
    assert archived.task.subject_state["event_count"].number_value == 2

    result = await outcome(mesh, "hops", response.request_id)
    assert result.response.decision.model == "echo-incumbent"
    assert statuses(result)["echo-incumbent"] == task_pb2.CANDIDATE_STATUS_ANSWERED
    assert "hops-challenger" in statuses(result)

    # It was the real broker: its admin API lists the topics the request crossed.
    topics = set(mesh.broker.admin_get("/admin/v2/persistent/public/default"))
    for name in ("requests", "tasks", "results", "archive", "events"):
        assert f"persistent://public/default/rdv.hops.{name}" in topics
    assert "persistent://public/default/rdv.predictions.rdv-0" in topics


# ----------------------------------------------------------------------------- the race


async def test_preferred_model_in_time_wins(mesh: RunningMesh) -> None:
    """The first step (until 25 ms) accepts the incumbent only, the second both: an incumbent
    that arrives inside the first step wins even when the equally fast challenger came first,
    and only then. Judged per request from the arrivals the rendezvous recorded (the same
    clock the race ran on), so a busy machine that delays some predictions changes which
    requests show the rule, never whether it held; sequential requests go on until enough
    showed the incumbent in time behind the challenger."""
    first_step_ms = 25.0
    responses: list[scoring_pb2.ScoreResponse] = []
    seen: list[tuple[str, int, float, float, float]] = []
    while len(responses) < 200:
        batch = [(await score(mesh, request("hops")))[0] for _ in range(20)]
        responses += batch
        outcomes = await outcomes_of(mesh, "hops", {r.request_id for r in batch})
        for response in batch:
            arrivals = {
                c.prediction.model: duration_ms(c.arrival)
                for c in outcomes[response.request_id].candidates
            }
            seen.append(
                (
                    response.decision.model,
                    response.decision.rule_index,
                    duration_ms(response.elapsed),
                    arrivals.get("echo-incumbent", float("inf")),
                    arrivals.get("hops-challenger", float("inf")),
                )
            )
        behind = [s for s in seen if s[1] == 0 and s[4] < s[3]]
        if len(behind) >= 3 and sum(s[1] == 0 for s in seen) >= 10:
            break
    for model, rule, _, incumbent_at, _ in seen:
        # The challenger never wins the first step; the incumbent wins it exactly when it
        # arrived inside it.
        assert (model, rule) != ("hops-challenger", 0), seen
        assert (model == "echo-incumbent" and rule == 0) == (incumbent_at < first_step_ms), seen
    in_time = [s for s in seen if s[1] == 0]
    # Shown, not just allowed: incumbents in time, some of them after the challenger.
    assert len(in_time) >= 10, seen
    assert sum(challenger_at < incumbent_at for *_, incumbent_at, challenger_at in in_time) >= 3, (
        seen
    )


async def test_preferred_late_gives_the_next_in_order(mesh: RunningMesh) -> None:
    """The incumbent takes 32 ms, past the first step: the 3 ms challenger is accepted at the
    step boundary (25 ms). On a busy machine the challenger too can come late; the request is
    then judged by the arrivals the rendezvous recorded, and the next one is tried."""
    last_step_ms = 55.0
    for _ in range(5):
        response, waited = await score(mesh, request("slowinc"))
        result = await outcome(mesh, "slowinc", response.request_id)
        arrivals = {c.prediction.model: duration_ms(c.arrival) for c in result.candidates}
        incumbent_at = arrivals.get("slow-incumbent", float("inf"))
        challenger_at = arrivals.get("quick-challenger", float("inf"))
        if challenger_at < min(incumbent_at, last_step_ms):
            break
        # Not this request: the incumbent came first (preferred in the second step too), or
        # neither came before the last step ended.
        expected = "slow-incumbent" if incumbent_at < last_step_ms else ""
        assert response.decision.model == expected, (response.decision, arrivals)
    else:
        raise AssertionError("in 5 requests the challenger never came first and in time")
    assert response.decision.model == "quick-challenger"
    assert response.decision.rule_index == 1
    assert max(25.0, challenger_at) <= duration_ms(response.elapsed) < SLA_MS
    assert waited < SLA_MS + CLIENT_MARGIN_MS
    # The incumbent came after the answer: recorded as late (or, when a busy machine left its
    # call too little of the deadline, as the model's error, late all the same).
    assert statuses(result).keys() == {"quick-challenger", "slow-incumbent"}
    assert statuses(result)["quick-challenger"] == task_pb2.CANDIDATE_STATUS_ANSWERED
    assert_late(result, "slow-incumbent", response)


async def test_all_late_gives_the_default_within_the_sla(mesh: RunningMesh) -> None:
    # One request's timing: one of three runs must hold (a busy machine can deschedule the
    # rendezvous at its SLA timer once; the 50 req/s test below holds every answer to it).
    async def scenario() -> None:
        response, waited = await score(mesh, request("alllate"))
        assert response.decision.source == scoring_pb2.ANSWER_SOURCE_DEFAULT
        assert response.decision.reason == scoring_pb2.DECISION_REASON_SLA_DEFAULT
        assert response.score == 7.0
        assert SLA_MS <= duration_ms(response.elapsed) < SLA_MS + 5
        assert waited < SLA_MS + CLIENT_MARGIN_MS

    await in_one_of(3, scenario)


async def test_client_deadline_tightens_the_sla(mesh: RunningMesh) -> None:
    async def scenario() -> None:
        # The call succeeds (no DEADLINE_EXCEEDED): the race was cut to the client's 30 ms,
        # not run to the objective's 60 ms (both models take 300).
        response, waited = await score(mesh, request("alllate"), timeout=0.03)
        assert response.decision.reason == scoring_pb2.DECISION_REASON_CLIENT_DEADLINE
        assert waited < SLA_MS

    await in_one_of(3, scenario)


async def test_model_error_falls_back_to_the_next(mesh: RunningMesh) -> None:
    response, _ = await score(mesh, request("failing"))
    assert response.decision.model == "backup-challenger"
    result = await outcome(mesh, "failing", response.request_id)
    assert statuses(result)["broken-incumbent"] == task_pb2.CANDIDATE_STATUS_ERROR
    error = next(c for c in result.candidates if c.prediction.model == "broken-incumbent")
    assert error.prediction.error.grpc_code in (
        grpc.StatusCode.UNAVAILABLE.value[0],
        grpc.StatusCode.INTERNAL.value[0],
    )


async def test_objective_without_enrichment_skips_the_enricher(mesh: RunningMesh) -> None:
    response, _ = await score(mesh, request("failing"))
    assert response.decision.source == scoring_pb2.ANSWER_SOURCE_MODEL
    # The rendezvous published the task to the tasks topic itself: never enriched ...
    task = await find(
        mesh.broker,
        "persistent://public/default/rdv.failing.tasks",
        task_pb2.EnrichedTask,
        lambda t: t.task.request.request_id == response.request_id,
    )
    assert not task.HasField("enriched_time")
    assert task.task.return_address == "persistent://public/default/rdv.predictions.rdv-0"
    # ... and nothing went to the request topic, which only the enricher reads.
    with pytest.raises(AssertionError, match="no matching"):
        await find(
            mesh.broker,
            "persistent://public/default/rdv.failing.requests",
            task_pb2.ScoringTask,
            lambda t: t.request.request_id == response.request_id,
            timeout=2,
        )


async def test_duplicate_prediction_is_ignored_and_counted(mesh: RunningMesh) -> None:
    response, _ = await score(mesh, request("hops"))
    archived = await find(
        mesh.broker,
        "persistent://public/default/rdv.hops.archive",
        task_pb2.ArchiveRecord,
        lambda r: r.task.task.request.request_id == response.request_id,
    )
    task = archived.task.task
    # Pulsar delivers at least once: replay the incumbent's prediction to the return address.
    duplicate = task_pb2.PredictionEvent(
        request_id=task.request.request_id,
        mailbox_id=task.mailbox_id,
        objective="hops",
        model="echo-incumbent",
        model_version="1",
        role=common_pb2.MODEL_ROLE_INCUMBENT,
    )
    duplicate.prediction.score = 99.0
    bus = PulsarBus(mesh.broker.settings(), "test-duplicate")
    await (await bus.publisher(task.return_address, task_pb2.PredictionEvent)).publish(duplicate)
    await bus.close()
    result = await outcome(mesh, "hops", response.request_id)
    assert result.duplicates == 1
    answered = next(c for c in result.candidates if c.prediction.model == "echo-incumbent")
    assert answered.prediction.prediction.score == 1.0  # the first copy, not the replay


# ----------------------------------------------------------------------------- bad input


def _violations(err: grpc.aio.AioRpcError) -> set[str]:
    status = rpc_status.from_call(err)
    assert status is not None
    fields: set[str] = set()
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields |= {v.field for v in bad.field_violations}
    return fields


async def test_bad_input_gets_clear_statuses(mesh: RunningMesh) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await score(mesh, request("no-such-objective"))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert unknown.value.details() == "unknown objective 'no-such-objective'"

    bad = scoring_pb2.ScoreRequest(objective="hops")
    bad.features["x"].string_value = "one"
    bad.features["y"].number_value = 2
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await score(mesh, bad)
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert invalid.value.details() == "invalid request: features.x, features.y"
    assert _violations(invalid.value) == {"features.x", "features.y"}

    missing = scoring_pb2.ScoreRequest(objective="hops")
    with pytest.raises(grpc.aio.AioRpcError) as absent:
        await score(mesh, missing)
    assert absent.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert absent.value.details() == "invalid request: features.x"
    assert _violations(absent.value) == {"features.x"}

    oversize = request("hops")
    oversize.payload.data = b"\0" * (5 * 1024 * 1024)
    with pytest.raises(grpc.aio.AioRpcError) as large:
        await score(mesh, oversize)
    assert large.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # gRPC's own words, before any handler runs: the size and the rendezvous' default limit.
    limit = RendezvousSettings.model_fields["max_message_bytes"].default
    assert large.value.details() == (
        f"SERVER: Received message larger than max ({oversize.ByteSize()} vs. {limit})"
    )


async def test_answers_leave_within_the_sla_at_25_requests_per_second(
    mesh: RunningMesh,
) -> None:
    # The server's own clock (started when the request reached the process, loop lag
    # included): 97 % of answers leave by SLA + 5 ms (the share the broker-outage test
    # below holds too), whoever answered, and none later than twice the SLA. At 25 req/s:
    # this mesh of twenty processes reaches its knee on this 2-core VM near 50 req/s (on
    # 12-02, 30 of 500 answers at 50 req/s left past SLA + 5 ms, the rendezvous
    # descheduled up to 20 ms), and a test of the SLA mechanism must not be a load test of
    # the machine; `make bench` measures the rates.
    rate, seconds, sla_ms = 25, 20, 60.0
    async with grpc.aio.insecure_channel(mesh.endpoint) as channel:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        started = time.monotonic()
        calls = []
        for index in range(rate * seconds):
            await asyncio.sleep(max(0.0, started + index / rate - time.monotonic()))
            calls.append(asyncio.ensure_future(stub.Score(request("hops"), timeout=5.0)))
        responses = await asyncio.gather(*calls)
    elapsed = sorted(duration_ms(r.elapsed) for r in responses)
    assert len(responses) == rate * seconds
    # On failure, the slowest answers and how far behind the rendezvous' loop ran.
    late = sum(e > sla_ms + 5.0 for e in elapsed)
    assert late <= 0.03 * len(elapsed), (late, elapsed[-10:], _loop_lag(mesh))
    assert elapsed[-1] <= 2 * sla_ms, (elapsed[-10:], _loop_lag(mesh))
    # The path works (CI runs this beside a core of unrelated load, where later models mean
    # more defaults: the designed answer, not a failure).
    by_model = sum(r.decision.source == scoring_pb2.ANSWER_SOURCE_MODEL for r in responses)
    assert by_model >= 0.9 * len(responses), f"{by_model} of {len(responses)} by a model"


def _loop_lag(mesh: RunningMesh) -> list[str]:
    """The rendezvous' event-loop lag histogram, from its metrics endpoint."""
    url = f"http://{mesh.process('rendezvous')['metrics']}/metrics"
    with urllib.request.urlopen(url, timeout=5.0) as reply:
        text: str = reply.read().decode()
    return [line for line in text.splitlines() if line.startswith("rdv_event_loop_lag")]


async def test_overload_is_shed_with_resource_exhausted(mesh: RunningMesh) -> None:
    # ghz (Go) holds 6x MAX_IN_FLIGHT calls open at once whatever this process is doing (a
    # Python client on a busy machine could not start them faster than they are answered), and
    # MAX_IN_FLIGHT is small enough that even a starved rendezvous starts that many handlers
    # within the 60 ms the calls stay open.
    calls = MAX_IN_FLIGHT * 6
    body = {"objective": "alllate", "features": {"x": 1.0}}
    ghz = await asyncio.create_subprocess_exec(
        str(REPO / "tools" / "bin" / "ghz"),
        "--insecure",
        "--call=rendezvous.v1.ScoringService/Score",
        f"--data={json.dumps(body)}",
        f"--total={calls}",
        f"--concurrency={calls}",
        "--connections=4",
        "--timeout=10s",
        "-O",
        "json",
        mesh.endpoint,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await ghz.communicate()
    assert out, err.decode()
    codes: dict[str, int] = json.loads(out)["statusCodeDistribution"]
    assert set(codes) == {"OK", "ResourceExhausted"}, codes
    assert codes["OK"] >= MAX_IN_FLIGHT
    assert sum(codes.values()) == calls


async def test_undecodable_message_goes_to_the_dead_letter_topic(mesh: RunningMesh) -> None:
    bus = PulsarBus(mesh.broker.settings(), "test-garbage")
    requests_topic = bus.topics.requests("hops")
    publisher = await bus.publisher(requests_topic, task_pb2.ScoringTask)
    marker = f"garbage-{time.time_ns()}"
    await publisher.publish_bytes(b"\xff\xfe not a proto", {"marker": marker})
    await bus.close()
    reader_bus = PulsarBus(mesh.broker.settings(), "test-dlq")
    try:
        reader = await reader_bus.reader(f"{requests_topic}-DLQ", task_pb2.ScoringTask)
        deadline = time.monotonic() + 20
        found = False
        while not found and time.monotonic() < deadline:
            raw = await asyncio.wait_for(reader._read_raw(), deadline - time.monotonic())
            found = raw.properties.get("marker") == marker
        assert found, "the undecodable message never reached the dead-letter topic"
        assert "rdv-dead-letter-reason" in raw.properties
    finally:
        await reader_bus.close()
    # ... and the enricher carried on: the incumbent answers again (polled, since a busy
    # machine can make one answer the default).
    await _answers_from(mesh, "echo-incumbent")


# ----------------------------------------------------------------------------- bad days


async def test_collector_restart_loses_nothing(mesh: RunningMesh) -> None:
    collector = mesh.process("collector")
    os.kill(collector["pid"], signal.SIGKILL)
    # While the collector is down the answers are defaults; the predictions wait in Pulsar.
    during = [(await score(mesh, request("hops")))[0] for _ in range(5)]
    assert all(r.decision.source == scoring_pb2.ANSWER_SOURCE_DEFAULT for r in during)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        restarted = mesh.process("collector")
        if restarted["restarts"] >= 1 and restarted["status"] == "ready":
            break
        await asyncio.sleep(0.2)
    assert mesh.process("collector")["restarts"] >= 1
    # Every prediction made while it was down was delivered after its restart, after the
    # answer: late. On a busy machine a model call can also run out of the task's deadline;
    # its error is delivered all the same and recorded as the model's error.
    for response in during:
        result = await outcome(mesh, "hops", response.request_id)
        assert statuses(result).keys() == {"echo-incumbent", "hops-challenger"}
        for model in ("echo-incumbent", "hops-challenger"):
            assert_late(result, model, response)
    await _answers_from(mesh, "echo-incumbent")


async def _wait_restarted(mesh: RunningMesh, name: str, before: int) -> None:
    # Ready includes a restarted rendezvous' warm-up, which may take its warmup_max_s (90 s)
    # on a busy machine.
    deadline = time.monotonic() + RendezvousSettings.model_fields["warmup_max_s"].default + 30
    while time.monotonic() < deadline:
        process = mesh.process(name)
        if process["restarts"] > before and process["status"] == "ready":
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"{name} was not restarted: {mesh.process(name)}")


async def _answers_from(mesh: RunningMesh, model: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            response, _ = await score(mesh, request("hops"), timeout=1)
            if response.decision.model == model:
                return
        except grpc.aio.AioRpcError:
            pass  # the rendezvous itself may still be coming up
        await asyncio.sleep(0.2)
    raise AssertionError(f"{model} never answered again")


async def test_rendezvous_restart_the_collector_reconnects(mesh: RunningMesh) -> None:
    rendezvous = mesh.process("rendezvous")
    collector_restarts = mesh.process("collector")["restarts"]
    os.kill(rendezvous["pid"], signal.SIGKILL)
    await _wait_restarted(mesh, "rendezvous", rendezvous["restarts"])
    # Answers from the models again: the collector found the new socket by itself.
    await _answers_from(mesh, "echo-incumbent")
    assert mesh.process("collector")["restarts"] == collector_restarts


async def test_model_restart_is_ridden_out(mesh: RunningMesh) -> None:
    model = mesh.process("model-echo-incumbent")
    os.kill(model["pid"], signal.SIGKILL)
    # While it is down the challenger answers (the incumbent's runner publishes errors).
    during, _ = await score(mesh, request("hops"))
    assert during.decision.model in ("hops-challenger", "echo-incumbent")
    await _wait_restarted(mesh, "model-echo-incumbent", model["restarts"])
    await _answers_from(mesh, "echo-incumbent")
    assert mesh.process("runners-hops-0")["restarts"] == 0


def _broker_pid() -> int:
    """The session broker's JVM (tools/pulsar.sh's pid file in PULSAR_RUN_DIR)."""
    run_dir = Path(os.environ.get("PULSAR_RUN_DIR", ".run/pulsar"))
    pid = int(((run_dir if run_dir.is_absolute() else REPO / run_dir) / "pulsar.pid").read_text())
    assert b"PulsarStandaloneStarter" in Path(f"/proc/{pid}/cmdline").read_bytes(), pid
    return pid


async def _ids_on(broker: PulsarBroker, topic: str, kind: type[M], ids: set[str]) -> list[str]:
    """The request ids among `ids` of every message on `topic`, repeats included."""
    bus = PulsarBus(broker.settings(), "test-ledger")
    try:
        reader = await bus.reader(topic, kind)
        found: list[str] = []
        while await reader.has_message_available():
            message = (await reader.read_next()).message
            if isinstance(message, task_pb2.ArchiveRecord):
                request_id = message.task.task.request.request_id
            else:
                assert isinstance(message, task_pb2.Outcome)
                request_id = message.request_id
            if request_id in ids:
                found.append(request_id)
        return found
    finally:
        await bus.close()


async def test_broker_killed_mid_traffic_loses_no_outcome_and_archives_each_task_once(
    mesh: RunningMesh,
) -> None:
    """`kill -9` of the broker under traffic, then a restart on its data (as an operator
    would): every request is answered within its SLA throughout, model answers resume by
    themselves, every answered request's outcome reaches the results topic once the broker
    is back (held by the rendezvous meanwhile), and no task is archived twice by the hosted
    decoy, which kept running (a killed broker forgets the acknowledgements of the last
    seconds and redelivers those tasks; the decoy remembers it archived them)."""
    results: list[tuple[float, str, scoring_pb2.ScoreResponse | BaseException, float]] = []
    stop = asyncio.Event()
    prefix = f"kill-{uuid.uuid4().hex[:8]}"
    survivors = {name: mesh.process(name)["restarts"] for name in ("runners-hops-0", "enricher")}

    async def traffic() -> None:
        async with grpc.aio.insecure_channel(mesh.endpoint) as channel:
            stub = scoring_pb2_grpc.ScoringServiceStub(channel)
            while not stop.is_set():
                started = time.monotonic()
                request_id = f"{prefix}-{len(results)}"
                try:
                    response: scoring_pb2.ScoreResponse | BaseException = await stub.Score(
                        request("hops", request_id=request_id), timeout=5
                    )
                except grpc.aio.AioRpcError as err:
                    response = err
                results.append((started, request_id, response, (time.monotonic() - started) * 1000))
                await asyncio.sleep(0.02)

    sender = asyncio.create_task(traffic())
    await asyncio.sleep(3)  # a few seconds of acknowledgements for the broker to forget
    os.kill(_broker_pid(), signal.SIGKILL)
    await asyncio.sleep(1)
    restart = await asyncio.create_subprocess_exec(
        str(REPO / "tools" / "pulsar.sh"),
        "restart",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert await restart.wait() == 0
    restarted_at = time.monotonic()
    # Normal answers resume by themselves once the broker is back.
    resumed_at = None
    deadline = restarted_at + 90
    while time.monotonic() < deadline:
        recent = [r for t, _, r, _ in results if t > restarted_at]
        models = [
            r for r in recent if isinstance(r, scoring_pb2.ScoreResponse) and r.decision.model
        ]
        if len(models) >= 5:
            resumed_at = time.monotonic()
            break
        await asyncio.sleep(0.5)
    stop.set()
    await sender
    errors = [r for _, _, r, _ in results if not isinstance(r, scoring_pb2.ScoreResponse)]
    assert not errors, f"requests failed during the outage: {errors[:3]}"
    answers = [r for _, _, r, _ in results if isinstance(r, scoring_pb2.ScoreResponse)]
    defaults = [r for r in answers if r.decision.source == scoring_pb2.ANSWER_SOURCE_DEFAULT]
    assert defaults, "the outage was never seen"
    # Every request, during the outage too, was answered, nearly all within the SLA plus
    # 5 ms. While the broker's JVM boots it takes both cores, and a rare answer is
    # scheduled late even at raised priority (measured on a quiet machine: 0-2 in ~450,
    # up to ~35 ms; on a machine busy with other work, up to ~45 ms). None may hang.
    elapsed = [duration_ms(r.elapsed) for r in answers]
    assert sum(e < SLA_MS + 5 for e in elapsed) >= 0.97 * len(elapsed), sorted(elapsed)[-5:]
    assert max(elapsed) < 3 * SLA_MS, sorted(elapsed)[-5:]
    assert resumed_at is not None, "model answers did not resume after the broker restart"

    # The ledger: the last outcomes leave `late_grace` (6 s) after their answers.
    answered = {i for _, i, r, _ in results if isinstance(r, scoring_pb2.ScoreResponse)}
    dispatched = {
        i
        for _, i, r, _ in results
        if isinstance(r, scoring_pb2.ScoreResponse)
        and r.decision.reason != scoring_pb2.DECISION_REASON_DISPATCH_FAILED
    }
    outcomes: list[str] = []
    archived: list[str] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        outcomes = await _ids_on(mesh.broker, _topic("hops", "results"), task_pb2.Outcome, answered)
        archived = await _ids_on(
            mesh.broker, _topic("hops", "archive"), task_pb2.ArchiveRecord, answered
        )
        if set(outcomes) == answered and dispatched <= set(archived):
            break
        await asyncio.sleep(1)
    assert len(answered) == len(results) > 100
    assert sorted(answered - set(outcomes))[:5] == [], f"{len(answered - set(outcomes))} lost"
    assert sorted(dispatched - set(archived))[:5] == [], "tasks the broker took, not archived"
    twice = sorted(i for i, n in Counter(archived).items() if n > 1)
    assert {n: mesh.process(n)["restarts"] for n in survivors} == survivors
    assert twice == [], f"{len(twice)} tasks archived twice"
    # How often the memories were needed (varies with when the broker last stored its cursors).
    print(
        "redeliveries skipped: decoy",
        _metric_sum(mesh, "runners-hops-0", "rdv_decoy_redeliveries_skipped_total"),
        "enricher",
        _metric_sum(mesh, "enricher", "rdv_enricher_redeliveries_skipped_total"),
    )


def _metric_sum(mesh: RunningMesh, process: str, name: str) -> float:
    with urllib.request.urlopen(f"http://{mesh.process(process)['metrics']}/metrics") as page:
        lines = page.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name + "{"))


def _topic(objective: str, kind: str) -> str:
    return f"persistent://public/default/rdv.{objective}.{kind}"
