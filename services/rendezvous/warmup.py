"""Warm-up: the whole path is exercised before the rendezvous says it serves.

A cold mesh answers its first requests late: the broker's JIT compiles on traffic, topics
load, subscriptions and producers (one per return address) are made on first use, every
process touches its code paths for the first time. So, once a collector stream is open, the
rendezvous sends warm-up requests through the real path (the task topic, the enricher, every
model runner, the collector, the mailbox race) at `warmup_rate`, open loop, for each
objective, until enough races in a row saw the path itself (the first prediction's arrival,
less the time the model took: a model slow by design says nothing about the mesh) take at
most `warmup_within_fraction` of the SLA, for `warmup_min_s` at least and `warmup_max_s` at
most. A replica restarted while other replicas serve (`rejoining`) warms up at
`rejoin_warmup_rate` instead: the path is warm already, and busy with their answers.
Warm-up tasks carry `warmup: true`: the models score them, but they are never archived,
never in an outcome and never counted as traffic. Health turns SERVING only afterwards, so
`rendezvous up` returns when the first real request will be answered in time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass

from rendezvous.v1 import model_pb2, objective_pb2, scoring_pb2

from services.core.protos import duration_ms
from services.rendezvous.settings import RendezvousSettings

log = logging.getLogger(__name__)

# One warm-up race: the path's own latency in ms, or None when no prediction came.
Race = Callable[[scoring_pb2.ScoreRequest], Awaitable[float | None]]


@dataclass
class WarmupProgress:
    """What `rendezvous status` shows of the warm-up."""

    state: str = "waiting for the collector"
    sent: int = 0
    in_time: int = 0
    # Races in a row (over every objective) whose path was fast enough.
    consecutive: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def warmup_request(config: objective_pb2.ObjectiveConfig) -> scoring_pb2.ScoreRequest:
    """A request every model of the objective accepts: each feature at its type's zero."""
    request = scoring_pb2.ScoreRequest(objective=config.objective)
    for spec in config.features:
        value = request.features[spec.name]
        if spec.type == model_pb2.FEATURE_TYPE_STRING:
            value.string_value = ""
        elif spec.type == model_pb2.FEATURE_TYPE_BOOL:
            value.bool_value = False
        elif spec.type == model_pb2.FEATURE_TYPE_LIST:
            value.list_value.SetInParent()
        else:
            value.number_value = 0.0
    return request


class Warmup:
    """Drives warm-up races over every objective until the path is warm or time is up.

    Warm: `warmup_consecutive` races in a row, over all objectives, and
    `warmup_consecutive_per_objective` in a row for each, whose path (the first
    prediction's arrival less the model's own time) took at most `warmup_within_fraction`
    of the SLA; and at least `warmup_min_s` spent. The races go round the objectives at
    `warmup_rate` in total, open loop.
    """

    def __init__(
        self,
        settings: RendezvousSettings,
        configs: list[objective_pb2.ObjectiveConfig],
        race: Race,
    ) -> None:
        self.settings = settings
        self.configs = configs
        self.race = race
        self.progress = WarmupProgress()
        self._per_objective = {config.objective: 0 for config in configs}

    @property
    def rate(self) -> float:
        """Warm-up races per second: gentler for a replica rejoining replicas that serve."""
        settings = self.settings
        return settings.rejoin_warmup_rate if settings.rejoining else settings.warmup_rate

    def warm(self, elapsed_s: float) -> bool:
        settings = self.settings
        return (
            elapsed_s >= settings.warmup_min_s
            and self.progress.consecutive >= settings.warmup_consecutive
            and all(
                n >= settings.warmup_consecutive_per_objective for n in self._per_objective.values()
            )
        )

    async def run(self) -> bool:
        """True when the path got warm within `warmup_max_s`."""
        settings = self.settings
        rate = self.rate
        self.progress.state = "running"
        started = time.monotonic()
        requests = [(config, warmup_request(config)) for config in self.configs]
        pending: set[asyncio.Task[None]] = set()
        index = 0
        ok = True
        while not self.warm(time.monotonic() - started):
            self.progress.seconds = time.monotonic() - started
            if self.progress.seconds >= settings.warmup_max_s:
                ok = False
                break
            await asyncio.sleep(max(0.0, started + index / rate - time.monotonic()))
            config, request = requests[index % len(requests)]
            task = asyncio.create_task(self._one(config, request))
            pending.add(task)
            task.add_done_callback(pending.discard)
            index += 1
            self.progress.sent += 1
        for task in list(pending):
            task.cancel()
        self.progress.seconds = time.monotonic() - started
        self.progress.state = "done" if ok else "gave up (serving anyway)"
        (log.info if ok else log.warning)("warm-up finished", extra=self.progress.as_dict())
        return ok

    async def _one(
        self, config: objective_pb2.ObjectiveConfig, request: scoring_pb2.ScoreRequest
    ) -> None:
        path_ms = await self.race(request)
        limit_ms = self.settings.warmup_within_fraction * duration_ms(config.sla)
        if path_ms is not None and path_ms <= limit_ms:
            self.progress.in_time += 1
            self.progress.consecutive += 1
            self._per_objective[config.objective] += 1
        else:
            self.progress.consecutive = 0
            self._per_objective[config.objective] = 0
