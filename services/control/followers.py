"""What the control plane reads besides the current configurations (`ControlFollower`).

- `HistoryFollower`: a NON-compacted read of the control topic from its earliest message,
  which is every version ever published (the topic's retention is infinite: its history is
  the audit trail). It serves ListObjectiveHistory and Get of a past version.
- `RunnerFollower`: a compacted read of the runner-status topic, the latest `RunnerStatus`
  of every (objective, model, host), which the readiness gate asks whether a model has a
  runner that is ready.

Both are `TopicFollower`s: they read until cancelled, set `caught_up` once nothing older
waits, and wake waiters on every message they take.
"""

from __future__ import annotations

from rendezvous.v1 import control_pb2, objective_pb2

from services.core.bus import Bus, Envelope
from services.core.topic_follower import TopicFollower


class HistoryFollower(TopicFollower[objective_pb2.ObjectiveConfig]):
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

    async def take(self, envelope: Envelope[objective_pb2.ObjectiveConfig]) -> None:
        message = envelope.message
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


class RunnerFollower(TopicFollower[control_pb2.RunnerStatus]):
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

    async def take(self, envelope: Envelope[control_pb2.RunnerStatus]) -> None:
        message = envelope.message
        self.statuses[envelope.key or runner_key(message)] = message

    def ready_hosts(self, objective: str, model: str) -> list[str]:
        """The hosts that last said their runner of `model` is ready."""
        return sorted(
            status.instance
            for status in self.statuses.values()
            if status.objective == objective and status.model == model and status.ready
        )
