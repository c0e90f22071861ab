"""The oip model kind: the Open Inference Protocol client against a fake server on a real
loopback socket, alone and inside a runner host; its arguments checked where configs are."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from rendezvous.v1 import common_pb2, model_pb2, objective_pb2, task_pb2

from services.control.validation import validate
from services.core.mesh import ModelEntry
from services.core.oip import OipArgs
from services.runner.live import serves_differently
from services.runner.model_client import ChannelOptions
from services.runner.oip_client import OipClient
from tests.fakes.memory_bus import MemoryBus
from tests.fakes.oip_server import INPUT, MODEL, OUTPUT, FakeOip, serve_fake
from tests.unit.control.configs import config
from tests.unit.runner.conftest import StartRunner
from tests.unit.runner.test_runner_flow import (
    listen,
    make_task,
    metric,
    publish_tasks,
    receive,
)

WEIGHTS = [2.0, -1.0]
BIAS = 0.5


def args(**overrides: Any) -> dict[str, Any]:
    return {"model_name": MODEL, "inputs": ["a", "b"], "output": OUTPUT, **overrides}


def expected(a: float, b: float) -> float:
    return BIAS + WEIGHTS[0] * a + WEIGHTS[1] * b


@pytest.fixture
async def fake() -> AsyncIterator[FakeOip]:
    servicer = FakeOip(weights=WEIGHTS, bias=BIAS)
    server = await serve_fake(servicer)
    try:
        yield servicer
    finally:
        await server.stop(0)


def client_for(fake: FakeOip, **overrides: Any) -> OipClient:
    return OipClient(
        fake.endpoint,
        OipArgs.model_validate(args(**overrides)),
        ChannelOptions(100, 1000, 4 * 1024 * 1024, max_timeout_s=5.0),
    )


def tasks(*rows: dict[str, Any]) -> list[task_pb2.EnrichedTask]:
    return [
        make_task("obj", "persistent://public/default/rdv.predictions.x", features=r) for r in rows
    ]


def scores(results: list[model_pb2.PredictResponse | common_pb2.ModelError]) -> list[float]:
    assert all(isinstance(r, model_pb2.PredictResponse) for r in results), results
    return [r.score for r in results if isinstance(r, model_pb2.PredictResponse)]


# ----------------------------------------------------------------------------- the client


async def test_a_burst_is_one_tensor_and_one_model_infer(fake: FakeOip) -> None:
    client = client_for(fake)
    rows = [{"a": 1.0, "b": 2.0}, {"a": -3.0, "b": 0.25}, {"a": 0.0, "b": 0.0, "extra": 9}]
    scored = await client.score(tasks(*rows), "obj")
    await client.close()

    assert scores(scored.results) == [expected(r["a"], r["b"]) for r in rows]
    assert scored.calls == [3]
    [request] = fake.requests
    [tensor] = request.inputs
    assert (request.model_name, tensor.name, tensor.datatype) == (MODEL, INPUT, "FP64")
    assert list(tensor.shape) == [3, 2]
    assert list(tensor.contents.fp64_contents) == [1.0, 2.0, -3.0, 0.25, 0.0, 0.0]
    assert [o.name for o in request.outputs] == [OUTPUT]
    assert all(
        isinstance(r, model_pb2.PredictResponse) and r.model_version == "7" for r in scored.results
    )


async def test_fp32_raw_input_and_raw_output(fake: FakeOip) -> None:
    fake.raw_output = True
    client = client_for(fake, datatype="FP32", raw=True, model_version="7")
    scored = await client.score(tasks({"a": 1.5, "b": 0.5}, {"a": 2.0, "b": 1.0}), "obj")
    await client.close()

    assert scores(scored.results) == [expected(1.5, 0.5), expected(2.0, 1.0)]
    [request] = fake.requests
    assert request.model_version == "7"
    assert request.inputs[0].datatype == "FP32"
    assert not request.inputs[0].HasField("contents")
    assert struct.unpack("<4f", request.raw_input_contents[0]) == (1.5, 0.5, 2.0, 1.0)


async def test_features_come_from_the_subject_state_too(fake: FakeOip) -> None:
    client = client_for(fake, inputs=["a", "views"])
    [task] = tasks({"a": 1.0})  # make_task's subject state has views: 3
    scored = await client.score([task], "obj")
    await client.close()
    assert scores(scored.results) == [expected(1.0, 3.0)]


async def test_a_task_without_its_features_fails_alone(fake: FakeOip) -> None:
    client = client_for(fake)
    scored = await client.score(
        tasks({"a": 1.0, "b": 1.0}, {"a": 1.0}, {"a": "x", "b": 1.0}, {"a": 2.0, "b": True}),
        "obj",
    )
    await client.close()

    ok, missing, text, boolean = scored.results
    assert isinstance(ok, model_pb2.PredictResponse) and ok.score == expected(1.0, 1.0)
    assert isinstance(boolean, model_pb2.PredictResponse) and boolean.score == expected(2.0, 1.0)
    for error, what in ((missing, "'b' is missing"), (text, "'a' must be a finite number")):
        assert isinstance(error, common_pb2.ModelError)
        assert (error.reason, error.grpc_code) == ("INVALID_ARGUMENT", 3)
        assert what in error.message
    # One call, with the two rows that could be made.
    assert scored.calls == [2]
    assert list(fake.requests[0].inputs[0].shape) == [2, 2]


async def test_a_failed_call_is_every_tasks_error_with_its_code(fake: FakeOip) -> None:
    fake.fail_with = grpc.StatusCode.RESOURCE_EXHAUSTED
    client = client_for(fake)
    scored = await client.score(tasks({"a": 1, "b": 2}, {"a": 3, "b": 4}), "obj")
    await client.close()

    assert len(fake.requests) == 1
    for result in scored.results:
        assert isinstance(result, common_pb2.ModelError)
        assert (result.grpc_code, result.reason) == (8, "RESOURCE_EXHAUSTED")
        assert "told to fail" in result.message


async def test_an_answer_that_does_not_split_into_the_rows_is_internal(fake: FakeOip) -> None:
    fake.rows_short = True
    client = client_for(fake)
    scored = await client.score(tasks({"a": 1, "b": 2}, {"a": 3, "b": 4}), "obj")
    await client.close()
    for result in scored.results:
        assert isinstance(result, common_pb2.ModelError)
        assert result.reason == "INTERNAL"
        assert "1 values for 2 rows" in result.message


async def test_a_missing_output_tensor_is_internal(fake: FakeOip) -> None:
    client = client_for(fake, output="predict_proba")
    [result] = (await client.score(tasks({"a": 1, "b": 2}), "obj")).results
    await client.close()
    assert isinstance(result, common_pb2.ModelError)
    assert result.reason == "INTERNAL"
    assert "no output tensor 'predict_proba'" in result.message


async def test_an_unreachable_server_is_unavailable() -> None:
    client = OipClient(
        "127.0.0.1:1",
        OipArgs.model_validate(args()),
        ChannelOptions(100, 1000, 1024 * 1024, max_timeout_s=0.5),
    )
    [result] = (await client.score(tasks({"a": 1, "b": 2}), "obj")).results
    await client.close()
    assert isinstance(result, common_pb2.ModelError)
    assert result.reason in ("UNAVAILABLE", "DEADLINE_EXCEEDED")


# ----------------------------------------------------------------------------- readiness


async def test_ready_once_model_ready_says_so_and_the_metadata_fits(fake: FakeOip) -> None:
    client = client_for(fake)
    fake.ready = False
    assert not await client.wait_ready(0.3, 0.05)
    fake.ready = True
    assert await client.wait_ready(2.0, 0.05)
    assert client.metadata is not None
    assert [t.name for t in client.metadata.inputs] == [INPUT]
    await client.close()


async def test_configured_tensors_the_model_lacks_are_refused_at_once(
    fake: FakeOip, caplog: pytest.LogCaptureFixture
) -> None:
    client = client_for(fake, input_name="features", output="proba")
    assert not await client.wait_ready(30.0, 0.05)  # at once, not after 30 s
    await client.close()
    message = caplog.records[-1].getMessage()
    assert "input tensor 'features' is not among the model's ['input-0']" in message
    assert "output tensor 'proba' is not among the model's ['predict']" in message


async def test_a_model_that_declares_no_tensors_is_taken_at_its_word(fake: FakeOip) -> None:
    fake.declared_inputs, fake.declared_outputs = [], []
    client = client_for(fake, input_name="anything")
    assert await client.wait_ready(2.0, 0.05)
    await client.close()


async def test_a_server_without_the_protocol_is_refused() -> None:
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        fake = FakeOip(weights=WEIGHTS, endpoint=f"127.0.0.1:{port}")
        client = client_for(fake)
        assert not await client.wait_ready(30.0, 0.05)
        await client.close()
    finally:
        await server.stop(0)


# ----------------------------------------------------------------------------- in a runner host


async def test_a_runner_host_scores_through_model_infer(
    bus: MemoryBus, objective: str, fake: FakeOip, start_runner: StartRunner
) -> None:
    host = await start_runner(fake.endpoint, kind="oip", args=args(), role="challenger")
    return_address, predictions = await listen(bus)
    burst = [
        make_task(objective, return_address, features={"a": float(i), "b": 1.0}) for i in range(6)
    ]
    expired = make_task(objective, return_address, features={"a": 1.0, "b": 1.0}, deadline_in_s=-1)

    await publish_tasks(bus, objective, *burst, expired)
    events = [e.message for e in await receive(predictions, len(burst))]

    by_request = {e.request_id: e for e in events}
    for i, task in enumerate(burst):
        event = by_request[task.task.request.request_id]
        assert event.WhichOneof("result") == "prediction"
        assert event.prediction.score == expected(float(i), 1.0)
        assert event.model == host.settings.model
        assert event.model_version == "7"
    # Fewer calls than tasks: bursts became tensors; the expired task was never sent.
    rows = sum(r.inputs[0].shape[0] for r in fake.requests)
    assert rows == len(burst)
    assert metric("rdv_runner_skipped_total", model=host.settings.model, reason="expired") == 1


async def test_a_runner_host_refuses_to_start_on_a_model_that_does_not_fit(
    fake: FakeOip, start_runner: StartRunner
) -> None:
    with pytest.raises(RuntimeError, match="is not ready or does not fit"):
        await start_runner(
            fake.endpoint, kind="oip", args=args(output="nope"), model_start_timeout_s=5.0
        )


def test_runner_settings_check_oip_args() -> None:
    from services.runner.settings import RunnerSettings

    with pytest.raises(ValueError, match="output"):
        RunnerSettings(
            objective="o", model="m", role="challenger", endpoint="h:1", kind="oip", args={}
        )


# ----------------------------------------------------------------------------- configuration


def oip_deployment(**fields: Any) -> objective_pb2.ModelDeployment:
    deployment = objective_pb2.ModelDeployment(
        name="oip-ridge", role=common_pb2.MODEL_ROLE_CHALLENGER, kind="oip", enabled=True
    )
    deployment.endpoint = fields.pop("endpoint", "127.0.0.1:8081")
    deployment.args.update(fields.pop("args", args()))
    return deployment


def test_a_valid_oip_deployment_validates() -> None:
    good = config()
    good.models.append(oip_deployment())
    assert validate(good) == []


def test_oip_deployment_problems_are_field_violations() -> None:
    bad = config()
    bad.models.append(
        oip_deployment(endpoint="", args={"inputs": ["a", "a"], "datatype": "INT8", "x": 1})
    )
    index = len(bad.models) - 1
    problems = dict(validate(bad))
    where = f"config.models[{index}]"
    assert set(problems) == {
        f"{where}.endpoint",
        f"{where}.args.model_name",
        f"{where}.args.inputs",
        f"{where}.args.datatype",
        f"{where}.args.output",
        f"{where}.args.x",
    }
    assert "['a'] listed twice" in problems[f"{where}.args.inputs"]
    assert problems[f"{where}.args.output"] == "is required"


def test_the_mesh_file_refuses_an_oip_model_without_its_endpoint() -> None:
    with pytest.raises(ValueError, match=r"endpoint.*required"):
        ModelEntry(name="oip-ridge", role="challenger", kind="oip", args=args())
    entry = ModelEntry(name="oip-ridge", role="challenger", kind="oip", args=args(), endpoint="h:1")
    assert entry.args["model_name"] == MODEL


async def test_a_changed_mapping_replaces_the_runner(
    bus: MemoryBus, fake: FakeOip, start_runner: StartRunner
) -> None:
    host = await start_runner(fake.endpoint, kind="oip", args=args())
    [runner] = host.runners
    assert not serves_differently(runner, oip_deployment(endpoint=fake.endpoint))
    assert serves_differently(runner, oip_deployment(args=args(datatype="FP32")))
    plain = oip_deployment()
    plain.kind = "diabetes"
    assert serves_differently(runner, plain)
