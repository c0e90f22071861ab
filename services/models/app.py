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

from services.core.server import GrpcServer, run, write_ready_file
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


class ModelContainer:
    """A Component serving one model until stopped."""

    def __init__(self, settings: ModelSettings) -> None:
        self.settings = settings
        # Built here, so bad args fail before anything listens.
        self.model = build_model(settings)
        self._server: GrpcServer | None = None

    @property
    def endpoint(self) -> str:
        """host:port the model listens on (the real port after binding port 0)."""
        return self._server.endpoint if self._server is not None else ""

    async def start(self) -> None:
        # grpc.aio objects belong to the loop they are made on: make them in start().
        servicer = ModelServicer(self.model, model_name(self.settings), self.settings.version)
        self._server = GrpcServer(
            service_names=[SERVICE_NAME],
            registrars=[
                lambda server: model_pb2_grpc.add_ModelServiceServicer_to_server(servicer, server)
            ],
            tcp_address=self.settings.listen,
            max_message_bytes=self.settings.max_message_bytes,
            maximum_concurrent_rpcs=self.settings.maximum_concurrent_rpcs,
        )
        await self._server.start()
        await self._server.set_serving(True)
        write_ready_file(
            self.settings.ready_file,
            endpoint=self.endpoint,
            model=model_name(self.settings),
            kind=self.settings.kind,
            version=self.settings.version,
        )
        log.info(
            "model serving",
            extra={
                "endpoint": self.endpoint,
                "model": model_name(self.settings),
                "kind": self.settings.kind,
            },
        )

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(self.settings.shutdown_grace_s)


def main() -> None:
    settings = ModelSettings()
    run("model", settings, lambda: ModelContainer(settings))
