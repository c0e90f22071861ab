"""The rendezvous service: `ScoringService.Score` on TCP, `DeliveryService` on a unix socket.

For each Score call: validate, open a mailbox, stamp the task with this instance's return
address, the mailbox id and the deadline, publish it to the objective's request topic (or,
for an objective without enrichment, straight to its tasks topic as an enriched task with no
subject state; bounded by the remaining budget, off the race's critical path), then wait for
the mailbox's verdict. The collector sidecar streams predictions in over the unix socket;
each one is offered to its mailbox. After the answer, the mailbox stays open for the
objective's late-grace window, then its outcome (the answer and every candidate) goes to the
results topic, sealed under the subject's key when the request names a subject and the mesh
runs a keyring (`services.core.privacy`; the key is fetched then, never before the answer),
waiting for the broker across an outage (`services.rendezvous.outcomes`).

The race's clock starts when the request reached the process, not when its handler ran:
the event loop's measured lag (`services.core.loop_lag`) is taken off the budget, and a
request the loop could not leave `min_race_budget_ms` is shed with RESOURCE_EXHAUSTED
rather than answered late. Health is SERVING only while a collector stream is open and
after the warm-up (`services.rendezvous.warmup`).

Configuration is live: run as a process, the rendezvous follows the control topic
(`services.core.control_topic`) and compiles each new version of an objective into an
`_Objective` (policy, SLA, default, sampling, publishers opened beforehand), swapped in by one
dict assignment. A request takes its objective's `_Objective` once, when it arrives, and is
decided by that version from start to finish: its task, its race, its answer and its outcome
all carry that version, whatever is applied meanwhile. Given static configurations (tests,
the bench, a mesh file), it serves those and follows nothing.

Per request, deterministically by request id (`services.core.sampling`), the rendezvous
decides who scores the task (`ScoringTask.scorers`: challengers only within
`challenger_fraction` and with the subject's consent to experimentation, canaries only with
that consent), whether the decoy archives it (`skip_archive`), and which A/B arm of the
policy it races under (`Policy.for_request`).
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
from opentelemetry import context as otel_context
from opentelemetry import trace
from prometheus_client import Counter, Histogram
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
from services.core.control_topic import follow
from services.core.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from services.core.lifecycle import Component, cancel_and_wait, run
from services.core.loop_lag import LoopLag
from services.core.mesh import load_mesh
from services.core.privacy import Sealer
from services.core.protos import duration_from_seconds, duration_ms, timestamp_from_ns
from services.core.sampling import ARCHIVE, CHALLENGERS, SHARES, draw
from services.core.server import write_ready_file
from services.core.telemetry import counter, gauge, histogram, inject, tracer
from services.core.tracing import continue_caller_trace
from services.rendezvous.answer import answer
from services.rendezvous.mailbox import DISPATCH_FAILED_RULE, Mailbox, MailboxRegistry
from services.rendezvous.outcomes import OutcomeSender
from services.rendezvous.policy import Policy, Reason, Verdict
from services.rendezvous.settings import RendezvousSettings
from services.rendezvous.validation import validate
from services.rendezvous.warmup import Warmup

log = logging.getLogger(__name__)
_tracer = tracer(__name__)

ANSWERS = counter(
    "rdv_answers",
    "Score answers by source, answering model and its role (the default: model default)",
    ("objective", "source", "model", "role"),
)
ANSWER_LATENCY = histogram("rdv_answer_latency_seconds", "Score time to answer", ("objective",))
ARRIVAL_LATENCY = histogram(
    "rdv_arrival_latency_seconds",
    "When a model's prediction (or error) reached its mailbox, from the request's receipt",
    ("objective", "model"),
)
LATE = counter(
    "rdv_late_predictions",
    "Predictions that reached their mailbox after the answer (within the late grace)",
    ("objective", "model"),
)
MAILBOXES = gauge(
    "rdv_mailboxes",
    "Open mailboxes: awaiting their answer, or answered and open for late predictions (grace)",
    ("state",),
)
DELIVERIES = counter("rdv_deliveries", "Predictions delivered by the collector", ("status",))
SHED = counter("rdv_shed", "Score calls shed for overload", ("objective", "why"))
DISPATCH_FAILURES = counter("rdv_dispatch_failures", "Tasks not published in time", ("objective",))
OBJECTIVE_VERSION = gauge(
    "rdv_objective_version", "The configuration version new requests are decided by", ("objective",)
)
OBJECTIVE_SLA = gauge(
    "rdv_objective_sla_seconds",
    "The SLA of the configuration version new requests are decided by",
    ("objective",),
)

# The model label of an arrival from a model the request's version does not list.
UNLISTED_MODEL = "unlisted"

_SERVICES = (
    scoring_pb2.DESCRIPTOR.services_by_name["ScoringService"].full_name,
    delivery_pb2.DESCRIPTOR.services_by_name["DeliveryService"].full_name,
)


class _Objective:
    """One version of an objective's configuration, compiled once for the request path."""

    def __init__(self, config: objective_pb2.ObjectiveConfig) -> None:
        self.config = config
        self.name = config.objective
        self.version = config.version
        self.policy = Policy.from_config(config)
        # Who scores a task: every enabled deployment but the decoy (which archives, it does
        # not score); without the challengers for a request outside `challenger_fraction`;
        # without challengers and canaries for a subject who denied experimentation.
        scoring = [m for m in config.models if m.enabled and m.role != common_pb2.MODEL_ROLE_DECOY]
        optional = (common_pb2.MODEL_ROLE_CHALLENGER, common_pb2.MODEL_ROLE_CANARY)
        self.scorers = tuple(m.name for m in scoring)
        self.scorers_without_challengers = tuple(
            m.name for m in scoring if m.role != common_pb2.MODEL_ROLE_CHALLENGER
        )
        self.scorers_without_experiments = tuple(m.name for m in scoring if m.role not in optional)
        # A config without a Sampling message samples nothing out (the fields' zero would
        # read as "no challenger, no archive").
        sampling = config.sampling if config.HasField("sampling") else None
        self.challenger_fraction = 1.0 if sampling is None else sampling.challenger_fraction
        self.archive_fraction = 1.0 if sampling is None else sampling.archive_fraction
        # Draw only when the draw can change something (a fraction of 1 keeps every request).
        self.samples_challengers = (
            self.challenger_fraction < 1.0 and self.scorers_without_challengers != self.scorers
        )
        self.samples_archive = self.archive_fraction < 1.0
        self.late_grace_s = duration_ms(config.late_grace) / 1000
        # ENRICHMENT_UNSPECIFIED keeps the enricher on the path: the safe reading.
        self.enriched = config.enrichment != objective_pb2.ENRICHMENT_NONE
        # Labelled children looked up once, by the model that answered ("" for the default),
        # and by the model that arrived. Created now, so every series exists from zero.
        model_source = scoring_pb2.AnswerSource.Name(scoring_pb2.ANSWER_SOURCE_MODEL)
        scoring_models = [m for m in config.models if m.role != common_pb2.MODEL_ROLE_DECOY]
        self.answers = {
            m.name: ANSWERS.labels(
                config.objective, model_source, m.name, common_pb2.ModelRole.Name(m.role)
            )
            for m in scoring_models
        }
        self.answers[""] = ANSWERS.labels(
            config.objective,
            scoring_pb2.AnswerSource.Name(scoring_pb2.ANSWER_SOURCE_DEFAULT),
            "default",
            common_pb2.ModelRole.Name(common_pb2.MODEL_ROLE_UNSPECIFIED),
        )
        self.arrivals = {m.name: self._arrival_children(m.name) for m in scoring_models}
        self.latency = ANSWER_LATENCY.labels(config.objective)

    def in_force(self) -> None:
        """Say in the metrics that this version decides new requests."""
        OBJECTIVE_VERSION.labels(self.name).set(self.version)
        OBJECTIVE_SLA.labels(self.name).set(self.policy.sla_ms / 1000)

    def answered(self, decision: scoring_pb2.Decision) -> Counter:
        """The answer counter's child for `decision`'s model ("" for the default)."""
        child = self.answers.get(decision.model)
        if child is None:
            # Not a deployment of this version (cannot win its policy); counted all the same.
            child = self.answers[decision.model] = ANSWERS.labels(
                self.name,
                scoring_pb2.AnswerSource.Name(scoring_pb2.ANSWER_SOURCE_MODEL),
                decision.model,
                common_pb2.ModelRole.Name(decision.role),
            )
        return child

    def _arrival_children(self, model: str) -> tuple[Histogram, Counter]:
        return ARRIVAL_LATENCY.labels(self.name, model), LATE.labels(self.name, model)

    def arrived(self, model: str, at_ms: float, late: bool) -> None:
        """A prediction of `model` reached a mailbox of this version `at_ms` after receipt."""
        children = self.arrivals.get(model)
        if children is None:
            # Only this version's scorers are asked; any other name is one bounded label.
            children = self.arrivals[model] = self._arrival_children(UNLISTED_MODEL)
        children[0].observe(at_ms / 1000)
        if late:
            children[1].inc()

    def sample(self, task: task_pb2.ScoringTask) -> None:
        """Write who scores `task` and whether it is archived, by its request id (its
        consent already resolved)."""
        if task.warmup:
            # Warm every scoring path; never archived.
            task.scorers.extend(self.scorers)
            task.skip_archive = True
            return
        request_id = task.request.request_id
        if task.request.consent.experimentation == common_pb2.CONSENT_DECISION_DENIED:
            task.scorers.extend(self.scorers_without_experiments)
        elif (
            self.samples_challengers
            and draw(self.name, request_id, CHALLENGERS) >= self.challenger_fraction
        ):
            task.scorers.extend(self.scorers_without_challengers)
        else:
            task.scorers.extend(self.scorers)
        task.skip_archive = (
            self.samples_archive and draw(self.name, request_id, ARCHIVE) >= self.archive_fraction
        )

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
        objectives: Mapping[str, objective_pb2.ObjectiveConfig] | None,
        bus: Bus | None = None,
    ) -> None:
        """Serve the static `objectives`, or (None) follow the control topic."""
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
        self.following = objectives is None
        # The version in force per objective; replaced, never mutated (see apply_config).
        self.objectives = {name: _Objective(cfg) for name, cfg in (objectives or {}).items()}
        # apply_config one version at a time; set once an objective is held.
        self._applying = asyncio.Lock()
        self._holding = asyncio.Event()
        self.registry = MailboxRegistry()
        # Per objective: the request topic (enriched versions) and/or the tasks topic (versions
        # without enrichment), opened before the first version that needs one is in force.
        self._request_publishers: dict[str, Publisher[task_pb2.ScoringTask]] = {}
        self._task_publishers: dict[str, Publisher[task_pb2.EnrichedTask]] = {}
        self._outcome_publishers: dict[str, Publisher[task_pb2.Outcome]] = {}
        self.outcomes = OutcomeSender(
            max_count=settings.outcome_backlog_max,
            max_bytes=settings.outcome_backlog_max_bytes,
            retry_initial_s=settings.outcome_retry_initial_s,
            retry_max_s=settings.outcome_retry_max_s,
        )
        self._background: set[asyncio.Task[Any]] = set()
        # Seals each outcome of a request with a subject under the subject's key.
        self._sealer = Sealer(settings.privacy, settings.tls)
        # Insertion-ordered: the first entry is the oldest answered mailbox.
        self._closers: dict[str, asyncio.TimerHandle] = {}
        self._awaiting = 0
        self._streams = 0
        # Read at scrape time, nothing on the request path (one rendezvous per process).
        MAILBOXES.labels("awaiting").set_function(lambda: self._awaiting)
        MAILBOXES.labels("grace").set_function(lambda: len(self._closers))
        self._warm = not settings.warmup
        # Set once open() is done: from then on a new version rewrites the ready file.
        self._opened = False
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
        # Closed last: drain() publishes the outcomes still in grace, sealed.
        stack.push_async_callback(self._sealer.close)
        if self.following:
            await self._follow(stack)
        else:
            for objective in self.objectives.values():
                await self._open_publishers(objective)
                objective.in_force()
        self._opened = True
        # A collector may have connected while the objectives were still being read: the
        # warm-up waited for them, and starts now.
        self._start_warmup()

    def make_loop_lag(self) -> LoopLag:
        # Also the request clock's correction (`behind_s`): a faster probe, and a backlog window.
        return LoopLag(
            self.settings.config_section,
            self.settings.loop_lag_probe_interval_s,
            self.settings.loop_lag_backlog_window_s,
        )

    async def _follow(self, stack: contextlib.AsyncExitStack) -> None:
        """Follow the control topic; return once it holds an objective (bounded by
        `control_wait_s`): the control component seeds the topic before we start."""
        settings = self.settings
        follower = await follow(
            self.bus,
            stack,
            self.watch,
            retry_delay_s=settings.control_retry_delay_s,
            objectives=settings.serve_only or None,
        )
        # Registered before the first await: no version after the catch-up is missed.
        follower.listen(self._on_config)
        for config in list(follower.configs.values()):
            await self.apply_config(config)
        try:
            await asyncio.wait_for(self._holding.wait(), settings.control_wait_s)
        except TimeoutError:
            raise RuntimeError(
                f"no objective on {follower.topic} after {settings.control_wait_s:g}s "
                "(is the control component running?)"
            ) from None
        # Warm-up covers the objectives held at start.
        self.warmup = Warmup(
            settings, [o.config for o in self.objectives.values()], self._warm_race
        )
        if not settings.warmup:
            self.warmup.progress.state = "off"

    async def _on_config(
        self, _held: objective_pb2.ObjectiveConfig | None, config: objective_pb2.ObjectiveConfig
    ) -> None:
        await self.apply_config(config)

    async def apply_config(self, config: objective_pb2.ObjectiveConfig) -> bool:
        """Decide new requests of `config.objective` by `config` (False: not newer than the
        version held, ignored). Requests already in flight keep the version they started with.

        The publishers the version needs (a new objective's, or the other task topic after
        an enrichment change) are opened first; then the compiled version replaces the old
        by one dict assignment, so a request sees one version or the other, never a mixture.
        """
        async with self._applying:
            name = config.objective
            held = self.objectives.get(name)
            if held is not None and config.version <= held.version:
                return False
            compiled = _Objective(config)
            while True:
                try:
                    await self._open_publishers(compiled)
                    break
                except BusError:
                    if self.stopping:
                        raise
                    # Keep the version held until the new one can be served; keep order.
                    log.warning(
                        "cannot open the publishers of a new version yet; retrying",
                        extra={"objective": name, "version": config.version},
                    )
                    await asyncio.sleep(self.settings.control_retry_delay_s)
            self.objectives[name] = compiled
            compiled.in_force()
            self._holding.set()
        if self._opened:
            # `rendezvous status` shows the versions in force.
            self._write_ready_file()
        log.info(
            "objective version applied",
            extra={
                "objective": name,
                "version": config.version,
                "previous_version": held.version if held is not None else 0,
                "action": config.change.action,
                "author": config.change.author,
                "enriched": compiled.enriched,
            },
        )
        return True

    async def _open_publishers(self, objective: _Objective) -> None:
        bus = self.bus
        name = objective.name
        if objective.enriched and name not in self._request_publishers:
            self._request_publishers[name] = await bus.publisher(
                bus.topics.requests(name), task_pb2.ScoringTask
            )
        if not objective.enriched and name not in self._task_publishers:
            self._task_publishers[name] = await bus.publisher(
                bus.topics.tasks(name), task_pb2.EnrichedTask
            )
        if name not in self._outcome_publishers:
            # Held: outcomes wait in the client for the broker (OutcomeSender bounds them).
            self._outcome_publishers[name] = await bus.publisher(
                bus.topics.results(name), task_pb2.Outcome, hold=self.settings.outcome_backlog_max
            )

    def facts(self) -> dict[str, Any]:
        return {
            "delivery_socket": str(self.settings.delivery_socket),
            "return_address": self.return_address,
            "objectives": list(self.objectives),
            "objective_versions": {name: o.version for name, o in self.objectives.items()},
            "following": self.following,
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
        # Outcomes waiting for the broker (an outage just before the stop) get the grace
        # too, and the rest of the background work what the outcomes left of it.
        grace_ends = time.monotonic() + self.settings.shutdown_grace_s
        await self.outcomes.flush(self.settings.shutdown_grace_s)
        self.outcomes.close()
        if self._background:
            await asyncio.wait(self._background, timeout=max(grace_ends - time.monotonic(), 0))

    def _health_changed(self) -> None:
        self._spawn(self.server.set_serving(self.serving))

    def stream_opened(self) -> None:
        self._streams += 1
        if self._streams == 1:
            log.info("collector connected")
            self._health_changed()
            self._start_warmup()

    def _start_warmup(self) -> None:
        """Warm up once the objectives are known (opened) and a collector is connected."""
        if self._opened and self._streams > 0 and not self._warm and self._warming is None:
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
        # A trace of its own (no caller), named so a trace store tells it from real requests.
        with _tracer.start_as_current_span(
            "rendezvous.warmup", attributes={"rdv.objective": request.objective}
        ):
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
        assert self.loop_lag is not None  # Score is served only once started
        behind_ms = self.loop_lag.behind_s() * 1000
        started_ns = time.monotonic_ns() - int(behind_ms * 1e6)
        if self.stopping:
            raise Unavailable("the service is draining")
        if not request.objective:
            raise InvalidArgument([("objective", "required")])
        # The one look-up: this request is decided by this version from start to finish.
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

        response = await self._race(request, objective, sla_ms, client_deadline, started_ns)
        # The call's SERVER span (services.core.tracing; the caller's trace when it sent
        # one): `rendezvous trace REQUEST_ID` finds the request's trace by rdv.request_id.
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attributes(
                {
                    "rdv.objective": request.objective,
                    "rdv.request_id": response.request_id,
                    "rdv.objective_version": objective.version,
                }
            )
            span.add_event(
                "answer",
                {
                    "rdv.answered_by": response.decision.model or "default",
                    "rdv.reason": scoring_pb2.DecisionReason.Name(response.decision.reason),
                },
            )
        objective.answered(response.decision).inc()
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
        policy = objective.policy
        if policy.has_shares:
            policy = self._arm(policy, objective, task)
        mailbox = Mailbox(
            mailbox_id=task.mailbox_id,
            request_id=task.request.request_id,
            objective=request.objective,
            policy=policy,
            sla_ms=sla_ms,
            client_deadline=client_deadline,
            started_ns=started_ns,
            answer=asyncio.get_running_loop().create_future(),
            received_ns=task.received_time.ToNanoseconds(),
            warmup=warmup,
            first_arrival=first_arrival,
            subject_id=request.subject_id,
            # Warm-up traffic is never counted.
            on_arrival=None if warmup else objective.arrived,
        )
        self.registry.add(mailbox)
        mailbox.start()
        self._spawn(self._dispatch(task, objective, mailbox, sla_ms))
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

    @staticmethod
    def _arm(policy: Policy, objective: _Objective, task: task_pb2.ScoringTask) -> Policy:
        """The request's A/B arm: the same in every step, and on every retry of it. A subject
        who denied experimentation races the control arm; an arm's model scores the task
        whatever the challenger sampling said (the experiment needs its prediction)."""
        denied = task.request.consent.experimentation == common_pb2.CONSENT_DECISION_DENIED
        if denied and policy.control is not None:
            return policy.control
        variant = policy.for_request(draw(objective.name, task.request.request_id, SHARES))
        for model in variant.armed:
            if model not in task.scorers:
                task.scorers.append(model)
        return variant

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
            objective_version=objective.version,
            warmup=warmup,
        )
        if not request.request_id:
            task.request.request_id = uuid.uuid4().hex
        objective.resolve_consent(task.request.consent)
        objective.sample(task)
        # The one place trace context enters the task; Pulsar properties carry it as well.
        task.trace_context.update(inject())
        return task

    async def _dispatch(
        self, task: task_pb2.ScoringTask, objective: _Objective, mailbox: Mailbox, sla_ms: float
    ) -> None:
        budget_s = max(sla_ms - mailbox.elapsed_ms(), 0.0) / 1000
        key = task.request.request_id
        try:
            # The request's own version says whether its task passes through the enricher.
            if objective.enriched:
                await self._request_publishers[objective.name].publish(
                    task, key=key, timeout=budget_s
                )
            else:
                await self._task_publishers[objective.name].publish(
                    task_pb2.EnrichedTask(task=task), key=key, timeout=budget_s
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
        # After the answer, never before it: the subject's key is fetched (or taken from the
        # cache) here, off the answer path.
        sealed = await self._sealer.seal(outcome, mailbox.subject_id, mailbox.objective)
        # Not a hop of the request's trace (the close timer runs in its context): it leaves
        # late_grace after the answer, off the answer path, and would stretch the request's
        # waterfall to seconds. This task's context only: detached before it ends.
        token = otel_context.attach(otel_context.Context())
        try:
            await self.outcomes.send(
                self._outcome_publishers[mailbox.objective], sealed, mailbox.request_id
            )
        finally:
            otel_context.detach(token)

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
        with continue_caller_trace(context.invocation_metadata()):
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
    # The control topic is the source of truth; a mesh file, if given, is a static mode
    # (nothing followed, version 1 for ever), for running without a control component.
    configs = None
    if settings.mesh_file is not None:
        configs = load_mesh(settings.mesh_file).objective_configs()
    with contextlib.suppress(KeyboardInterrupt):
        run("rendezvous", settings, lambda: Rendezvous(settings, configs))
