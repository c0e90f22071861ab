"""The code of S4's deployments: one model replica, and the router that races them.

No Ray here: `app` wraps these classes with `serve.deployment`, and Serve hands the router a
DeploymentHandle per model, whose `predict.remote(request)` is awaitable. The unit tests
hand it fakes instead.

The router runs the objective's own policy (`services.rendezvous.policy`: ordered steps,
each accepting a list of models until its deadline; at the SLA the canary's score when the
objective prefers it, else the static default) over the arrivals it sees, as S2's rendezvous
does. Every model scores every request (S2's `challenger_fraction` is 1.0); predictions that
come after the answer are still awaited, up to the objective's late grace, and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Mapping
from pathlib import Path
from typing import Any, Protocol

from rendezvous.v1 import model_pb2, objective_pb2, scoring_pb2

from services.core.mesh import load_mesh
from services.core.protos import (
    duration_from_seconds,
    duration_ms,
    seconds_until,
    timestamp_from_ns,
)
from services.models.app import build_model
from services.models.settings import ModelSettings
from services.rendezvous.policy import Policy, Verdict, decide, next_wakeup

log = logging.getLogger(__name__)
# One model's prediction in flight.
Call = asyncio.Future[model_pb2.PredictResponse]


class PredictMethod(Protocol):
    """`handle.predict` of a DeploymentHandle."""

    def remote(self, request: model_pb2.PredictRequest) -> Awaitable[model_pb2.PredictResponse]:
        """Send one request; the awaitable is the model's answer (or its error)."""
        ...


class ModelHandle(Protocol):
    """What the router needs of a model's DeploymentHandle."""

    @property
    def predict(self) -> PredictMethod: ...


class ModelReplica:
    """One model of the objective, the very class its S2 container serves."""

    def __init__(self, name: str, kind: str, version: str, args: dict[str, Any]) -> None:
        # Built as the container builds it: the same settings, validated the same way.
        settings = {"kind": kind, "name": name, "version": version, "args": args}
        self._model = build_model(ModelSettings.model_validate(settings))
        self._version = version

    async def predict(self, request: model_pb2.PredictRequest) -> model_pb2.PredictResponse:
        # The request's deadline is the race's SLA, as S2's runners pass it on.
        budget = seconds_until(request.deadline) if request.HasField("deadline") else None
        response = await self._model.predict(request, budget)
        if not response.model_version:
            response.model_version = self._version
        return response


def objective_config(mesh_file: Path, objective: str) -> objective_pb2.ObjectiveConfig:
    """The objective as S2's rendezvous compiles it from the same mesh file."""
    return load_mesh(mesh_file).objective_configs()[objective]


class Router:
    """The ingress: fan out, race under the policy, answer; count what happened."""

    def __init__(self, models: Mapping[str, ModelHandle], mesh_file: str, objective: str) -> None:
        self._config = objective_config(Path(mesh_file), objective)
        self._policy = Policy.from_config(self._config)
        self._late_grace_s = duration_ms(self._config.late_grace) / 1000
        self._roles = {m.name: m.role for m in self._config.models}
        self._models = dict(models)
        # What the bench reads over HTTP: answers by source and reason, predictions by model
        # and outcome (ok, error, late: after the answer, or lost: past the late grace).
        self.answers: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()
        self.predictions: Counter[tuple[str, str]] = Counter()
        self._stragglers: set[asyncio.Task[None]] = set()

    async def Score(self, request: scoring_pb2.ScoreRequest) -> scoring_pb2.ScoreResponse:
        """Serve's gRPC ingress calls the deployment's method named after the RPC."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        request_id = request.request_id or uuid.uuid4().hex
        predict = model_pb2.PredictRequest(
            request_id=request_id,
            objective=request.objective,
            deadline=timestamp_from_ns(time.time_ns() + int(self._policy.sla_ms * 1e6)),
        )
        predict.features.MergeFrom(request.features)
        calls: dict[Call, str] = {
            asyncio.ensure_future(handle.predict.remote(predict)): name
            for name, handle in self._models.items()
        }
        pending = set(calls)
        arrived: dict[str, float] = {}
        predictions: dict[str, model_pb2.PredictResponse] = {}
        try:
            while True:
                now_ms = (loop.time() - started) * 1000
                verdict = decide(self._policy, arrived, now_ms)
                if verdict is not None:
                    break
                timeout_s = max(0.0, next_wakeup(self._policy, now_ms) - now_ms) / 1000
                if not pending:
                    await asyncio.sleep(timeout_s)
                    continue
                done, pending = await asyncio.wait(
                    pending, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
                )
                at_ms = (loop.time() - started) * 1000
                for call in done:
                    name = calls[call]
                    response = self._result(name, call)
                    if response is not None:
                        arrived[name] = at_ms
                        predictions[name] = response
        finally:
            # Answered, or the client went away: what is still running is awaited apart.
            if pending:
                straggler = asyncio.create_task(self._await_late({c: calls[c] for c in pending}))
                self._stragglers.add(straggler)
                straggler.add_done_callback(self._stragglers.discard)
        answer = self._answer(request_id, verdict, predictions, loop.time() - started)
        self.answers[scoring_pb2.AnswerSource.Name(answer.decision.source)] += 1
        self.reasons[scoring_pb2.DecisionReason.Name(answer.decision.reason)] += 1
        return answer

    async def __call__(self, http_request: Any) -> dict[str, Any]:
        """Serve's HTTP ingress: the counters, for the bench (any path, any method)."""
        return self.stats()

    def stats(self) -> dict[str, Any]:
        return {
            "answers": dict(self.answers),
            "reasons": dict(self.reasons),
            "predictions": {f"{m}/{o}": n for (m, o), n in sorted(self.predictions.items())},
        }

    def _result(
        self, name: str, call: Call, late: bool = False
    ) -> model_pb2.PredictResponse | None:
        """The prediction of a finished call, counted; None for an error, which never
        counts as an arrival (as in S2)."""
        if call.cancelled():
            self.predictions[name, "error"] += 1
            return None
        try:
            response = call.result()
        except Exception as exc:
            self.predictions[name, "error"] += 1
            log.debug("prediction failed", extra={"model": name, "error": type(exc).__name__})
            return None
        self.predictions[name, "late" if late else "ok"] += 1
        return response

    async def _await_late(self, calls: dict[Call, str]) -> None:
        """Predictions still running at the answer: awaited up to the late grace (S2's
        collector waits as long for them), then given up."""
        done, pending = await asyncio.wait(calls, timeout=self._late_grace_s)
        for call in done:
            self._result(calls[call], call, late=True)
        for call in pending:
            self.predictions[calls[call], "lost"] += 1
            call.cancel()
            with contextlib.suppress(BaseException):
                await call

    def _answer(
        self,
        request_id: str,
        verdict: Verdict,
        predictions: Mapping[str, model_pb2.PredictResponse],
        elapsed_s: float,
    ) -> scoring_pb2.ScoreResponse:
        """The response S2 would give for this verdict: the winner's prediction, or the
        default; who answered, by which rule, why."""
        response = scoring_pb2.ScoreResponse(
            request_id=request_id,
            objective_version=self._config.version,
            elapsed=duration_from_seconds(elapsed_s),
        )
        decision = response.decision
        decision.rule_index = verdict.rule_index
        decision.rule = verdict.rule
        decision.reason = scoring_pb2.DecisionReason.ValueType(verdict.reason)
        if verdict.model is None:
            response.score = self._config.default_answer.score
            response.outputs.MergeFrom(self._config.default_answer.outputs)
            decision.source = scoring_pb2.ANSWER_SOURCE_DEFAULT
            return response
        prediction = predictions[verdict.model]
        response.score = prediction.score
        response.outputs.MergeFrom(prediction.outputs)
        decision.source = scoring_pb2.ANSWER_SOURCE_MODEL
        decision.model = verdict.model
        decision.model_version = prediction.model_version
        decision.role = self._roles[verdict.model]
        return response
