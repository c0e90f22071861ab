"""The join of outcomes and their ground truth, in memory, in any order, in bounded memory.

An outcome (results topic) records what every model scored for a request and what the
client got; the feedback (feedback topic) says, minutes or days later, what was observed.
`FeedbackJoin` keeps whichever side comes first, keyed by (objective, request id), until
the other comes, and emits one `JoinedRequest` per request. Both waiting rooms are bounded
by a count (the oldest is evicted first) and by an age (on the caller's clock): a request
whose feedback never comes, or feedback for an outcome outside the retained history,
cannot grow memory without end. Evictions are counted, so the evaluator can report them.

From joined requests, `paired_samples` gives each model's error next to the incumbent's on
the same request (the input of the paired bootstrap), `model_error_figures` each model's
MAE/RMSE or accuracy/log loss, and `answered_error_figures` the error of what clients got.
The pure parts take no clock of their own: `now` is passed in (seconds, non-decreasing).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from rendezvous.v1 import common_pb2, feedback_pb2, scoring_pb2, task_pb2

from services.evaluator import stats

#: Candidate statuses that carry a prediction (late ones count: they are the model's score).
_SCORED = frozenset(
    {
        task_pb2.CANDIDATE_STATUS_ANSWERED,
        task_pb2.CANDIDATE_STATUS_IN_TIME,
        task_pb2.CANDIDATE_STATUS_LATE,
    }
)


@dataclass(frozen=True)
class JoinSettings:
    """Bounds of the join.

    max_pending: at most this many outcomes, and as many feedbacks, wait for their other
    half; past it the oldest is evicted. max_age_s: an entry that waited longer than this
    (by the `now` passed in) is evicted. The joined ids remembered to drop redeliveries
    are bounded by max_pending too.
    """

    max_pending: int = 1_000_000
    max_age_s: float = 7 * 24 * 3600.0

    def __post_init__(self) -> None:
        """Reject bounds that would keep nothing."""
        if self.max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {self.max_pending}")
        if self.max_age_s <= 0:
            raise ValueError(f"max_age_s must be positive, got {self.max_age_s}")


@dataclass(frozen=True)
class _OutcomeFacts:
    """What the join keeps of an outcome: the scores, not the whole record."""

    received_ns: int
    answered_score: float
    answered_model: str
    answered_default: bool
    incumbent: str | None
    scores: dict[str, float]
    roles: dict[str, int]


@dataclass(frozen=True)
class _Observation:
    """What the join keeps of a feedback."""

    kind: stats.TargetKind
    truth: float
    observed_ns: int


@dataclass(frozen=True)
class JoinedRequest:
    """One request with both its outcome and its observed ground truth.

    scores holds every model that produced a prediction for the request (late ones too:
    a late prediction is still that model's score for the comparison); a model that
    returned an error has none. incumbent names the model in the incumbent role among
    them, None when the incumbent gave no prediction. truth is the observed value, or 1.0 /
    0.0 for a positive / negative label.
    """

    objective: str
    request_id: str
    received_ns: int
    observed_ns: int
    kind: stats.TargetKind
    truth: float
    answered_score: float
    answered_model: str
    answered_default: bool
    incumbent: str | None
    scores: dict[str, float]
    roles: dict[str, int]

    def error(self, model: str) -> float | None:
        """The model's error on this request (`stats.request_error`); None if no score."""
        score = self.scores.get(model)
        return None if score is None else stats.request_error(self.kind, score, self.truth)

    @property
    def answered_error(self) -> float:
        """The error of the answer the client got (a model's or the default)."""
        return stats.request_error(self.kind, self.answered_score, self.truth)


@dataclass
class JoinCounters:
    """What became of the inputs, for metrics and the report."""

    joined: int = 0
    evicted_outcomes: int = 0
    evicted_feedback: int = 0
    duplicate_outcomes: int = 0
    feedback_after_join: int = 0
    feedback_replaced: int = 0
    feedback_without_value: int = 0


_T = TypeVar("_T")


@dataclass
class _Pending(Generic[_T]):
    added: float
    item: _T


_Key = tuple[str, str]


@dataclass
class FeedbackJoin:
    """Pairs outcomes with feedback by (objective, request id), whichever comes first.

    - A feedback that waits is replaced by a later one for the same request (a correction;
      the latest recorded wins until the outcome comes).
    - Once joined, the request id is remembered (bounded) and a redelivered outcome or a
      later feedback for it is dropped and counted, so at-least-once delivery does not
      count a request twice. A correction after the join is not applied.
    """

    settings: JoinSettings = field(default_factory=JoinSettings)
    counters: JoinCounters = field(default_factory=JoinCounters)
    _outcomes: OrderedDict[_Key, _Pending[_OutcomeFacts]] = field(default_factory=OrderedDict)
    _feedback: OrderedDict[_Key, _Pending[_Observation]] = field(default_factory=OrderedDict)
    _joined: OrderedDict[_Key, None] = field(default_factory=OrderedDict)

    @property
    def pending_outcomes(self) -> int:
        """Outcomes waiting for their feedback."""
        return len(self._outcomes)

    @property
    def pending_feedback(self) -> int:
        """Feedbacks waiting for their outcome."""
        return len(self._feedback)

    def add_outcome(self, outcome: task_pb2.Outcome, now: float) -> JoinedRequest | None:
        """Take an outcome; the joined request if its feedback was waiting, else None."""
        self.expire(now)
        key = (outcome.objective, outcome.request_id)
        if key in self._joined or key in self._outcomes:
            self.counters.duplicate_outcomes += 1
            return None
        facts = _outcome_facts(outcome)
        waiting = self._feedback.pop(key, None)
        if waiting is not None:
            return self._join(key, facts, waiting.item)
        self._outcomes[key] = _Pending(now, facts)
        if len(self._outcomes) > self.settings.max_pending:
            self._outcomes.popitem(last=False)
            self.counters.evicted_outcomes += 1
        return None

    def add_feedback(self, feedback: feedback_pb2.Feedback, now: float) -> JoinedRequest | None:
        """Take a feedback; the joined request if its outcome was waiting, else None."""
        self.expire(now)
        observation = _observation(feedback)
        if observation is None:
            self.counters.feedback_without_value += 1
            return None
        key = (feedback.objective, feedback.request_id)
        if key in self._joined:
            self.counters.feedback_after_join += 1
            return None
        waiting = self._outcomes.pop(key, None)
        if waiting is not None:
            return self._join(key, waiting.item, observation)
        if self._feedback.pop(key, None) is not None:
            self.counters.feedback_replaced += 1
        self._feedback[key] = _Pending(now, observation)
        if len(self._feedback) > self.settings.max_pending:
            self._feedback.popitem(last=False)
            self.counters.evicted_feedback += 1
        return None

    def expire(self, now: float) -> int:
        """Evict entries that waited longer than max_age_s; how many were evicted."""
        cutoff = now - self.settings.max_age_s
        evicted = 0
        while self._outcomes and next(iter(self._outcomes.values())).added < cutoff:
            self._outcomes.popitem(last=False)
            self.counters.evicted_outcomes += 1
            evicted += 1
        while self._feedback and next(iter(self._feedback.values())).added < cutoff:
            self._feedback.popitem(last=False)
            self.counters.evicted_feedback += 1
            evicted += 1
        return evicted

    def _join(self, key: _Key, facts: _OutcomeFacts, observation: _Observation) -> JoinedRequest:
        self._joined[key] = None
        if len(self._joined) > self.settings.max_pending:
            self._joined.popitem(last=False)
        self.counters.joined += 1
        return JoinedRequest(
            objective=key[0],
            request_id=key[1],
            received_ns=facts.received_ns,
            observed_ns=observation.observed_ns,
            kind=observation.kind,
            truth=observation.truth,
            answered_score=facts.answered_score,
            answered_model=facts.answered_model,
            answered_default=facts.answered_default,
            incumbent=facts.incumbent,
            scores=facts.scores,
            roles=facts.roles,
        )


def _outcome_facts(outcome: task_pb2.Outcome) -> _OutcomeFacts:
    scores: dict[str, float] = {}
    roles: dict[str, int] = {}
    incumbent: str | None = None
    for candidate in outcome.candidates:
        event = candidate.prediction
        if candidate.status not in _SCORED or event.WhichOneof("result") != "prediction":
            continue
        if event.model in scores:  # one score per model: the first received
            continue
        scores[event.model] = event.prediction.score
        roles[event.model] = event.role
        if incumbent is None and event.role == common_pb2.MODEL_ROLE_INCUMBENT:
            incumbent = event.model
    decision = outcome.response.decision
    return _OutcomeFacts(
        received_ns=outcome.received_time.ToNanoseconds(),
        answered_score=outcome.response.score,
        answered_model=decision.model,
        answered_default=decision.source == scoring_pb2.ANSWER_SOURCE_DEFAULT,
        incumbent=incumbent,
        scores=scores,
        roles=roles,
    )


def scored_candidates(outcome: task_pb2.Outcome) -> tuple[dict[str, float], dict[str, int]]:
    """Each model's score in an outcome and its role, as the join keeps them (the first
    score received per model, late ones included, errors left out)."""
    facts = _outcome_facts(outcome)
    return facts.scores, facts.roles


def _observation(feedback: feedback_pb2.Feedback) -> _Observation | None:
    which = feedback.WhichOneof("observed")
    observed_ns = feedback.observed_time.ToNanoseconds()
    if which == "value":
        return _Observation("regression", feedback.value, observed_ns)
    if which == "label":
        return _Observation("classification", 1.0 if feedback.label else 0.0, observed_ns)
    return None


# ---------------------------------------------------------------------------------------
# From joined requests to the report's figures
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairedSample:
    """One request's error for a model and for the incumbent that scored the same request."""

    request_id: str
    incumbent: str
    model_error: float
    incumbent_error: float

    @property
    def diff(self) -> float:
        """model_error - incumbent_error: negative when the model did better."""
        return self.model_error - self.incumbent_error


def paired_samples(joined: Iterable[JoinedRequest]) -> dict[str, list[PairedSample]]:
    """Per model other than the incumbent, its error next to the incumbent's, on the
    requests both scored. A request without an incumbent score pairs nothing."""
    samples: dict[str, list[PairedSample]] = {}
    for request in joined:
        if request.incumbent is None:
            continue
        incumbent_error = request.error(request.incumbent)
        if incumbent_error is None:  # pragma: no cover - incumbent is chosen among scores
            continue
        for model in request.scores:
            if model == request.incumbent:
                continue
            model_error = request.error(model)
            if model_error is None:  # pragma: no cover - model is among scores
                continue
            samples.setdefault(model, []).append(
                PairedSample(request.request_id, request.incumbent, model_error, incumbent_error)
            )
    return samples


@dataclass(frozen=True)
class Comparison:
    """A model against the incumbent on the same requests: n, mean difference and CI."""

    model: str
    baseline: str
    pairs: int
    interval: stats.Interval
    confidence: float
    verdict: stats.Verdict


def compare_with_incumbent(
    samples: dict[str, list[PairedSample]],
    confidence: float = 0.95,
    resamples: int = stats.BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> dict[str, Comparison]:
    """The paired bootstrap of each model's error differences with the incumbent.

    The baseline named is the incumbent of most of the pairs (a promotion inside the window
    changes it; every pair still compares with the incumbent of its own request).
    """
    comparisons: dict[str, Comparison] = {}
    for model, pairs in samples.items():
        if not pairs:
            continue
        interval = stats.paired_bootstrap(
            [p.diff for p in pairs], confidence=confidence, resamples=resamples, seed=seed
        )
        baseline = Counter(p.incumbent for p in pairs).most_common(1)[0][0]
        comparisons[model] = Comparison(
            model, baseline, len(pairs), interval, confidence, stats.verdict(interval)
        )
    return comparisons


def model_error_figures(
    joined: Iterable[JoinedRequest], kind: stats.TargetKind
) -> dict[str, stats.RegressionError | stats.ClassificationError]:
    """Each model's error against the ground truth on the requests of that kind it scored."""
    predictions: dict[str, tuple[list[float], list[float]]] = {}
    for request in joined:
        if request.kind != kind:
            continue
        for model, score in request.scores.items():
            preds, truths = predictions.setdefault(model, ([], []))
            preds.append(score)
            truths.append(request.truth)
    return {
        model: stats.error_figures(kind, preds, truths)
        for model, (preds, truths) in predictions.items()
    }


def answered_error_figures(
    joined: Iterable[JoinedRequest], kind: stats.TargetKind
) -> stats.RegressionError | stats.ClassificationError:
    """The error of what clients actually got (the policy's answer, defaults included)."""
    preds: list[float] = []
    truths: list[float] = []
    for request in joined:
        if request.kind == kind:
            preds.append(request.answered_score)
            truths.append(request.truth)
    return stats.error_figures(kind, preds, truths)
