"""A topic read from its earliest message for as long as the process lives.

Several components keep state that is nothing but a topic read from the start: the control
topic (each objective's configuration, `services.core.control_topic`), its history and the
runner statuses (the control plane), an objective's subject events (the enricher). Each
reads with a `Reader` (a non-durable cursor: nothing to clean up, the state is rebuilt from
the topic on every start), knows when it has *caught up* (no older message waiting:
`has_message_available` says so exactly), rides out a failed read (the client reconnects by
itself), and wakes whoever waits for a message. `TopicFollower` is that loop, once;
subclasses say what a message does (`take`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Generic

from services.core.bus import Bus, Envelope, M, Reader

log = logging.getLogger(__name__)


class TopicFollower(Generic[M]):
    """Reads `topic` from its earliest message until cancelled, handing each to `take`."""

    # A long catch-up must not starve the gRPC server and health checks of the loop.
    yield_every: int = 1000

    def __init__(
        self,
        bus: Bus,
        topic: str,
        message_type: type[M],
        *,
        compacted: bool = False,
        retry_delay_s: float = 0.5,
    ) -> None:
        self.bus = bus
        self.topic = topic
        self.caught_up = asyncio.Event()
        self.read = 0
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
        """Read until cancelled; `caught_up` is set once no older message is waiting."""
        if self._reader is None:
            await self.open()
        reader = self._reader
        assert reader is not None
        while True:
            try:
                if not self.caught_up.is_set() and not await reader.has_message_available():
                    self.caught_up.set()
                    self.on_caught_up()
                    continue
                envelope = await reader.read_next()
            except asyncio.CancelledError:
                raise
            except Exception:
                # The client reconnects by itself; keep what we hold and try again.
                log.exception("reading a followed topic failed", extra={"topic": self.topic})
                await asyncio.sleep(self._retry_delay_s)
                continue
            await self.take(envelope)
            self.read += 1
            async with self._changed:
                self._changed.notify_all()
            if self.read % self.yield_every == 0:
                await asyncio.sleep(0)

    async def take(self, envelope: Envelope[M]) -> None:
        """What one message does to the state held."""
        raise NotImplementedError

    def on_caught_up(self) -> None:
        """Called once, when no older message waits (default: a log line)."""
        log.info("caught up", extra={"topic": self.topic, "messages": self.read})

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once `predicate` holds, checked after every message taken (callers bound
        the wait with their own timeout)."""
        async with self._changed:
            await self._changed.wait_for(predicate)

    async def close(self) -> None:
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await self._reader.close()
