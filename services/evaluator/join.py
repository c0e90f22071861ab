"""An outcome joined with its ground truth, and the error figures of joined requests.

An outcome (results topic) records what every model scored for a request and what the
client got; the feedback (feedback topic) says, minutes or days later, what was observed.
`outcome_facts` and `observation` keep what a join needs of each; a `JoinedRequest` is both
(the evaluator's store joins them by request id as they come, `services.evaluator.store`;
a replay joins what it read, `joined_request`).

From joined requests, `paired_samples` gives each model's error next to the incumbent's on
the same request (the input of the paired bootstrap), `model_error_figures` each model's
MAE/RMSE or accuracy/log loss, and `answered_error_figures` the error of what clients got.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

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
class OutcomeFacts:
    """What the join keeps of an outcome: the scores, not the whole record."""

    received_ns: int
    answered_score: float
    answered_model: str
    answered_default: bool
    incumbent: str | None
    scores: dict[str, float]
    roles: dict[str, int]


@dataclass(frozen=True)
class Observation:
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


def joined_request(
    outcome: task_pb2.Outcome, feedback: feedback_pb2.Feedback
) -> JoinedRequest | None:
    """The outcome with its ground truth; None when the feedback carries no value."""
    seen = observation(feedback)
    if seen is None:
        return None
    facts = outcome_facts(outcome)
    return JoinedRequest(
        objective=outcome.objective,
        request_id=outcome.request_id,
        received_ns=facts.received_ns,
        observed_ns=seen.observed_ns,
        kind=seen.kind,
        truth=seen.truth,
        answered_score=facts.answered_score,
        answered_model=facts.answered_model,
        answered_default=facts.answered_default,
        incumbent=facts.incumbent,
        scores=facts.scores,
        roles=facts.roles,
    )


def outcome_facts(outcome: task_pb2.Outcome) -> OutcomeFacts:
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
    return OutcomeFacts(
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
    facts = outcome_facts(outcome)
    return facts.scores, facts.roles


def observation(feedback: feedback_pb2.Feedback) -> Observation | None:
    which = feedback.WhichOneof("observed")
    observed_ns = feedback.observed_time.ToNanoseconds()
    if which == "value":
        return Observation("regression", feedback.value, observed_ns)
    if which == "label":
        return Observation("classification", 1.0 if feedback.label else 0.0, observed_ns)
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
