"""Following the control topic: every objective's current configuration, live.

The control topic (`rdv.control.objectives`, keyed by objective, compacted) is the source of
truth for how objectives are served; the control component is its one writer. Every other
component follows it with a `ControlFollower`: a compacted read from the earliest message
(the latest version of each objective, then every change after it), so a component that
starts late needs nothing but the topic. Until the follower has caught up (no older message
waiting) a component does not act on a configuration; after that, each new version is
handed to the listeners, in order, one version at a time.

A version that is not newer than the one held is ignored: the compacted part and the
topic's tail can overlap, and a reconnecting reader may see a message twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable, Collection

from rendezvous.v1 import objective_pb2

from services.core.bus import Bus, Envelope
from services.core.topic_follower import TopicFollower

log = logging.getLogger(__name__)

ObjectiveConfig = objective_pb2.ObjectiveConfig
# Called with the version held before (None for a new objective) and the new one.
Listener = Callable[[ObjectiveConfig | None, ObjectiveConfig], Awaitable[None] | None]


class ControlFollower(TopicFollower[ObjectiveConfig]):
    """Holds the current configuration of every (or the named) objective, live."""

    def __init__(
        self,
        bus: Bus,
        *,
        retry_delay_s: float = 0.5,
        objectives: Collection[str] | None = None,
    ) -> None:
        super().__init__(
            bus,
            bus.topics.control(),
            ObjectiveConfig,
            compacted=True,
            retry_delay_s=retry_delay_s,
        )
        self.configs: dict[str, ObjectiveConfig] = {}
        self._only = frozenset(objectives) if objectives is not None else None
        self._listeners: list[Listener] = []

    def listen(self, listener: Listener) -> None:
        """Call `listener` for every version that arrives once caught up."""
        self._listeners.append(listener)

    def on_caught_up(self) -> None:
        log.info(
            "caught up with the control topic",
            extra={"objectives": ",".join(sorted(self.configs))},
        )

    async def take(self, envelope: Envelope[ObjectiveConfig]) -> None:
        config = envelope.message
        name = config.objective
        if self._only is not None and name not in self._only:
            return
        held = self.configs.get(name)
        if held is not None and config.version <= held.version:
            return
        self.configs[name] = config
        if not self.caught_up.is_set():
            return
        log.info(
            "objective configuration changed",
            extra={"objective": name, "version": config.version},
        )
        for listener in self._listeners:
            try:
                result = listener(held, config)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                # One listener's failure must not stop the others, nor the follower.
                log.exception(
                    "applying a configuration failed",
                    extra={"objective": name, "version": config.version},
                )

    async def wait_for(self, objective: str, min_version: int = 1) -> ObjectiveConfig:
        """The objective's configuration once it is at least `min_version` (callers bound
        the wait with their own timeout)."""
        await self.wait_until(
            lambda: self.configs.get(objective, ObjectiveConfig()).version >= min_version
        )
        return self.configs[objective]


async def follow(
    bus: Bus,
    stack: contextlib.AsyncExitStack,
    watch: Callable[[asyncio.Task[None]], asyncio.Task[None]],
    *,
    retry_delay_s: float = 0.5,
    objectives: Collection[str] | None = None,
) -> ControlFollower:
    """A follower that runs until `stack` closes, returned once it has caught up.

    `watch` is the component's `Component.watch`: a follower that dies ends the process
    (the supervisor restarts it) rather than leaving it on a stale configuration.
    """
    follower = ControlFollower(bus, retry_delay_s=retry_delay_s, objectives=objectives)
    await follower.open()
    stack.push_async_callback(follower.close)
    task = watch(asyncio.create_task(follower.run(), name="control:follow"))

    async def stop() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    stack.push_async_callback(stop)
    await follower.caught_up.wait()
    return follower
