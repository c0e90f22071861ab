"""The model container as a process would run it: health, reflection, ready file, bad args."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from rendezvous.v1 import model_pb2

from services.models.app import ModelContainer
from services.models.settings import ModelSettings
from tests.unit.models.model_testing import ServeModel


async def test_health_and_reflection_come_with_the_server(serve_model: ServeModel) -> None:
    served = await serve_model("sum")
    health = health_pb2_grpc.HealthStub(served.channel)
    reflection = reflection_pb2_grpc.ServerReflectionStub(served.channel)

    overall = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    model = await health.Check(
        health_pb2.HealthCheckRequest(service="rendezvous.v1.ModelService"), timeout=5
    )
    listed = [
        reply
        async for reply in reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
    ]

    assert overall.status == model.status == health_pb2.HealthCheckResponse.SERVING
    names = {service.name for service in listed[0].list_services_response.service}
    assert "rendezvous.v1.ModelService" in names


async def test_ready_file_names_the_bound_endpoint(tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    container = ModelContainer(
        ModelSettings(kind="sum", listen="127.0.0.1:0", ready_file=ready, shutdown_grace_s=0.1)
    )
    await container.start()
    try:
        facts = json.loads(ready.read_text())
        assert facts["endpoint"] == container.endpoint
        assert not facts["endpoint"].endswith(":0")
        async with grpc.aio.insecure_channel(facts["endpoint"]) as channel:
            await channel.channel_ready()
    finally:
        await container.stop()


@pytest.mark.parametrize(
    ("kind", "args"),
    [("sum", {"weights": 1}), ("diabetes", {"algorithm": "forest"}), ("flaky", {"seed": "x"})],
)
def test_bad_args_fail_before_serving(kind: str, args: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ModelContainer(ModelSettings(kind=kind, args=args))  # type: ignore[arg-type]


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RDV_MODEL_KIND", "diabetes")
    monkeypatch.setenv("RDV_MODEL_NAME", "canary-linear")
    monkeypatch.setenv("RDV_MODEL_ARGS", '{"algorithm": "linear"}')

    settings = ModelSettings()

    assert (settings.kind, settings.name, settings.args) == (
        "diabetes",
        "canary-linear",
        {"algorithm": "linear"},
    )


async def test_predict_batch_answers_each_request_in_order(serve_model: ServeModel) -> None:
    served = await serve_model("sum", name="summer", version="7")
    good = model_pb2.PredictRequest(request_id="a")
    good.features["x"].number_value = 2.0
    bad = model_pb2.PredictRequest(request_id="b")
    bad.features["x"].string_value = "two"
    other = model_pb2.PredictRequest(request_id="c")
    other.features["x"].number_value = 5.0

    response = await served.stub.PredictBatch(
        model_pb2.PredictBatchRequest(requests=[good, bad, other])
    )

    first, second, third = response.results
    assert first.response.score == 2.0
    assert first.response.model_version == "7"
    # One bad request fails alone, with the field it got wrong; the others are answered.
    assert second.WhichOneof("result") == "error"
    assert second.error.grpc_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert second.error.reason == "INVALID_ARGUMENT"
    assert third.response.score == 5.0
