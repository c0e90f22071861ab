"""What the evaluator holds of one objective: time buckets of counts and latency sketches for
the whole retained history, and the recent requests one by one for the figures that pair
requests (agreement, error against the ground truth, the paired comparison, drift).

Two layers because they cost differently. A `Bucket` (one per `bucket_width_s` of request
arrival time) keeps counts and one mergeable latency sketch per model: a few KB whatever the
traffic, so days of history cost little and any window's quantiles are the merge of its
buckets. A `RequestRecord` keeps one request's scores (every model's, late ones too) and,
once feedback came, its ground truth: what pairing needs, and bounded by `max_records`
(the oldest go first). The report says how many pairs it had, so a window older than the
records kept shows counts and latency without pretending to pair anything.

The join with the ground truth happens here, by request id, in either order: feedback for a
request already held is applied at once (a later one replaces it: a correction), feedback
for one not seen yet waits (bounded by `max_pending_feedback`, oldest evicted) until the
outcome comes. Outcomes are delivered at least once, so a request id already held is a
redelivery and is dropped.
"""

from __future__ import annotations

import bisect
import math
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

from rendezvous.v1 import common_pb2, feedback_pb2, scoring_pb2, task_pb2

from services.evaluator import stats
from services.evaluator.join import JoinedRequest, Observation, observation, outcome_facts

#: Candidate statuses that carry a score of the model (late ones count: they are its score).
_SCORED = frozenset(
    {
        task_pb2.CANDIDATE_STATUS_ANSWERED,
        task_pb2.CANDIDATE_STATUS_IN_TIME,
        task_pb2.CANDIDATE_STATUS_LATE,
    }
)


@dataclass
class ModelTally:
    """One model's counts and latency sketch in one bucket."""

    role: int = common_pb2.MODEL_ROLE_UNSPECIFIED
    version: str = ""
    predictions: int = 0
    answers: int = 0
    errors: int = 0
    late: int = 0
    latency: stats.LatencySketch = field(default_factory=stats.LatencySketch)

    def merge(self, other: ModelTally) -> None:
        """Add `other` (a later bucket: its role and version win)."""
        self.role = other.role or self.role
        self.version = other.version or self.version
        self.predictions += other.predictions
        self.answers += other.answers
        self.errors += other.errors
        self.late += other.late
        self.latency.merge(other.latency)


@dataclass
class Bucket:
    """The requests that arrived in [start_s, start_s + width)."""

    start_s: float
    requests: int = 0
    default_answers: int = 0
    # Requests whose subject data is gone (erased, or withheld): counted, never scored.
    erased: int = 0
    models: dict[str, ModelTally] = field(default_factory=dict)

    def merge(self, other: Bucket) -> None:
        """Add a later bucket's counts and sketches into this one."""
        self.requests += other.requests
        self.default_answers += other.default_answers
        self.erased += other.erased
        for name, tally in other.models.items():
            self.models.setdefault(name, ModelTally()).merge(tally)


@dataclass(slots=True)
class RequestRecord:
    """One request: every model's score, the answer, and the ground truth once known."""

    request_id: str
    received_s: float
    answered_score: float
    answered_model: str
    answered_default: bool
    incumbent: str | None
    scores: dict[str, float]
    roles: dict[str, int]
    observed: Observation | None = None
    # The subject key the outcome was sealed with ("" : none): an erasure of that key
    # drops the record (`ObjectiveStore.forget`).
    key_id: str = ""

    def joined(self, objective: str) -> JoinedRequest | None:
        """The request with its ground truth, for the error figures; None before feedback."""
        seen = self.observed
        if seen is None:
            return None
        return JoinedRequest(
            objective=objective,
            request_id=self.request_id,
            received_ns=int(self.received_s * 1e9),
            observed_ns=seen.observed_ns,
            kind=seen.kind,
            truth=seen.truth,
            answered_score=self.answered_score,
            answered_model=self.answered_model,
            answered_default=self.answered_default,
            incumbent=self.incumbent,
            scores=self.scores,
            roles=self.roles,
        )


@dataclass(frozen=True)
class StoreLimits:
    """How much one objective's store keeps (see the module docstring)."""

    bucket_width_s: float = 10.0
    # Buckets older than this, counted from the newest request, are dropped.
    retention_s: float = 7 * 24 * 3600.0
    max_records: int = 200_000
    max_pending_feedback: int = 200_000


@dataclass
class IngestCounters:
    """What became of the inputs (metrics, and the report's pending_feedback)."""

    outcomes: int = 0
    duplicate_outcomes: int = 0
    feedback: int = 0
    feedback_replaced: int = 0
    feedback_without_value: int = 0
    evicted_feedback: int = 0
    evicted_records: int = 0
    # Outcomes read without their subject data, and records dropped by an erasure.
    erased_outcomes: int = 0
    forgotten_records: int = 0


class ObjectiveStore:
    """Buckets and records of one objective, fed outcome by outcome and feedback by feedback."""

    def __init__(self, objective: str, limits: StoreLimits | None = None) -> None:
        self.objective = objective
        self.limits = limits or StoreLimits()
        self.counters = IngestCounters()
        self._buckets: dict[int, Bucket] = {}
        # Sorted by arrival; outcomes come nearly in order, so an insert lands near the end.
        self._records: list[RequestRecord] = []
        self._record_times: list[float] = []
        self._by_id: dict[str, RequestRecord] = {}
        self._pending: OrderedDict[str, Observation] = OrderedDict()
        # Request ids of outcomes held without subject data (no record): for deduplication
        # only, bounded like the records.
        self._erased_ids: OrderedDict[str, None] = OrderedDict()
        self._newest_s = -math.inf

    # ---------------------------------------------------------------------------- ingest

    def add_outcome(self, outcome: task_pb2.Outcome, key_id: str = "") -> bool:
        """Take one outcome; False when it is a redelivery of a request already held.
        `key_id`: the subject key it was opened with, if it was sealed."""
        if outcome.request_id in self._by_id or outcome.request_id in self._erased_ids:
            self.counters.duplicate_outcomes += 1
            return False
        self.counters.outcomes += 1
        received_s = outcome.received_time.ToNanoseconds() / 1e9
        self._tally(outcome, received_s)
        facts = outcome_facts(outcome)
        record = RequestRecord(
            request_id=outcome.request_id,
            received_s=received_s,
            answered_score=facts.answered_score,
            answered_model=facts.answered_model,
            answered_default=facts.answered_default,
            incumbent=facts.incumbent,
            scores=facts.scores,
            roles=facts.roles,
            observed=self._pending.pop(outcome.request_id, None),
            key_id=key_id,
        )
        index = bisect.bisect_right(self._record_times, received_s)
        self._records.insert(index, record)
        self._record_times.insert(index, received_s)
        self._by_id[record.request_id] = record
        self._trim(received_s)
        return True

    def add_erased_outcome(self, outcome: task_pb2.Outcome) -> bool:
        """Take an outcome whose subject data cannot be read (erased, withheld): its
        readable part counts (requests, answers by whom, latency), no record is kept."""
        request_id = outcome.request_id
        if request_id in self._by_id or request_id in self._erased_ids:
            self.counters.duplicate_outcomes += 1
            return False
        self.counters.outcomes += 1
        self.counters.erased_outcomes += 1
        received_s = outcome.received_time.ToNanoseconds() / 1e9
        self._tally(outcome, received_s).erased += 1
        self._erased_ids[request_id] = None
        while len(self._erased_ids) > self.limits.max_records:
            self._erased_ids.popitem(last=False)
        self._trim(received_s)
        return True

    def forget(self, key_ids: set[str]) -> int:
        """Drop the records opened with these (now erased) keys: their scores and ground
        truth go, their counts stay (the bucket notes them as erased). How many."""
        gone = [i for i, record in enumerate(self._records) if record.key_id in key_ids]
        width = self.limits.bucket_width_s
        for index in reversed(gone):
            record = self._records.pop(index)
            del self._record_times[index]
            self._by_id.pop(record.request_id, None)
            self._erased_ids[record.request_id] = None
            bucket = self._buckets.get(math.floor(record.received_s / width))
            if bucket is not None:
                bucket.erased += 1
        self.counters.forgotten_records += len(gone)
        return len(gone)

    def add_feedback(self, feedback: feedback_pb2.Feedback) -> None:
        """Take one observation: applied to its request, or kept until the outcome comes."""
        seen = observation(feedback)
        if seen is None:
            self.counters.feedback_without_value += 1
            return
        self.counters.feedback += 1
        record = self._by_id.get(feedback.request_id)
        if record is not None:
            if record.observed is not None:
                self.counters.feedback_replaced += 1
            record.observed = seen
            return
        if self._pending.pop(feedback.request_id, None) is not None:
            self.counters.feedback_replaced += 1
        self._pending[feedback.request_id] = seen
        while len(self._pending) > self.limits.max_pending_feedback:
            self._pending.popitem(last=False)
            self.counters.evicted_feedback += 1

    @property
    def pending_feedback(self) -> int:
        """Observations whose outcome is not held (not seen yet, or outside the history)."""
        return len(self._pending)

    @property
    def records_held(self) -> int:
        return len(self._records)

    def _tally(self, outcome: task_pb2.Outcome, received_s: float) -> Bucket:
        width = self.limits.bucket_width_s
        key = math.floor(received_s / width)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = Bucket(start_s=key * width)
        bucket.requests += 1
        if outcome.response.decision.source == scoring_pb2.ANSWER_SOURCE_DEFAULT:
            bucket.default_answers += 1
        seen: set[str] = set()
        for candidate in outcome.candidates:
            event = candidate.prediction
            # One figure per model and request: a second prediction of the same model (a
            # redelivered prediction the rendezvous counted in `duplicates`) adds nothing.
            if event.model in seen:
                continue
            seen.add(event.model)
            tally = bucket.models.get(event.model)
            if tally is None:
                tally = bucket.models[event.model] = ModelTally()
            tally.role = event.role
            tally.version = event.model_version or tally.version
            if candidate.status == task_pb2.CANDIDATE_STATUS_ERROR:
                tally.errors += 1
                continue
            if candidate.status not in _SCORED:
                continue
            tally.predictions += 1
            tally.latency.add(candidate.arrival.ToNanoseconds() / 1e9)
            if candidate.status == task_pb2.CANDIDATE_STATUS_ANSWERED:
                tally.answers += 1
            elif candidate.status == task_pb2.CANDIDATE_STATUS_LATE:
                tally.late += 1
        return bucket

    def _trim(self, received_s: float) -> None:
        limits = self.limits
        if received_s > self._newest_s:
            self._newest_s = received_s
            oldest_key = math.floor((received_s - limits.retention_s) / limits.bucket_width_s)
            # Buckets are few (one per width): a scan on each new bucket is cheap enough.
            if oldest_key > min(self._buckets, default=oldest_key):
                for key in [k for k in self._buckets if k < oldest_key]:
                    del self._buckets[key]
        excess = len(self._records) - limits.max_records
        # Trimmed in chunks of a tenth of the limit: deleting a list's head is a memmove.
        if excess > max(0, limits.max_records // 10):
            for record in self._records[:excess]:
                self._by_id.pop(record.request_id, None)
            del self._records[:excess]
            del self._record_times[:excess]
            self.counters.evicted_records += excess

    # ---------------------------------------------------------------------------- queries

    @property
    def oldest_s(self) -> float | None:
        """Start of the oldest bucket held."""
        return None if not self._buckets else min(self._buckets) * self.limits.bucket_width_s

    @property
    def newest_s(self) -> float | None:
        """Arrival time of the newest request held."""
        return None if self._newest_s == -math.inf else self._newest_s

    def buckets(self, start_s: float, end_s: float) -> Iterator[Bucket]:
        """The buckets whose start lies in [start_s, end_s), oldest first."""
        width = self.limits.bucket_width_s
        for key in sorted(self._buckets):
            if start_s <= key * width < end_s:
                yield self._buckets[key]

    def records(self, start_s: float, end_s: float) -> list[RequestRecord]:
        """The records that arrived in [start_s, end_s), oldest first (a copy)."""
        low = bisect.bisect_left(self._record_times, start_s)
        high = bisect.bisect_left(self._record_times, end_s)
        return self._records[low:high]
