"""What the control plane reads besides the current configurations (`ControlFollower`).

- `HistoryFollower`: a NON-compacted read of the control topic from its earliest message,
  which is every version ever published (the topic's retention is infinite: its history is
  the audit trail). It serves ListObjectiveHistory and Get of a past version.
- `RunnerFollower`: a compacted read of the runner-status topic, the latest `RunnerStatus`
  of every (objective, model, host), which the readiness gate asks whether a model has a
  runner that is ready.

Both read until cancelled, set `caught_up` once nothing older waits, and wake waiters on
every message they take.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Generic

from rendezvous.v1 import control_pb2, objective_pb2

from services.core.bus import Bus, M, Reader

log = logging.getLogger(__name__)


class _Follower(Generic[M]):
    """Reads one topic from its earliest message until cancelled."""

    def __init__(
        self, bus: Bus, topic: str, message_type: type[M], *, compacted: bool, retry_delay_s: float
    ) -> None:
        self.bus = bus
        self.topic = topic
        self.caught_up = asyncio.Event()
        self._message_type = message_type
        self._compacted = compacted
        self._retry_delay_s = retry_delay_s
        self._reader: Reader[M] | None = None
        self._changed = asyncio.Condition()

    async def open(self) -> None:
        self._reader = await self.bus.reader(
            self.topic, self._message_type, start="earliest", compacted=self._compacted
        )

    async def run(self) -> None:
        if self._reader is None:
            await self.open()
        reader = self._reader
        assert reader is not None
        while True:
            try:
                if not self.caught_up.is_set() and not await reader.has_message_available():
                    self.caught_up.set()
                    continue
                envelope = await reader.read_next()
            except asyncio.CancelledError:
                raise
            except Exception:
                # The client reconnects by itself; keep what we hold and try again.
                log.exception("reading a control-plane topic failed", extra={"topic": self.topic})
                await asyncio.sleep(self._retry_delay_s)
                continue
            self.take(envelope.message, envelope.key)
            async with self._changed:
                self._changed.notify_all()

    def take(self, message: M, key: str | None) -> None:
        raise NotImplementedError

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        async with self._changed:
            await self._changed.wait_for(predicate)

    async def close(self) -> None:
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await self._reader.close()


class HistoryFollower(_Follower[objective_pb2.ObjectiveConfig]):
    """Every version of every objective, oldest first, as published on the control topic."""

    def __init__(self, bus: Bus, *, retry_delay_s: float) -> None:
        super().__init__(
            bus,
            bus.topics.control(),
            objective_pb2.ObjectiveConfig,
            compacted=False,
            retry_delay_s=retry_delay_s,
        )
        self.versions: dict[str, list[objective_pb2.ObjectiveConfig]] = {}

    def take(self, message: objective_pb2.ObjectiveConfig, key: str | None) -> None:
        held = self.versions.setdefault(message.objective, [])
        # A version is published once; a reconnecting reader may still deliver it twice.
        if held and message.version <= held[-1].version:
            return
        held.append(message)

    def latest(self, objective: str) -> int:
        held = self.versions.get(objective)
        return held[-1].version if held else 0

    async def wait_for(self, objective: str, min_version: int) -> None:
        await self.wait_until(lambda: self.latest(objective) >= min_version)


def runner_key(status: control_pb2.RunnerStatus) -> str:
    return f"{status.objective}/{status.model}/{status.instance}"


class RunnerFollower(_Follower[control_pb2.RunnerStatus]):
    """The latest status each runner host reported for each model it serves."""

    def __init__(self, bus: Bus, *, retry_delay_s: float) -> None:
        super().__init__(
            bus,
            bus.topics.runner_status(),
            control_pb2.RunnerStatus,
            compacted=True,
            retry_delay_s=retry_delay_s,
        )
        self.statuses: dict[str, control_pb2.RunnerStatus] = {}

    def take(self, message: control_pb2.RunnerStatus, key: str | None) -> None:
        self.statuses[key or runner_key(message)] = message

    def ready_hosts(self, objective: str, model: str) -> list[str]:
        """The hosts that last said their runner of `model` is ready."""
        return sorted(
            status.instance
            for status in self.statuses.values()
            if status.objective == objective and status.model == model and status.ready
        )
