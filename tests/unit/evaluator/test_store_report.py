"""The evaluator's store and report on outcomes built in memory: windows, the join in either
order, redeliveries, eviction, drift, the timeline."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping

import pytest
from rendezvous.v1 import common_pb2, evaluation_pb2, feedback_pb2, scoring_pb2, task_pb2

from services.core.protos import duration_from_seconds, timestamp_from_ns
from services.evaluator import report as reports
from services.evaluator.store import ObjectiveStore, StoreLimits

OBJECTIVE = "unit"
T0 = 1_800_000_000.0


def outcome(
    request_id: str,
    at_s: float,
    scores: Mapping[str, tuple[int, float, float]],
    answered: str | None = "inc",
) -> task_pb2.Outcome:
    """An outcome whose candidates are model -> (role, score, arrival seconds)."""
    result = task_pb2.Outcome(request_id=request_id, objective=OBJECTIVE)
    result.received_time.CopyFrom(timestamp_from_ns(int(at_s * 1e9)))
    if answered is None:
        result.response.decision.source = scoring_pb2.ANSWER_SOURCE_DEFAULT
        result.response.score = 100.0
    else:
        result.response.decision.source = scoring_pb2.ANSWER_SOURCE_MODEL
        result.response.decision.model = answered
        result.response.score = scores[answered][1]
    for name, (role, score, arrival) in scores.items():
        candidate = result.candidates.add(
            status=task_pb2.CANDIDATE_STATUS_ANSWERED
            if name == answered
            else task_pb2.CANDIDATE_STATUS_IN_TIME
        )
        candidate.prediction.model = name
        candidate.prediction.role = role  # type: ignore[assignment]
        candidate.prediction.prediction.score = score
        candidate.arrival.CopyFrom(duration_from_seconds(arrival))
    return result


def feedback(request_id: str, value: float) -> feedback_pb2.Feedback:
    return feedback_pb2.Feedback(objective=OBJECTIVE, request_id=request_id, value=value)


INC = common_pb2.MODEL_ROLE_INCUMBENT
CHAL = common_pb2.MODEL_ROLE_CHALLENGER
CANARY = common_pb2.MODEL_ROLE_CANARY


def filled(n: int = 300, seed: int = 1) -> ObjectiveStore:
    """n requests one per 0.1 s: the challenger's error is half the incumbent's; every
    request gets its ground truth, half of them before the outcome."""
    rng = random.Random(seed)
    store = ObjectiveStore(OBJECTIVE, StoreLimits(bucket_width_s=1.0))
    for i in range(n):
        truth = rng.uniform(50, 250)
        rid = f"r{i}"
        if i % 2:
            store.add_feedback(feedback(rid, truth))
        scores = {
            "inc": (INC, truth + rng.choice((-1, 1)) * 20, 0.010),
            "chal": (CHAL, truth + rng.choice((-1, 1)) * 10, 0.020),
            "can": (CANARY, truth + rng.gauss(0, 5), 0.030),
        }
        store.add_outcome(
            outcome(rid, T0 + i * 0.1, scores, answered=None if i % 10 == 0 else "inc")
        )
        if not i % 2:
            store.add_feedback(feedback(rid, truth))
    return store


def build(
    store: ObjectiveStore, start: float, end: float, **kwargs: object
) -> evaluation_pb2.GetEvaluationReportResponse:
    settings = reports.ReportSettings(
        bootstrap_resamples=500,
        drift=reports.DriftSettings(recent_s=5, reference_s=10, min_scores=20),
    )
    snap = reports.snapshot(store, start, end, settings)
    return reports.build(snap, settings, include_charts=bool(kwargs.get("charts")))


def test_counts_shares_and_the_paired_comparison_come_out_right() -> None:
    store = filled()
    report = build(store, T0, T0 + 30)
    assert report.requests == 300
    assert report.default_answers == 30
    assert report.default_share == pytest.approx(0.1)
    assert report.labelled_requests == 300
    models = {m.model: m for m in report.models}
    assert [m.model for m in report.models] == ["inc", "chal", "can"]  # incumbent first
    assert models["inc"].error.regression.mae == pytest.approx(20.0)
    assert models["chal"].error.regression.mae == pytest.approx(10.0)
    versus = models["chal"].versus_incumbent
    assert versus.pairs == 300
    assert versus.mean_difference == pytest.approx(-10.0)
    assert versus.verdict == evaluation_pb2.COMPARISON_VERDICT_BETTER
    assert versus.ci_high < 0
    assert models["inc"].win_share == pytest.approx(0.9)
    assert models["inc"].latency_p50.ToNanoseconds() == pytest.approx(10_000_000, rel=0.02)
    assert models["inc"].agreement_with_incumbent == 0.0
    assert models["inc"].incumbent_pairs == 300
    assert not models["inc"].HasField("versus_incumbent")


def test_a_window_counts_only_its_requests() -> None:
    store = filled()
    report = build(store, T0 + 10, T0 + 20)
    assert report.requests == 100
    assert report.labelled_requests == 100


def test_redelivered_outcomes_count_once_and_late_feedback_replaces() -> None:
    store = filled(n=10)
    again = outcome("r3", T0 + 0.3, {"inc": (INC, 1.0, 0.01)})
    assert not store.add_outcome(again)
    store.add_feedback(feedback("r3", 1e6))
    assert store.counters.duplicate_outcomes == 1
    assert store.counters.feedback_replaced == 1
    report = build(store, T0, T0 + 2)
    assert report.requests == 10
    assert {m.model: m for m in report.models}["inc"].error.regression.mae > 1e4


def test_feedback_for_unknown_requests_waits_bounded() -> None:
    store = ObjectiveStore(OBJECTIVE, StoreLimits(max_pending_feedback=3))
    for i in range(5):
        store.add_feedback(feedback(f"x{i}", 1.0))
    assert store.pending_feedback == 3
    assert store.counters.evicted_feedback == 2


def test_records_are_bounded_and_counts_outlive_them() -> None:
    store = ObjectiveStore(OBJECTIVE, StoreLimits(bucket_width_s=1.0, max_records=100))
    for i in range(300):
        store.add_outcome(outcome(f"r{i}", T0 + i * 0.1, {"inc": (INC, 1.0, 0.01)}))
    assert store.records_held <= 110
    report = build(store, T0, T0 + 30)
    assert report.requests == 300  # from the buckets
    assert {m.model: m for m in report.models}["inc"].incumbent_pairs <= 110


def test_undefined_figures_are_nan_not_zero() -> None:
    store = ObjectiveStore(OBJECTIVE, StoreLimits(bucket_width_s=1.0))
    store.add_outcome(outcome("only", T0, {"chal": (CHAL, 1.0, 0.01)}, answered="chal"))
    report = build(store, T0, T0 + 1)
    chal = report.models[0]
    assert math.isnan(chal.agreement_with_incumbent)
    assert math.isnan(chal.rank_correlation_with_incumbent)
    assert not chal.HasField("error")
    assert report.target_kind == evaluation_pb2.TARGET_KIND_UNSPECIFIED


def test_window_bounds_snap_to_buckets() -> None:
    store = filled(n=20)
    start, end = reports.window_bounds(store, T0 + 0.5, T0 + 1.2, now_s=T0 + 100)
    assert (start, end) == (T0, T0 + 2)
    start, end = reports.window_bounds(store, None, None, now_s=T0 + 100)
    assert (start, end) == (T0, T0 + 100)


def test_drift_stays_quiet_until_the_canary_scores_shift() -> None:
    rng = random.Random(3)
    store = ObjectiveStore(OBJECTIVE, StoreLimits(bucket_width_s=1.0))
    for i in range(3000):
        shift = 60.0 if i >= 2500 else 0.0  # the last 5 s shifted
        score = 150 + rng.gauss(0, 20) + shift
        store.add_outcome(outcome(f"r{i}", T0 + i * 0.01, {"can": (CANARY, score, 0.01)}, "can"))
    drift = reports.DriftSettings(recent_s=5, reference_s=10, min_scores=400)
    quiet = reports.drift_at("can", store.records(T0, T0 + 25), T0 + 25, drift)
    loud = reports.drift_at("can", store.records(T0, T0 + 30), T0 + 30, drift)
    assert not quiet.alarm and quiet.statistic < 0.1
    assert loud.alarm and loud.statistic > drift.threshold
    too_few = reports.drift_at("can", store.records(T0, T0 + 1), T0 + 1, drift)
    assert math.isnan(too_few.statistic) and not too_few.alarm


def test_charts_cover_the_window_in_equal_buckets() -> None:
    store = filled()
    report = build(store, T0, T0 + 30, charts=True)
    assert len(report.timeline) == 30
    assert sum(b.requests for b in report.timeline) == 300
    first = {m.model: m for m in report.timeline[0].models}
    assert first["chal"].labelled == 10
    assert first["chal"].mean_error == pytest.approx(10.0)
    assert len(report.score_bin_edges) == 21
    for distribution in report.distributions:
        assert sum(distribution.score_counts) == 300
        quantiles = [q.latency.ToNanoseconds() for q in distribution.latency]
        assert quantiles == sorted(quantiles) and quantiles
    assert len(report.drift_timeline) == 30


def test_erased_requests_count_but_score_nothing() -> None:
    store = ObjectiveStore(OBJECTIVE, StoreLimits(bucket_width_s=1.0))
    scores = {"inc": (INC, 10.0, 0.01), "chal": (CHAL, 20.0, 0.02)}
    # Opened with alice's key (r0, r1), bob's (r2), and one read with its key gone (r3).
    for index, key_id in enumerate(("k-alice", "k-alice", "k-bob")):
        store.add_outcome(outcome(f"r{index}", T0 + index * 0.1, scores), key_id)
        store.add_feedback(feedback(f"r{index}", 12.0))
    assert store.add_erased_outcome(outcome("r3", T0 + 0.3, scores))
    assert not store.add_erased_outcome(outcome("r3", T0 + 0.3, scores))  # a redelivery
    assert store.forget({"k-alice"}) == 2
    assert not store.add_outcome(outcome("r0", T0, scores), "k-alice")  # gone, not new
    report = build(store, T0, T0 + 1)
    assert report.requests == 4 and report.erased_requests == 3
    assert report.labelled_requests == 1  # bob's only: no score of alice's is left
    [inc] = [m for m in report.models if m.model == "inc"]
    assert inc.predictions == 4 and inc.error.labelled == 1
    assert store.counters.erased_outcomes == 1 and store.counters.forgotten_records == 2
