"""The rendezvous service: `ScoringService.Score` on TCP, `DeliveryService` on a unix socket.

For each Score call: validate, open a mailbox, stamp the task with this
instance's return address, the mailbox id and the deadline, publish it to the
objective's request topic, or, for an objective without enrichment, straight to its
tasks topic as an enriched task with no subject state (bounded by the remaining
budget, off the race's critical path), then wait for the mailbox's verdict. The collector sidecar
streams predictions in over the unix socket; each one is offered to its mailbox.
After the answer, the mailbox stays open for the objective's late-grace window,
then its outcome (the answer and every candidate) goes to the results topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
from opentelemetry import trace
from rendezvous.v1 import (
    common_pb2,
    delivery_pb2,
    delivery_pb2_grpc,
    objective_pb2,
    scoring_pb2,
    scoring_pb2_grpc,
    task_pb2,
)

from services.core.bus import Bus, BusError, Publisher, connect
from services.core.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from services.core.mesh import load_mesh
from services.core.protos import duration_from_seconds, duration_ms, timestamp_from_ns
from services.core.server import GrpcServer, run, write_ready_file
from services.core.telemetry import counter, histogram, inject, tracer
from services.rendezvous.mailbox import Mailbox, MailboxRegistry
from services.rendezvous.policy import Policy, Reason, Verdict
from services.rendezvous.settings import RendezvousSettings
from services.rendezvous.validation import validate

log = logging.getLogger(__name__)
_tracer = tracer(__name__)

ANSWERS = counter("rdv_answers", "Score answers by source", ("objective", "source", "model"))
ANSWER_LATENCY = histogram("rdv_answer_latency_seconds", "Score time to answer", ("objective",))
DELIVERIES = counter("rdv_deliveries", "Predictions delivered by the collector", ("status",))
SHED = counter("rdv_shed", "Score calls shed for overload", ("objective",))
DISPATCH_FAILURES = counter("rdv_dispatch_failures", "Tasks not published in time", ("objective",))
OUTCOMES = counter("rdv_outcomes", "Outcomes published to the results topic", ("result",))

_REASONS = {
    Reason.ACCEPTED: scoring_pb2.DECISION_REASON_ACCEPTED,
    Reason.SLA_DEFAULT: scoring_pb2.DECISION_REASON_SLA_DEFAULT,
    Reason.SLA_CANARY: scoring_pb2.DECISION_REASON_SLA_CANARY,
    Reason.CLIENT_DEADLINE: scoring_pb2.DECISION_REASON_CLIENT_DEADLINE,
}
_DISPATCH_FAILED = "dispatch failed: default"


class _Objective:
    """An objective's configuration, compiled once for the request path."""

    def __init__(self, config: objective_pb2.ObjectiveConfig) -> None:
        self.config = config
        self.policy = Policy.from_config(config)
        self.late_grace_s = duration_ms(config.late_grace) / 1000
        self.roles = {model.name: model.role for model in config.models}
        # ENRICHMENT_UNSPECIFIED keeps the enricher on the path: the safe reading.
        self.enriched = config.enrichment != objective_pb2.ENRICHMENT_NONE


class Rendezvous:
    """The rendezvous component: both gRPC services, the mailboxes, the publishers."""

    def __init__(
        self,
        settings: RendezvousSettings,
        objectives: Mapping[str, objective_pb2.ObjectiveConfig],
        bus: Bus | None = None,
    ) -> None:
        self.settings = settings
        self.bus = bus or connect(settings.pulsar, f"rendezvous-{settings.instance}")
        self.objectives = {name: _Objective(cfg) for name, cfg in objectives.items()}
        self.return_address = self.bus.topics.predictions(settings.instance)
        self.registry = MailboxRegistry()
        # Per objective: the request topic (enriched objectives) or the tasks topic.
        self._request_publishers: dict[str, Publisher[task_pb2.ScoringTask]] = {}
        self._task_publishers: dict[str, Publisher[task_pb2.EnrichedTask]] = {}
        self._outcome_publishers: dict[str, Publisher[task_pb2.Outcome]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        # Insertion-ordered: the first entry is the oldest answered mailbox.
        self._closers: dict[str, asyncio.TimerHandle] = {}
        self._awaiting = 0
        self.server = GrpcServer(
            service_names=[
                scoring_pb2.DESCRIPTOR.services_by_name["ScoringService"].full_name,
                delivery_pb2.DESCRIPTOR.services_by_name["DeliveryService"].full_name,
            ],
            registrars=[
                lambda s: scoring_pb2_grpc.add_ScoringServiceServicer_to_server(
                    _ScoringServicer(self), s
                ),
                lambda s: delivery_pb2_grpc.add_DeliveryServiceServicer_to_server(
                    _DeliveryServicer(self), s
                ),
            ],
            tcp_address=settings.listen,
            uds_path=settings.delivery_socket,
            max_message_bytes=settings.max_message_bytes,
        )
        self._draining = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        for name, objective in self.objectives.items():
            if objective.enriched:
                self._request_publishers[name] = await self.bus.publisher(
                    self.bus.topics.requests(name),
                    task_pb2.ScoringTask,
                )
            else:
                self._task_publishers[name] = await self.bus.publisher(
                    self.bus.topics.tasks(name),
                    task_pb2.EnrichedTask,
                )
            self._outcome_publishers[name] = await self.bus.publisher(
                self.bus.topics.results(name),
                task_pb2.Outcome,
            )
        await self.server.start()
        await self.server.set_serving(True)
        write_ready_file(
            self.settings.ready_file,
            endpoint=self.server.endpoint,
            delivery_socket=str(self.settings.delivery_socket),
            return_address=self.return_address,
        )
        log.info(
            "rendezvous serving",
            extra={
                "endpoint": self.server.endpoint,
                "return_address": self.return_address,
                "objectives": ",".join(self.objectives),
            },
        )

    async def stop(self) -> None:
        self._draining = True
        # Answer in-flight calls first (their SLA bounds the wait), then flush outcomes.
        await self.server.stop(self.settings.shutdown_grace_s)
        for mailbox_id in list(self._closers):
            self._closers.pop(mailbox_id).cancel()
            self._close_mailbox(mailbox_id)
        if self._background:
            await asyncio.wait(self._background, timeout=self.settings.shutdown_grace_s)
        await self.bus.close()

    # ------------------------------------------------------------------ Score

    async def score(
        self, request: scoring_pb2.ScoreRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> scoring_pb2.ScoreResponse:
        started_ns = time.monotonic_ns()
        if self._draining:
            raise Unavailable("the service is draining")
        if not request.objective:
            raise InvalidArgument([("objective", "required")])
        objective = self.objectives.get(request.objective)
        if objective is None:
            raise NotFound(f"unknown objective {request.objective!r}")
        validate(request, objective.config, self.settings)
        if self._awaiting >= self.settings.max_in_flight:
            SHED.labels(request.objective).inc()
            raise ResourceExhausted("too many requests in flight; retry later")

        sla_ms = objective.policy.sla_ms
        client_deadline = False
        remaining = context.time_remaining()
        if remaining is not None:
            client_ms = remaining * 1000 - self.settings.client_deadline_margin_ms
            if client_ms < sla_ms:
                sla_ms, client_deadline = max(client_ms, 0.0), True

        with _tracer.start_as_current_span("rendezvous.score", kind=trace.SpanKind.SERVER) as span:
            span.set_attribute("rdv.objective", request.objective)
            task = self._task(request, objective, sla_ms)
            span.set_attribute("rdv.request_id", task.request.request_id)
            mailbox = Mailbox(
                mailbox_id=task.mailbox_id,
                request_id=task.request.request_id,
                objective=request.objective,
                policy=objective.policy,
                sla_ms=sla_ms,
                client_deadline=client_deadline,
                started_ns=started_ns,
                answer=asyncio.get_running_loop().create_future(),
                received_ns=task.received_time.ToNanoseconds(),
            )
            self.registry.add(mailbox)
            mailbox.start()
            self._spawn(self._dispatch(task, mailbox, sla_ms))
            self._awaiting += 1
            try:
                verdict = await mailbox.answer
            finally:
                self._awaiting -= 1
                self._schedule_close(mailbox, objective.late_grace_s)
            response = self._response(task.request.request_id, objective, mailbox, verdict)
            mailbox.response = response
            span.set_attribute("rdv.answered_by", response.decision.model or "default")
        ANSWERS.labels(
            request.objective,
            scoring_pb2.AnswerSource.Name(response.decision.source),
            response.decision.model or "default",
        ).inc()
        ANSWER_LATENCY.labels(request.objective).observe(duration_ms(response.elapsed) / 1000)
        return response

    def _task(
        self, request: scoring_pb2.ScoreRequest, objective: _Objective, sla_ms: float
    ) -> task_pb2.ScoringTask:
        now_ns = time.time_ns()
        task = task_pb2.ScoringTask(
            request=request,
            return_address=self.return_address,
            mailbox_id=uuid.uuid4().hex,
            received_time=timestamp_from_ns(now_ns),
            deadline=timestamp_from_ns(now_ns + int(sla_ms * 1e6)),
            objective_version=objective.config.version,
        )
        if not request.request_id:
            task.request.request_id = uuid.uuid4().hex
        # Consumers only look for DENIED: resolve "unspecified" to the objective's default here.
        consent = task.request.consent
        defaults = objective.config.default_consent
        if consent.experimentation == common_pb2.CONSENT_DECISION_UNSPECIFIED:
            consent.experimentation = defaults.experimentation
        if consent.archiving == common_pb2.CONSENT_DECISION_UNSPECIFIED:
            consent.archiving = defaults.archiving
        task.trace_context.update(inject())
        return task

    async def _dispatch(self, task: task_pb2.ScoringTask, mailbox: Mailbox, sla_ms: float) -> None:
        budget_s = max(sla_ms - mailbox.elapsed_ms(), 0.0) / 1000
        key = task.request.request_id
        try:
            publisher = self._task_publishers.get(mailbox.objective)
            if publisher is not None:
                await publisher.publish(task_pb2.EnrichedTask(task=task), key=key, timeout=budget_s)
            else:
                await self._request_publishers[mailbox.objective].publish(
                    task, key=key, timeout=budget_s
                )
            mailbox.dispatched = True
        except BusError:
            # The broker did not take the task in time: no prediction can come, so the
            # designed answer is the default, now rather than at the SLA.
            DISPATCH_FAILURES.labels(mailbox.objective).inc()
            mailbox.give_up(Verdict(None, Reason.SLA_DEFAULT, -1, _DISPATCH_FAILED))

    def _response(
        self,
        request_id: str,
        objective: _Objective,
        mailbox: Mailbox,
        verdict: Verdict,
    ) -> scoring_pb2.ScoreResponse:
        response = scoring_pb2.ScoreResponse(
            request_id=request_id,
            objective_version=objective.config.version,
        )
        decision = response.decision
        decision.rule_index = verdict.rule_index
        decision.rule = verdict.rule
        decision.reason = _REASONS[verdict.reason]
        if verdict.model is None and not mailbox.dispatched:
            decision.reason = scoring_pb2.DECISION_REASON_DISPATCH_FAILED
            decision.rule = _DISPATCH_FAILED
        if verdict.model is not None:
            event = mailbox.arrivals[verdict.model].event
            response.score = event.prediction.score
            response.outputs.MergeFrom(event.prediction.outputs)
            decision.source = scoring_pb2.ANSWER_SOURCE_MODEL
            decision.model = event.model
            decision.model_version = event.model_version
            decision.role = event.role or objective.roles.get(
                event.model, common_pb2.MODEL_ROLE_UNSPECIFIED
            )
        else:
            default = objective.config.default_answer
            response.score = default.score
            response.outputs.MergeFrom(default.outputs)
            decision.source = scoring_pb2.ANSWER_SOURCE_DEFAULT
        response.elapsed.CopyFrom(duration_from_seconds(mailbox.elapsed_ms() / 1000))
        return response

    # ------------------------------------------------------------------ mailboxes and outcomes

    def _schedule_close(self, mailbox: Mailbox, grace_s: float) -> None:
        while len(self._closers) >= self.settings.max_grace_mailboxes:
            oldest = next(iter(self._closers))
            self._closers.pop(oldest).cancel()
            self._close_mailbox(oldest)
        loop = asyncio.get_running_loop()
        self._closers[mailbox.mailbox_id] = loop.call_later(
            grace_s, self._close_mailbox, mailbox.mailbox_id
        )

    def _close_mailbox(self, mailbox_id: str) -> None:
        self._closers.pop(mailbox_id, None)
        mailbox = self.registry.remove(mailbox_id)
        if mailbox is None:
            return
        mailbox.close()
        self._spawn(self._publish_outcome(mailbox))

    async def _publish_outcome(self, mailbox: Mailbox) -> None:
        outcome = task_pb2.Outcome(
            request_id=mailbox.request_id,
            objective=mailbox.objective,
            rendezvous_instance=self.settings.instance,
            duplicates=mailbox.duplicates,
            sla=duration_from_seconds(mailbox.sla_ms / 1000),
            received_time=timestamp_from_ns(mailbox.received_ns),
        )
        answered_by = None
        if mailbox.response is not None:
            outcome.response.CopyFrom(mailbox.response)
            answered_by = mailbox.response.decision.model or None
        outcome.candidates.extend(mailbox.candidates(answered_by))
        try:
            await self._outcome_publishers[mailbox.objective].publish(
                outcome,
                key=mailbox.request_id,
                timeout=self.settings.outcome_publish_timeout_s,
            )
            OUTCOMES.labels("published").inc()
        except BusError:
            OUTCOMES.labels("failed").inc()
            log.warning("outcome not published", extra={"request_id": mailbox.request_id})

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[Any] = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ delivery

    def deliver(self, event: task_pb2.PredictionEvent) -> delivery_pb2.DeliveryStatus.ValueType:
        status = self.registry.offer(event)
        DELIVERIES.labels(delivery_pb2.DeliveryStatus.Name(status)).inc()
        return status


class _ScoringServicer(scoring_pb2_grpc.ScoringServiceServicer):
    def __init__(self, rendezvous: Rendezvous) -> None:
        self._rendezvous = rendezvous

    async def Score(
        self, request: scoring_pb2.ScoreRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> scoring_pb2.ScoreResponse:
        return await self._rendezvous.score(request, context)


class _DeliveryServicer(delivery_pb2_grpc.DeliveryServiceServicer):
    def __init__(self, rendezvous: Rendezvous) -> None:
        self._rendezvous = rendezvous

    async def Deliver(
        self,
        request_iterator: AsyncIterator[delivery_pb2.DeliverRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[delivery_pb2.DeliverResponse]:
        deliver = self._rendezvous.deliver
        async for request in request_iterator:
            if request.predictions:
                yield delivery_pb2.DeliverResponse(
                    delivery_id=request.delivery_id,
                    statuses=[deliver(event) for event in request.predictions],
                )
            else:
                status = deliver(request.prediction)
                yield delivery_pb2.DeliverResponse(delivery_id=request.delivery_id, status=status)


def main() -> None:
    settings = RendezvousSettings()
    if settings.mesh_file is None:
        raise SystemExit("RDV_RENDEZVOUS_MESH_FILE (or mesh_file in the config file) is required")
    configs = load_mesh(settings.mesh_file).objective_configs()
    with contextlib.suppress(KeyboardInterrupt):
        run("rendezvous", settings, lambda: Rendezvous(settings, configs))
