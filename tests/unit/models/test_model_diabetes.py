"""The `diabetes` model: the JSON artifact predicts what scikit-learn predicts."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import pytest
from rendezvous.v1 import model_pb2
from sklearn.datasets import load_diabetes
from sklearn.linear_model import LinearRegression, Ridge
from sklearn.metrics import mean_absolute_error, r2_score
from sklearn.model_selection import train_test_split

from services.core.protos import set_values, values_dict
from services.models.diabetes import DiabetesArtifact, artifact_path
from tests.unit.models.model_testing import ServeModel, field_violations

FEATURES = ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]


def sklearn_fit(artifact: DiabetesArtifact) -> tuple[Any, Any, Any, Any]:
    """Train the same model with scikit-learn on the same split; return it and the split."""
    data = load_diabetes()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data,
        data.target,
        test_size=artifact.split.test_size,
        random_state=artifact.split.random_state,
    )
    if artifact.algorithm == "ridge":
        estimator = Ridge(alpha=artifact.hyperparameters["alpha"])
    else:
        estimator = LinearRegression()
    estimator.fit(x_train, y_train)
    return estimator, x_test, y_test, x_train


def request_for(row: Any) -> model_pb2.PredictRequest:
    out = model_pb2.PredictRequest(request_id="r", objective="demo")
    set_values(out.features, dict(zip(FEATURES, (float(x) for x in row), strict=True)))
    return out


@pytest.mark.parametrize("algorithm", ["ridge", "linear"])
async def test_predictions_equal_sklearn_predictions(
    serve_model: ServeModel, algorithm: str
) -> None:
    artifact = DiabetesArtifact.load(artifact_path(algorithm))  # type: ignore[arg-type]
    estimator, x_test, _, x_train = sklearn_fit(artifact)
    rows = np.vstack([x_test[:5], x_train[:3]])
    expected = estimator.predict(rows)
    served = await serve_model("diabetes", {"algorithm": algorithm}, version="9")

    for row, want in zip(rows, expected, strict=True):
        response = await served.stub.Predict(request_for(row), timeout=5)
        assert response.score == pytest.approx(float(want), abs=1e-6)
        assert values_dict(response.outputs) == {"model": algorithm}
        assert response.model_version == "9"


@pytest.mark.parametrize("algorithm", ["ridge", "linear"])
def test_artifact_metrics_are_what_sklearn_measures(algorithm: str) -> None:
    artifact = DiabetesArtifact.load(artifact_path(algorithm))  # type: ignore[arg-type]
    estimator, x_test, y_test, _ = sklearn_fit(artifact)
    predicted = estimator.predict(x_test)

    assert artifact.metrics.r2 == pytest.approx(r2_score(y_test, predicted), abs=1e-9)
    assert artifact.metrics.mae == pytest.approx(mean_absolute_error(y_test, predicted), abs=1e-9)
    assert artifact.split.n_test == len(y_test)
    # A real model: clearly better than predicting the mean on rows it never saw.
    assert artifact.metrics.r2 > 0.4


async def test_missing_and_non_numeric_features_are_named(serve_model: ServeModel) -> None:
    served = await serve_model("diabetes", {"algorithm": "ridge"})
    bad = model_pb2.PredictRequest(request_id="r")
    set_values(
        bad.features,
        {name: 0.01 for name in FEATURES if name not in ("bmi", "s3")} | {"age": "old"},
    )

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await served.stub.Predict(bad, timeout=5)

    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(info.value)
    assert set(violations) == {"features.age", "features.bmi", "features.s3"}
    assert violations["features.bmi"] == "is required"


async def test_extra_features_are_ignored(serve_model: ServeModel) -> None:
    served = await serve_model("diabetes", {"algorithm": "linear"})
    artifact = DiabetesArtifact.load(artifact_path("linear"))
    row = dict.fromkeys(FEATURES, 0.02)
    plain = model_pb2.PredictRequest()
    set_values(plain.features, row)
    extra = model_pb2.PredictRequest()
    set_values(extra.features, row | {"zip_code": "12345"})

    first = await served.stub.Predict(plain, timeout=5)
    second = await served.stub.Predict(extra, timeout=5)

    assert first.score == second.score == pytest.approx(artifact.predict_row(row), abs=1e-9)


async def test_metadata_describes_the_inputs(serve_model: ServeModel) -> None:
    served = await serve_model("diabetes", {"algorithm": "ridge"}, name="diabetes-ridge")

    metadata = await served.stub.GetModelMetadata(model_pb2.GetModelMetadataRequest(), timeout=5)

    assert metadata.name == "diabetes-ridge"
    assert [spec.name for spec in metadata.inputs] == FEATURES
    assert all(
        spec.type == model_pb2.FEATURE_TYPE_NUMBER and spec.required for spec in metadata.inputs
    )
    assert metadata.platform.startswith("scikit-learn ") and metadata.platform.endswith(" ridge")
    assert list(metadata.outputs) == ["model"]
