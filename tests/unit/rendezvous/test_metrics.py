"""The request path's metrics: answers by model and role, arrivals and late ones per model,
open mailboxes, the outcome backlog, the SLA in force, and Score's per-RPC counts."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
from rendezvous.v1 import scoring_pb2

from tests.helpers import metric_value, until
from tests.unit.rendezvous.conftest import Mesh
from tests.unit.rendezvous.test_race import outcome_of, request

SHED_RETRIES = 5
SHED_RETRY_DELAY_S = 0.1


def arrivals(model: str) -> float:
    return metric_value("rdv_arrival_latency_seconds_count", {"objective": "demo", "model": model})


def late(model: str) -> float:
    return metric_value("rdv_late_predictions_total", {"objective": "demo", "model": model})


def answers(model: str, role: str, source: str = "ANSWER_SOURCE_MODEL") -> float:
    labels = {"objective": "demo", "source": source, "model": model, "role": role}
    return metric_value("rdv_answers_total", labels)


def mailboxes(state: str) -> float:
    return metric_value("rdv_mailboxes", {"state": state})


def score_calls(code: str) -> float:
    labels = {
        "grpc_service": "rendezvous.v1.ScoringService",
        "grpc_method": "Score",
        "grpc_type": "unary",
        "grpc_code": code,
    }
    return metric_value("rdv_grpc_server_handled_total", labels)


async def _score_once_not_shed(mesh: Mesh) -> scoring_pb2.ScoreResponse:
    """One answered Score. A loop that is behind (the fixture's start-up, a collection of a
    heap grown over a whole test session) sheds the call before any race, counting nothing
    this module checks (test_race covers shedding): then the call is made again."""
    for _ in range(SHED_RETRIES):
        try:
            response: scoring_pb2.ScoreResponse = await mesh.stub.Score(request())
            return response
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            await asyncio.sleep(SHED_RETRY_DELAY_S)
    raise AssertionError(f"shed {SHED_RETRIES} times in a row")


async def test_a_race_is_counted_per_model_late_ones_included(mesh: Mesh) -> None:
    # The incumbent answers at 5 ms; the challenger comes after the 50 ms SLA, so after the
    # answer whoever gave it, within the grace.
    mesh.script.plan = {"incumbent": (5, 10.0), "challenger": (80, 20.0), "canary": (2, 30.0)}
    models = ("incumbent", "challenger", "canary")
    roles = {"incumbent": "MODEL_ROLE_INCUMBENT", "": "MODEL_ROLE_UNSPECIFIED"}
    arrived = {model: arrivals(model) for model in models}
    late_before = {model: late(model) for model in models}
    incumbent_sum = metric_value(
        "rdv_arrival_latency_seconds_sum", {"objective": "demo", "model": "incumbent"}
    )
    answered_before = {
        "incumbent": answers("incumbent", roles["incumbent"]),
        "": answers("default", roles[""], "ANSWER_SOURCE_DEFAULT"),
    }
    response = await _score_once_not_shed(mesh)
    winner = response.decision.model
    # Counted under the model the client was told answered (on a busy machine, the default).
    if winner:
        assert answers(winner, roles[winner]) - answered_before[winner] == 1
    else:
        assert answers("default", roles[""], "ANSWER_SOURCE_DEFAULT") - answered_before[""] == 1
    # Answered, open for late predictions until the grace (300 ms) ends.
    assert mailboxes("grace") == 1
    assert mailboxes("awaiting") == 0
    await outcome_of(mesh.bus, response.request_id)
    await until(lambda: arrivals("challenger") - arrived["challenger"] == 1)
    assert {model: arrivals(model) - arrived[model] for model in models} == dict.fromkeys(models, 1)
    assert late("challenger") - late_before["challenger"] == 1
    if winner == "incumbent":
        assert late("incumbent") - late_before["incumbent"] == 0
    waited = (
        metric_value("rdv_arrival_latency_seconds_sum", {"objective": "demo", "model": "incumbent"})
        - incumbent_sum
    )
    assert 0.005 <= waited < 0.3
    await until(lambda: mailboxes("grace") == 0)
    assert metric_value("rdv_outcome_backlog", {}) == 0
    assert metric_value("rdv_objective_sla_seconds", {"objective": "demo"}) == 0.05


async def test_the_default_is_counted_with_no_model_and_no_role(mesh: Mesh) -> None:
    mesh.script.plan = {}
    before = answers("default", "MODEL_ROLE_UNSPECIFIED", "ANSWER_SOURCE_DEFAULT")
    response = await mesh.stub.Score(request())
    assert response.decision.source == scoring_pb2.ANSWER_SOURCE_DEFAULT
    assert answers("default", "MODEL_ROLE_UNSPECIFIED", "ANSWER_SOURCE_DEFAULT") - before == 1


async def test_score_calls_are_counted_by_code(mesh: Mesh) -> None:
    mesh.script.plan = {"incumbent": (1, 10.0)}
    codes = ("OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED")
    before = {code: score_calls(code) for code in codes}
    try:
        await mesh.stub.Score(request())
        got = "OK"
    except grpc.aio.AioRpcError as error:
        # Shed when a busy machine left the loop too far behind: counted as the client saw it.
        got = error.code().name
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await mesh.stub.Score(scoring_pb2.ScoreRequest(objective="demo"))  # no features
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    expected = dict.fromkeys(codes, 0)
    expected[got] += 1
    expected["INVALID_ARGUMENT"] += 1

    def counted() -> dict[str, float]:
        return {code: score_calls(code) - before[code] for code in codes}

    # The server counts a call once its handler is done, which a busy loop can run after
    # the client already has the status.
    with contextlib.suppress(AssertionError):
        await until(lambda: counted() == expected, timeout=2.0)
    assert counted() == expected
