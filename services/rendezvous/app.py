"""The rendezvous service: `ScoringService.Score` on TCP, `DeliveryService` on a unix socket.

For each Score call: validate, open a mailbox, stamp the task with this instance's return
address, the mailbox id and the deadline, publish it to the objective's request topic (or,
for an objective without enrichment, straight to its tasks topic as an enriched task with no
subject state; bounded by the remaining budget, off the race's critical path), then wait for
the mailbox's verdict. The collector sidecar streams predictions in over the unix socket;
each one is offered to its mailbox. After the answer, the mailbox stays open for the
objective's late-grace window, then its outcome (the answer and every candidate) goes to the
results topic.

The race's clock starts when the request reached the process, not when its handler ran:
the event loop's measured lag (`services.core.loop_lag`) is taken off the budget, and a
request the loop could not leave `min_race_budget_ms` is shed with RESOURCE_EXHAUSTED
rather than answered late. Health is SERVING only while a collector stream is open and
after the warm-up (`services.rendezvous.warmup`).
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

from services.core.bus import Bus, BusError, Publisher
from services.core.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from services.core.lifecycle import Component, cancel_and_wait, run
from services.core.loop_lag import LoopLag
from services.core.mesh import load_mesh
from services.core.protos import duration_from_seconds, duration_ms, timestamp_from_ns
from services.core.server import write_ready_file
from services.core.telemetry import counter, histogram, inject, tracer
from services.rendezvous.answer import answer
from services.rendezvous.mailbox import DISPATCH_FAILED_RULE, Mailbox, MailboxRegistry
from services.rendezvous.policy import Policy, Reason, Verdict
from services.rendezvous.settings import RendezvousSettings
from services.rendezvous.validation import validate
from services.rendezvous.warmup import Warmup

log = logging.getLogger(__name__)
_tracer = tracer(__name__)

ANSWERS = counter("rdv_answers", "Score answers by source", ("objective", "source", "model"))
ANSWER_LATENCY = histogram("rdv_answer_latency_seconds", "Score time to answer", ("objective",))
DELIVERIES = counter("rdv_deliveries", "Predictions delivered by the collector", ("status",))
SHED = counter("rdv_shed", "Score calls shed for overload", ("objective", "why"))
DISPATCH_FAILURES = counter("rdv_dispatch_failures", "Tasks not published in time", ("objective",))
OUTCOMES = counter("rdv_outcomes", "Outcomes published to the results topic", ("result",))

_SERVICES = (
    scoring_pb2.DESCRIPTOR.services_by_name["ScoringService"].full_name,
    delivery_pb2.DESCRIPTOR.services_by_name["DeliveryService"].full_name,
)


class _Objective:
    """An objective's configuration, compiled once for the request path."""

    def __init__(self, config: objective_pb2.ObjectiveConfig) -> None:
        self.config = config
        self.policy = Policy.from_config(config)
        self.late_grace_s = duration_ms(config.late_grace) / 1000
        # ENRICHMENT_UNSPECIFIED keeps the enricher on the path: the safe reading.
        self.enriched = config.enrichment != objective_pb2.ENRICHMENT_NONE
        # Labelled children looked up once, by the model that answered ("" for the default).
        model_source = scoring_pb2.AnswerSource.Name(scoring_pb2.ANSWER_SOURCE_MODEL)
        self.answers = {
            m.name: ANSWERS.labels(config.objective, model_source, m.name) for m in config.models
        }
        self.answers[""] = ANSWERS.labels(
            config.objective,
            scoring_pb2.AnswerSource.Name(scoring_pb2.ANSWER_SOURCE_DEFAULT),
            "default",
        )
        self.latency = ANSWER_LATENCY.labels(config.objective)

    def resolve_consent(self, consent: common_pb2.Consent) -> None:
        """Consumers only look for DENIED: "unspecified" becomes the objective's default here,
        the one place consent defaults are resolved."""
        defaults = self.config.default_consent
        if consent.experimentation == common_pb2.CONSENT_DECISION_UNSPECIFIED:
            consent.experimentation = defaults.experimentation
        if consent.archiving == common_pb2.CONSENT_DECISION_UNSPECIFIED:
            consent.archiving = defaults.archiving


class Rendezvous(Component):
    """The rendezvous component: both gRPC services, the mailboxes, the publishers."""

    serving_once_started = False

    def __init__(
        self,
        settings: RendezvousSettings,
        objectives: Mapping[str, objective_pb2.ObjectiveConfig],
        bus: Bus | None = None,
    ) -> None:
        super().__init__(
            settings,
            name=f"rendezvous-{settings.instance}",
            bus=bus,
            service_names=_SERVICES,
            registrars=[
                lambda s: scoring_pb2_grpc.add_ScoringServiceServicer_to_server(
                    _ScoringServicer(self), s
                ),
                lambda s: delivery_pb2_grpc.add_DeliveryServiceServicer_to_server(
                    _DeliveryServicer(self), s
                ),
            ],
            uds_path=settings.delivery_socket,
        )
        self.settings: RendezvousSettings = settings
        self.objectives = {name: _Objective(cfg) for name, cfg in objectives.items()}
        self.registry = MailboxRegistry()
        # Per objective: the request topic (enriched objectives) or the tasks topic.
        self._request_publishers: dict[str, Publisher[task_pb2.ScoringTask]] = {}
        self._task_publishers: dict[str, Publisher[task_pb2.EnrichedTask]] = {}
        self._outcome_publishers: dict[str, Publisher[task_pb2.Outcome]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        # Insertion-ordered: the first entry is the oldest answered mailbox.
        self._closers: dict[str, asyncio.TimerHandle] = {}
        self._awaiting = 0
        self._streams = 0
        self._warm = not settings.warmup
        self._lag: LoopLag | None = None
        self._warming: asyncio.Task[None] | None = None
        self.warmup = Warmup(
            settings, [o.config for o in self.objectives.values()], self._warm_race
        )
        if not settings.warmup:
            self.warmup.progress.state = "off"

    @property
    def return_address(self) -> str:
        return self.bus.topics.predictions(self.settings.instance)

    @property
    def serving(self) -> bool:
        """Whether a client can expect model answers: warm, and a collector connected."""
        return self._warm and self._streams > 0 and not self.stopping

    # ------------------------------------------------------------------ lifecycle

    async def open(self, stack: contextlib.AsyncExitStack) -> None:
        bus = self.bus
        for name, objective in self.objectives.items():
            if objective.enriched:
                self._request_publishers[name] = await bus.publisher(
                    bus.topics.requests(name), task_pb2.ScoringTask
                )
            else:
                self._task_publishers[name] = await bus.publisher(
                    bus.topics.tasks(name), task_pb2.EnrichedTask
                )
            self._outcome_publishers[name] = await bus.publisher(
                bus.topics.results(name), task_pb2.Outcome
            )
        lag = self._lag = LoopLag(
            "rendezvous",
            self.settings.loop_lag_probe_interval_s,
            self.settings.loop_lag_backlog_window_s,
        )
        stack.callback(lag.stop)

    def facts(self) -> dict[str, Any]:
        return {
            "delivery_socket": str(self.settings.delivery_socket),
            "return_address": self.return_address,
            "objectives": list(self.objectives),
            "warmup": self.warmup.progress.as_dict(),
        }

    async def drain(self) -> None:
        if self._warming is not None:
            await cancel_and_wait([self._warming])
        # Answer in-flight calls first (their SLA bounds the wait), then flush outcomes.
        await self.server.stop(self.settings.shutdown_grace_s)
        for mailbox_id in list(self._closers):
            self._closers.pop(mailbox_id).cancel()
            self._close_mailbox(mailbox_id)
        if self._background:
            await asyncio.wait(self._background, timeout=self.settings.shutdown_grace_s)

    def _health_changed(self) -> None:
        self._spawn(self.server.set_serving(self.serving))

    def stream_opened(self) -> None:
        self._streams += 1
        if self._streams == 1:
            log.info("collector connected")
            self._health_changed()
            if not self._warm and self._warming is None:
                self._warming = asyncio.create_task(self._warm_up(), name="rendezvous:warmup")

    def stream_closed(self) -> None:
        self._streams -= 1
        if self._streams == 0:
            log.warning("no collector connected: NOT_SERVING until one is")
            self._health_changed()

    async def _warm_up(self) -> None:
        reporter = asyncio.create_task(self._report_warmup())
        try:
            await self.warmup.run()
        finally:
            reporter.cancel()
        self._warm = True
        self._write_ready_file()
        self._health_changed()

    async def _report_warmup(self) -> None:
        """The warm-up's progress in the ready file, which `rendezvous status` shows."""
        while True:
            self._write_ready_file()
            await asyncio.sleep(1.0)

    def _write_ready_file(self) -> None:
        write_ready_file(self.settings.ready_file, endpoint=self.endpoint, **self.facts())

    async def _warm_race(self, request: scoring_pb2.ScoreRequest) -> float | None:
        """One warm-up race: the path's own latency (the first prediction's arrival less the
        model's time, so a slow model does not count against the mesh), or None when nothing
        arrived within the late grace."""
        objective = self.objectives[request.objective]
        first = asyncio.get_running_loop().create_future()
        await self._race(
            request,
            objective,
            objective.policy.sla_ms,
            False,
            time.monotonic_ns(),
            warmup=True,
            first_arrival=first,
        )
        try:
            return await asyncio.wait_for(first, objective.late_grace_s)
        except TimeoutError:
            return None

    # ------------------------------------------------------------------ Score

    async def score(
        self, request: scoring_pb2.ScoreRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> scoring_pb2.ScoreResponse:
        assert self._lag is not None  # Score is served only once started
        behind_ms = self._lag.behind_s() * 1000
        started_ns = time.monotonic_ns() - int(behind_ms * 1e6)
        if self.stopping:
            raise Unavailable("the service is draining")
        if not request.objective:
            raise InvalidArgument([("objective", "required")])
        objective = self.objectives.get(request.objective)
        if objective is None:
            raise NotFound(f"unknown objective {request.objective!r}")
        validate(request, objective.config, self.settings)
        if self._awaiting >= self.settings.max_in_flight:
            SHED.labels(request.objective, "in_flight").inc()
            raise ResourceExhausted("too many requests in flight; retry later")
        sla_ms = objective.policy.sla_ms
        client_deadline = False
        remaining = context.time_remaining()
        if remaining is not None:
            # gRPC measures the deadline from the call's arrival: on our clock, that is the
            # time the loop was behind plus what remains.
            client_ms = behind_ms + remaining * 1000 - self.settings.client_deadline_margin_ms
            if client_ms < sla_ms:
                sla_ms, client_deadline = max(client_ms, 0.0), True
        # Shed only for the loop's own lag: a budget a tight client deadline leaves small is
        # answered as the client asked, by the default at its deadline (CLIENT_DEADLINE).
        if objective.policy.sla_ms - behind_ms < self.settings.min_race_budget_ms:
            SHED.labels(request.objective, "behind").inc()
            raise ResourceExhausted("the service is overloaded; retry later")

        with _tracer.start_as_current_span("rendezvous.score", kind=trace.SpanKind.SERVER) as span:
            span.set_attribute("rdv.objective", request.objective)
            response = await self._race(request, objective, sla_ms, client_deadline, started_ns)
            span.set_attribute("rdv.request_id", response.request_id)
            span.set_attribute("rdv.answered_by", response.decision.model or "default")
        objective.answers[response.decision.model].inc()
        objective.latency.observe(duration_ms(response.elapsed) / 1000)
        return response

    async def _race(
        self,
        request: scoring_pb2.ScoreRequest,
        objective: _Objective,
        sla_ms: float,
        client_deadline: bool,
        started_ns: int,
        *,
        warmup: bool = False,
        first_arrival: asyncio.Future[float] | None = None,
    ) -> scoring_pb2.ScoreResponse:
        """Open a mailbox, dispatch the task, wait for the verdict; the answer."""
        behind_ns = time.monotonic_ns() - started_ns
        task = self._task(request, objective, sla_ms, time.time_ns() - behind_ns, warmup)
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
            warmup=warmup,
            first_arrival=first_arrival,
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
        response = answer(
            task.request.request_id,
            objective.config,
            verdict,
            mailbox.arrivals,
            mailbox.elapsed_ms() / 1000,
        )
        mailbox.response = response
        return response

    def _task(
        self,
        request: scoring_pb2.ScoreRequest,
        objective: _Objective,
        sla_ms: float,
        received_ns: int,
        warmup: bool,
    ) -> task_pb2.ScoringTask:
        task = task_pb2.ScoringTask(
            request=request,
            return_address=self.return_address,
            mailbox_id=uuid.uuid4().hex,
            received_time=timestamp_from_ns(received_ns),
            deadline=timestamp_from_ns(received_ns + int(sla_ms * 1e6)),
            objective_version=objective.config.version,
            warmup=warmup,
        )
        if not request.request_id:
            task.request.request_id = uuid.uuid4().hex
        objective.resolve_consent(task.request.consent)
        # The one place trace context enters the task; Pulsar properties carry it as well.
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
            mailbox.give_up(Verdict(None, Reason.DISPATCH_FAILED, -1, DISPATCH_FAILED_RULE))

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
        if not mailbox.warmup:
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
        rendezvous = self._rendezvous
        deliver = rendezvous.deliver
        rendezvous.stream_opened()
        try:
            async for request in request_iterator:
                yield delivery_pb2.DeliverResponse(
                    delivery_id=request.delivery_id,
                    statuses=[deliver(event) for event in request.predictions],
                )
        finally:
            rendezvous.stream_closed()


def main() -> None:
    settings = RendezvousSettings()
    if settings.mesh_file is None:
        raise SystemExit("RDV_RENDEZVOUS_MESH_FILE (or mesh_file in the config file) is required")
    configs = load_mesh(settings.mesh_file).objective_configs()
    with contextlib.suppress(KeyboardInterrupt):
        run("rendezvous", settings, lambda: Rendezvous(settings, configs))
