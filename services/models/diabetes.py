"""The `diabetes` model: a linear model trained offline on scikit-learn's diabetes dataset.

`tools/train_diabetes.py` fits ridge and ordinary least squares on the bundled
dataset (ten scaled features: age, sex, bmi, bp, s1..s6) and writes each model's
coefficients, intercept and held-out metrics to a small JSON artifact in
`services/models/artifacts/`. Serving loads that JSON, never a pickle, so the
container does not depend on the scikit-learn version at serve time and a
prediction is a ten-term dot product.

Args: `algorithm` (ridge | linear), optionally `artifact` (a path overriding the
committed file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from rendezvous.v1 import model_pb2

from services.core.protos import finite_number, set_values
from services.models.base import NOT_A_NUMBER, REQUIRED, feature_path, invalid_features

Algorithm = Literal["ridge", "linear"]

ARTIFACT_DIR = Path(__file__).resolve().parent / "artifacts"
ARTIFACT_FORMAT: Literal[1] = 1
OUTPUTS = ("model",)


def artifact_path(algorithm: Algorithm, directory: Path = ARTIFACT_DIR) -> Path:
    """Where the committed artifact for `algorithm` lives."""
    return directory / f"diabetes-{algorithm}.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ArtifactFeature(_Strict):
    """One input of the trained model, in coefficient order."""

    name: str
    description: str = ""


class ArtifactSplit(_Strict):
    """How the dataset was split into training and held-out rows."""

    test_size: float = Field(gt=0, lt=1)
    random_state: int
    n_train: int = Field(gt=0)
    n_test: int = Field(gt=0)


class ArtifactMetrics(_Strict):
    """How well the model did on the held-out split."""

    r2: float
    mae: float
    rmse: float
    # The least-wrong constant answer: a sensible static default for the objective.
    train_target_mean: float


class DiabetesArtifact(_Strict):
    """The JSON a trained diabetes model is served from (written by tools/train_diabetes.py)."""

    format: Literal[1] = ARTIFACT_FORMAT
    algorithm: Algorithm
    dataset: str
    sklearn_version: str
    features: list[ArtifactFeature] = Field(min_length=1)
    coefficients: list[float]
    intercept: float
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    split: ArtifactSplit
    metrics: ArtifactMetrics

    @model_validator(mode="after")
    def _one_coefficient_per_feature(self) -> DiabetesArtifact:
        if len(self.coefficients) != len(self.features):
            raise ValueError("coefficients and features differ in length")
        return self

    @classmethod
    def load(cls, path: Path) -> DiabetesArtifact:
        return cls.model_validate_json(path.read_text(encoding="utf-8"))

    def dump(self) -> str:
        # Python's float repr round-trips exactly, so serving reproduces training bit for bit.
        return self.model_dump_json(indent=2) + "\n"

    def predict_row(self, row: dict[str, float]) -> float:
        """The prediction for one row of plain numbers (for tools and checks)."""
        return self.intercept + sum(
            coefficient * row[feature.name]
            for feature, coefficient in zip(self.features, self.coefficients, strict=True)
        )


class DiabetesArgs(_Strict):
    """Arguments of the diabetes model."""

    algorithm: Algorithm = "ridge"
    artifact: Path | None = None


class DiabetesModel:
    """score = intercept + coefficients · features, from the trained artifact."""

    def __init__(self, name: str, version: str, args: dict[str, Any]) -> None:
        parsed = DiabetesArgs.model_validate(args)
        path = parsed.artifact or artifact_path(parsed.algorithm)
        self.artifact = DiabetesArtifact.load(path)
        if self.artifact.algorithm != parsed.algorithm:
            raise ValueError(
                f"{path} holds a {self.artifact.algorithm} model, not {parsed.algorithm}"
            )
        self._version = version
        self._intercept = self.artifact.intercept
        # (feature name, violation path, coefficient), computed once: predict stays a loop.
        self._terms = tuple(
            (feature.name, feature_path(feature.name), coefficient)
            for feature, coefficient in zip(
                self.artifact.features, self.artifact.coefficients, strict=True
            )
        )
        self._outputs = {"model": parsed.algorithm}
        self._metadata = model_pb2.GetModelMetadataResponse(
            name=name,
            version=version,
            platform=f"scikit-learn {self.artifact.sklearn_version} {parsed.algorithm}",
            inputs=[
                model_pb2.FeatureSpec(
                    name=feature.name,
                    type=model_pb2.FEATURE_TYPE_NUMBER,
                    required=True,
                    description=feature.description,
                )
                for feature in self.artifact.features
            ],
            outputs=list(OUTPUTS),
        )

    def metadata(self) -> model_pb2.GetModelMetadataResponse:
        return self._metadata

    async def predict(
        self, request: model_pb2.PredictRequest, budget_s: float | None
    ) -> model_pb2.PredictResponse:
        features = request.features
        score = self._intercept
        violations: list[tuple[str, str]] = []
        for name, path, coefficient in self._terms:
            if name not in features:
                violations.append((path, REQUIRED))
                continue
            number = finite_number(features[name])
            if number is None:
                violations.append((path, NOT_A_NUMBER))
                continue
            score += coefficient * number
        if violations:
            raise invalid_features(violations)
        response = model_pb2.PredictResponse(score=score, model_version=self._version)
        set_values(response.outputs, self._outputs)
        return response
