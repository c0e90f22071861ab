"""A bounded receive-and-handle loop over one subscription.

The decoy, the enricher's request pipelines and the model runner all consume a SHARED
subscription the same way: one receiver task takes messages off the subscription and
hands each to its own asyncio task, at most `max_in_flight` at once, so a slow handler
never holds up receiving and a flood never grows memory without bound. On stop the
receiver is cancelled first (nothing new is taken), the handlers in flight get a grace
period to finish, and the rest are cancelled: what they had not acknowledged the broker
redelivers to another consumer.

The handler owns acknowledgement (ack, nack) and its own error handling; the consumer
only logs what escapes it. The subscription stays the caller's to close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Generic

from services.core.bus import Envelope, M, Subscription

log = logging.getLogger(__name__)

# A coroutine function, not any awaitable: each message's handling is its own asyncio task.
Handler = Callable[[Envelope[M]], Coroutine[Any, Any, None]]


class BoundedConsumer(Generic[M]):
    """Receives from `subscription` and runs `handler` per message, at most `max_in_flight`.

    `on_receive_error` is called inside the `except` block of a failed receive (so a
    `log.exception` there carries the traceback), to log and count it the caller's way;
    without it the failure is logged here. Either way the loop waits `retry_delay_s` and
    receives again: a broker that went away must not end consumption.
    """

    def __init__(
        self,
        subscription: Subscription[M],
        handler: Handler[M],
        *,
        max_in_flight: int,
        retry_delay_s: float,
        name: str,
        on_receive_error: Callable[[Exception], None] | None = None,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.subscription = subscription
        self.name = name
        self._handler = handler
        self._retry_delay_s = retry_delay_s
        self._on_receive_error = on_receive_error
        self._slots = asyncio.Semaphore(max_in_flight)
        # Strong references: the event loop keeps only weak ones to tasks.
        self._handlers: set[asyncio.Task[None]] = set()
        self._receiver: asyncio.Task[None] | None = None

    @property
    def in_flight(self) -> int:
        """Messages received and not yet done with (their handler has not finished)."""
        return len(self._handlers)

    def start(self) -> None:
        """Start receiving (call on the running loop)."""
        if self._receiver is not None:
            raise RuntimeError(f"consumer {self.name!r} is already running")
        self._receiver = asyncio.create_task(self._receive_loop(), name=self.name)

    async def stop(self, grace_s: float) -> None:
        """Stop receiving, let handlers in flight finish for up to `grace_s`, cancel the rest."""
        receiver, self._receiver = self._receiver, None
        if receiver is not None:
            # The only place a receive is cancelled mid-way: once stopped, what the broker
            # had not yet handed over stays queued for the other consumers.
            receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await receiver
        # No handler is spawned any more, so this set is complete.
        pending = set(self._handlers)
        if pending:
            _, late = await asyncio.wait(pending, timeout=grace_s)
            # Unacknowledged, so the broker hands their messages to another consumer.
            for handler in late:
                handler.cancel()
            if late:
                await asyncio.wait(late)

    async def _receive_loop(self) -> None:
        subscription = self.subscription
        while True:
            # A slot first: a message is only taken off the subscription's queue when it can
            # be worked on at once, so none sits here received but unhandled.
            await self._slots.acquire()
            try:
                envelope = await subscription.receive()
            except asyncio.CancelledError:
                self._slots.release()
                raise
            except Exception as exc:
                self._slots.release()
                if self._on_receive_error is not None:
                    self._on_receive_error(exc)
                else:
                    log.exception(
                        "receiving failed",
                        extra={"consumer": self.name, "topic": subscription.topic},
                    )
                await asyncio.sleep(self._retry_delay_s)
                continue
            handler = asyncio.create_task(self._handler(envelope), name=f"{self.name}:handle")
            self._handlers.add(handler)
            handler.add_done_callback(self._finished)

    def _finished(self, handler: asyncio.Task[None]) -> None:
        # Runs however the handler ended (done, failed, cancelled), so a slot is never lost.
        self._handlers.discard(handler)
        self._slots.release()
        if not handler.cancelled() and handler.exception() is not None:
            log.error(
                "task handler failed",
                exc_info=handler.exception(),
                extra={"consumer": self.name, "topic": self.subscription.topic},
            )
