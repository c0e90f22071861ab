"""What every example model shares: the `Model` protocol, input checks and the servicer.

A model is a plain object with `metadata()` and an async `predict(request, budget_s)`;
`ModelServicer` adapts it to `rendezvous.v1.ModelService`, works out the budget
(the tighter of the call's gRPC deadline and the request's own `deadline`) and
stamps the model version. Bad input is an `InvalidArgument` naming every
offending field, which the server's error interceptor turns into INVALID_ARGUMENT
with `google.rpc.BadRequest` field violations.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any, Protocol

import grpc
from google.protobuf import struct_pb2
from rendezvous.v1 import common_pb2, model_pb2, model_pb2_grpc

from services.core.errors import InvalidArgument, ServiceError
from services.core.protos import finite_number, seconds_until
from services.core.telemetry import counter

log = logging.getLogger(__name__)

PREDICTIONS = counter(
    "rdv_model_predictions", "Predict calls a model container answered", ("model", "outcome")
)

NOT_A_NUMBER = "must be a finite number"
REQUIRED = "is required"


class DeadlineExceeded(ServiceError):
    """The model could not finish before the request's deadline."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


class Model(Protocol):
    """One servable model."""

    def metadata(self) -> model_pb2.GetModelMetadataResponse: ...

    async def predict(
        self, request: model_pb2.PredictRequest, budget_s: float | None
    ) -> model_pb2.PredictResponse:
        """Score one request. `budget_s` is the time left before the deadline (None: none)."""
        ...


def feature_path(name: str) -> str:
    """The field path a violation names for one feature."""
    return f"features.{name}"


def sum_numeric(features: Mapping[str, struct_pb2.Value]) -> float:
    """The sum of every feature, each of which must be a finite number."""
    total = 0.0
    violations: list[tuple[str, str]] | None = None
    for name, value in features.items():
        number = finite_number(value)
        if number is None:
            if violations is None:
                violations = []
            violations.append((feature_path(name), NOT_A_NUMBER))
        else:
            total += number
    if violations:
        raise invalid_features(violations)
    return total


def invalid_features(violations: list[tuple[str, str]]) -> InvalidArgument:
    """An INVALID_ARGUMENT naming each offending feature."""
    # Sorted so the client sees the same order whatever the map's iteration order.
    return InvalidArgument(sorted(violations))


class ModelServicer(model_pb2_grpc.ModelServiceServicer):
    """Serves one `Model` as `rendezvous.v1.ModelService`."""

    def __init__(self, model: Model, name: str, version: str) -> None:
        self._model = model
        self._name = name
        self._version = version
        self._ok = PREDICTIONS.labels(name, "ok")

    async def Predict(
        self, request: model_pb2.PredictRequest, context: Any
    ) -> model_pb2.PredictResponse:
        return await self._predict(request, _budget_s(request, context))

    async def _predict(
        self, request: model_pb2.PredictRequest, budget: float | None
    ) -> model_pb2.PredictResponse:
        """The model's answer, counted and stamped with the version; a ServiceError is
        counted by its code and raised."""
        try:
            response = await self._model.predict(request, budget)
        except ServiceError as exc:
            PREDICTIONS.labels(self._name, exc.code.name.lower()).inc()
            raise
        self._ok.inc()
        if not response.model_version:
            response.model_version = self._version
        return response

    async def PredictBatch(
        self, request: model_pb2.PredictBatchRequest, context: Any
    ) -> model_pb2.PredictBatchResponse:
        # Concurrently: a model that waits on something (the flaky one sleeps) must not make
        # the batch as slow as the sum of its items.
        results = await asyncio.gather(
            *(self._result(item, _budget_s(item, context)) for item in request.requests)
        )
        return model_pb2.PredictBatchResponse(results=results)

    async def _result(
        self, request: model_pb2.PredictRequest, budget: float | None
    ) -> model_pb2.PredictResult:
        try:
            return model_pb2.PredictResult(response=await self._predict(request, budget))
        except ServiceError as exc:
            error = common_pb2.ModelError(
                grpc_code=exc.code.value[0], reason=exc.reason, message=exc.message
            )
            return model_pb2.PredictResult(error=error)
        except Exception:
            # One item's bug answers that item with INTERNAL; its text stays in the log.
            log.exception("predict failed", extra={"request_id": request.request_id})
            PREDICTIONS.labels(self._name, "internal").inc()
            internal = grpc.StatusCode.INTERNAL
            error = common_pb2.ModelError(grpc_code=internal.value[0], reason=internal.name)
            return model_pb2.PredictResult(error=error)

    async def GetModelMetadata(
        self, request: model_pb2.GetModelMetadataRequest, context: Any
    ) -> model_pb2.GetModelMetadataResponse:
        return self._model.metadata()


def _budget_s(request: model_pb2.PredictRequest, context: Any) -> float | None:
    # The request's own deadline holds even when a caller sets no gRPC timeout.
    budget: float | None = context.time_remaining()
    if request.HasField("deadline"):
        remaining = seconds_until(request.deadline)
        budget = remaining if budget is None else min(budget, remaining)
    return budget
