"""`rendezvous.v1.EvaluationService` and `rendezvous.v1.FeedbackService`: the gRPC faces of
`Evaluation`.

Errors (services/core/errors.py): INVALID_ARGUMENT with a field violation per problem (no
objective, end before start, no request id, no observed value, a value that is not finite),
NOT_FOUND for an objective the evaluator does not follow, UNAVAILABLE when the feedback topic
does not take the observation in time (nothing was recorded; the client may retry: recording
the same request again replaces the observation).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from rendezvous.v1 import evaluation_pb2, evaluation_pb2_grpc, feedback_pb2, feedback_pb2_grpc

from services.evaluator.evaluation import Evaluation

EVALUATION_SERVICE: str = evaluation_pb2.DESCRIPTOR.services_by_name["EvaluationService"].full_name
FEEDBACK_SERVICE: str = feedback_pb2.DESCRIPTOR.services_by_name["FeedbackService"].full_name


class EvaluationServicer(evaluation_pb2_grpc.EvaluationServiceServicer):
    """Reports from the evaluator's stores."""

    def __init__(self, evaluation: Evaluation) -> None:
        self._evaluation = evaluation

    async def GetEvaluationReport(
        self,
        request: evaluation_pb2.GetEvaluationReportRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> evaluation_pb2.GetEvaluationReportResponse:
        return await self._evaluation.report(request)


class FeedbackServicer(feedback_pb2_grpc.FeedbackServiceServicer):
    """Publishes observations of the ground truth on the feedback topic."""

    def __init__(self, evaluation: Evaluation) -> None:
        self._evaluation = evaluation

    async def Record(
        self,
        request: feedback_pb2.RecordRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> feedback_pb2.RecordResponse:
        return await self._evaluation.record(request)


def registrar(evaluation: Evaluation) -> Callable[[grpc.aio.Server], None]:
    """Adds both services, over the same state, to a server."""

    def register(server: grpc.aio.Server) -> None:
        evaluation_pb2_grpc.add_EvaluationServiceServicer_to_server(
            EvaluationServicer(evaluation), server
        )
        feedback_pb2_grpc.add_FeedbackServiceServicer_to_server(
            FeedbackServicer(evaluation), server
        )

    return register
