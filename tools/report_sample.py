"""A realistic evaluation report built without a mesh, for the page's tests and screenshots.

`sample_report()` returns a `GetEvaluationReportResponse` with charts: an incumbent, a canary,
two challengers and a decoy on a regression objective (the diabetes demo's target range),
30 timeline buckets, latency quantiles, score histograms and a drift timeline whose last
points raise the alarm. `empty_report()` is the same objective with nothing in its window.
Deterministic: a fixed seed, a fixed clock.

    .venv/bin/python -m tools.report_sample > /tmp/report.json
"""

from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from google.protobuf import json_format
from rendezvous.v1 import common_pb2, evaluation_pb2

OBJECTIVE = "demo"
END = datetime(2025, 6, 2, 14, 30, tzinfo=UTC)
BUCKETS = 30
BUCKET_WIDTH = timedelta(seconds=20)
REQUESTS_PER_BUCKET = 40
LATENCY_LEVELS = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999)
# The diabetes target runs from about 25 to 346: 14 bins of 25.
SCORE_EDGES = tuple(float(edge) for edge in range(0, 351, 25))
DRIFT_THRESHOLD = 0.25
# From this bucket on, the canary's inputs drift (its PSI climbs over the threshold).
DRIFT_FROM = 22
SEED = 11
# Half the width of the sample's confidence intervals of the error difference.
CI_HALF_WIDTH = 4.0


@dataclass(frozen=True)
class _Model:
    name: str
    role: common_pb2.ModelRole.ValueType
    version: str
    median_latency_s: float
    score_mean: float
    score_sd: float
    mean_error: float
    win_weight: float


_MODELS = (
    _Model("diabetes-ridge", common_pb2.MODEL_ROLE_INCUMBENT, "v3", 0.004, 150, 55, 44.0, 0.7),
    _Model("diabetes-canary", common_pb2.MODEL_ROLE_CANARY, "v1", 0.003, 152, 50, 47.0, 0.0),
    _Model("gbm-challenger", common_pb2.MODEL_ROLE_CHALLENGER, "v7", 0.009, 148, 60, 38.0, 0.2),
    _Model("knn-challenger", common_pb2.MODEL_ROLE_CHALLENGER, "v2", 0.021, 155, 45, 52.0, 0.07),
    _Model("archive-decoy", common_pb2.MODEL_ROLE_DECOY, "v1", 0.002, math.nan, 0, math.nan, 0),
)


def _latency_quantiles(model: _Model) -> list[evaluation_pb2.LatencyQuantile]:
    # A log-normal arrival time: the tail grows with the level.
    quantiles = []
    for level in LATENCY_LEVELS:
        z = math.sqrt(2) * _inverse_erf(2 * level - 1)
        latency = evaluation_pb2.LatencyQuantile(quantile=level)
        latency.latency.FromNanoseconds(round(model.median_latency_s * math.exp(0.5 * z) * 1e9))
        quantiles.append(latency)
    return quantiles


def _inverse_erf(y: float) -> float:
    # Newton's method on erf: plenty for a sample's quantiles.
    x = 0.0
    for _ in range(50):
        x -= (math.erf(x) - y) / (2 / math.sqrt(math.pi) * math.exp(-x * x))
    return x


def _score_counts(model: _Model, rng: random.Random) -> list[int]:
    counts = [0] * (len(SCORE_EDGES) - 1)
    if math.isnan(model.score_mean):
        return counts
    for _ in range(BUCKETS * REQUESTS_PER_BUCKET):
        score = min(max(rng.gauss(model.score_mean, model.score_sd), SCORE_EDGES[0]), 350.0)
        counts[min(int(score // 25), len(counts) - 1)] += 1
    return counts


def _timeline(rng: random.Random) -> list[evaluation_pb2.ReportBucket]:
    start = END - BUCKETS * BUCKET_WIDTH
    answering = [m for m in _MODELS if m.win_weight > 0]
    buckets = []
    for i in range(BUCKETS):
        bucket = evaluation_pb2.ReportBucket(requests=REQUESTS_PER_BUCKET)
        bucket.start.FromDatetime(start + i * BUCKET_WIDTH)
        bucket.width.FromTimedelta(BUCKET_WIDTH)
        wins = {m.name: 0 for m in _MODELS}
        for _ in range(REQUESTS_PER_BUCKET):
            if rng.random() < 0.03:
                bucket.default_answers += 1
                continue
            pick = rng.choices(answering, weights=[m.win_weight for m in answering])[0]
            wins[pick.name] += 1
        for model in _MODELS:
            # Feedback arrives late: the newest buckets have no labels yet.
            labelled = 0 if i >= BUCKETS - 3 or math.isnan(model.mean_error) else 25
            error = model.mean_error * rng.uniform(0.85, 1.15) if labelled else math.nan
            bucket.models.append(
                evaluation_pb2.ModelBucket(
                    model=model.name,
                    predictions=REQUESTS_PER_BUCKET,
                    answers=wins[model.name],
                    win_share=wins[model.name] / REQUESTS_PER_BUCKET,
                    labelled=labelled,
                    mean_error=error,
                )
            )
        buckets.append(bucket)
    return buckets


def _drift_timeline(rng: random.Random) -> list[evaluation_pb2.DriftPoint]:
    start = END - BUCKETS * BUCKET_WIDTH
    points = []
    for i in range(BUCKETS):
        base = 0.04 + 0.02 * rng.random()
        statistic = base + (0.06 * (i - DRIFT_FROM + 1) if i >= DRIFT_FROM else 0.0)
        point = evaluation_pb2.DriftPoint(
            statistic=statistic, alarm=statistic > DRIFT_THRESHOLD, recent_count=200
        )
        point.end.FromDatetime(start + (i + 1) * BUCKET_WIDTH)
        points.append(point)
    return points


def _evaluation(
    model: _Model, timeline: list[evaluation_pb2.ReportBucket]
) -> evaluation_pb2.ModelEvaluation:
    requests = BUCKETS * REQUESTS_PER_BUCKET
    answers = sum(m.answers for b in timeline for m in b.models if m.model == model.name)
    scores = not math.isnan(model.score_mean)
    incumbent = model.role == common_pb2.MODEL_ROLE_INCUMBENT
    late = 40 if model.median_latency_s > 0.01 else 3
    errors = 2 if model.role == common_pb2.MODEL_ROLE_CHALLENGER else 0
    evaluation = evaluation_pb2.ModelEvaluation(
        model=model.name,
        role=model.role,
        model_version=model.version,
        predictions=requests if scores else 0,
        answers=answers,
        errors=errors,
        late=late,
        win_share=answers / requests,
        late_share=late / requests,
        error_share=errors / requests,
        incumbent_pairs=requests if scores else 0,
        # The decoy scores nothing: its agreement figures are undefined (NaN).
        agreement_with_incumbent=(
            0.0 if incumbent else abs(model.score_mean - _MODELS[0].score_mean) + 8
        ),
        rank_correlation_with_incumbent=1.0 if incumbent else 0.9 if scores else math.nan,
    )
    for level, field in ((0.5, "p50"), (0.9, "p90"), (0.99, "p99"), (0.999, "p999")):
        quantile = next(q for q in _latency_quantiles(model) if q.quantile == level)
        getattr(evaluation, f"latency_{field}").CopyFrom(quantile.latency)
    if scores:
        evaluation.error.labelled = 675
        evaluation.error.regression.mae = model.mean_error
        evaluation.error.regression.rmse = model.mean_error * 1.25
    if scores and model.role != common_pb2.MODEL_ROLE_INCUMBENT:
        diff = model.mean_error - _MODELS[0].mean_error
        low, high = diff - CI_HALF_WIDTH, diff + CI_HALF_WIDTH
        verdict = (
            evaluation_pb2.COMPARISON_VERDICT_BETTER
            if high < 0
            else evaluation_pb2.COMPARISON_VERDICT_WORSE
            if low > 0
            else evaluation_pb2.COMPARISON_VERDICT_INCONCLUSIVE
        )
        evaluation.versus_incumbent.CopyFrom(
            evaluation_pb2.PairedComparison(
                baseline_model=_MODELS[0].name,
                pairs=675,
                error_measure="absolute_error",
                mean_difference=diff,
                ci_low=low,
                ci_high=high,
                confidence=0.95,
                method="paired percentile bootstrap",
                verdict=verdict,
            )
        )
    return evaluation


def sample_report() -> evaluation_pb2.GetEvaluationReportResponse:
    """A full report with charts: five models, 30 buckets, a drift alarm at the end."""
    rng = random.Random(SEED)
    timeline = _timeline(rng)
    response = evaluation_pb2.GetEvaluationReportResponse(
        objective=OBJECTIVE,
        requests=BUCKETS * REQUESTS_PER_BUCKET,
        default_answers=sum(b.default_answers for b in timeline),
        target_kind=evaluation_pb2.TARGET_KIND_REGRESSION,
        labelled_requests=675,
        pending_feedback=12,
        timeline=timeline,
        score_bin_edges=SCORE_EDGES,
        drift_timeline=_drift_timeline(rng),
    )
    response.default_share = response.default_answers / response.requests
    response.answered_error.labelled = 675
    response.answered_error.regression.mae = 43.1
    response.answered_error.regression.rmse = 53.9
    response.start_time.FromDatetime(END - BUCKETS * BUCKET_WIDTH)
    response.end_time.FromDatetime(END)
    response.models.extend(_evaluation(model, timeline) for model in _MODELS)
    for model in _MODELS:
        response.distributions.append(
            evaluation_pb2.ModelDistribution(
                model=model.name,
                role=model.role,
                latency=_latency_quantiles(model),
                score_counts=_score_counts(model, rng),
            )
        )
    last = response.drift_timeline[-1]
    drift = response.canary_drift
    drift.model = "diabetes-canary"
    drift.statistic_name = "psi"
    drift.statistic = last.statistic
    drift.threshold = DRIFT_THRESHOLD
    drift.alarm = last.alarm
    drift.reference_count = 1200
    drift.recent_count = last.recent_count
    return response


def empty_report() -> evaluation_pb2.GetEvaluationReportResponse:
    """The sample objective with nothing in its window (no models, no timeline, no canary)."""
    response = evaluation_pb2.GetEvaluationReportResponse(
        objective=OBJECTIVE, default_share=math.nan
    )
    response.start_time.FromDatetime(END - BUCKETS * BUCKET_WIDTH)
    response.end_time.FromDatetime(END)
    return response


if __name__ == "__main__":
    sys.stdout.write(json_format.MessageToJson(sample_report(), preserving_proto_field_name=True))
    sys.stdout.write("\n")
