"""The runner host: one process, one subscription, every hosted model and the decoy.

A host serves the deployments of one objective that scale together (the same replica
count). It receives each task once, from one SHARED subscription on the objective's tasks
topic (replicas of the host split the load), and hands every burst to each hosted
`ModelRunner` and, when the decoy is hosted here, to the `Archiver`. The task is
acknowledged once every runner is done with it (published, or skipped) and its archive
record is on the archive topic; if any of them failed it is negatively acknowledged and
redelivered (a prediction already published then arrives again and is counted as a
duplicate; the archive remembers what it archived and does not archive it twice).
On a small machine that is one receive, one ack and one broker dispatch per task instead
of one per model and one more for the decoy.

The host serves gRPC health (+ reflection), SERVING once subscribed.

Live mode (`RunnerSettings.follow`): the host follows its objective on the control topic and
serves one replica group of it (`services.runner.live`). Each new version is applied in
order, one at a time: a model added gets its runner, which joins the fan-out once its model
answers health; a model removed or disabled leaves the fan-out for new bursts, finishes what
it has queued and in flight, and is closed; a role or version change updates the runner in
place; an endpoint change replaces it. After each version the host reports every model it
serves (and every one it stopped serving) as a `RunnerStatus` on the runner-status topic,
keyed "<objective>/<model>/<host instance>": the control plane lets a policy accept a model
only once a host reports it ready. The subscription stays the one it is: a new model simply
joins the fan-out (a new replica group is a new host, with a subscription of its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from rendezvous.v1 import control_pb2, objective_pb2, task_pb2

from services.core.bus import Bus, BusError, Envelope, Subscription, SubscriptionMode
from services.core.consumer import BoundedConsumer
from services.core.control_topic import ControlFollower, follow
from services.core.lifecycle import Component
from services.core.oip import OIP_KIND
from services.core.privacy import Sealer
from services.core.protos import now_timestamp
from services.core.telemetry import counter
from services.decoy.archive import Archiver
from services.runner.live import (
    archive_hosted,
    archiving_denied_by_default,
    deployment_args,
    hosted_models,
    read_model_directory,
    runner_role,
    serves_differently,
)
from services.runner.runner import ModelRunner
from services.runner.settings import RunnerSettings

log = logging.getLogger(__name__)

RECEIVE_ERRORS = counter("rdv_runner_receive_errors", "Failed receives from the bus", ("host",))
REDELIVERIES = counter(
    "rdv_runner_redeliveries_requested",
    "Tasks negatively acknowledged because a runner or the archive failed",
    ("objective",),
)
LIVE_CHANGES = counter(
    "rdv_runner_live_changes",
    "Models a live runner host added, removed, updated or replaced, and adds that failed",
    ("objective", "change"),
)
STATUS_FAILURES = counter(
    "rdv_runner_status_failures", "RunnerStatus reports that could not be published", ("objective",)
)


class RunnerHost(Component):
    """A Component: the hosted runners, the hosted archive, one subscription."""

    def __init__(self, settings: RunnerSettings, bus: Bus | None = None) -> None:
        super().__init__(settings, name=f"runner-host-{settings.instance}", bus=bus)
        self.settings: RunnerSettings = settings
        self.objective = settings.host_objective()
        # The fan-out: replaced, never changed in place, so a burst keeps the list it began with.
        self.runners: list[ModelRunner] = []
        self.archiver: Archiver | None = None
        # Seals archive records of requests with a subject (whichever archiver is hosted).
        self._sealer = Sealer(settings.privacy, settings.tls)
        self._subscription: Subscription[task_pb2.EnrichedTask] | None = None
        self._consumer: BoundedConsumer[task_pb2.EnrichedTask] | None = None
        self._redeliveries = REDELIVERIES.labels(self.objective)
        # Live mode: the version applied, and one version applied at a time.
        self.config: objective_pb2.ObjectiveConfig | None = None
        self.follower: ControlFollower | None = None
        self._apply_lock = asyncio.Lock()
        self._changes = {
            change: LIVE_CHANGES.labels(self.objective, change)
            for change in ("added", "removed", "updated", "replaced", "add_failed")
        }
        self._status_failures = STATUS_FAILURES.labels(self.objective)

    @property
    def consumer(self) -> BoundedConsumer[task_pb2.EnrichedTask] | None:
        return self._consumer

    def runner(self, model: str) -> ModelRunner | None:
        return next((runner for runner in self.runners if runner.model == model), None)

    async def open(self, stack: contextlib.AsyncExitStack) -> None:
        settings = self.settings
        bus = self.bus
        # Whatever runs at stop is closed then (a runner added live as well).
        stack.push_async_callback(self._close_runners)
        stack.push_async_callback(self._sealer.close)
        archive = settings.archive
        if settings.follow:
            self.follower = await follow(
                bus,
                stack,
                self.watch,
                retry_delay_s=settings.receive_retry_s,
                objectives=[self.objective],
            )
            config = await asyncio.wait_for(
                self.follower.wait_for(self.objective), settings.config_timeout_s
            )
            await self._apply(config, report=False)
            archive = self.archiver is not None
        else:
            self.runners = [ModelRunner(hosted, bus) for hosted in settings.hosted()]
            for runner in self.runners:
                # An oip model is checked at start (ready, and the configured tensors exist):
                # a host that cannot serve it fails now, with the reason logged.
                if runner.settings.kind == OIP_KIND and not await runner.client.wait_ready(
                    settings.model_start_timeout_s, settings.model_poll_s
                ):
                    raise RuntimeError(
                        f"the oip model of {runner.model!r} at {runner.client.endpoint} "
                        "is not ready or does not fit its configuration (see the log)"
                    )
            if settings.archive:
                self.archiver = await self._archiver(settings.default_archiving == "denied")
        subscription = await bus.subscribe(
            bus.topics.tasks(self.objective),
            settings.subscription,
            task_pb2.EnrichedTask,
            mode=SubscriptionMode.SHARED,
            # The archive keeps every task ever accepted, also those published before any
            # host ran; models only care about live tasks (expired ones are skipped anyway).
            start="earliest" if archive else settings.start_position,
        )
        self._subscription = subscription
        stack.push_async_callback(subscription.close)
        # One burst is handed to every runner at once; each runner batches and bounds its
        # own calls, so bursts themselves are bounded only by the messages in flight.
        consumer = BoundedConsumer(
            subscription,
            burst_handler=self._handle_burst,
            max_in_flight=settings.concurrency,
            retry_delay_s=settings.receive_retry_s,
            name=f"runners:{self.objective}",
            on_receive_error=self._receive_failed,
            max_burst=settings.max_batch,
            max_bursts_in_flight=settings.concurrency,
        )
        self._consumer = consumer
        consumer.start()
        stack.push_async_callback(consumer.stop, settings.shutdown_grace_s)
        if self.follower is not None:
            self.follower.listen(self._changed)
            # A version that arrived between the catch-up and the listener: apply it now.
            latest = self.follower.configs.get(self.objective)
            if latest is not None and self.config is not None:
                await self._changed(self.config, latest)
            await self._report(ready=True)

    async def _archiver(self, default_denied: bool) -> Archiver:
        # Held: a record waits in the client for the broker (one per task in flight at most).
        publisher = await self.bus.publisher(
            self.bus.topics.archive(self.objective),
            task_pb2.ArchiveRecord,
            hold=self.settings.concurrency,
        )
        return Archiver(
            publisher,
            self.objective,
            default_denied=default_denied,
            remember=self.settings.remember_archived,
            sealer=self._sealer,
        )

    async def drain(self) -> None:
        if self.follower is not None:
            # Best effort: a host that dies without saying so leaves its last report behind,
            # which the same host instance overwrites when it comes back.
            await self._report(ready=False)

    async def _close_runners(self) -> None:
        runners, self.runners = self.runners, []
        for runner in runners:
            await runner.close()

    # ------------------------------------------------------------------------ live mode

    async def _changed(
        self, _: objective_pb2.ObjectiveConfig | None, new: objective_pb2.ObjectiveConfig
    ) -> None:
        if self.stopping:
            return
        async with self._apply_lock:
            if self.config is not None and new.version <= self.config.version:
                return
            await self._apply(new, report=True)

    async def _apply(self, config: objective_pb2.ObjectiveConfig, *, report: bool) -> None:
        """Serve `config`: runners added, removed, updated or replaced; the archive too."""
        group = self.settings.replicas
        wanted = hosted_models(config, group)
        directory = read_model_directory(self.settings.model_directory)
        keep: list[ModelRunner] = []
        retire: list[ModelRunner] = []
        start: list[objective_pb2.ModelDeployment] = []
        for runner in self.runners:
            deployment = wanted.get(runner.model)
            if deployment is None:
                retire.append(runner)
                continue
            endpoint = deployment.endpoint or directory.get(deployment.name, "")
            if (endpoint and endpoint != runner.client.endpoint) or serves_differently(
                runner, deployment
            ):
                # A new address (or protocol, or oip mapping) is a new channel: the new
                # runner joins before the old leaves.
                start.append(deployment)
                retire.append(runner)
                continue
            role = runner_role(deployment)
            if (role, deployment.version) != (runner.role, runner.deployment.model_version):
                runner.update(role, deployment.version)
                self._changes["updated"].inc()
                log.info(
                    "model updated in place",
                    extra={"objective": self.objective, "model": runner.model, "role": role},
                )
            keep.append(runner)
        running = {runner.model for runner in keep} | {d.name for d in start}
        start.extend(d for name, d in wanted.items() if name not in running)
        started = await asyncio.gather(*(self._start_runner(d) for d in start))
        failed = [d.name for d, runner in zip(start, started, strict=True) if runner is None]
        # New runners join the fan-out for the next burst; retired ones get no new burst.
        self.runners = keep + [runner for runner in started if runner is not None]
        await self._apply_archive(config)
        self.config = config
        for runner in retire:
            await runner.drain(self.settings.drain_timeout_s)
            await runner.close()
            replaced = any(r.model == runner.model for r in self.runners)
            self._changes["replaced" if replaced else "removed"].inc()
            log.info(
                "model replaced" if replaced else "model removed",
                extra={"objective": self.objective, "model": runner.model},
            )
        if report:
            gone = {r.model for r in retire} | set(failed)
            await self._report(ready=True)
            hosted = {r.model for r in self.runners}
            for model in sorted(gone - hosted):
                await self._publish_status(model, ready=False)

    async def _start_runner(self, deployment: objective_pb2.ModelDeployment) -> ModelRunner | None:
        """A runner for `deployment` once its model answers health, or None (logged)."""
        settings = self.settings
        timeout_s = settings.model_start_timeout_s
        started = time.monotonic()
        endpoint = deployment.endpoint
        while not endpoint:
            # The supervisor writes the address of a container it starts on this change.
            endpoint = read_model_directory(settings.model_directory).get(deployment.name, "")
            if endpoint:
                break
            if time.monotonic() - started >= timeout_s:
                self._changes["add_failed"].inc()
                log.error(
                    "a model added has no endpoint; it is not served",
                    extra={"objective": self.objective, "model": deployment.name},
                )
                return None
            await asyncio.sleep(settings.model_poll_s)
        try:
            runner = ModelRunner(
                settings.model_copy(
                    update={
                        "model": deployment.name,
                        "role": runner_role(deployment),
                        "model_version": deployment.version,
                        "endpoint": endpoint,
                        "kind": deployment.kind,
                        "args": deployment_args(deployment),
                        "deployments": [],
                        "follow": False,
                    }
                ),
                self.bus,
            )
        except ValueError as exc:
            # Validation keeps such a version off the topic; a host never trusts that alone.
            self._changes["add_failed"].inc()
            log.error(
                "a model added cannot be served as configured; it is not served",
                extra={"objective": self.objective, "model": deployment.name, "error": str(exc)},
            )
            return None
        try:
            remaining = max(timeout_s - (time.monotonic() - started), settings.model_poll_s)
            ready = await runner.client.wait_ready(remaining, settings.model_poll_s)
        except BaseException:
            await runner.close()
            raise
        if not ready:
            await runner.close()
            self._changes["add_failed"].inc()
            log.error(
                "a model added did not answer health in time; it is not served",
                extra={"objective": self.objective, "model": deployment.name, "endpoint": endpoint},
            )
            return None
        self._changes["added"].inc()
        log.info(
            "model added",
            extra={"objective": self.objective, "model": deployment.name, "endpoint": endpoint},
        )
        return runner

    async def _apply_archive(self, config: objective_pb2.ObjectiveConfig) -> None:
        denied = archiving_denied_by_default(config)
        if not archive_hosted(config, self.settings.replicas):
            self.archiver = None
        elif self.archiver is None:
            self.archiver = await self._archiver(denied)
        else:
            self.archiver.default_denied = denied

    async def _report(self, *, ready: bool) -> None:
        for runner in self.runners:
            await self._publish_status(runner.model, ready=ready)

    async def _publish_status(self, model: str, *, ready: bool) -> None:
        instance = self.settings.instance
        status = control_pb2.RunnerStatus(
            objective=self.objective,
            model=model,
            instance=instance,
            ready=ready,
            objective_version=self.config.version if self.config is not None else 0,
            report_time=now_timestamp(),
        )
        try:
            publisher = await self.bus.publisher(
                self.bus.topics.runner_status(), control_pb2.RunnerStatus
            )
            await publisher.publish(
                status,
                key=f"{self.objective}/{model}/{instance}",
                timeout=self.settings.pulsar.send_timeout_s,
            )
        except BusError as exc:
            # The next version reports again; until then the control plane sees the last one.
            self._status_failures.inc()
            log.warning(
                "publishing a runner status failed",
                extra={"objective": self.objective, "model": model, "error": type(exc).__name__},
            )

    def facts(self) -> dict[str, Any]:
        return {
            "objective": self.objective,
            "subscription": self.settings.subscription,
            "models": [runner.model for runner in self.runners],
            "archive": self.archiver is not None,
            **({"objective_version": self.config.version} if self.config is not None else {}),
        }

    def _receive_failed(self, _: Exception) -> None:
        if self.stopping:
            return
        RECEIVE_ERRORS.labels(self.name).inc()
        log.exception("receive failed", extra={"objective": self.objective})

    async def _handle_burst(self, envelopes: list[Envelope[task_pb2.EnrichedTask]]) -> None:
        subscription = self._subscription
        assert subscription is not None  # the consumer exists only once subscribed
        received_ns = time.time_ns()
        jobs = [runner.handle(envelopes, received_ns) for runner in self.runners]
        if self.archiver is not None:
            jobs.append(self.archiver.archive(envelopes))
        results = await asyncio.gather(*jobs, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                # A bug must not strand tasks unacknowledged: they are redelivered (and after
                # max_redeliveries the broker dead-letters them).
                log.error("handling tasks failed", exc_info=result)
        for index, envelope in enumerate(envelopes):
            done = all(not isinstance(r, BaseException) and r[index] for r in results)
            try:
                if done:
                    await subscription.ack(envelope)
                else:
                    self._redeliveries.inc()
                    await subscription.nack(envelope)
            except Exception:
                # The broker redelivers what it did not see acknowledged: a duplicate, not a loss.
                log.warning("ack/nack failed", exc_info=True, extra={"objective": self.objective})
