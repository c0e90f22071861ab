"""`rendezvous.v1.EnricherService`: the enrich step, callable directly over gRPC."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from opentelemetry import trace
from rendezvous.v1 import enricher_pb2, enricher_pb2_grpc

from services.core.errors import InvalidArgument, NotFound, Unavailable
from services.enricher.enrich import Enricher

SERVICE_NAME: str = enricher_pb2.DESCRIPTOR.services_by_name["EnricherService"].full_name


class EnricherServicer(enricher_pb2_grpc.EnricherServiceServicer):
    """Answers Enrich with the same function the Pulsar path uses."""

    def __init__(self, enricher: Enricher, ready: Callable[[], bool]) -> None:
        self._enricher = enricher
        self._ready = ready

    async def Enrich(
        self,
        request: enricher_pb2.EnrichRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> enricher_pb2.EnrichResponse:
        if not request.HasField("task"):
            raise InvalidArgument([("task", "the scoring task to enrich is required")])
        objective = request.task.request.objective
        if not objective:
            raise InvalidArgument([("task.request.objective", "the objective is required")])
        if objective not in self._enricher.objectives:
            raise NotFound("this enricher does not serve the objective")
        if not self._ready():
            # Answering from half-read state would hand models a wrong subject state.
            raise Unavailable("the subject state is still catching up with the events topic")
        # Inside the call's SERVER span (services.core.tracing), the caller's trace.
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attribute("rdv.objective", objective)
        return enricher_pb2.EnrichResponse(enriched_task=self._enricher.enrich(request.task))


def registrar(servicer: EnricherServicer) -> Callable[[grpc.aio.Server], None]:
    def register(server: grpc.aio.Server) -> None:
        enricher_pb2_grpc.add_EnricherServiceServicer_to_server(servicer, server)

    return register
