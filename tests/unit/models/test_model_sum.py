"""The `sum` model over a real gRPC server: correctness and field-level errors."""

from __future__ import annotations

import math

import grpc
import pytest
from rendezvous.v1 import model_pb2

from services.core.protos import set_values
from tests.unit.models.model_testing import ServeModel, field_violations


def request(**features: object) -> model_pb2.PredictRequest:
    out = model_pb2.PredictRequest(request_id="r-1", objective="demo")
    set_values(out.features, features)
    return out


async def test_score_is_the_sum_of_the_features(serve_model: ServeModel) -> None:
    served = await serve_model("sum", name="feature-sum", version="3")

    response = await served.stub.Predict(request(a=1.5, b=2, c=-0.25), timeout=5)

    assert response.score == pytest.approx(3.25)
    assert response.model_version == "3"


async def test_no_features_sum_to_zero(serve_model: ServeModel) -> None:
    served = await serve_model("sum")

    response = await served.stub.Predict(request(), timeout=5)

    assert response.score == 0.0


async def test_non_numeric_features_are_invalid_argument_naming_each(
    serve_model: ServeModel,
) -> None:
    served = await serve_model("sum")
    bad = request(a="seven", b=True, c=1.0, d=[1, 2])
    bad.features["e"].number_value = math.nan

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await served.stub.Predict(bad, timeout=5)

    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(info.value)) == {
        "features.a",
        "features.b",
        "features.d",
        "features.e",
    }
    assert info.value.details() == "invalid request: features.a, features.b, features.d, features.e"


async def test_metadata_names_the_model(serve_model: ServeModel) -> None:
    served = await serve_model("sum", name="feature-sum", version="2")

    metadata = await served.stub.GetModelMetadata(model_pb2.GetModelMetadataRequest(), timeout=5)

    assert (metadata.name, metadata.version) == ("feature-sum", "2")
    assert metadata.platform
