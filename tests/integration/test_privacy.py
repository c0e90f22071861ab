"""Privacy end to end (docs/privacy.md), on the real broker with a supervised mesh (enricher,
runners, the decoy, challenger and canary):

- PII never leaks: requests carry unique markers in their PII fields (ScoreRequest.subject_id,
  SubjectEvent.subject_id), one bad request too; then every topic on the broker is read from
  the earliest message (payload, key and properties), every log file of the mesh (spans
  printed to them too: every process's, each gRPC call and Pulsar hop) and every metrics
  endpoint is searched for the markers. Hits are
  allowed only where the design needs the raw subject id (`ALLOWED_TOPICS`), and there they
  must be found: the scan is shown to see what it looks for.
- Consent: a subject who denied experimentation is scored by no challenger and no canary;
  one who denied archiving has an archive record without features, payload, subject state
  or PII (the record is kept, as docs/privacy.md says why).
- The delivery socket of the running mesh is 0600 in a 0700 directory.
"""

from __future__ import annotations

import asyncio
import os
import re
import stat
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pulsar as pulsar_client
import pytest
from rendezvous.v1 import common_pb2, scoring_pb2, scoring_pb2_grpc, task_pb2

from services.core.bus import PulsarBus
from services.core.protos import now_timestamp
from services.supervisor.plan import free_port
from tests.conftest import PulsarBroker
from tests.integration.supervised import RunningMesh, supervised_mesh
from tests.integration.test_scoring_path import find

pytestmark = pytest.mark.integration

OBJECTIVE = "privacy"
INCUMBENT, CHALLENGER, CANARY = "priv-incumbent", "priv-challenger", "priv-canary"
GRANTED, DENIED = common_pb2.CONSENT_DECISION_GRANTED, common_pb2.CONSENT_DECISION_DENIED
# Unique per run: the broker's topics outlive test runs.
RUN = uuid.uuid4().hex[:10]
MARKER = f"PIIMARK{RUN}"
# Topics that may hold the raw subject id by design (docs/privacy.md), with their DLQs:
# the enricher needs it to look the subject's state up (requests), keys that state by it
# (events), and the tasks topic carries the request on to the runners and the decoy.
ALLOWED_TOPICS = re.compile(r"/rdv\.[^./]+\.(requests|events|tasks)(-DLQ)?$")
READ_TIMEOUT_MS = 3000


def _flaky(name: str, role: str, score: float) -> dict[str, Any]:
    return {
        "name": name,
        "role": role,
        "kind": "flaky",
        "args": {"latency_ms_median": 2, "score": score},
    }


def _document(listen: str) -> dict[str, Any]:
    return {
        "rendezvous": {"listen": listen},
        "objectives": {
            OBJECTIVE: {
                "sla_ms": 200,
                "late_grace_ms": 1500,
                "features": [{"name": "x"}],
                "models": [
                    _flaky(INCUMBENT, "incumbent", 1.0),
                    _flaky(CHALLENGER, "challenger", 2.0),
                    _flaky(CANARY, "canary", 3.0),
                    {"name": "decoy", "role": "decoy"},
                ],
                "policy": [{"until_ms": 150, "accept": [INCUMBENT]}],
                "default": {"score": -1.0},
            }
        },
    }


@pytest.fixture(scope="module")
def mesh(pulsar: PulsarBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMesh]:
    # Spans are printed to the processes' logs, so the log scan covers traces too.
    env = {
        f"RDV_{service}_TRACE_EXPORTER": "console"
        for service in ("RENDEZVOUS", "COLLECTOR", "ENRICHER", "RUNNER", "DECOY", "MODEL")
    }
    root = tmp_path_factory.mktemp("privacy")
    with supervised_mesh(pulsar, root, _document(f"127.0.0.1:{free_port()}"), env) as running:
        yield running


def _request(
    request_id: str, subject: str, **consent: common_pb2.ConsentDecision.ValueType
) -> scoring_pb2.ScoreRequest:
    request = scoring_pb2.ScoreRequest(
        objective=OBJECTIVE,
        request_id=request_id,
        subject_id=subject,
        consent=common_pb2.Consent(
            experimentation=consent.get("experimentation", GRANTED),
            archiving=consent.get("archiving", GRANTED),
        ),
    )
    request.features["x"].number_value = 1.0
    return request


@dataclass
class Sent:
    """What the test sent, by request id, and the outcome of each."""

    subjects: dict[str, str] = field(default_factory=dict)
    outcomes: dict[str, task_pb2.Outcome] = field(default_factory=dict)
    bad_status: grpc.aio.AioRpcError | None = None


async def _send(mesh: RunningMesh) -> Sent:
    sent = Sent()
    bus = PulsarBus(mesh.broker.settings(), "test-privacy-events")
    try:
        events = await bus.publisher(bus.topics.events(OBJECTIVE), task_pb2.SubjectEvent)
        subject = f"{MARKER}-event"
        await events.publish(
            task_pb2.SubjectEvent(
                subject_id=subject, objective=OBJECTIVE, kind="view", event_time=now_timestamp()
            ),
            key=subject,
        )
    finally:
        await bus.close()

    requests = {f"{RUN}-ok-{i}": _request(f"{RUN}-ok-{i}", f"{MARKER}-ok-{i}") for i in range(4)}
    requests[f"{RUN}-noexp"] = _request(f"{RUN}-noexp", f"{MARKER}-noexp", experimentation=DENIED)
    requests[f"{RUN}-noarch"] = _request(f"{RUN}-noarch", f"{MARKER}-noarch", archiving=DENIED)
    async with grpc.aio.insecure_channel(mesh.endpoint) as channel:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        for request_id, request in requests.items():
            response = await stub.Score(request, timeout=10)
            assert response.request_id == request_id
            sent.subjects[request_id] = request.subject_id
        # Invalid (subject id too long), with a marker in it: the error must not echo it.
        bad = _request(f"{RUN}-bad", f"{MARKER}-bad-" + "x" * 300)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await stub.Score(bad, timeout=10)
        sent.bad_status = failure.value
    for request_id in requests:
        sent.outcomes[request_id] = await find(
            mesh.broker,
            f"persistent://public/default/rdv.{OBJECTIVE}.results",
            task_pb2.Outcome,
            lambda o, rid=request_id: o.request_id == rid,  # type: ignore[misc]
            timeout=30,
        )
    return sent


@pytest.fixture(scope="module")
def sent(mesh: RunningMesh) -> Sent:
    return asyncio.run(_send(mesh))


# ----------------------------------------------------------------------------- scanning


@dataclass
class Scan:
    """Where the markers were found: sink name -> hits, and what was scanned."""

    hits: dict[str, int] = field(default_factory=dict)
    sinks: int = 0
    messages: int = 0
    scanned_bytes: int = 0

    def search(self, sink: str, data: bytes) -> None:
        self.sinks += 1
        self.scanned_bytes += len(data)
        count = data.count(MARKER.encode())
        if count:
            self.hits[sink] = self.hits.get(sink, 0) + count


def _scan_topics(broker: PulsarBroker) -> tuple[Scan, list[str]]:
    topics = sorted(broker.admin_get("/admin/v2/persistent/public/default"))
    scan = Scan()
    client = pulsar_client.Client(
        broker.service_url, logger=pulsar_client.ConsoleLogger(pulsar_client.LoggerLevel.Error)
    )
    try:
        for topic in topics:
            reader = client.create_reader(topic, pulsar_client.MessageId.earliest)
            chunks: list[bytes] = []
            try:
                while reader.has_message_available():
                    message = reader.read_next(READ_TIMEOUT_MS)
                    scan.messages += 1
                    chunks.append(message.data())
                    chunks.append((message.partition_key() or "").encode())
                    chunks.extend(
                        f"{key}={value}".encode() for key, value in message.properties().items()
                    )
            finally:
                reader.close()
            scan.search(topic, b"\n".join(chunks))
    finally:
        client.close()
    return scan, topics


# What the printed spans must include for the scan to cover every process's spans: each
# component's service name, and every kind of span (gRPC server and client, Pulsar producer
# and consumer).
SPAN_SERVICES = ("rendezvous", "collector", "enricher", "runner", "model")
SPAN_KINDS = ("SpanKind.SERVER", "SpanKind.CLIENT", "SpanKind.PRODUCER", "SpanKind.CONSUMER")


def _scan_logs(mesh: RunningMesh) -> tuple[Scan, int, set[str]]:
    scan = Scan()
    root = mesh.state_dir.parent
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".log", ".json"))
    spans = 0
    seen: set[str] = set()
    for path in files:
        data = path.read_bytes()
        spans += data.count(b'"span_id"')
        scan.search(str(path.relative_to(root)), data)
        text = data.decode(errors="replace")
        seen |= {s for s in SPAN_SERVICES if f'"service.name": "{s}"' in text}
        seen |= {k for k in SPAN_KINDS if f'"kind": "{k}"' in text}
    return scan, spans, seen


def _scan_metrics(mesh: RunningMesh) -> Scan:
    scan = Scan()
    for process in mesh.state()["processes"]:
        address = process.get("metrics")
        if not address:
            continue
        try:
            with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
                scan.search(f"{process['name']} /metrics", response.read())
        except OSError:
            continue  # a process without a metrics server (a polyglot container)
    return scan


# ----------------------------------------------------------------------------- tests


def test_pii_is_nowhere_but_where_the_design_needs_it(mesh: RunningMesh, sent: Sent) -> None:
    # The error message and details of the bad request do not echo its subject id.
    assert sent.bad_status is not None
    assert sent.bad_status.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert MARKER not in (sent.bad_status.details() or "")
    for key, value in sent.bad_status.trailing_metadata() or ():
        assert MARKER.encode() not in (value if isinstance(value, bytes) else value.encode()), key

    # Let the archive catch up with the last task before reading everything.
    time.sleep(2.0)
    topics, names = _scan_topics(mesh.broker)
    logs, spans, seen = _scan_logs(mesh)
    metrics = _scan_metrics(mesh)
    allowed = {t: n for t, n in topics.hits.items() if ALLOWED_TOPICS.search(t)}
    leaks = {
        **{t: n for t, n in topics.hits.items() if t not in allowed},
        **logs.hits,
        **metrics.hits,
    }
    print(
        f"\nprivacy scan, marker {MARKER}:"
        f"\n  topics: {len(names)} scanned, {topics.messages} messages, "
        f"{topics.scanned_bytes} bytes; hits where allowed: {allowed}"
        f"\n  logs: {logs.sinks} files, {logs.scanned_bytes} bytes, {spans} spans"
        f"\n  metrics: {metrics.sinks} endpoints, {metrics.scanned_bytes} bytes"
        f"\n  leaks: {leaks or 0}"
    )
    assert not leaks, f"PII markers outside the allowed sinks: {leaks}"
    # The scan sees what it looks for: the allowed topics hold the markers they must.
    for sink in ("requests", "events", "tasks"):
        assert any(t.endswith(f"/rdv.{OBJECTIVE}.{sink}") for t in allowed), sink
    for sink in ("results", "archive"):
        assert f"persistent://public/default/rdv.{OBJECTIVE}.{sink}" in names, sink
    assert spans > 0, "no span reached the logs: the trace scan scanned nothing"
    # ... and it scanned the spans of every process and of every hop.
    assert seen == {*SPAN_SERVICES, *SPAN_KINDS}, seen
    assert metrics.sinks > 0


def test_denied_experimentation_reaches_no_challenger_and_no_canary(sent: Sent) -> None:
    def scorers(request_id: str) -> set[str]:
        return {c.prediction.model for c in sent.outcomes[request_id].candidates}

    for request_id in sent.outcomes:
        if request_id.endswith("-noexp"):
            assert scorers(request_id) == {INCUMBENT}
        else:
            # Granted: every scoring model raced (no sampling in this objective).
            assert scorers(request_id) == {INCUMBENT, CHALLENGER, CANARY}, request_id
        assert sent.outcomes[request_id].response.decision.model == INCUMBENT


async def test_the_task_of_a_denied_subject_names_only_the_incumbent(
    mesh: RunningMesh, sent: Sent
) -> None:
    request_id = f"{RUN}-noexp"
    task = await find(
        mesh.broker,
        f"persistent://public/default/rdv.{OBJECTIVE}.tasks",
        task_pb2.EnrichedTask,
        lambda t: t.task.request.request_id == request_id,
    )
    assert list(task.task.scorers) == [INCUMBENT]


async def test_denied_archiving_keeps_a_record_without_features_or_pii(
    mesh: RunningMesh, sent: Sent
) -> None:
    records: dict[str, task_pb2.ArchiveRecord] = {}
    for request_id in (f"{RUN}-noarch", f"{RUN}-ok-0"):
        sealed = await find(
            mesh.broker,
            f"persistent://public/default/rdv.{OBJECTIVE}.archive",
            task_pb2.ArchiveRecord,
            lambda r, rid=request_id: r.task.task.request.request_id == rid,  # type: ignore[misc]
        )
        # Every request here names a subject: its record is sealed under the subject's key.
        assert sealed.HasField("sealed") and not sealed.task.task.request.features
        [records[request_id]] = await mesh.open_records([sealed])
    denied, granted = records[f"{RUN}-noarch"], records[f"{RUN}-ok-0"]
    # Denied: the record says it was kept without the subject's data, and holds none.
    assert denied.features_dropped
    request = denied.task.task.request
    assert not request.features and not request.HasField("payload")
    assert not denied.task.subject_state
    assert request.subject_id == ""
    assert request.consent.archiving == DENIED
    # Granted: features kept, PII still redacted.
    assert not granted.features_dropped
    assert granted.task.task.request.features["x"].number_value == 1.0
    assert granted.task.task.request.subject_id == ""
    for record in records.values():
        assert "task.task.request.subject_id" in record.redacted_fields
        assert MARKER.encode() not in record.SerializeToString()


def test_the_running_delivery_socket_is_private(mesh: RunningMesh) -> None:
    [socket_path] = list(mesh.state_dir.rglob("delivery.sock"))
    status = os.stat(socket_path)
    assert stat.S_ISSOCK(status.st_mode)
    assert stat.S_IMODE(status.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(socket_path.parent).st_mode) == 0o700
