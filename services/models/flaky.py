"""The `flaky` model: configurable latency and errors, for demos and tests.

Latency is drawn from a lognormal fitted to two quantiles: `latency_ms_median`
and `latency_ms_p99` (median = e^mu, p99 = e^(mu + z99 * sigma)). With
probability `error_rate` the call fails, after its latency, with UNAVAILABLE or
INTERNAL and a fixed, safe message. The score is the sum of the features, or the
constant `score` when given. `seed` makes the draws reproducible.

It never sleeps past the deadline: when the drawn latency does not fit in the
budget it waits out the budget and answers DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import asyncio
import math
import random
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from rendezvous.v1 import model_pb2

from services.core.errors import ServiceError, Unavailable
from services.core.protos import set_values, values_dict
from services.models.base import DeadlineExceeded, sum_numeric

PLATFORM = "python"
# The standard normal's 99th percentile.
Z99 = 2.3263478740408408
OUTPUTS = ("latency_ms",)

ErrorCode = Literal["UNAVAILABLE", "INTERNAL"]
ERROR_CODES: tuple[ErrorCode, ...] = ("UNAVAILABLE", "INTERNAL")


class FlakyArgs(BaseModel):
    """Arguments of the flaky model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    latency_ms_median: float = Field(default=0.0, ge=0)
    # None: every call takes the median (no spread).
    latency_ms_p99: float | None = Field(default=None, ge=0)
    error_rate: float = Field(default=0.0, ge=0, le=1)
    error_codes: list[ErrorCode] = Field(default_factory=lambda: list(ERROR_CODES), min_length=1)
    seed: int | None = None
    # None: score = sum of the features; otherwise this constant.
    score: float | None = None
    # Return the enricher's subject state in outputs["subject_state"]: shows, end to end,
    # what a model actually received.
    echo_subject_state: bool = False

    @model_validator(mode="after")
    def _p99_above_median(self) -> FlakyArgs:
        if self.latency_ms_p99 is not None and self.latency_ms_p99 < self.latency_ms_median:
            raise ValueError("latency_ms_p99 must not be below latency_ms_median")
        if self.latency_ms_median == 0 and (self.latency_ms_p99 or 0) > 0:
            raise ValueError("a lognormal latency needs latency_ms_median > 0")
        return self


class SimulatedFailure(ServiceError):
    """The flaky model failing on purpose (INTERNAL)."""

    reason = "SIMULATED_FAILURE"


class SimulatedOutage(Unavailable):
    """The flaky model pretending to be unavailable."""

    reason = "SIMULATED_OUTAGE"


class FlakyModel:
    """Sleeps a lognormal latency, sometimes fails, then sums the features."""

    def __init__(self, name: str, version: str, args: dict[str, Any]) -> None:
        self.args = FlakyArgs.model_validate(args)
        self._version = version
        self._rng = random.Random(self.args.seed)
        median = self.args.latency_ms_median / 1000.0
        p99 = (self.args.latency_ms_p99 or self.args.latency_ms_median) / 1000.0
        self._mu = math.log(median) if median > 0 else -math.inf
        self._sigma = math.log(p99 / median) / Z99 if median > 0 else 0.0
        self._metadata = model_pb2.GetModelMetadataResponse(
            name=name, version=version, platform=PLATFORM, outputs=list(OUTPUTS)
        )

    def metadata(self) -> model_pb2.GetModelMetadataResponse:
        return self._metadata

    def draw_latency_s(self) -> float:
        """One latency draw, in seconds."""
        if self._mu == -math.inf:
            return 0.0
        return self._rng.lognormvariate(self._mu, self._sigma)

    async def predict(
        self, request: model_pb2.PredictRequest, budget_s: float | None
    ) -> model_pb2.PredictResponse:
        # Every call draws the same numbers in the same order, so a seed fixes the sequence.
        latency = self.draw_latency_s()
        fails = self._rng.random() < self.args.error_rate
        code = self._rng.choice(self.args.error_codes)
        if budget_s is not None and latency >= budget_s:
            await asyncio.sleep(max(0.0, budget_s))
            raise DeadlineExceeded("the model did not finish before the deadline")
        if latency > 0:
            await asyncio.sleep(latency)
        if fails:
            if code == "UNAVAILABLE":
                raise SimulatedOutage("the model is unavailable (simulated)")
            raise SimulatedFailure("the model failed (simulated)")
        score = self.args.score if self.args.score is not None else sum_numeric(request.features)
        response = model_pb2.PredictResponse(score=score, model_version=self._version)
        set_values(response.outputs, {"latency_ms": latency * 1000.0})
        if self.args.echo_subject_state:
            response.outputs["subject_state"].struct_value.update(
                values_dict(request.subject_state)
            )
        return response
