"""Warm-up: the whole path is exercised before the rendezvous says it serves.

A cold mesh answers its first requests late: the broker's JIT compiles on traffic, topics
load, subscriptions and producers (one per return address) are made on first use, every
process touches its code paths for the first time. So, once a collector stream is open, the
rendezvous sends warm-up requests through the real path (the task topic, the enricher, every
model runner, the collector, the mailbox race) at `warmup_rate`, open loop, for each
objective, until `warmup_consecutive` in a row were answered by a model within
`warmup_within_fraction` of the SLA, for `warmup_min_s` at least and `warmup_max_s` at most.
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

Race = Callable[[scoring_pb2.ScoreRequest], Awaitable[scoring_pb2.ScoreResponse]]


@dataclass
class WarmupProgress:
    """What `rendezvous status` shows of the warm-up."""

    state: str = "waiting for the collector"
    sent: int = 0
    answered_in_time: int = 0
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
    """Drives warm-up races for every objective until each is warm or time is up."""

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

    async def run(self) -> bool:
        """True when every objective got warm within `warmup_max_s`."""
        self.progress.state = "running"
        started = time.monotonic()
        try:
            warm = await asyncio.wait_for(
                asyncio.gather(*(self._objective(config, started) for config in self.configs)),
                self.settings.warmup_max_s,
            )
        except TimeoutError:
            warm = [False]
        ok = all(warm)
        self.progress.seconds = time.monotonic() - started
        self.progress.state = "done" if ok else "gave up (serving anyway)"
        log_ = log.info if ok else log.warning
        log_("warm-up finished", extra=self.progress.as_dict())
        return ok

    async def _objective(self, config: objective_pb2.ObjectiveConfig, started: float) -> bool:
        settings = self.settings
        request = warmup_request(config)
        within_ms = settings.warmup_within_fraction * duration_ms(config.sla)
        interval = len(self.configs) / settings.warmup_rate
        consecutive = 0
        pending: set[asyncio.Task[None]] = set()

        async def one() -> None:
            nonlocal consecutive
            response = await self.race(request)
            in_time = (
                response.decision.source == scoring_pb2.ANSWER_SOURCE_MODEL
                and duration_ms(response.elapsed) <= within_ms
            )
            consecutive = consecutive + 1 if in_time else 0
            self.progress.answered_in_time += in_time
            self.progress.consecutive = consecutive

        index = 0
        while True:
            elapsed = time.monotonic() - started
            self.progress.seconds = elapsed
            if consecutive >= settings.warmup_consecutive and elapsed >= settings.warmup_min_s:
                break
            due = started + index * interval
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            task = asyncio.create_task(one())
            pending.add(task)
            task.add_done_callback(pending.discard)
            index += 1
            self.progress.sent += 1
        if pending:
            await asyncio.wait(pending)
        return True
