"""Settings of a model container (env prefix RDV_MODEL_, YAML section "model")."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.core.settings import ServiceSettings

ModelKind = Literal["sum", "diabetes", "flaky"]


class ModelSettings(ServiceSettings):
    """Which example model this process serves, under which name and version."""

    model_config = SettingsConfigDict(env_prefix="RDV_MODEL_")
    config_section: ClassVar[str] = "model"

    kind: ModelKind = "sum"
    # The name GetModelMetadata reports; empty means the kind's name.
    name: str = ""
    version: str = "1"
    # Kind-specific arguments, validated by the kind (unknown keys are errors).
    args: dict[str, Any] = Field(default_factory=dict)
    # gRPC sheds calls beyond this with RESOURCE_EXHAUSTED; None means no limit.
    maximum_concurrent_rpcs: int | None = Field(default=None, ge=1)
