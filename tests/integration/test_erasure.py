"""Erasure (the right to be forgotten) end to end, on the real broker with a supervised mesh
(keyring, enricher, runner host with the decoy, evaluator): docs/privacy.md, "Erasure".

Subjects A and B each have an event and send requests carrying marker feature values; A is
erased with `rendezvous erase`. Then the archive and results topics, read raw from the
earliest message, hold A's records sealed under a key the keyring no longer has, with no
trace of A's id or markers in the clear; B's still open, and the evaluator and a replay
still work for B while counting A's as erased. The enricher forgot A (a new request sees
event_count 0), also after it is killed and rebuilds its state from the events topic.
Erasing an unknown subject, or A again, is fine; an empty subject is INVALID_ARGUMENT with a
field violation.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pulsar as pulsar_client
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from rendezvous.v1 import (
    evaluation_pb2,
    evaluation_pb2_grpc,
    feedback_pb2,
    feedback_pb2_grpc,
    keyring_pb2,
    keyring_pb2_grpc,
    scoring_pb2,
    scoring_pb2_grpc,
    task_pb2,
)

from services.core.bus import PulsarBus
from services.core.protos import from_value, now_timestamp
from services.supervisor.plan import free_port
from tests.conftest import REPO, PulsarBroker
from tests.integration.supervised import RunningMesh, supervised_mesh

pytestmark = pytest.mark.integration

RUN = uuid.uuid4().hex[:8]
# Unique per run: the broker's topics outlive test runs.
OBJECTIVE = f"erase{RUN}"
SUBJECT_A, SUBJECT_B = f"subject-a-{RUN}", f"subject-b-{RUN}"
MARKER_A, MARKER_B = f"MARKA{RUN}", f"MARKB{RUN}"
PER_SUBJECT = 3
INCUMBENT = "erase-incumbent"
WAIT_S = 30.0
READ_TIMEOUT_MS = 3000
# Writers and readers hold a key this long at most (RDV_*_PRIVACY__KEY_CACHE_TTL_S): the
# bound on how soon an erasure takes effect for a process that does not follow the erasure
# topic.
KEY_TTL_S = 1.0


def _document(listen: str) -> dict[str, Any]:
    return {
        "rendezvous": {"listen": listen},
        "objectives": {
            OBJECTIVE: {
                "sla_ms": 200,
                "late_grace_ms": 300,
                "models": [
                    {
                        "name": INCUMBENT,
                        "role": "incumbent",
                        "kind": "flaky",
                        "args": {"latency_ms_median": 2, "score": 1.0, "echo_subject_state": True},
                    },
                    {"name": "decoy", "role": "decoy"},
                ],
                "policy": [{"until_ms": 150, "accept": [INCUMBENT]}],
                "default": {"score": -1.0},
            }
        },
    }


@pytest.fixture(scope="module")
def mesh(pulsar: PulsarBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMesh]:
    env = {
        f"RDV_{service}_PRIVACY__KEY_CACHE_TTL_S": str(KEY_TTL_S)
        for service in ("RENDEZVOUS", "RUNNER", "EVALUATOR")
    }
    root = tmp_path_factory.mktemp("erasure")
    with supervised_mesh(pulsar, root, _document(f"127.0.0.1:{free_port()}"), env) as running:
        yield running


def _request(request_id: str, subject: str, marker: str) -> scoring_pb2.ScoreRequest:
    request = scoring_pb2.ScoreRequest(
        objective=OBJECTIVE, request_id=request_id, subject_id=subject
    )
    request.features["x"].number_value = 1.0
    request.features["note"].string_value = f"{marker}-{request_id}"
    return request


async def _score(mesh: RunningMesh, request: scoring_pb2.ScoreRequest) -> dict[str, Any]:
    """The subject state the incumbent was given (it echoes it)."""
    async with grpc.aio.insecure_channel(mesh.endpoint) as channel:
        response = await scoring_pb2_grpc.ScoringServiceStub(channel).Score(request, timeout=10)
    assert response.decision.model == INCUMBENT, response
    state = response.outputs["subject_state"]
    return dict(from_value(state)) if state.WhichOneof("kind") else {}


async def _event_count(mesh: RunningMesh, subject: str, want: int | None = None) -> int:
    """event_count of a fresh request for `subject` (polled until `want`, if given)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        rid = f"{RUN}-probe-{uuid.uuid4().hex[:6]}"
        count = int((await _score(mesh, _request(rid, subject, "probe")))["event_count"])
        if want is None or count == want or time.monotonic() > deadline:
            return count
        await asyncio.sleep(0.3)


@dataclass
class Sent:
    ids: dict[str, list[str]] = field(default_factory=dict)
    erase_output: dict[str, Any] = field(default_factory=dict)


def _raw(broker: PulsarBroker, name: str) -> list[bytes]:
    """Every message of the objective's `name` topic, from the earliest, as bytes."""
    client = pulsar_client.Client(
        broker.service_url, logger=pulsar_client.ConsoleLogger(pulsar_client.LoggerLevel.Error)
    )
    try:
        reader = client.create_reader(
            f"persistent://public/default/rdv.{OBJECTIVE}.{name}", pulsar_client.MessageId.earliest
        )
        found = []
        while reader.has_message_available():
            found.append(reader.read_next(READ_TIMEOUT_MS).data())
        reader.close()
        return found
    finally:
        client.close()


def _records(broker: PulsarBroker) -> tuple[dict[str, task_pb2.ArchiveRecord], dict[str, bytes]]:
    """The archive by request id, and every record's raw bytes (archive and results)."""
    archive = {}
    raw = {}
    for data in _raw(broker, "archive"):
        record = task_pb2.ArchiveRecord.FromString(data)
        archive[record.task.task.request.request_id] = record
        raw[f"archive/{record.task.task.request.request_id}"] = data
    for data in _raw(broker, "results"):
        outcome = task_pb2.Outcome.FromString(data)
        raw[f"results/{outcome.request_id}"] = data
    return archive, raw


def _outcomes(broker: PulsarBroker) -> dict[str, task_pb2.Outcome]:
    return {o.request_id: o for o in map(task_pb2.Outcome.FromString, _raw(broker, "results"))}


async def _keys_missing(mesh: RunningMesh, key_ids: list[str]) -> set[str]:
    async with grpc.aio.insecure_channel(mesh.keyring_endpoint) as channel:
        reply = await keyring_pb2_grpc.KeyringServiceStub(channel).GetKeys(
            keyring_pb2.GetKeysRequest(key_ids=key_ids), timeout=10
        )
    return set(reply.missing)


def _erase_cli(mesh: RunningMesh, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "--state-dir", str(mesh.state_dir), "erase", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def _send(mesh: RunningMesh) -> Sent:
    sent = Sent()
    bus = PulsarBus(mesh.broker.settings(), "test-erasure-events")
    try:
        events = await bus.publisher(bus.topics.events(OBJECTIVE), task_pb2.SubjectEvent)
        for subject in (SUBJECT_A, SUBJECT_B):
            await events.publish(
                task_pb2.SubjectEvent(
                    subject_id=subject, objective=OBJECTIVE, kind="view", event_time=now_timestamp()
                ),
                key=subject,
            )
    finally:
        await bus.close()
    # The enricher follows the events topic live.
    for subject in (SUBJECT_A, SUBJECT_B):
        assert await _event_count(mesh, subject, want=1) == 1
    for label, subject, marker in (("a", SUBJECT_A, MARKER_A), ("b", SUBJECT_B, MARKER_B)):
        # The request ids stay readable: they must not carry the marker.
        ids = sent.ids[subject] = [f"{RUN}-{label}-{i}" for i in range(PER_SUBJECT)]
        for request_id in ids:
            await _score(mesh, _request(request_id, subject, marker))
    # Every record of both subjects is on both topics before the erasure.
    wanted = {rid for ids in sent.ids.values() for rid in ids}
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        archive, raw = _records(mesh.broker)
        if wanted <= set(archive) and all(f"results/{rid}" in raw for rid in wanted):
            break
        await asyncio.sleep(0.5)
    # Before: A's records open (the test sees what it looks for).
    sealed = [archive[rid] for rid in sent.ids[SUBJECT_A]]
    opened = await mesh.open_records(sealed)
    assert all(
        r.task.task.request.features["note"].string_value.startswith(MARKER_A) for r in opened
    )
    # Ground truth for every request, A's too.
    async with grpc.aio.insecure_channel(mesh.process("evaluator")["endpoint"]) as channel:
        stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
        for request_id in wanted:
            await stub.Record(
                feedback_pb2.RecordRequest(objective=OBJECTIVE, request_id=request_id, value=1.0),
                timeout=10,
            )

    done = _erase_cli(mesh, "--subject", SUBJECT_A, "--reason", f"ticket-{RUN}")
    assert done.returncode == 0, done.stderr
    sent.erase_output = json.loads(done.stdout)
    return sent


@pytest.fixture(scope="module")
def sent(mesh: RunningMesh) -> Sent:
    return asyncio.run(_send(mesh))


def test_erase_names_the_pseudonym_and_the_keys_it_deleted(mesh: RunningMesh, sent: Sent) -> None:
    output = sent.erase_output
    assert output["keys_deleted"] == 1 and output["objective"] == "*"
    assert len(output["pseudonym"]) == 64 and SUBJECT_A not in json.dumps(output)
    # The audit line names the pseudonym, never the subject.
    log = (mesh.state_dir / "logs" / "keyring.log").read_text()
    audit = [json.loads(line) for line in log.splitlines() if '"subject erased"' in line]
    assert [entry["pseudonym"] for entry in audit] == [output["pseudonym"]]
    assert SUBJECT_A not in log and f"ticket-{RUN}" not in log


async def test_the_erased_subjects_records_cannot_be_opened_and_hold_no_trace_of_it(
    mesh: RunningMesh, sent: Sent
) -> None:
    archive, raw = _records(mesh.broker)
    outcomes = _outcomes(mesh.broker)
    a_ids, b_ids = sent.ids[SUBJECT_A], sent.ids[SUBJECT_B]
    a_keys = {archive[rid].sealed.key_id for rid in a_ids} | {
        outcomes[rid].sealed.key_id for rid in a_ids
    }
    assert len(a_keys) == 1 and "" not in a_keys  # one key: the subject's, for the objective
    assert await _keys_missing(mesh, sorted(a_keys)) == a_keys
    for name, data in raw.items():
        if any(name.endswith(rid) for rid in a_ids):
            assert MARKER_A.encode() not in data, name
            assert SUBJECT_A.encode() not in data, name
        assert SUBJECT_B.encode() not in data, name  # B's id was never written either
    # What stays readable: the request id, the objective, who answered, when.
    outcome = outcomes[a_ids[0]]
    assert outcome.objective == OBJECTIVE and outcome.response.decision.model == INCUMBENT
    assert outcome.response.score == 0 and outcome.candidates[0].prediction.model == INCUMBENT
    # B's records still open, whole.
    records = await mesh.open_records([archive[rid] for rid in b_ids])
    assert [r.task.task.request.features["note"].string_value for r in records] == [
        f"{MARKER_B}-{rid}" for rid in b_ids
    ]
    [b_outcome] = await mesh.open_records([outcomes[b_ids[0]]])
    assert b_outcome.response.score == 1.0


async def test_the_enricher_forgot_the_subject_also_after_a_restart(
    mesh: RunningMesh, sent: Sent
) -> None:
    assert await _event_count(mesh, SUBJECT_A, want=0) == 0
    assert await _event_count(mesh, SUBJECT_B) == 1
    enricher = mesh.process("enricher")
    os.kill(enricher["pid"], signal.SIGKILL)
    deadline = time.monotonic() + WAIT_S * 2
    while time.monotonic() < deadline:
        now = mesh.process("enricher")
        if now["pid"] != enricher["pid"] and now["status"] == "ready":
            break
        await asyncio.sleep(0.3)
    assert mesh.process("enricher")["restarts"] == enricher["restarts"] + 1
    # Rebuilt from the events topic: B's event is back, A's is not.
    assert await _event_count(mesh, SUBJECT_B, want=1) == 1
    assert await _event_count(mesh, SUBJECT_A) == 0


async def test_the_evaluator_counts_the_erased_and_still_evaluates_the_rest(
    mesh: RunningMesh, sent: Sent
) -> None:
    async with grpc.aio.insecure_channel(mesh.process("evaluator")["endpoint"]) as channel:
        stub = evaluation_pb2_grpc.EvaluationServiceStub(channel)
        deadline = time.monotonic() + WAIT_S
        while True:
            report = await stub.GetEvaluationReport(
                evaluation_pb2.GetEvaluationReportRequest(objective=OBJECTIVE), timeout=10
            )
            done = report.erased_requests >= PER_SUBJECT and report.labelled_requests > 0
            if done or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
    # A's requests (and its probes before the erasure, same key) count, but score nothing;
    # only B's ground truth joins.
    assert report.erased_requests >= PER_SUBJECT
    assert report.labelled_requests == PER_SUBJECT
    assert report.requests >= 2 * PER_SUBJECT


def test_a_replay_skips_the_erased_records_and_replays_the_rest(
    mesh: RunningMesh, sent: Sent, tmp_path: Any
) -> None:
    out = tmp_path / "replay.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli",
            "--state-dir",
            str(mesh.state_dir),
            "replay",
            "--objective",
            OBJECTIVE,
            "--model",
            "erase-shadow",
            "--kind",
            "flaky",
            # A constant: the features hold a string (the marker) no sum can take.
            "--args",
            '{"score": 2.0}',
            "--json",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    counts = json.loads(out.read_text())["counts"]
    archive, _ = _records(mesh.broker)
    erased_keys = {archive[rid].sealed.key_id for rid in sent.ids[SUBJECT_A]}
    erased = [r for r in archive.values() if r.sealed.key_id in erased_keys]
    assert counts["skipped_erased"] == len(erased) >= PER_SUBJECT
    assert counts["replayed"] == counts["succeeded"] == len(archive) - len(erased)
    assert counts["replayed"] >= PER_SUBJECT  # B's, at least


async def test_erasing_again_or_an_unknown_subject_is_fine_and_bad_input_is_refused(
    mesh: RunningMesh, sent: Sent
) -> None:
    again = _erase_cli(mesh, "--subject", SUBJECT_A, "--objective", OBJECTIVE)
    unknown = _erase_cli(mesh, "--subject", f"nobody-{RUN}")
    for done in (again, unknown):
        assert done.returncode == 0, done.stderr
    assert json.loads(unknown.stdout)["keys_deleted"] == 0
    async with grpc.aio.insecure_channel(mesh.keyring_endpoint) as channel:
        stub = keyring_pb2_grpc.KeyringServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await stub.Erase(keyring_pb2.EraseRequest(subject_id=""), timeout=10)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(failure.value)
    assert status is not None
    violations = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [v.field for v in bad.field_violations]
    assert violations == ["subject_id"]
    assert _erase_cli(mesh, "--subject", "").returncode == 2
