"""The answer a client gets, as a pure function of the race's verdict and its arrivals.

Everything in it comes from the one configuration version that decided the request: the
version, the default, and the answering model's role (a model promoted a moment ago answers
as the incumbent even while its runner, on the version before, still stamps "challenger").
"""

from __future__ import annotations

from collections.abc import Mapping

from rendezvous.v1 import common_pb2, objective_pb2, scoring_pb2

from services.core.protos import duration_from_seconds
from services.rendezvous.mailbox import Arrival
from services.rendezvous.policy import Verdict


def answer(
    request_id: str,
    config: objective_pb2.ObjectiveConfig,
    verdict: Verdict,
    arrivals: Mapping[str, Arrival],
    elapsed_s: float,
) -> scoring_pb2.ScoreResponse:
    """The response for `verdict`: the winning model's prediction, or the default; who
    answered, by which rule and why, and how long the race took."""
    response = scoring_pb2.ScoreResponse(
        request_id=request_id,
        objective_version=config.version,
        elapsed=duration_from_seconds(elapsed_s),
    )
    decision = response.decision
    decision.rule_index = verdict.rule_index
    decision.rule = verdict.rule
    decision.reason = scoring_pb2.DecisionReason.ValueType(verdict.reason)
    if verdict.model is not None:
        event = arrivals[verdict.model].event
        response.score = event.prediction.score
        response.outputs.MergeFrom(event.prediction.outputs)
        decision.source = scoring_pb2.ANSWER_SOURCE_MODEL
        decision.model = event.model
        decision.model_version = event.model_version
        # The deciding version's role; the event's own only for a model it does not list.
        decision.role = _configured_role(config, event.model) or event.role
    else:
        default = config.default_answer
        response.score = default.score
        response.outputs.MergeFrom(default.outputs)
        decision.source = scoring_pb2.ANSWER_SOURCE_DEFAULT
    return response


def _configured_role(
    config: objective_pb2.ObjectiveConfig, model: str
) -> common_pb2.ModelRole.ValueType:
    for deployment in config.models:
        if deployment.name == model:
            return deployment.role
    return common_pb2.MODEL_ROLE_UNSPECIFIED
