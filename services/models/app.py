"""The model container: one example model served as `rendezvous.v1.ModelService`.

`python -m services.models` reads `ModelSettings` (RDV_MODEL_*, YAML section
"model"), builds the model of the configured kind (bad `args` fail at start-up,
not at the first request), serves it on a `GrpcServer` (health + reflection
included), reports SERVING and writes the ready file with its address.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from rendezvous.v1 import model_pb2, model_pb2_grpc

from services.core.lifecycle import Component, run
from services.models.base import Model, ModelServicer
from services.models.diabetes import DiabetesModel
from services.models.flaky import FlakyModel
from services.models.settings import ModelKind, ModelSettings
from services.models.sum_model import SumModel

log = logging.getLogger(__name__)

SERVICE_NAME = model_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name

KINDS: dict[ModelKind, Callable[[str, str, dict[str, Any]], Model]] = {
    "sum": SumModel,
    "diabetes": DiabetesModel,
    "flaky": FlakyModel,
}


def build_model(settings: ModelSettings) -> Model:
    """The model `settings` describe; invalid args raise here."""
    return KINDS[settings.kind](model_name(settings), settings.version, settings.args)


def model_name(settings: ModelSettings) -> str:
    return settings.name or settings.kind


class ModelContainer(Component):
    """A Component serving one model until stopped."""

    uses_bus = False

    def __init__(self, settings: ModelSettings) -> None:
        # Built first, so bad args fail before anything listens.
        self.model = build_model(settings)
        servicer = ModelServicer(self.model, model_name(settings), settings.version)
        super().__init__(
            settings,
            name=f"model-{model_name(settings)}",
            service_names=[SERVICE_NAME],
            registrars=[
                lambda server: model_pb2_grpc.add_ModelServiceServicer_to_server(servicer, server)
            ],
            maximum_concurrent_rpcs=settings.maximum_concurrent_rpcs,
        )
        self.settings: ModelSettings = settings

    def facts(self) -> dict[str, Any]:
        return {
            "model": model_name(self.settings),
            "kind": self.settings.kind,
            "version": self.settings.version,
        }


def main() -> None:
    settings = ModelSettings()
    run("model", settings, lambda: ModelContainer(settings))
