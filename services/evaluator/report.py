"""The evaluation report of one objective over one window, built from an `ObjectiveStore`.

`snapshot` copies what a window needs while the event loop holds the store (the merged
buckets, the records of the window and of the drift windows before its end); `build` turns a
snapshot into the `GetEvaluationReportResponse` and may run in a worker thread, since the
paired bootstrap over many requests takes a while and must not stall ingest or the server.

Figures and where they come from:
- counts, win/late/error shares, latency quantiles: the buckets (all retained history);
- agreement with the incumbent, the error against the ground truth, the paired comparison:
  the records (the most recent `max_records` requests), pairing each request's scores with
  the incumbent of that same request;
- canary drift: PSI of the canary's scores in the recent window ending at the window's end
  against the reference window just before it (see `DriftSettings`).
Undefined figures are NaN (no pairs, a constant side), never a 0 that reads as a result.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from rendezvous.v1 import common_pb2, evaluation_pb2

from services.core.protos import duration_from_seconds, timestamp_from_ns
from services.evaluator import stats
from services.evaluator.join import (
    Comparison,
    JoinedRequest,
    answered_error_figures,
    compare_with_incumbent,
    model_error_figures,
    paired_samples,
)
from services.evaluator.store import Bucket, ModelTally, ObjectiveStore, RequestRecord

_VERDICTS = {
    "better": evaluation_pb2.COMPARISON_VERDICT_BETTER,
    "worse": evaluation_pb2.COMPARISON_VERDICT_WORSE,
    "inconclusive": evaluation_pb2.COMPARISON_VERDICT_INCONCLUSIVE,
}
_TARGET_KINDS = {
    "regression": evaluation_pb2.TARGET_KIND_REGRESSION,
    "classification": evaluation_pb2.TARGET_KIND_CLASSIFICATION,
}
# The per-request error the paired comparison and the timeline average (stats.request_error).
ERROR_MEASURES = {"regression": "absolute_error", "classification": "log_loss"}
BOOTSTRAP_METHOD = "paired percentile bootstrap"
# The latency CDF drawn per model: dense in the body, then the tail.
CDF_QUANTILES: tuple[float, ...] = (
    *(q / 100 for q in range(1, 100)),
    0.995,
    0.999,
)


@dataclass(frozen=True)
class DriftSettings:
    """The canary drift windows: `recent_s` ending at the report's end, compared with the
    `reference_s` before it. Fewer than `min_scores` canary scores in either window: no
    statistic (NaN) and no alarm.

    Why 400: PSI is biased upwards on small samples; with no shift at all its expected value
    is about (bins - 1) * (1/n_reference + 1/n_recent), 0.27 at 50 and 100 scores (above
    the 0.25 alarm: a false alarm every other check), 0.045 at 400 each."""

    recent_s: float = 120.0
    reference_s: float = 600.0
    min_scores: int = 400
    threshold: float = stats.PSI_ALARM

    @property
    def span_s(self) -> float:
        return self.recent_s + self.reference_s


@dataclass(frozen=True)
class ReportSettings:
    """How the report computes its figures."""

    confidence: float = 0.95
    bootstrap_resamples: int = 2_000
    drift: DriftSettings = field(default_factory=DriftSettings)
    # The timeline's points when the request leaves bucket_width unset.
    timeline_points: int = 60
    score_bins: int = 20


@dataclass
class Snapshot:
    """What a window's report needs, copied from the store (safe to use in a thread)."""

    objective: str
    start_s: float
    end_s: float
    bucket_width_s: float
    buckets: list[Bucket]
    # Records of [start_s - drift span, end_s): the window's, and the drift windows'.
    records: list[RequestRecord]
    pending_feedback: int


def window_bounds(
    store: ObjectiveStore, start_s: float | None, end_s: float | None, now_s: float
) -> tuple[float, float]:
    """The window as applied: unset start = the oldest bucket, unset end = now, both on the
    store's bucket edges (the start rounded down, the end up)."""
    width = store.limits.bucket_width_s
    if start_s is None:
        start_s = store.oldest_s if store.oldest_s is not None else now_s
    if end_s is None:
        end_s = now_s
    start = math.floor(start_s / width) * width
    end = max(start + width, math.ceil(end_s / width) * width)
    return start, end


def snapshot(
    store: ObjectiveStore, start_s: float, end_s: float, settings: ReportSettings
) -> Snapshot:
    """Copy the window's buckets and records (call on the loop that feeds the store)."""
    copies: list[Bucket] = []
    for bucket in store.buckets(start_s, end_s):
        copy = Bucket(start_s=bucket.start_s)
        copy.merge(bucket)
        copies.append(copy)
    return Snapshot(
        objective=store.objective,
        start_s=start_s,
        end_s=end_s,
        bucket_width_s=store.limits.bucket_width_s,
        buckets=copies,
        records=store.records(min(start_s, end_s - settings.drift.span_s), end_s),
        pending_feedback=store.pending_feedback,
    )


def build(
    snap: Snapshot, settings: ReportSettings, *, include_charts: bool, bucket_width_s: float = 0
) -> evaluation_pb2.GetEvaluationReportResponse:
    """The report of a snapshot's window."""
    report = evaluation_pb2.GetEvaluationReportResponse(
        objective=snap.objective,
        start_time=timestamp_from_ns(int(snap.start_s * 1e9)),
        end_time=timestamp_from_ns(int(snap.end_s * 1e9)),
        pending_feedback=snap.pending_feedback,
    )
    total = _merged(snap.buckets, snap.start_s)
    records = [r for r in snap.records if r.received_s >= snap.start_s]
    report.requests = total.requests
    report.default_answers = total.default_answers
    report.default_share = _share(total.default_answers, total.requests)
    report.erased_requests = total.erased

    joined = [j for r in records if (j := r.joined(snap.objective)) is not None]
    kind = _target_kind(joined)
    report.labelled_requests = len(joined)
    if kind is not None:
        report.target_kind = _TARGET_KINDS[kind]
        _error_metrics(report.answered_error, answered_error_figures(joined, kind))
    errors = model_error_figures(joined, kind) if kind is not None else {}
    samples = paired_samples(j for j in joined if j.kind == kind)
    comparisons = compare_with_incumbent(
        samples, confidence=settings.confidence, resamples=settings.bootstrap_resamples
    )
    for name in sorted(total.models, key=lambda n: (_role_order(total.models[n].role), n)):
        tally = total.models[name]
        model = report.models.add(
            model=name,
            role=tally.role,
            model_version=tally.version,
            predictions=tally.predictions,
            answers=tally.answers,
            errors=tally.errors,
            late=tally.late,
            win_share=_share(tally.answers, total.requests),
            late_share=_share(tally.late, tally.predictions),
            error_share=_share(tally.errors, tally.predictions + tally.errors),
        )
        _latency(model, tally)
        _agreement(model, name, tally.role, records)
        if name in errors:
            _error_metrics(model.error, errors[name])
        if name in comparisons and kind is not None:
            _comparison(model.versus_incumbent, comparisons[name], kind)
    canary = _canary(total)
    if canary is not None:
        _drift(report.canary_drift, canary, snap.records, snap.end_s, settings.drift)
    if include_charts:
        _charts(report, snap, total, records, kind, settings, bucket_width_s)
    return report


# ------------------------------------------------------------------------------- figures


def _merged(buckets: Sequence[Bucket], start_s: float) -> Bucket:
    total = Bucket(start_s=start_s)
    for bucket in buckets:
        total.merge(bucket)
    return total


def _share(part: int, whole: int) -> float:
    return part / whole if whole else math.nan


_ROLE_ORDER = (
    common_pb2.MODEL_ROLE_INCUMBENT,
    common_pb2.MODEL_ROLE_CHALLENGER,
    common_pb2.MODEL_ROLE_CANARY,
    common_pb2.MODEL_ROLE_DECOY,
)


def _role_order(role: int) -> int:
    return _ROLE_ORDER.index(role) if role in _ROLE_ORDER else len(_ROLE_ORDER)


def _latency(model: evaluation_pb2.ModelEvaluation, tally: ModelTally) -> None:
    fields = {
        0.5: model.latency_p50,
        0.9: model.latency_p90,
        0.99: model.latency_p99,
        0.999: model.latency_p999,
    }
    for q, value in tally.latency.quantiles(stats.REPORT_QUANTILES).items():
        if value is not None:
            fields[q].CopyFrom(duration_from_seconds(value))


def _agreement(
    model: evaluation_pb2.ModelEvaluation, name: str, role: int, records: Sequence[RequestRecord]
) -> None:
    """Mean absolute difference and Spearman with the incumbent of each same request."""
    mine: list[float] = []
    theirs: list[float] = []
    as_incumbent = 0
    for record in records:
        incumbent = record.incumbent
        score = record.scores.get(name)
        if score is None or incumbent is None:
            continue
        if incumbent == name:
            as_incumbent += 1
            continue
        mine.append(score)
        theirs.append(record.scores[incumbent])
    if role == common_pb2.MODEL_ROLE_INCUMBENT and not mine:
        # The incumbent agrees with itself: shown as such rather than as "unknown".
        model.incumbent_pairs = as_incumbent
        model.agreement_with_incumbent = 0.0 if as_incumbent else math.nan
        model.rank_correlation_with_incumbent = 1.0 if as_incumbent > 1 else math.nan
        return
    model.incumbent_pairs = len(mine)
    model.agreement_with_incumbent = stats.mean_absolute_difference(mine, theirs)
    model.rank_correlation_with_incumbent = stats.rank_correlation(mine, theirs)


def _target_kind(joined: Sequence[JoinedRequest]) -> stats.TargetKind | None:
    """The kind most of the window's feedback carried (an objective has one; a stray
    observation of the other kind is left out rather than mixed into the errors)."""
    if not joined:
        return None
    return Counter(j.kind for j in joined).most_common(1)[0][0]


def _error_metrics(
    target: evaluation_pb2.ErrorMetrics,
    figures: stats.RegressionError | stats.ClassificationError,
) -> None:
    target.labelled = figures.n
    if isinstance(figures, stats.RegressionError):
        target.regression.mae = figures.mae
        target.regression.rmse = figures.rmse
    else:
        target.classification.accuracy = figures.accuracy
        target.classification.log_loss = figures.log_loss


def _comparison(
    target: evaluation_pb2.PairedComparison, comparison: Comparison, kind: stats.TargetKind
) -> None:
    target.baseline_model = comparison.baseline
    target.pairs = comparison.pairs
    target.error_measure = ERROR_MEASURES[kind]
    target.mean_difference = comparison.interval.mean
    target.ci_low = comparison.interval.low
    target.ci_high = comparison.interval.high
    target.confidence = comparison.confidence
    target.method = BOOTSTRAP_METHOD
    target.verdict = _VERDICTS[comparison.verdict]


# ---------------------------------------------------------------------------------- drift


def _canary(total: Bucket) -> str | None:
    """The window's canary: the model in the canary role with the most predictions."""
    canaries = [
        (tally.predictions, name)
        for name, tally in total.models.items()
        if tally.role == common_pb2.MODEL_ROLE_CANARY
    ]
    return max(canaries)[1] if canaries else None


@dataclass(frozen=True)
class DriftFigure:
    """One comparison of the canary's recent scores with its reference window."""

    statistic: float
    alarm: bool
    reference_count: int
    recent_count: int


def drift_at(
    canary: str, records: Sequence[RequestRecord], end_s: float, settings: DriftSettings
) -> DriftFigure:
    """PSI of the canary's scores in [end - recent, end) against the reference before it."""
    split = end_s - settings.recent_s
    begin = split - settings.reference_s
    reference: list[float] = []
    recent: list[float] = []
    for record in records:
        score = record.scores.get(canary)
        if score is None or not begin <= record.received_s < end_s:
            continue
        (recent if record.received_s >= split else reference).append(score)
    if min(len(reference), len(recent)) < settings.min_scores:
        return DriftFigure(math.nan, False, len(reference), len(recent))
    value = stats.psi(reference, recent)
    return DriftFigure(value, value > settings.threshold, len(reference), len(recent))


def _drift(
    target: evaluation_pb2.CanaryDrift,
    canary: str,
    records: Sequence[RequestRecord],
    end_s: float,
    settings: DriftSettings,
) -> None:
    figure = drift_at(canary, records, end_s, settings)
    split = end_s - settings.recent_s
    target.model = canary
    target.statistic_name = "psi"
    target.statistic = figure.statistic
    target.threshold = settings.threshold
    target.alarm = figure.alarm
    target.reference_count = figure.reference_count
    target.recent_count = figure.recent_count
    target.reference_start.CopyFrom(timestamp_from_ns(int((split - settings.reference_s) * 1e9)))
    target.reference_end.CopyFrom(timestamp_from_ns(int(split * 1e9)))
    target.recent_start.CopyFrom(timestamp_from_ns(int(split * 1e9)))
    target.recent_end.CopyFrom(timestamp_from_ns(int(end_s * 1e9)))


# --------------------------------------------------------------------------------- charts


def timeline_width(snap: Snapshot, requested_s: float, points: int) -> float:
    """The timeline's bucket width: the request's, or the window over `points`, rounded up
    to a whole number of the store's buckets."""
    width = requested_s if requested_s > 0 else (snap.end_s - snap.start_s) / points
    return max(1, math.ceil(width / snap.bucket_width_s - 1e-9)) * snap.bucket_width_s


def _charts(  # noqa: PLR0917 (the report's parts, each needed)
    report: evaluation_pb2.GetEvaluationReportResponse,
    snap: Snapshot,
    total: Bucket,
    records: Sequence[RequestRecord],
    kind: stats.TargetKind | None,
    settings: ReportSettings,
    bucket_width_s: float,
) -> None:
    width = timeline_width(snap, bucket_width_s, settings.timeline_points)
    slots = max(1, math.ceil((snap.end_s - snap.start_s) / width - 1e-9))
    slot_buckets: list[list[Bucket]] = [[] for _ in range(slots)]
    for bucket in snap.buckets:
        slot_buckets[min(slots - 1, int((bucket.start_s - snap.start_s) // width))].append(bucket)
    slot_records: list[list[RequestRecord]] = [[] for _ in range(slots)]
    for record in records:
        slot_records[min(slots - 1, int((record.received_s - snap.start_s) // width))].append(
            record
        )
    names = [m.model for m in report.models]
    for index in range(slots):
        start = snap.start_s + index * width
        merged = _merged(slot_buckets[index], start)
        point = report.timeline.add(
            requests=merged.requests, default_answers=merged.default_answers
        )
        point.start.CopyFrom(timestamp_from_ns(int(start * 1e9)))
        point.width.CopyFrom(duration_from_seconds(width))
        for name in names:
            tally = merged.models.get(name, ModelTally())
            errors = [
                stats.request_error(seen.kind, r.scores[name], seen.truth)
                for r in slot_records[index]
                if (seen := r.observed) is not None and seen.kind == kind and name in r.scores
            ]
            point.models.add(
                model=name,
                predictions=tally.predictions,
                answers=tally.answers,
                win_share=_share(tally.answers, merged.requests),
                labelled=len(errors),
                mean_error=float(np.mean(errors)) if errors else math.nan,
            )
    _distributions(report, total, records, settings.score_bins)
    canary = _canary(total)
    if canary is not None:
        for index in range(slots):
            end = snap.start_s + (index + 1) * width
            figure = drift_at(canary, snap.records, end, settings.drift)
            report.drift_timeline.add(
                statistic=figure.statistic, alarm=figure.alarm, recent_count=figure.recent_count
            ).end.CopyFrom(timestamp_from_ns(int(end * 1e9)))


def _distributions(
    report: evaluation_pb2.GetEvaluationReportResponse,
    total: Bucket,
    records: Sequence[RequestRecord],
    bins: int,
) -> None:
    scores: dict[str, list[float]] = {m.model: [] for m in report.models}
    for record in records:
        for name, score in record.scores.items():
            if name in scores and math.isfinite(score):
                scores[name].append(score)
    every = [s for values in scores.values() for s in values]
    edges: np.ndarray | None = None
    if every:
        low, high = min(every), max(every)
        if low == high:  # one value: a bin around it
            low, high = low - 0.5, high + 0.5
        edges = np.linspace(low, high, bins + 1)
        report.score_bin_edges.extend(float(e) for e in edges)
    for model in report.models:
        tally = total.models[model.model]
        distribution = report.distributions.add(model=model.model, role=model.role)
        if tally.latency.count:
            for q in CDF_QUANTILES:
                value = tally.latency.quantile(q)
                if value is not None:
                    distribution.latency.add(quantile=q, latency=duration_from_seconds(value))
        if edges is not None:
            counts, _ = np.histogram(scores[model.model], bins=edges)
            distribution.score_counts.extend(int(c) for c in counts)
