"""A fake Open Inference Protocol (KServe V2) server on a real loopback gRPC socket.

It serves one model, `linear`, whose prediction for a row is the dot product of the row and
`weights` (plus `bias`), on input tensor `input-0` (FP64 or FP32, typed or raw) and output
tensor `predict` (FP64, typed or raw as `raw_output` says). Every ModelInfer request is kept
(`requests`); `fail_with` makes ModelInfer answer that status; `rows_short` drops the last
row of the answer (a server breaking the contract); `ready` is what ModelReady says.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import grpc
from inference.v2 import grpc_predict_v2_pb2 as oip
from inference.v2 import grpc_predict_v2_pb2_grpc as oip_grpc

MODEL = "linear"
INPUT = "input-0"
OUTPUT = "predict"
_UNPACK = {"FP64": "d", "FP32": "f"}
Context = grpc.aio.ServicerContext[Any, Any]


@dataclass
class FakeOip(oip_grpc.GRPCInferenceServiceServicer):
    """The servicer; its fields steer what it answers."""

    weights: list[float]
    bias: float = 0.0
    ready: bool = True
    version: str = "7"
    declared_inputs: list[str] = field(default_factory=lambda: [INPUT])
    declared_outputs: list[str] = field(default_factory=lambda: [OUTPUT])
    raw_output: bool = False
    fail_with: grpc.StatusCode | None = None
    rows_short: bool = False
    requests: list[oip.ModelInferRequest] = field(default_factory=list)
    endpoint: str = ""

    async def ServerLive(
        self, request: oip.ServerLiveRequest, context: Context
    ) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    async def ServerMetadata(
        self, request: oip.ServerMetadataRequest, context: Context
    ) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(name="fake-oip", version="1")

    async def ServerReady(
        self, request: oip.ServerReadyRequest, context: Context
    ) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=True)

    async def ModelReady(
        self, request: oip.ModelReadyRequest, context: Context
    ) -> oip.ModelReadyResponse:
        return oip.ModelReadyResponse(ready=self.ready and request.name == MODEL)

    async def ModelMetadata(
        self, request: oip.ModelMetadataRequest, context: Context
    ) -> oip.ModelMetadataResponse:
        if request.name != MODEL:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.name!r}")
        tensor = oip.ModelMetadataResponse.TensorMetadata
        return oip.ModelMetadataResponse(
            name=MODEL,
            versions=[self.version],
            platform="fake",
            inputs=[
                tensor(name=name, datatype="FP64", shape=[-1, len(self.weights)])
                for name in self.declared_inputs
            ],
            outputs=[
                tensor(name=name, datatype="FP64", shape=[-1, 1]) for name in self.declared_outputs
            ],
        )

    async def ModelInfer(
        self, request: oip.ModelInferRequest, context: Context
    ) -> oip.ModelInferResponse:
        self.requests.append(request)
        if self.fail_with is not None:
            await context.abort(self.fail_with, "the fake server was told to fail")
        [tensor] = request.inputs
        rows, width = tensor.shape
        if tensor.name != INPUT or width != len(self.weights):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "unexpected input tensor")
        if request.raw_input_contents:
            code = _UNPACK[tensor.datatype]
            flat = list(struct.unpack(f"<{rows * width}{code}", request.raw_input_contents[0]))
        elif tensor.datatype == "FP64":
            flat = list(tensor.contents.fp64_contents)
        else:
            flat = list(tensor.contents.fp32_contents)
        scores = [
            self.bias
            + sum(
                w * x for w, x in zip(self.weights, flat[r * width : (r + 1) * width], strict=True)
            )
            for r in range(rows)
        ]
        if self.rows_short:
            scores = scores[:-1]
        response = oip.ModelInferResponse(
            model_name=MODEL, model_version=self.version, id=request.id
        )
        out = response.outputs.add(name=OUTPUT, datatype="FP64", shape=[len(scores), 1])
        if self.raw_output:
            response.raw_output_contents.append(struct.pack(f"<{len(scores)}d", *scores))
        else:
            out.contents.fp64_contents.extend(scores)
        return response


async def serve_fake(fake: FakeOip) -> grpc.aio.Server:
    """Start `fake` on a free loopback port (its `endpoint` says which)."""
    server = grpc.aio.server()
    oip_grpc.add_GRPCInferenceServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    fake.endpoint = f"127.0.0.1:{port}"
    return server
