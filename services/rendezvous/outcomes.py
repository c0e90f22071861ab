"""Outcomes to the results topic, none lost to a broker outage (bounded).

An outcome leaves when its mailbox closes, `late_grace` after the answer, off the answer
path. Its publisher is a held one (`Bus.publisher`'s `hold`): the Pulsar client keeps every
outcome the broker has not confirmed, across a broker restart, stall or reconnect, and sends
them when it reconnects (with its own backoff), so this module keeps no second queue of
outcomes. What it keeps is the bound and the books:

- at most `outcome_backlog_max` outcomes and `outcome_backlog_max_bytes` of them wait at
  once (`rdv_outcome_backlog`, `rdv_outcome_backlog_bytes`); an outcome beyond either is
  dropped (`rdv_outcomes_total{result="dropped"}`; one log line when dropping starts, one
  when there is room again, with the count);
- a publish the client fails all the same (it refused the outcome, or its producer closed
  under it) is tried again after a backoff (`outcome_retry_initial_s`, doubling up to
  `outcome_retry_max_s`; `result="retried"`), still counted in the backlog: a failed publish
  is one the client will not send, so trying again publishes it once;
- at shutdown the rendezvous waits for the backlog within its drain budget (`flush`); what
  is still waiting when the bus closes is dropped, counted and logged (`close`).

The backlog lives in this process (in the client): a rendezvous killed while the broker is
away loses it, as it loses the outcomes of its open mailboxes.

Order does not matter (the evaluator keys outcomes by request id); each outcome is
published once, but for the one the broker stored just before a crash took its receipt
with it (the client sends that one again).
"""

from __future__ import annotations

import asyncio
import logging

from rendezvous.v1 import task_pb2

from services.core.bus import BusError, Publisher, message_properties
from services.core.telemetry import counter, gauge

log = logging.getLogger(__name__)

OUTCOMES = counter(
    "rdv_outcomes",
    "Outcomes to the results topic: published, retried (a publish the client failed, tried "
    "again), dropped (the backlog was full, or the bus closed under it)",
    ("result",),
)
BACKLOG = gauge("rdv_outcome_backlog", "Outcomes waiting for the broker's receipt")
BACKLOG_BYTES = gauge("rdv_outcome_backlog_bytes", "Bytes of the outcomes waiting for the broker")


class OutcomeSender:
    """Publishes outcomes and keeps the backlog of those the broker has not confirmed."""

    def __init__(
        self,
        *,
        max_count: int,
        max_bytes: int,
        retry_initial_s: float,
        retry_max_s: float,
    ) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self.count = 0
        self.bytes = 0
        self.published = 0
        self.dropped = 0
        self._emptied = asyncio.Event()
        self._emptied.set()
        # Dropped since the backlog filled up (logged once it has room again); None: not full.
        self._dropping: int | None = None
        self._failing = False
        self._closed = False
        self._published = OUTCOMES.labels("published")
        self._retried = OUTCOMES.labels("retried")
        self._dropped = OUTCOMES.labels("dropped")

    async def send(
        self, publisher: Publisher[task_pb2.Outcome], outcome: task_pb2.Outcome, key: str
    ) -> bool:
        """Publish `outcome`, waiting for the broker as long as it takes; False when it was
        dropped (the backlog is full, or the sender closed before the broker took it)."""
        data = outcome.SerializeToString()
        size = len(data)
        if self._closed or self.count >= self.max_count or self.bytes + size > self.max_bytes:
            self._drop_for_room(outcome.request_id)
            return False
        self._enter(size)
        try:
            return await self._publish(publisher, data, message_properties(outcome, None), key)
        finally:
            self._leave(size)

    async def _publish(
        self,
        publisher: Publisher[task_pb2.Outcome],
        data: bytes,
        properties: dict[str, str],
        key: str,
    ) -> bool:
        delay_s = self._retry_initial_s
        while True:
            try:
                # No timeout: the held publisher keeps it until the broker is back.
                await publisher.publish_bytes(data, properties, key)
            except BusError as exc:
                if self._closed:
                    self.dropped += 1
                    self._dropped.inc()
                    return False
                self._retried.inc()
                if not self._failing:
                    self._failing = True
                    log.warning(
                        "publishing outcomes failed; kept and retried with backoff",
                        extra={"topic": publisher.topic, "error": str(exc)},
                    )
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, self._retry_max_s)
                continue
            if self._failing:
                self._failing = False
                log.info("outcomes published again", extra={"topic": publisher.topic})
            self.published += 1
            self._published.inc()
            return True

    def _enter(self, size: int) -> None:
        if self._dropping is not None:
            log.warning(
                "outcome backlog has room again",
                extra={"dropped": self._dropping, "backlog": self.count},
            )
            self._dropping = None
        self.count += 1
        self.bytes += size
        BACKLOG.inc()
        BACKLOG_BYTES.inc(size)
        self._emptied.clear()

    def _leave(self, size: int) -> None:
        self.count -= 1
        self.bytes -= size
        BACKLOG.dec()
        BACKLOG_BYTES.dec(size)
        if self.count == 0:
            self._emptied.set()

    def _drop_for_room(self, request_id: str) -> None:
        self.dropped += 1
        self._dropped.inc()
        if self._closed:
            return
        if self._dropping is None:
            self._dropping = 0
            log.error(
                "outcome backlog full: outcomes are dropped until the broker takes some",
                extra={
                    "request_id": request_id,
                    "backlog": self.count,
                    "backlog_bytes": self.bytes,
                    "max_count": self.max_count,
                    "max_bytes": self.max_bytes,
                },
            )
        self._dropping += 1

    async def flush(self, timeout_s: float) -> bool:
        """Wait until no outcome is waiting, at most `timeout_s`; True when none is."""
        try:
            await asyncio.wait_for(self._emptied.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        """No more outcomes: what is still waiting is dropped when the bus closes under it."""
        self._closed = True
        if self.count:
            log.error(
                "outcomes not published at shutdown: the broker did not take them in time",
                extra={"backlog": self.count, "backlog_bytes": self.bytes},
            )
