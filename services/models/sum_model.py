"""The `sum` model: the original Rendezvous blog's test model, score = sum of the features.

Every feature must be a finite number; anything else is INVALID_ARGUMENT naming
each offending feature. It takes no arguments.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict
from rendezvous.v1 import model_pb2

from services.models.base import sum_numeric

PLATFORM = "python"


class SumArgs(BaseModel):
    """The sum model takes no arguments; any key is a typo worth failing on."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SumModel:
    """score = the sum of every (numeric) feature."""

    def __init__(self, name: str, version: str, args: dict[str, Any]) -> None:
        SumArgs.model_validate(args)
        self._metadata = model_pb2.GetModelMetadataResponse(
            name=name, version=version, platform=PLATFORM
        )
        self._version = version

    def metadata(self) -> model_pb2.GetModelMetadataResponse:
        return self._metadata

    async def predict(
        self, request: model_pb2.PredictRequest, budget_s: float | None
    ) -> model_pb2.PredictResponse:
        return model_pb2.PredictResponse(
            score=sum_numeric(request.features), model_version=self._version
        )
