"""S4's router and model replica without Ray: fake DeploymentHandles with set latencies.

The objective is written per test with windows wide enough (100 ms steps, 300 ms SLA) that
a loaded machine's scheduling delay cannot move an arrival into another step.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from rendezvous.v1 import common_pb2, model_pb2, scoring_pb2

from services.core.errors import Unavailable
from services.core.protos import timestamp_from_ns
from services.models.base import DeadlineExceeded
from tools.bench.rayserve.race import ModelReplica, Router
from tools.bench.rayserve.settings import RayServeSettings

OBJECTIVE = "race"
FEATURES = {f"f{i}": 0.5 for i in range(3)}
SLA_MS = 300
LATE_GRACE_MS = 200


class FakeModel:
    """A model deployment's handle: `predict.remote(request)` answers after `delay_s`."""

    def __init__(self, delay_s: float, score: float = 1.0, fail: bool = False) -> None:
        self.delay_s = delay_s
        self.score = score
        self.fail = fail
        self.requests: list[model_pb2.PredictRequest] = []
        self.cancelled = False

    @property
    def predict(self) -> FakeModel:
        return self

    def remote(self, request: model_pb2.PredictRequest) -> Any:
        self.requests.append(request)
        return self._answer()

    async def _answer(self) -> model_pb2.PredictResponse:
        try:
            await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        if self.fail:
            raise Unavailable("model unavailable")
        return model_pb2.PredictResponse(score=self.score, model_version="7")


def write_mesh(path: Path) -> Path:
    """ridge alone until 100 ms, then ridge, sum or canary until 200 ms; canary at the SLA."""
    document = {
        "objectives": {
            OBJECTIVE: {
                "sla_ms": SLA_MS,
                "late_grace_ms": LATE_GRACE_MS,
                "enrichment": "none",
                "features": [{"name": name} for name in FEATURES],
                "models": [
                    {"name": "ridge", "role": "incumbent", "kind": "sum"},
                    {"name": "sum", "role": "challenger", "kind": "sum"},
                    {"name": "canary", "role": "canary", "kind": "sum"},
                    {"name": "decoy", "role": "decoy"},
                ],
                "policy": [
                    {"until_ms": 100, "accept": ["ridge"]},
                    {"until_ms": 200, "accept": ["ridge", "sum", "canary"]},
                ],
                "default": {"score": 152.13, "prefer_canary": True},
            }
        }
    }
    mesh = path / "mesh.yaml"
    mesh.write_text(yaml.safe_dump(document))
    return mesh


def request() -> scoring_pb2.ScoreRequest:
    out = scoring_pb2.ScoreRequest(objective=OBJECTIVE, request_id="r-1")
    for name, value in FEATURES.items():
        out.features[name].number_value = value
    return out


async def score(
    tmp_path: Path, models: dict[str, FakeModel]
) -> tuple[Router, scoring_pb2.ScoreResponse, float]:
    router = Router(models, str(write_mesh(tmp_path)), OBJECTIVE)
    started = time.monotonic()
    response = await router.Score(request())
    return router, response, (time.monotonic() - started) * 1000


async def test_the_incumbent_in_its_step_answers_at_once(tmp_path: Path) -> None:
    models = {
        "ridge": FakeModel(0.01, score=10.0),
        "sum": FakeModel(0.0, score=20.0),
        "canary": FakeModel(0.0, score=30.0),
    }
    router, response, waited_ms = await score(tmp_path, models)
    assert response.score == 10.0
    assert response.decision.source == scoring_pb2.ANSWER_SOURCE_MODEL
    assert response.decision.model == "ridge"
    assert response.decision.model_version == "7"
    assert response.decision.role == common_pb2.MODEL_ROLE_INCUMBENT
    assert response.decision.reason == scoring_pb2.DECISION_REASON_ACCEPTED
    assert response.decision.rule_index == 0
    assert response.request_id == "r-1"
    # Faster models do not end the first step: only ridge is accepted in it.
    assert waited_ms < 100
    # Every model was asked, with the features and the SLA as the deadline.
    for model in models.values():
        (sent,) = model.requests
        assert dict(sent.features) == dict(request().features)
        assert sent.request_id == "r-1"
    deadline_in_ms = (sent.deadline.ToNanoseconds() - time.time_ns()) / 1e6
    assert deadline_in_ms < SLA_MS
    assert router.stats()["answers"] == {"ANSWER_SOURCE_MODEL": 1}


async def test_a_challenger_answers_when_the_second_step_opens(tmp_path: Path) -> None:
    models = {
        "ridge": FakeModel(10.0),
        "sum": FakeModel(0.01, score=20.0),
        "canary": FakeModel(10.0),
    }
    _, response, waited_ms = await score(tmp_path, models)
    assert response.decision.model == "sum"
    assert response.decision.rule_index == 1
    assert response.decision.role == common_pb2.MODEL_ROLE_CHALLENGER
    assert 100 <= waited_ms < 200


async def test_at_the_sla_the_canary_that_came_after_the_steps_answers(tmp_path: Path) -> None:
    models = {"ridge": FakeModel(10.0), "sum": FakeModel(10.0), "canary": FakeModel(0.22)}
    router, response, waited_ms = await score(tmp_path, models)
    assert response.score == 1.0
    assert response.decision.reason == scoring_pb2.DECISION_REASON_SLA_CANARY
    assert response.decision.model == "canary"
    assert response.decision.rule_index == -1
    assert SLA_MS <= waited_ms < SLA_MS + 100
    assert router.stats()["reasons"] == {"DECISION_REASON_SLA_CANARY": 1}


async def test_errors_never_arrive_and_the_default_answers_at_the_sla(tmp_path: Path) -> None:
    models = {name: FakeModel(0.0, fail=True) for name in ("ridge", "sum", "canary")}
    router, response, waited_ms = await score(tmp_path, models)
    assert response.decision.source == scoring_pb2.ANSWER_SOURCE_DEFAULT
    assert response.decision.reason == scoring_pb2.DECISION_REASON_SLA_DEFAULT
    assert response.score == 152.13
    assert not response.decision.model
    assert SLA_MS <= waited_ms < SLA_MS + 100
    stats = router.stats()
    assert stats["answers"] == {"ANSWER_SOURCE_DEFAULT": 1}
    assert stats["predictions"] == {"canary/error": 1, "ridge/error": 1, "sum/error": 1}


async def test_late_predictions_are_counted_and_those_past_the_grace_given_up(
    tmp_path: Path,
) -> None:
    models = {
        "ridge": FakeModel(0.0, score=10.0),
        "sum": FakeModel(0.05),
        "canary": FakeModel(LATE_GRACE_MS / 1000 + 5.0),
    }
    router, response, _ = await score(tmp_path, models)
    assert response.decision.model == "ridge"
    await asyncio.sleep(LATE_GRACE_MS / 1000 + 0.2)
    assert router.stats()["predictions"] == {
        "canary/lost": 1,
        "ridge/ok": 1,
        "sum/late": 1,
    }
    assert models["canary"].cancelled


async def test_a_client_that_goes_away_leaves_the_predictions_counted(tmp_path: Path) -> None:
    models = {name: FakeModel(0.05) for name in ("ridge", "sum", "canary")}
    router = Router(models, str(write_mesh(tmp_path)), OBJECTIVE)
    race = asyncio.create_task(router.Score(request()))
    await asyncio.sleep(0.01)
    race.cancel()
    with pytest.raises(asyncio.CancelledError):
        await race
    await asyncio.sleep(0.2)
    stats = router.stats()
    assert stats["answers"] == {}
    assert stats["predictions"] == {"canary/late": 1, "ridge/late": 1, "sum/late": 1}


async def test_the_http_ingress_returns_the_counters(tmp_path: Path) -> None:
    models = {name: FakeModel(0.0) for name in ("ridge", "sum", "canary")}
    router, _, _ = await score(tmp_path, models)
    assert (await router(object()))["answers"] == {"ANSWER_SOURCE_MODEL": 1}


async def test_the_replica_runs_the_containers_model_with_the_deadline_as_budget() -> None:
    replica = ModelReplica("race-ridge", "diabetes", "3", {"algorithm": "ridge"})
    features = dict.fromkeys(("age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"), 0.0)
    predict = model_pb2.PredictRequest(request_id="r", objective=OBJECTIVE)
    for name, value in features.items():
        predict.features[name].number_value = value
    response = await replica.predict(predict)
    assert response.model_version == "3"
    # All features zero: the ridge artifact's intercept.
    assert response.score == pytest.approx(151.3375600688543)
    flaky = ModelReplica("race-flaky", "flaky", "1", {"latency_ms_median": 200})
    predict.deadline.CopyFrom(timestamp_from_ns(time.time_ns() + 20_000_000))
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        await flaky.predict(predict)
    assert time.monotonic() - started < 0.15


def test_the_default_settings_race_s2s_objective() -> None:
    settings = RayServeSettings()
    assert settings.objective == "bench-race"
    assert settings.mesh_file.name == "bench-systems.yaml"
    assert settings.mesh_file.exists()
