"""Metrics of a running mesh: what the dashboard and the alerts read is what the mesh exports,
and the per-RPC metrics move as calls say they should.

A supervised mesh on the real broker (Python, Go and Node model containers, a flaky model
for errors and late predictions, a canary, the decoy, the evaluator) takes good requests, bad
ones and one for an objective that does not exist. Then every process's /metrics (the URLs
`rendezvous status --metrics` lists, from the supervisor's Prometheus targets) and the
broker's are scraped: every metric name in deploy/grafana/rendezvous.json and
deploy/prometheus/rendezvous-alerts.yml must be exported (declared) by one of them, and hold
a sample unless it only counts failures this run does not cause.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from rendezvous.v1 import scoring_pb2, scoring_pb2_grpc

from services.core.protos import set_values
from services.demo import diabetes_dataset
from services.supervisor.app import PROMETHEUS_TARGETS
from services.supervisor.plan import free_port
from tests.conftest import PulsarBroker
from tests.integration.supervised import RunningMesh, supervised_mesh
from tests.promql import (
    alert_rules,
    dashboard,
    dashboard_queries,
    declared,
    metric_names,
    sampled,
    variable_metrics,
)

pytestmark = pytest.mark.integration

OBJECTIVE = "metrics"
FEATURES = ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]
GOOD, BAD, UNKNOWN = 60, 3, 1
# Counted only when something fails: a healthy run has no sample of them (their families
# are declared all the same).
FAILURE_ONLY = {
    "rdv_shed_total",
    "rdv_dispatch_failures_total",
    "rdv_dead_letters_total",
    "rdv_publish_failures_total",
}
SCORE = {
    "grpc_service": "rendezvous.v1.ScoringService",
    "grpc_method": "Score",
    "grpc_type": "unary",
}


def mesh_document(listen: str) -> dict[str, Any]:
    diabetes = {"kind": "diabetes", "args": {"algorithm": "ridge"}}
    return {
        "rendezvous": {"listen": listen},
        "objectives": {
            OBJECTIVE: {
                "sla_ms": 50,
                "late_grace_ms": 500,
                "features": [{"name": name} for name in FEATURES],
                "models": [
                    {"name": "inc", "role": "incumbent", **diabetes},
                    {
                        "name": "flaky",
                        "role": "challenger",
                        "kind": "flaky",
                        "args": {"latency_ms_median": 5, "latency_ms_p99": 40, "error_rate": 0.3},
                    },
                    {
                        "name": "go",
                        "role": "challenger",
                        "command": ["tools/bin/rendezvous-model-go"],
                        **diabetes,
                    },
                    {
                        "name": "node",
                        "role": "challenger",
                        "command": ["node", "services/models/ts/dist/main.js"],
                        **diabetes,
                    },
                    {"name": "canary", "role": "canary", "kind": "sum"},
                    {"name": "decoy", "role": "decoy"},
                ],
                "policy": [{"until_ms": 40, "accept": ["inc"]}],
                "default": {"score": 152.13},
                "sampling": {"challenger_fraction": 1.0, "archive_fraction": 1.0},
            }
        },
    }


@pytest.fixture(scope="module")
def mesh(pulsar: PulsarBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMesh]:
    root = tmp_path_factory.mktemp("metrics")
    with supervised_mesh(pulsar, root, mesh_document(f"127.0.0.1:{free_port()}")) as running:
        yield running


def _targets(mesh: RunningMesh) -> dict[str, str]:
    """Every /metrics URL the supervisor lists for Prometheus, by component."""
    groups = json.loads((mesh.state_dir / PROMETHEUS_TARGETS).read_text())
    out = {}
    for group in groups:
        labels = group["labels"]
        path = labels.get("__metrics_path__", "/metrics")
        out[labels["component"]] = (
            f"{labels.get('__scheme__', 'http')}://{group['targets'][0]}{path}"
        )
    return out


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        text: str = reply.read().decode()
    return text


def _value(text: str, name: str, labels: dict[str, str]) -> float:
    """The sample `name` with (at least) `labels`, summed; 0 when there is none."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


async def _traffic(endpoint: str) -> Counter[str]:
    """Send the good, bad and unknown-objective calls; who answered the good ones."""
    rows, _ = diabetes_dataset()
    answered: Counter[str] = Counter()
    async with grpc.aio.insecure_channel(endpoint) as channel:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        for index in range(GOOD):
            request = scoring_pb2.ScoreRequest(objective=OBJECTIVE)
            set_values(request.features, rows[index])
            response = await stub.Score(request, timeout=5.0)
            answered[response.decision.model or "default"] += 1
            await asyncio.sleep(0.02)
        for index in range(BAD):
            bad = scoring_pb2.ScoreRequest(objective=OBJECTIVE)
            bad.features["age"].string_value = f"not a number {index}"
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.Score(bad, timeout=5.0)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Score(scoring_pb2.ScoreRequest(objective="no-such-objective"), timeout=5.0)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    return answered


def _until(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def scraped(mesh: RunningMesh) -> dict[str, Any]:
    """Score's per-RPC metrics before and after the traffic, then every process's page."""
    targets = _targets(mesh)
    before = _scrape(targets["rendezvous"])
    answered = asyncio.run(_traffic(mesh.endpoint))
    # Outcomes leave after the late grace; the evaluator reads them from the results topic.
    _until(
        lambda: (
            _value(
                _scrape(targets["evaluator"]),
                "rdv_evaluator_outcomes_total",
                {"objective": OBJECTIVE},
            )
            >= GOOD
        )
    )
    pages = {component: _scrape(url) for component, url in targets.items()}
    return {
        "before": before,
        "pages": pages,
        "processes": mesh.state()["processes"],
        "answered": answered,
    }


def test_every_process_and_the_broker_serve_metrics(scraped: dict[str, Any]) -> None:
    pages: dict[str, str] = scraped["pages"]
    assert set(pages) == {p["name"] for p in scraped["processes"]} | {"pulsar"}
    for component, text in pages.items():
        if component == "pulsar":
            assert "pulsar_subscription_back_log" in sampled(text)
            continue
        # Every server counts its calls: the supervisor's health checks at least.
        health = {
            "grpc_service": "grpc.health.v1.Health",
            "grpc_method": "Check",
            "grpc_code": "OK",
        }
        assert _value(text, "rdv_grpc_server_handled_total", health) >= 1, component
        assert "process_resident_memory_bytes" in sampled(text), component
    # Python, Go and Node containers alike count Predict calls by code, with one spelling.
    for container in ("model-inc", "model-go", "model-node"):
        predicted = {"grpc_method": "PredictBatch", "grpc_code": "OK"}
        single = {"grpc_method": "Predict", "grpc_code": "OK"}
        calls = _value(pages[container], "rdv_grpc_server_handled_total", predicted) + _value(
            pages[container], "rdv_grpc_server_handled_total", single
        )
        assert calls >= 1, container
    # Every asyncio process runs the event-loop lag probe, labelled by its kind.
    lag = {
        name: _value(text, "rdv_event_loop_lag_seconds_count", {})
        for name, text in pages.items()
        if name not in ("pulsar", "model-go", "model-node")
    }
    assert all(count > 0 for count in lag.values()), lag
    assert (
        _value(pages["rendezvous"], "rdv_event_loop_lag_seconds_count", {"process": "rendezvous"})
        > 0
    )
    assert (
        _value(
            pages["runners-metrics-0"], "rdv_event_loop_lag_seconds_count", {"process": "runner"}
        )
        > 0
    )


def test_every_metric_the_dashboard_and_the_alerts_read_is_exported(
    scraped: dict[str, Any],
) -> None:
    pages: dict[str, str] = scraped["pages"]
    exported = set().union(*(declared(text) for text in pages.values()))
    with_samples = set().union(*(sampled(text) for text in pages.values()))
    document = dashboard()
    read = {where: metric_names(expr) for where, expr in dashboard_queries(document).items()}
    read["variables"] = variable_metrics(document)
    read.update({rule["alert"]: metric_names(rule["expr"]) for rule in alert_rules()})
    not_exported = {where: names - exported for where, names in read.items() if names - exported}
    assert not not_exported, not_exported
    no_sample = {
        where: names - with_samples - FAILURE_ONLY
        for where, names in read.items()
        if names - with_samples - FAILURE_ONLY
    }
    assert not no_sample, no_sample


def test_score_calls_move_the_per_rpc_metrics_as_they_should(scraped: dict[str, Any]) -> None:
    before, after = scraped["before"], scraped["pages"]["rendezvous"]

    def delta(name: str, labels: dict[str, str]) -> float:
        return _value(after, name, labels) - _value(before, name, labels)

    counted = {
        code: delta("rdv_grpc_server_handled_total", {**SCORE, "grpc_code": code})
        for code in ("OK", "INVALID_ARGUMENT", "NOT_FOUND")
    }
    assert counted == {"OK": GOOD, "INVALID_ARGUMENT": BAD, "NOT_FOUND": UNKNOWN}
    # Each call timed once, whatever its code; none left in flight.
    assert delta("rdv_grpc_server_handling_seconds_count", SCORE) == GOOD + BAD + UNKNOWN
    assert _value(after, "rdv_grpc_server_in_flight", SCORE) == 0
    # The collector's stream is open while the mesh serves.
    deliver = {"grpc_service": "rendezvous.v1.DeliveryService", "grpc_method": "Deliver"}
    assert _value(after, "rdv_grpc_server_in_flight", deliver) == 1


def test_the_request_path_metrics_count_the_traffic(scraped: dict[str, Any]) -> None:
    rendezvous = scraped["pages"]["rendezvous"]
    objective = {"objective": OBJECTIVE}
    # Every good request counted once (warm-up never), under the model the client was told
    # answered, with its role (on a busy machine some are the default: counted as such).
    answered: Counter[str] = scraped["answered"]
    counted = {
        model: _value(rendezvous, "rdv_answers_total", {**objective, "model": model})
        for model in answered
    }
    assert counted == answered
    assert _value(rendezvous, "rdv_answers_total", objective) == GOOD
    role = {**objective, "model": "inc", "role": "MODEL_ROLE_INCUMBENT"}
    assert _value(rendezvous, "rdv_answers_total", role) == answered["inc"] > 0
    default = {**objective, "source": "ANSWER_SOURCE_DEFAULT", "role": "MODEL_ROLE_UNSPECIFIED"}
    assert _value(rendezvous, "rdv_answers_total", default) == answered["default"]
    # Each scorer's predictions arrived, each counted at most once per request (a task that
    # expired before a runner took it is skipped, not scored).
    for model in ("inc", "flaky", "go", "node", "canary"):
        labels = {**objective, "model": model}
        arrived = _value(rendezvous, "rdv_arrival_latency_seconds_count", labels)
        assert 0 < arrived <= GOOD, (model, arrived)
    late = _value(rendezvous, "rdv_late_predictions_total", objective)
    assert late >= 1, late
    assert _value(rendezvous, "rdv_mailboxes", {"state": "awaiting"}) == 0
    assert _value(rendezvous, "rdv_objective_sla_seconds", objective) == 0.05
