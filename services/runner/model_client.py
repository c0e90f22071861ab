"""The runner's side of `rendezvous.v1.ModelService`: Predict and PredictBatch.

One call scores a batch of tasks: `PredictBatch` for several (each item carries its own
deadline), `Predict` for one, and `Predict` per task, concurrently, for a container that
answers PredictBatch with UNIMPLEMENTED (the method is optional; the answer is remembered).
Whatever goes wrong comes back as a `ModelError` per task, built in one place
(`model_error`): a failing model costs error predictions, never the runner.

`wait_ready` asks the container's standard gRPC health service until it says SERVING: a
runner host that adds a model live puts it in its fan-out (and reports it ready) only then.

`ScoringClient` is what a runner needs of any model client; a deployment of kind `oip` gets
the Open Inference Protocol's (`services/runner/oip_client.py`) behind the same interface.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rendezvous.v1 import common_pb2, model_pb2, model_pb2_grpc, task_pb2

from services.core.channels import aio_channel
from services.core.settings import TlsSettings
from services.runner.admission import call_timeout_s

log = logging.getLogger(__name__)

Result = model_pb2.PredictResponse | common_pb2.ModelError


def model_error(code: grpc.StatusCode, message: str) -> common_pb2.ModelError:
    """The one way a runner describes a model's failure."""
    return common_pb2.ModelError(grpc_code=code.value[0], reason=code.name, message=message)


@dataclass(frozen=True, slots=True)
class Scored:
    """The results of one model call, one per task in order, and what the call cost."""

    results: list[Result]
    elapsed_s: float
    # Tasks per call made: [n] for one PredictBatch, [1] * n for Predict per task.
    calls: list[int]


class ScoringClient(Protocol):
    """What a runner needs of a model, whatever protocol it speaks: `ModelClient`
    (rendezvous.v1.ModelService) or `OipClient` (the Open Inference Protocol, kind `oip`)."""

    endpoint: str

    async def wait_ready(self, timeout_s: float, poll_s: float) -> bool: ...

    async def score(self, tasks: list[task_pb2.EnrichedTask], objective: str) -> Scored: ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ChannelOptions:
    """How a runner talks to a model, whatever the protocol: reconnect fast after a restart
    (gRPC's defaults wait up to 120 s), messages up to `max_message_bytes`, and no call
    longer than `max_timeout_s` (the ceiling for a task without a deadline)."""

    initial_reconnect_backoff_ms: int
    max_reconnect_backoff_ms: int
    max_message_bytes: int
    max_timeout_s: float
    # The container's TLS, when it serves TLS (the runner's RDV_RUNNER_TLS__*).
    tls: TlsSettings | None = None

    def open(self, endpoint: str) -> grpc.aio.Channel:
        return aio_channel(
            endpoint,
            self.tls,
            options=[
                ("grpc.initial_reconnect_backoff_ms", self.initial_reconnect_backoff_ms),
                ("grpc.max_reconnect_backoff_ms", self.max_reconnect_backoff_ms),
                ("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.max_send_message_length", self.max_message_bytes),
            ],
        )


class ModelClient:
    """A channel to one model container, reconnecting fast after a restart."""

    def __init__(self, endpoint: str, options: ChannelOptions) -> None:
        self.endpoint = endpoint
        self._max_timeout_s = options.max_timeout_s
        self._channel = options.open(endpoint)
        self._stub = model_pb2_grpc.ModelServiceStub(self._channel)
        # Until the model answers PredictBatch with UNIMPLEMENTED.
        self._batch_capable = True

    async def close(self) -> None:
        await self._channel.close()

    async def wait_ready(self, timeout_s: float, poll_s: float) -> bool:
        """True once the container's health service answers SERVING, False after `timeout_s`.

        A container without the health service (UNIMPLEMENTED) answered all the same: it
        listens, and it is taken as ready."""
        health = health_pb2_grpc.HealthStub(self._channel)
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            try:
                reply = await health.Check(
                    health_pb2.HealthCheckRequest(), timeout=max(min(remaining, 1.0), 0.05)
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                    return True
            if time.monotonic() + poll_s >= deadline:
                return False
            await asyncio.sleep(poll_s)

    async def score(self, tasks: list[task_pb2.EnrichedTask], objective: str) -> Scored:
        """One result per task: one PredictBatch call when there are several and the model
        has it, else one Predict call per task, concurrently."""
        started = time.perf_counter()
        if len(tasks) > 1 and self._batch_capable:
            results = await self._predict_batch(tasks, objective)
            if results is not None:
                return Scored(results, time.perf_counter() - started, [len(tasks)])
        results = list(await asyncio.gather(*(self._predict(t, objective) for t in tasks)))
        return Scored(results, time.perf_counter() - started, [1] * len(tasks))

    def _timeout_s(self, task: task_pb2.ScoringTask) -> float:
        return call_timeout_s(task, self._max_timeout_s)

    async def _predict(self, enriched: task_pb2.EnrichedTask, objective: str) -> Result:
        try:
            response: model_pb2.PredictResponse = await self._stub.Predict(
                predict_request(enriched, objective),
                timeout=self._timeout_s(enriched.task),
            )
        except grpc.aio.AioRpcError as err:
            return model_error(err.code(), err.details() or "")
        except Exception as exc:
            return internal_error(exc)
        return response

    async def _predict_batch(
        self, tasks: list[task_pb2.EnrichedTask], objective: str
    ) -> list[Result] | None:
        """The results, or None when the model has no PredictBatch (remembered)."""
        batch = model_pb2.PredictBatchRequest(
            requests=[predict_request(t, objective) for t in tasks]
        )
        # The call lives as long as the longest budget; each item carries its own deadline.
        timeout = max(self._timeout_s(t.task) for t in tasks)
        try:
            response = await self._stub.PredictBatch(batch, timeout=timeout)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                self._batch_capable = False
                log.info(
                    "the model has no PredictBatch: one Predict call per task from now",
                    extra={"model_endpoint": self.endpoint},
                )
                return None
            return [model_error(err.code(), err.details() or "")] * len(tasks)
        except Exception as exc:
            return [internal_error(exc)] * len(tasks)
        results: list[Result] = [
            item.response if item.WhichOneof("result") == "response" else item.error
            for item in response.results
        ]
        if len(results) != len(tasks):
            # A model that breaks the contract: no task gets another task's answer.
            wrong = model_error(
                grpc.StatusCode.INTERNAL,
                f"runner: {len(results)} results for {len(tasks)} requests",
            )
            return [wrong] * len(tasks)
        return results


def predict_request(enriched: task_pb2.EnrichedTask, objective: str) -> model_pb2.PredictRequest:
    """What the model sees of a task: features, payload, subject state and deadline."""
    task = enriched.task
    request = model_pb2.PredictRequest(
        request_id=task.request.request_id,
        objective=objective,
        features=task.request.features,
        subject_state=enriched.subject_state,
    )
    if task.request.HasField("payload"):
        request.payload.CopyFrom(task.request.payload)
    if task.HasField("deadline"):
        request.deadline.CopyFrom(task.deadline)
    return request


def internal_error(exc: Exception) -> common_pb2.ModelError:
    # Not a status from the model (e.g. the channel is closing): still an answer.
    return model_error(grpc.StatusCode.INTERNAL, f"runner: {type(exc).__name__}")
