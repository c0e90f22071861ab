"""The runner as a service: health once subscribed, ready file, settings."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError

from services.runner.settings import RunnerSettings
from tests.unit.models.model_testing import ServeModel
from tests.unit.runner.conftest import StartRunner


async def test_health_is_serving_once_subscribed(
    serve_model: ServeModel, start_runner: StartRunner, tmp_path: Path
) -> None:
    model = await serve_model("sum")
    ready = tmp_path / "runner.json"
    runner = await start_runner(model.container.endpoint, ready_file=ready)

    async with grpc.aio.insecure_channel(runner.endpoint) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)

    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    facts = json.loads(ready.read_text())
    assert facts["endpoint"] == runner.endpoint
    assert facts["subscription"] == runner.settings.model


def test_subscription_defaults_to_the_model_name() -> None:
    settings = RunnerSettings(
        objective="demo", model="diabetes-ridge", role="incumbent", endpoint="127.0.0.1:1"
    )

    assert settings.subscription == "diabetes-ridge"


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RDV_RUNNER_OBJECTIVE", "demo")
    monkeypatch.setenv("RDV_RUNNER_MODEL", "flaky")
    monkeypatch.setenv("RDV_RUNNER_ROLE", "challenger")
    monkeypatch.setenv("RDV_RUNNER_ENDPOINT", "127.0.0.1:50071")
    monkeypatch.setenv("RDV_RUNNER_CONCURRENCY", "4")

    settings = RunnerSettings()

    assert (settings.model, settings.role, settings.concurrency) == ("flaky", "challenger", 4)


def test_decoy_is_not_a_runner_role() -> None:
    with pytest.raises(ValidationError):
        RunnerSettings(
            objective="demo",
            model="decoy",
            role="decoy",  # type: ignore[arg-type]
            endpoint="127.0.0.1:1",
        )
