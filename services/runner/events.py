"""The `PredictionEvent` a runner publishes for one task: the model's answer or its error."""

from __future__ import annotations

import time
from dataclasses import dataclass

from rendezvous.v1 import common_pb2, model_pb2, task_pb2

from services.core.protos import duration_from_seconds, timestamp_from_ns
from services.runner.model_client import Result


@dataclass(frozen=True, slots=True)
class Deployment:
    """Who answers: what every event of one model deployment carries."""

    objective: str
    model: str
    model_version: str
    role: common_pb2.ModelRole.ValueType
    runner: str
    max_error_message_chars: int


def prediction_event(
    deployment: Deployment,
    task: task_pb2.ScoringTask,
    result: Result,
    *,
    received_ns: int,
    elapsed_s: float,
) -> task_pb2.PredictionEvent:
    """The event for `task`: addressed to its mailbox, with the result and its timings."""
    event = task_pb2.PredictionEvent(
        request_id=task.request.request_id,
        mailbox_id=task.mailbox_id,
        objective=task.request.objective or deployment.objective,
        model=deployment.model,
        model_version=deployment.model_version,
        role=deployment.role,
        task_received_time=timestamp_from_ns(received_ns),
        predicted_time=timestamp_from_ns(time.time_ns()),
        model_latency=duration_from_seconds(elapsed_s),
        runner=deployment.runner,
    )
    if isinstance(result, model_pb2.PredictResponse):
        event.prediction.SetInParent()  # a score of 0.0 with no outputs is still an answer
        event.prediction.score = result.score
        event.prediction.outputs.MergeFrom(result.outputs)
        if result.model_version:
            event.model_version = result.model_version
    else:
        error = event.error
        error.CopyFrom(result)
        error.message = result.message[: deployment.max_error_message_chars]
    return event
