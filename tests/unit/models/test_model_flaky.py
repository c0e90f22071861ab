"""The `flaky` model: seeded error rate, lognormal latency, and it honours deadlines."""

from __future__ import annotations

import statistics
import time

import grpc
import pytest
from rendezvous.v1 import model_pb2

from services.core.protos import set_values, timestamp_from_ns
from services.models.flaky import FlakyModel
from tests.unit.models.model_testing import ServeModel


def request(**features: float) -> model_pb2.PredictRequest:
    out = model_pb2.PredictRequest(request_id="r")
    set_values(out.features, features)
    return out


async def outcomes(stub: object, calls: int) -> list[str]:
    results = []
    for _ in range(calls):
        try:
            await stub.Predict(request(a=1, b=2), timeout=5)  # type: ignore[attr-defined]
            results.append("OK")
        except grpc.aio.AioRpcError as err:
            results.append(err.code().name)
            assert (err.code(), err.details()) in {
                (grpc.StatusCode.UNAVAILABLE, "the model is unavailable (simulated)"),
                (grpc.StatusCode.INTERNAL, "the model failed (simulated)"),
            }
    return results


async def test_error_rate_is_roughly_honoured_and_seeded(serve_model: ServeModel) -> None:
    args = {"error_rate": 0.25, "seed": 1234}
    first = await serve_model("flaky", args)
    second = await serve_model("flaky", args)

    seen = await outcomes(first.stub, 400)
    again = await outcomes(second.stub, 400)

    error_share = sum(outcome != "OK" for outcome in seen) / len(seen)
    assert 0.19 <= error_share <= 0.31
    assert {"OK", "UNAVAILABLE", "INTERNAL"} == set(seen)
    assert seen == again  # the same seed, the same sequence


async def test_score_is_the_sum_or_the_constant(serve_model: ServeModel) -> None:
    summing = await serve_model("flaky", {})
    constant = await serve_model("flaky", {"score": 7.5})

    assert (await summing.stub.Predict(request(a=1, b=2), timeout=5)).score == 3.0
    assert (await constant.stub.Predict(request(a=1, b=2), timeout=5)).score == 7.5


async def test_grpc_deadline_is_honoured(serve_model: ServeModel) -> None:
    served = await serve_model("flaky", {"latency_ms_median": 5000})
    started = time.monotonic()

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await served.stub.Predict(request(a=1), timeout=0.2)

    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 1.0


async def test_request_deadline_is_honoured_without_a_grpc_timeout(
    serve_model: ServeModel,
) -> None:
    served = await serve_model("flaky", {"latency_ms_median": 5000})
    slow = request(a=1)
    slow.deadline.CopyFrom(timestamp_from_ns(time.time_ns() + 200_000_000))
    started = time.monotonic()

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await served.stub.Predict(slow)

    elapsed = time.monotonic() - started
    # The model itself gave up at the request's deadline (the call had no timeout).
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.15 <= elapsed < 1.0


async def test_latency_within_budget_is_slept(serve_model: ServeModel) -> None:
    served = await serve_model("flaky", {"latency_ms_median": 100})
    started = time.monotonic()

    response = await served.stub.Predict(request(a=1), timeout=5)

    assert time.monotonic() - started >= 0.09
    assert response.outputs["latency_ms"].number_value == pytest.approx(100.0)


def test_latency_follows_the_fitted_lognormal() -> None:
    model = FlakyModel("flaky", "1", {"latency_ms_median": 5, "latency_ms_p99": 60, "seed": 7})

    draws = sorted(model.draw_latency_s() * 1000 for _ in range(20_000))

    assert statistics.median(draws) == pytest.approx(5.0, rel=0.05)
    assert draws[int(0.99 * len(draws))] == pytest.approx(60.0, rel=0.15)


@pytest.mark.parametrize(
    "args",
    [
        {"latency_ms_median": 10, "latency_ms_p99": 5},
        {"error_rate": 1.5},
        {"error_codes": ["NOT_FOUND"]},
        {"latency_ms_median": 0, "latency_ms_p99": 5},
        {"typo": 1},
    ],
)
def test_bad_args_fail_at_start(args: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        FlakyModel("flaky", "1", args)
