"""The control plane's state and its one write path.

`ControlPlane` is the single writer of the control topic: it holds the topic through an
exclusive producer (a second instance waits as a standby until the first goes away), keeps
the current configuration of every objective from a compacted read (`ControlFollower`), the
history from a non-compacted read, and the runner hosts' status, and publishes each change
as the next version:

1. `expected_version` must be the current version (optimistic concurrency);
2. the configuration must validate (`validation.validate`, every problem reported);
3. a model the policy accepts for the first time must have a runner host reporting ready
   (`require_ready_runners`), so a hand-off never goes to a model nobody serves;
4. the server stamps the version, the previous version and the change time;
5. it answers only once its own readers see the new version, so a Get or a history right
   after an Update returns it, and then asks the broker to compact the topic.

Updates are serialised by one lock: two concurrent updates with the same expected version
cannot both pass the check. The gRPC mapping is in `service.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from rendezvous.v1 import objective_pb2

from services.control.admin import TopicAdmin
from services.control.edits import same_serving
from services.control.followers import HistoryFollower, RunnerFollower
from services.control.settings import ControlSettings
from services.control.validation import accepted_models, validate
from services.core.bus import Bus, BusError, Publisher
from services.core.control_topic import ControlFollower, follow
from services.core.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from services.core.mesh import load_mesh
from services.core.protos import now_timestamp

log = logging.getLogger(__name__)

ObjectiveConfig = objective_pb2.ObjectiveConfig
Watch = Callable[[asyncio.Task[Any]], asyncio.Task[Any]]


def _copy(config: ObjectiveConfig) -> ObjectiveConfig:
    out = ObjectiveConfig()
    out.CopyFrom(config)
    return out


class ControlPlane:
    """Current configurations, their history, runner readiness, and the update path."""

    def __init__(self, settings: ControlSettings, admin: TopicAdmin) -> None:
        self.settings = settings
        self.admin = admin
        self.ready = False
        self.seeded: list[str] = []
        self.mesh_file_differs: list[str] = []
        self._lock = asyncio.Lock()
        self._bus: Bus | None = None
        self._publisher: Publisher[ObjectiveConfig] | None = None
        self._follower: ControlFollower | None = None
        self._history: HistoryFollower | None = None
        self._runners: RunnerFollower | None = None

    # ------------------------------------------------------------------ start-up

    async def open(self, bus: Bus, stack: contextlib.AsyncExitStack, watch: Watch) -> None:
        """Become the topic's writer, catch up with it, seed it; returns once ready."""
        self._bus = bus
        topic = bus.topics.control()
        self._publisher = await self._become_writer(bus, topic)
        await self.admin.prepare(topic, self.settings.compaction_threshold_bytes)
        self._history = HistoryFollower(bus, retry_delay_s=self.settings.retry_delay_s)
        self._runners = RunnerFollower(bus, retry_delay_s=self.settings.retry_delay_s)
        for reader, name in ((self._history, "history"), (self._runners, "runners")):
            await reader.open()
            stack.push_async_callback(reader.close)
            task = watch(asyncio.create_task(reader.run(), name=f"control:{name}"))
            stack.push_async_callback(_cancel, task)
        self._follower = await follow(bus, stack, watch, retry_delay_s=self.settings.retry_delay_s)
        await self._history.caught_up.wait()
        await self._runners.caught_up.wait()
        await self._seed()
        self.ready = True

    async def _become_writer(self, bus: Bus, topic: str) -> Publisher[ObjectiveConfig]:
        """The topic's exclusive publisher; while another instance holds it, wait as a standby.

        The client gives up waiting for exclusive access after its operation timeout, so the
        standby asks again until it gets the topic."""
        while True:
            try:
                # Unbatched: one version, one entry, compacted and read back on its own.
                return await bus.publisher(topic, ObjectiveConfig, batching=False, exclusive=True)
            except BusError as exc:
                log.warning(
                    "another control plane holds the control topic; standing by",
                    extra={"topic": topic, "error": str(exc)},
                )
                await asyncio.sleep(self.settings.standby_retry_s)

    async def _seed(self) -> None:
        """Version 1 of every objective of the mesh file that the topic does not hold."""
        path = self.settings.mesh_file
        if path is None:
            return
        follower = self._current_follower()
        for name, config in load_mesh(path).objective_configs().items():
            held = follower.configs.get(name)
            if held is not None:
                if not same_serving(held, config):
                    self.mesh_file_differs.append(name)
                    log.warning(
                        "the control topic serves an objective differently from the mesh file; "
                        "the topic wins (apply the file to change it)",
                        extra={"objective": name, "version": held.version, "mesh_file": str(path)},
                    )
                continue
            config.version = 1
            config.change.CopyFrom(
                objective_pb2.ConfigChange(
                    author=self.settings.seed_author,
                    reason=f"seeded from the mesh file {path}",
                    action="seed",
                    previous_version=0,
                    change_time=now_timestamp(),
                )
            )
            problems = validate(config)
            if problems:
                listed = "; ".join(f"{field}: {what}" for field, what in problems)
                raise ValueError(f"the mesh file {path} does not validate: {listed}")
            async with self._lock:
                await self._publish(config)
            self.seeded.append(name)
            log.info("seeded an objective", extra={"objective": name, "mesh_file": str(path)})

    # ------------------------------------------------------------------ reads

    def _current_follower(self) -> ControlFollower:
        if self._follower is None:
            raise Unavailable("the control plane has not caught up with the control topic")
        return self._follower

    def _check_ready(self) -> None:
        if not self.ready:
            raise Unavailable("the control plane has not caught up with the control topic")

    @property
    def runners(self) -> RunnerFollower:
        if self._runners is None:
            raise Unavailable("the control plane has not caught up with the runner status")
        return self._runners

    def current(self) -> dict[str, ObjectiveConfig]:
        return self._current_follower().configs

    def get(self, objective: str, version: int = 0) -> ObjectiveConfig:
        self._check_ready()
        if version == 0:
            config = self.current().get(objective)
            if config is None:
                raise NotFound(f"no objective {objective!r}")
            return config
        for config in self.history(objective):
            if config.version == version:
                return config
        raise NotFound(f"objective {objective!r} has no version {version}")

    def list_current(self) -> list[ObjectiveConfig]:
        self._check_ready()
        return [self.current()[name] for name in sorted(self.current())]

    def history(self, objective: str) -> list[ObjectiveConfig]:
        self._check_ready()
        assert self._history is not None
        versions = self._history.versions.get(objective)
        if not versions:
            raise NotFound(f"no objective {objective!r}")
        return list(versions)

    # ------------------------------------------------------------------ the write path

    async def update(
        self, config: ObjectiveConfig, expected_version: int, validate_only: bool = False
    ) -> ObjectiveConfig:
        """The configuration as stored (or as it would be, with `validate_only`)."""
        self._check_ready()
        name = config.objective
        if not name:
            raise InvalidArgument([("config.objective", "the objective is required")])
        async with self._lock:
            current = self.current().get(name)
            current_version = current.version if current is not None else 0
            if expected_version != current_version:
                raise FailedPrecondition(
                    f"objective {name!r} is at version {current_version}, not "
                    f"{expected_version}: read it again and redo the change",
                    [("VERSION", f"objectives/{name}", f"current version is {current_version}")],
                    reason="VERSION_MISMATCH",
                )
            problems = validate(config)
            if problems:
                raise InvalidArgument(
                    problems,
                    message=f"the configuration of {name!r} does not validate: "
                    f"{len(problems)} problem(s), nothing was published",
                )
            self._check_runners(current, config)
            stored = _copy(config)
            stored.version = current_version + 1
            stored.change.previous_version = current_version
            stored.change.change_time.CopyFrom(now_timestamp())
            if not stored.change.action:
                stored.change.action = "update"
            if validate_only:
                return stored
            await self._publish(stored)
        log.info(
            "objective changed",
            extra={
                "objective": name,
                "version": stored.version,
                "previous_version": current_version,
                "action": stored.change.action,
                "author": stored.change.author,
                "reason": stored.change.reason,
            },
        )
        return stored

    def _check_runners(self, current: ObjectiveConfig | None, config: ObjectiveConfig) -> None:
        """Refuse a policy that newly accepts a model no runner host reports ready.

        A new objective has no traffic to hand off yet, so its first version is not gated."""
        if not self.settings.require_ready_runners or current is None:
            return
        newly = sorted(accepted_models(config) - accepted_models(current))
        ready = self.runners.ready_hosts
        missing = [model for model in newly if not ready(config.objective, model)]
        if missing:
            raise FailedPrecondition(
                f"no runner host reports ready for {', '.join(missing)}: add the model(s) first "
                "and let a runner start before the policy accepts them",
                [
                    (
                        "RUNNER_NOT_READY",
                        f"objectives/{config.objective}/models/{model}",
                        "no runner host reports this model ready",
                    )
                    for model in missing
                ],
                reason="RUNNER_NOT_READY",
            )

    async def _publish(self, config: ObjectiveConfig) -> None:
        """Publish one version and wait until this process's readers see it."""
        assert self._publisher is not None and self._history is not None
        name, version = config.objective, config.version
        timeout = self.settings.update_timeout_s
        try:
            await self._publisher.publish(config, key=name, timeout=timeout)
        except BusError as exc:
            log.error(
                "publishing a configuration failed",
                extra={"objective": name, "version": version, "error": str(exc)},
            )
            raise Unavailable(
                "the control topic did not take the change; read the objective again "
                "before retrying"
            ) from exc
        try:
            async with asyncio.timeout(timeout):
                await self._current_follower().wait_for(name, version)
                await self._history.wait_for(name, version)
        except TimeoutError:
            # Published is published: the readers will get there; say so and answer.
            log.warning(
                "a published version is not back from the topic yet",
                extra={"objective": name, "version": version, "timeout_s": timeout},
            )
        await self.admin.compact(self._publisher.topic)

    def facts(self) -> dict[str, Any]:
        configs = self._follower.configs if self._follower is not None else {}
        return {
            "objectives": {name: configs[name].version for name in sorted(configs)},
            "seeded": list(self.seeded),
            "mesh_file_differs": list(self.mesh_file_differs),
        }


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
