"""The runner's side of the Open Inference Protocol (KServe V2): a model of kind `oip`.

Behind the same interface as `ModelClient` (`ScoringClient`), for a model served by an OIP
v2 gRPC server (MLServer, KServe, Triton) at the deployment's endpoint:

- `score`: a burst is ONE `ModelInfer` call. Each task's features (named in `args.inputs`,
  in column order; services/core/oip.py) make one row of one tensor of shape
  [tasks, features]; the output tensor `args.output` is split back into rows, and the first
  value of a row is its task's score (the whole row, when it has several values, is in the
  prediction's outputs under the tensor's name). A task whose features cannot make a row
  (missing, not a number) gets its own INVALID_ARGUMENT error and stays out of the call.
  OIP has no per-row errors: when the call fails, its status is every task's `ModelError`
  (`model_error`, as for ModelService); an answer the runner cannot split into the rows it
  sent is an INTERNAL error for each.
- `wait_ready`: `ModelReady` until the server says the model is ready, then
  `ModelMetadata`: the inputs and outputs are logged and kept (`metadata`), and a server
  that declares its tensors but not the configured input or output tensor is refused with
  an error naming what it does have (a server that declares none is taken at its word).
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
import time
from collections.abc import Sequence

import grpc
import numpy as np
from google.protobuf import struct_pb2
from inference.v2 import grpc_predict_v2_pb2 as oip
from inference.v2 import grpc_predict_v2_pb2_grpc as oip_grpc
from rendezvous.v1 import model_pb2, task_pb2

from services.core.oip import OipArgs
from services.runner.admission import call_timeout_s
from services.runner.model_client import (
    ChannelOptions,
    Result,
    Scored,
    internal_error,
    model_error,
)

log = logging.getLogger(__name__)

# Raw contents are little-endian, row-major, without padding (the protocol's rule).
_RAW_DTYPES = {
    "BOOL": "?",
    "INT8": "<i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "UINT8": "<u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
}
# Which InferTensorContents field holds a datatype's typed contents.
_CONTENTS_FIELDS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
_PACK = {"FP64": "d", "FP32": "f"}


class OipClient:
    """A channel to one model on an Open Inference Protocol server."""

    def __init__(self, endpoint: str, args: OipArgs, options: ChannelOptions) -> None:
        self.endpoint = endpoint
        self.args = args
        self._max_timeout_s = options.max_timeout_s
        self._channel = options.open(endpoint)
        self._stub = oip_grpc.GRPCInferenceServiceStub(self._channel)
        # What the server said of the model once it was ready (`wait_ready`).
        self.metadata: oip.ModelMetadataResponse | None = None

    async def close(self) -> None:
        await self._channel.close()

    def _log_extra(self) -> dict[str, str]:
        return {"model_endpoint": self.endpoint, "oip_model": self.args.model_name}

    async def wait_ready(self, timeout_s: float, poll_s: float) -> bool:
        """True once the server says the model is ready and its metadata fits the
        configuration; False after `timeout_s`, or at once when the server does not speak
        the protocol or lacks the configured tensors (logged, with what it has)."""
        args = self.args
        request = oip.ModelReadyRequest(name=args.model_name)
        if args.model_version:
            request.version = args.model_version
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            try:
                reply = await self._stub.ModelReady(request, timeout=max(min(remaining, 1.0), 0.05))
                if reply.ready:
                    return await self._check_metadata(max(deadline - time.monotonic(), 1.0))
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                    log.error(
                        "the oip endpoint does not answer ModelReady: not an Open Inference "
                        "Protocol v2 server",
                        extra=self._log_extra(),
                    )
                    return False
            if time.monotonic() + poll_s >= deadline:
                log.error("the oip model was not ready in time", extra=self._log_extra())
                return False
            await asyncio.sleep(poll_s)

    async def _check_metadata(self, timeout_s: float) -> bool:
        args = self.args
        request = oip.ModelMetadataRequest(name=args.model_name)
        if args.model_version:
            request.version = args.model_version
        try:
            metadata = await self._stub.ModelMetadata(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as err:
            log.error(
                "the oip model's metadata cannot be read",
                extra={**self._log_extra(), "code": err.code().name, "details": err.details()},
            )
            return False
        self.metadata = metadata
        inputs = [_describe(tensor) for tensor in metadata.inputs]
        outputs = [_describe(tensor) for tensor in metadata.outputs]
        problems = metadata_problems(args, metadata)
        extra = {
            **self._log_extra(),
            "platform": metadata.platform,
            "versions": list(metadata.versions),
            "inputs": inputs,
            "outputs": outputs,
        }
        if problems:
            log.error(
                f"the oip model does not fit its configuration: {'; '.join(problems)}", extra=extra
            )
            return False
        log.info("oip model ready", extra=extra)
        return True

    async def score(self, tasks: list[task_pb2.EnrichedTask], objective: str) -> Scored:
        """One result per task, from one ModelInfer call for every task that makes a row."""
        del objective  # the OIP request has no room for it; the model is the objective's
        started = time.perf_counter()
        results: list[Result | None] = [None] * len(tasks)
        rows: list[list[float]] = []
        called: list[int] = []
        for index, enriched in enumerate(tasks):
            row = feature_row(enriched, self.args.inputs)
            if isinstance(row, str):
                results[index] = model_error(grpc.StatusCode.INVALID_ARGUMENT, row)
            else:
                rows.append(row)
                called.append(index)
        if called:
            batch = [tasks[index] for index in called]
            for index, result in zip(called, await self._infer(batch, rows), strict=True):
                results[index] = result
        done = [result for result in results if result is not None]
        return Scored(done, time.perf_counter() - started, [len(called)] if called else [])

    async def _infer(
        self, tasks: list[task_pb2.EnrichedTask], rows: list[list[float]]
    ) -> list[Result]:
        request = infer_request(self.args, tasks, rows)
        # The call lives as long as the longest budget of its tasks.
        timeout = max(call_timeout_s(t.task, self._max_timeout_s) for t in tasks)
        try:
            response = await self._stub.ModelInfer(request, timeout=timeout)
        except grpc.aio.AioRpcError as err:
            return [model_error(err.code(), err.details() or "")] * len(tasks)
        except Exception as exc:
            return [internal_error(exc)] * len(tasks)
        split = split_rows(response, self.args.output, len(tasks))
        if isinstance(split, str):
            # A server that breaks the contract: no task gets another task's answer.
            return [model_error(grpc.StatusCode.INTERNAL, f"runner: {split}")] * len(tasks)
        return [_prediction(self.args.output, row, response.model_version) for row in split]


def feature_row(enriched: task_pb2.EnrichedTask, names: Sequence[str]) -> list[float] | str:
    """The task's row (features first, then subject state), or what is wrong with it."""
    features = enriched.task.request.features
    state = enriched.subject_state
    row: list[float] = []
    for name in names:
        value = features.get(name)
        if value is None:
            value = state.get(name)
        if value is None:
            return f"feature {name!r} is missing"
        kind = value.WhichOneof("kind")
        if kind == "number_value" and math.isfinite(value.number_value):
            row.append(value.number_value)
        elif kind == "bool_value":
            row.append(1.0 if value.bool_value else 0.0)
        else:
            return f"feature {name!r} must be a finite number"
    return row


def infer_request(
    args: OipArgs, tasks: Sequence[task_pb2.EnrichedTask], rows: Sequence[Sequence[float]]
) -> oip.ModelInferRequest:
    """One ModelInferRequest: `rows` as one [len(rows), len(args.inputs)] tensor."""
    first = tasks[0].task.request.request_id
    request = oip.ModelInferRequest(
        model_name=args.model_name,
        id=first if len(tasks) == 1 else f"{first}+{len(tasks) - 1}",
        outputs=[oip.ModelInferRequest.InferRequestedOutputTensor(name=args.output)],
    )
    if args.model_version:
        request.model_version = args.model_version
    tensor = request.inputs.add(
        name=args.input_name, datatype=args.datatype, shape=[len(rows), len(args.inputs)]
    )
    flat = [value for row in rows for value in row]
    if args.raw:
        request.raw_input_contents.append(struct.pack(f"<{len(flat)}{_PACK[args.datatype]}", *flat))
    elif args.datatype == "FP64":
        tensor.contents.fp64_contents.extend(flat)
    else:
        tensor.contents.fp32_contents.extend(flat)
    return request


def split_rows(
    response: oip.ModelInferResponse, output: str, batch: int
) -> list[list[float]] | str:
    """The output tensor's values, one list per row, or why they cannot be had."""
    names = [tensor.name for tensor in response.outputs]
    if output not in names:
        return f"no output tensor {output!r} in the response (it has {names})"
    index = names.index(output)
    tensor = response.outputs[index]
    values = _values(tensor, response.raw_output_contents, index)
    if isinstance(values, str):
        return values
    if not values or len(values) % batch:
        return f"output {output!r} has {len(values)} values for {batch} rows"
    width = len(values) // batch
    return [values[row * width : (row + 1) * width] for row in range(batch)]


def _values(
    tensor: oip.ModelInferResponse.InferOutputTensor, raw: Sequence[bytes], index: int
) -> list[float] | str:
    datatype = tensor.datatype
    if raw:
        if index >= len(raw) or datatype not in _RAW_DTYPES:
            return f"raw output {tensor.name!r} ({datatype}) cannot be read"
        return [float(v) for v in np.frombuffer(raw[index], dtype=_RAW_DTYPES[datatype])]
    field = _CONTENTS_FIELDS.get(datatype)
    if field is None:
        return f"output {tensor.name!r} is {datatype or 'untyped'}, not a number"
    return [float(v) for v in getattr(tensor.contents, field)]


def _prediction(output: str, row: list[float], version: str) -> model_pb2.PredictResponse:
    response = model_pb2.PredictResponse(score=row[0], model_version=version)
    if len(row) > 1:
        response.outputs[output].list_value.values.extend(
            struct_pb2.Value(number_value=value) for value in row
        )
    return response


def metadata_problems(args: OipArgs, metadata: oip.ModelMetadataResponse) -> list[str]:
    """Where the server's declared tensors contradict the configuration (none declared:
    nothing to check)."""
    problems = []
    inputs = [tensor.name for tensor in metadata.inputs]
    outputs = [tensor.name for tensor in metadata.outputs]
    if inputs and args.input_name not in inputs:
        problems.append(f"input tensor {args.input_name!r} is not among the model's {inputs}")
    if outputs and args.output not in outputs:
        problems.append(f"output tensor {args.output!r} is not among the model's {outputs}")
    return problems


def _describe(tensor: oip.ModelMetadataResponse.TensorMetadata) -> str:
    return f"{tensor.name} {tensor.datatype} {list(tensor.shape)}"
