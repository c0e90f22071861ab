"""One request, one trace, every process: a supervised mesh with `--traces` on the real broker,
Jaeger run by the supervisor (on loopback, ports of the test's own), Python, Go and Node model
containers, the enricher, a runner host hosting the decoy, the rendezvous and its collector.

A client sends a Score with its own `traceparent`; the trace Jaeger returns for the request's
id must be the client's trace, hold spans from at least six processes, and its hops must
follow each other in causal order (each span the child of the one before it and starting no
earlier): Score (SERVER) → send requests (PRODUCER) → enricher's process (CONSUMER) → send
tasks → runner host's process → runner.predict → the model call (CLIENT) → the container's
SERVER span → send predictions → the collector's delivery (accepted) → the answer. The decoy's
archive hangs off the same task. `rendezvous trace` prints it as a waterfall.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from rendezvous.v1 import scoring_pb2, scoring_pb2_grpc

from services.core.protos import set_values
from services.demo import diabetes_dataset
from services.supervisor.plan import JAEGER_BINARY, free_port
from services.trace_command import Trace, TraceSpan, wait_for_trace
from tests.conftest import REPO, PulsarBroker
from tests.integration.supervised import RunningMesh, supervised_mesh

pytestmark = pytest.mark.integration

OBJECTIVE = "traced"
FEATURES = ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]
# Model name -> the program serving it (None: the Python container).
CONTAINERS: dict[str, list[str] | None] = {
    "py-ridge": None,
    "go-ridge": ["tools/bin/rendezvous-model-go"],
    "node-ridge": ["node", "services/models/ts/dist/main.js"],
}
INCUMBENT = "py-ridge"


def _document(listen: str) -> dict[str, Any]:
    models: list[dict[str, Any]] = []
    for name, command in CONTAINERS.items():
        model: dict[str, Any] = {
            "name": name,
            "role": "incumbent" if name == INCUMBENT else "challenger",
            "kind": "diabetes",
            "args": {"algorithm": "ridge"},
        }
        if command:
            model["command"] = command
        models.append(model)
    models.append({"name": "decoy", "role": "decoy"})
    return {
        "rendezvous": {"listen": listen},
        "objectives": {
            OBJECTIVE: {
                "sla_ms": 200,
                "late_grace_ms": 1000,
                "features": [{"name": name} for name in FEATURES],
                "models": models,
                # Only the Python model is accepted: the one whose delivery is the answer.
                "policy": [{"until_ms": 190, "accept": [INCUMBENT]}],
                "default": {"score": 152.13},
                "sampling": {"challenger_fraction": 1.0, "archive_fraction": 1.0},
            }
        },
    }


@pytest.fixture(scope="module")
def mesh(pulsar: PulsarBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMesh]:
    if not (REPO / JAEGER_BINARY).exists():
        pytest.fail(f"{JAEGER_BINARY} is missing: `make setup` (or `make jaeger`) builds it")
    root = tmp_path_factory.mktemp("traces")
    env = {
        "RDV_SUPERVISOR_JAEGER_OTLP_LISTEN": f"127.0.0.1:{free_port()}",
        "RDV_SUPERVISOR_JAEGER_QUERY_LISTEN": f"127.0.0.1:{free_port()}",
        # The warm-up is not what this test is about: on a busy machine it would take the
        # full 90 s before serving anyway.
        "RDV_RENDEZVOUS_WARMUP_MAX_S": "15",
    }
    # An OTEL_* variable in the environment would win over the supervisor's (by design).
    assert not [name for name in os.environ if name.startswith("OTEL_")]
    document = _document(f"127.0.0.1:{free_port()}")
    with supervised_mesh(pulsar, root, document, env, supervise_args=["--traces"]) as running:
        yield running


def _score(endpoint: str, request_id: str, trace_id: str) -> scoring_pb2.ScoreResponse:
    rows, _ = diabetes_dataset()
    request = scoring_pb2.ScoreRequest(objective=OBJECTIVE, request_id=request_id)
    set_values(request.features, rows[0])
    # The client's own trace: the rendezvous must continue it, not start another.
    traceparent = f"00-{trace_id}-{secrets.token_hex(8)}-01"
    with grpc.insecure_channel(endpoint) as channel:
        response: scoring_pb2.ScoreResponse = scoring_pb2_grpc.ScoringServiceStub(channel).Score(
            request, metadata=(("traceparent", traceparent),), timeout=5.0
        )
    return response


def _child(trace: Trace, parent: TraceSpan, name: str, **attributes: str) -> TraceSpan:
    """The one child of `parent` named `name` (with those attributes), starting no earlier."""
    found = [
        span
        for span in trace.spans
        if span.parent_id == parent.span_id
        and span.name == name
        and all(span.attributes.get(key) == value for key, value in attributes.items())
    ]
    siblings = [(s.name, s.service) for s in trace.spans if s.parent_id == parent.span_id]
    assert len(found) == 1, (
        f"{len(found)} children of {parent.name} ({parent.service}) named {name} {attributes}; "
        f"its children: {siblings}"
    )
    [span] = found
    assert span.start_us >= parent.start_us, f"{name} starts before its parent {parent.name}"
    return span


@pytest.fixture(scope="module")
def traced(mesh: RunningMesh) -> tuple[str, str, scoring_pb2.ScoreResponse, Trace]:
    request_id = f"trace-{uuid.uuid4().hex[:12]}"
    trace_id = secrets.token_hex(16)
    response = _score(mesh.endpoint, request_id, trace_id)
    query_url = mesh.state()["traces"]["query_url"]
    # Spans leave each process every 500 ms (the supervisor's trace_export_delay_ms); the
    # decoy's and late predictions' spans come last: wait until the count holds.
    trace = wait_for_trace(query_url, request_id, wait_s=30.0, settle_s=1.5)
    return request_id, trace_id, response, trace


def test_the_request_is_one_trace_across_at_least_six_processes(
    traced: tuple[str, str, scoring_pb2.ScoreResponse, Trace],
) -> None:
    _, trace_id, response, trace = traced
    assert response.decision.model == INCUMBENT
    assert trace.trace_id == trace_id
    runner_hosts = {s for s in trace.services if s.startswith(f"runners-{OBJECTIVE}-")}
    assert len(runner_hosts) == 1, trace.services
    expected = {
        "rendezvous",
        "collector",
        "enricher",
        *runner_hosts,
        *(f"model-{name}" for name in CONTAINERS),
    }
    assert expected <= trace.services, trace.services
    assert len(trace.services) >= 6
    # Every model container (Python, Go, Node) served its call inside the trace.
    for name in CONTAINERS:
        servers = [s for s in trace.spans if s.service == f"model-{name}" and s.kind == "server"]
        assert len(servers) == 1, (name, [(s.name, s.kind) for s in trace.spans])


def test_the_hops_follow_each_other_in_causal_order(
    traced: tuple[str, str, scoring_pb2.ScoreResponse, Trace],
) -> None:
    request_id, _, _, trace = traced
    [score] = [
        s for s in trace.spans if s.service == "rendezvous" and s.kind == "server"
    ]  # the Score call
    assert score.name == "/rendezvous.v1.ScoringService/Score"
    assert score.attributes["rdv.request_id"] == request_id
    requests = _child(trace, score, f"send rdv.{OBJECTIVE}.requests")
    assert requests.kind == "producer" and requests.service == "rendezvous"
    assert requests.attributes["messaging.system"] == "pulsar"
    enriching = _child(trace, requests, f"process rdv.{OBJECTIVE}.requests")
    assert (enriching.kind, enriching.service) == ("consumer", "enricher")
    tasks = _child(trace, enriching, f"send rdv.{OBJECTIVE}.tasks")
    hosting = _child(trace, tasks, f"process rdv.{OBJECTIVE}.tasks")
    assert hosting.kind == "consumer" and hosting.service.startswith("runners-")
    predicting = _child(trace, hosting, "runner.predict", **{"rdv.model": INCUMBENT})
    [call] = [s for s in trace.spans if s.parent_id == predicting.span_id and s.kind == "client"]
    assert call.name.startswith("/rendezvous.v1.ModelService/Predict")
    served = _child(trace, call, call.name)
    assert (served.kind, served.service) == ("server", f"model-{INCUMBENT}")
    prediction = _child(trace, predicting, "send rdv.predictions.rdv-0")
    assert prediction.start_us >= served.end_us - 1000  # after the model answered (clock: 1 ms)
    delivered = _child(
        trace,
        prediction,
        "process rdv.predictions.rdv-0",
        **{"rdv.delivery_status": "DELIVERY_STATUS_ACCEPTED"},
    )
    assert (delivered.kind, delivered.service) == ("consumer", "collector")
    [answer] = [event for event in score.events if event.name == "answer"]
    assert answer.attributes["rdv.answered_by"] == INCUMBENT
    assert delivered.start_us <= answer.time_us <= score.end_us
    # The decoy (hosted by the runner host) archives the same task, in the same trace.
    archiving = _child(trace, hosting, "decoy.archive")
    _child(trace, archiving, f"send rdv.{OBJECTIVE}.archive")
    # The challengers' calls are in the trace too, each under its own runner.predict.
    for name in CONTAINERS:
        _child(trace, hosting, "runner.predict", **{"rdv.model": name})


def test_rendezvous_trace_prints_the_waterfall(
    mesh: RunningMesh, traced: tuple[str, str, scoring_pb2.ScoreResponse, Trace]
) -> None:
    request_id, trace_id, _, trace = traced
    printed = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli",
            "--state-dir",
            str(mesh.state_dir),
            "trace",
            request_id,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    print(f"\n{printed.stdout}")
    assert printed.returncode == 0, printed.stderr
    lines = printed.stdout.splitlines()
    assert lines[0].startswith(f"trace {trace_id}  request {request_id}  {len(trace.spans)} spans")
    body = [line for line in lines[2:] if "·" not in line]
    assert len(body) == len(trace.spans)
    # The root first, then its hops, each on its own line with its process.
    assert "rendezvous" in body[0] and "/rendezvous.v1.ScoringService/Score" in body[0]
    for service in trace.services:
        assert any(f"  {service}  " in line for line in body), service
    assert any("· answer" in line for line in lines)
    # An unknown request: a clear failure, not an empty waterfall.
    missing = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli",
            "--state-dir",
            str(mesh.state_dir),
            "trace",
            "no-such-request",
            "--wait",
            "1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert missing.returncode == 1
    assert "No trace holds request no-such-request" in missing.stderr
