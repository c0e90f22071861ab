"""An outcome joined with its ground truth: what scores, the paired errors on the same request."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping

import pytest
from rendezvous.v1 import common_pb2, feedback_pb2, scoring_pb2, task_pb2

from services.core.protos import timestamp_from_ns
from services.evaluator import stats
from services.evaluator.join import (
    JoinedRequest,
    answered_error_figures,
    compare_with_incumbent,
    joined_request,
    model_error_figures,
    paired_samples,
)

INCUMBENT = common_pb2.MODEL_ROLE_INCUMBENT
CHALLENGER = common_pb2.MODEL_ROLE_CHALLENGER


def outcome(
    request_id: str,
    scores: Mapping[str, tuple[common_pb2.ModelRole.ValueType, float]],
    *,
    answered: str = "inc",
    errors: tuple[str, ...] = (),
    late: tuple[str, ...] = (),
    default_score: float | None = None,
) -> task_pb2.Outcome:
    """An outcome with one candidate per model: {model: (role, score)}."""
    record = task_pb2.Outcome(
        request_id=request_id, objective="demo", received_time=timestamp_from_ns(10**18)
    )
    for model, (role, score) in scores.items():
        status = task_pb2.CANDIDATE_STATUS_IN_TIME
        if model == answered:
            status = task_pb2.CANDIDATE_STATUS_ANSWERED
        if model in late:
            status = task_pb2.CANDIDATE_STATUS_LATE
        event = task_pb2.PredictionEvent(request_id=request_id, model=model, role=role)
        event.prediction.score = score
        record.candidates.add(prediction=event, status=status)
    for model in errors:
        event = task_pb2.PredictionEvent(request_id=request_id, model=model, role=CHALLENGER)
        event.error.reason = "UNAVAILABLE"
        record.candidates.add(prediction=event, status=task_pb2.CANDIDATE_STATUS_ERROR)
    decision = record.response.decision
    if default_score is not None:
        record.response.score = default_score
        decision.source = scoring_pb2.ANSWER_SOURCE_DEFAULT
    else:
        record.response.score = scores[answered][1]
        decision.source = scoring_pb2.ANSWER_SOURCE_MODEL
        decision.model = answered
    return record


def value(request_id: str, observed: float) -> feedback_pb2.Feedback:
    return feedback_pb2.Feedback(objective="demo", request_id=request_id, value=observed)


def label(request_id: str, positive: bool) -> feedback_pb2.Feedback:
    return feedback_pb2.Feedback(objective="demo", request_id=request_id, label=positive)


def test_errors_do_not_score_and_late_predictions_do() -> None:
    record = outcome(
        "r1",
        {"inc": (INCUMBENT, 10.0), "slow": (CHALLENGER, 12.0)},
        errors=("broken",),
        late=("slow",),
    )
    joined = joined_request(record, value("r1", 11.0))
    assert joined is not None
    assert set(joined.scores) == {"inc", "slow"}
    assert joined.error("broken") is None
    assert paired_samples([joined])["slow"][0].diff == pytest.approx(0.0)


def test_no_incumbent_score_pairs_nothing_and_the_default_answer_is_the_policy_error() -> None:
    record = outcome("r1", {"ch": (CHALLENGER, 3.0)}, default_score=0.0)
    joined = joined_request(record, value("r1", 2.0))
    assert joined is not None and joined.incumbent is None and joined.answered_default
    assert paired_samples([joined]) == {}
    figures = answered_error_figures([joined], "regression")
    assert isinstance(figures, stats.RegressionError) and figures.mae == 2.0


def simulate(n: int, challenger_noise: float, seed: int) -> list[JoinedRequest]:
    """n requests whose truth is known; incumbent noise 30, challenger's as given."""
    rng = random.Random(seed)
    joined = []
    for i in range(n):
        truth = rng.uniform(25, 350)
        scores = {
            "inc": (INCUMBENT, truth + rng.gauss(0, 30)),
            "ch": (CHALLENGER, truth + rng.gauss(0, challenger_noise)),
        }
        got = joined_request(outcome(f"r{i}", scores), value(f"r{i}", truth))
        assert got is not None
        joined.append(got)
    return joined


def test_a_better_challenger_is_reported_better_and_a_worse_one_worse() -> None:
    better = compare_with_incumbent(paired_samples(simulate(400, 15.0, seed=1)), seed=1)["ch"]
    assert better.baseline == "inc" and better.pairs == 400
    assert better.interval.high < 0.0 and better.verdict == "better"
    worse = compare_with_incumbent(paired_samples(simulate(400, 60.0, seed=2)), seed=1)["ch"]
    assert worse.interval.low > 0.0 and worse.verdict == "worse"
    same = compare_with_incumbent(paired_samples(simulate(400, 30.0, seed=3)), seed=1)["ch"]
    assert same.interval.low < 0.0 < same.interval.high


def test_model_error_figures_per_model_and_classification() -> None:
    joined = simulate(200, 15.0, seed=4)
    figures = model_error_figures(joined, "regression")
    inc, ch = figures["inc"], figures["ch"]
    assert isinstance(inc, stats.RegressionError) and isinstance(ch, stats.RegressionError)
    assert inc.n == ch.n == 200
    assert ch.mae < inc.mae and inc.mae <= inc.rmse
    # The incumbent answered every request: the policy's error is the incumbent's.
    assert answered_error_figures(joined, "regression") == inc

    classified = joined_request(
        outcome("c1", {"inc": (INCUMBENT, 0.9), "ch": (CHALLENGER, 0.4)}), label("c1", True)
    )
    assert classified is not None and classified.kind == "classification"
    by_model = model_error_figures([classified], "classification")
    inc_c, ch_c = by_model["inc"], by_model["ch"]
    assert isinstance(inc_c, stats.ClassificationError)
    assert isinstance(ch_c, stats.ClassificationError)
    assert inc_c.accuracy == 1.0 and ch_c.accuracy == 0.0
    pair = paired_samples([classified])["ch"][0]
    assert pair.diff == pytest.approx(-math.log(0.4) + math.log(0.9))
    assert model_error_figures([classified], "regression") == {}


def test_feedback_without_a_value_joins_nothing() -> None:
    empty = feedback_pb2.Feedback(objective="demo", request_id="r1")
    assert joined_request(outcome("r1", {"inc": (INCUMBENT, 1.0)}), empty) is None
