"""A bounded receive-and-handle loop over one subscription.

The decoy, the enricher's request pipelines and the model runner all consume a SHARED
subscription the same way: one receiver task takes messages off the subscription and
hands each to its own asyncio task, at most `max_in_flight` at once, so a slow handler
never holds up receiving and a flood never grows memory without bound. On stop the
receiver is cancelled first (nothing new is taken), the handlers in flight get a grace
period to finish, and the rest are cancelled: what they had not acknowledged the broker
redelivers to another consumer.

Messages are taken in bursts: one (waiting for it), then whatever else the client already
holds, up to the free slots and `max_burst`. Under light load a burst is one message; under
load the handlers of a burst start in the same turn of the event loop, so what they publish
leaves as one batch. A `burst_handler` takes the whole burst in one task instead (the model
runner scores it with one call), at most `max_bursts_in_flight` at once: while they run,
new messages queue in the client and make up the next burst (dynamic batching).

Each message is processed inside a CONSUMER span of its own (`Envelope.span`, child of the
span that published it), current in a handler's task and ended when its handler ends; a
burst handler continues each message's trace with `envelope.trace_context()`.

The handler owns acknowledgement (ack, nack) and its own error handling; the consumer
only logs what escapes it. The subscription stays the caller's to close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Generic

from opentelemetry import context as otel_context
from opentelemetry.trace import StatusCode

from services.core.bus import Envelope, M, Subscription
from services.core.tracing import consumer_span, in_span

log = logging.getLogger(__name__)

# A coroutine function, not any awaitable: each message's handling is its own asyncio task.
Handler = Callable[[Envelope[M]], Coroutine[Any, Any, None]]
BurstHandler = Callable[[list[Envelope[M]]], Coroutine[Any, Any, None]]


class Window:
    """Room for at most `size` messages held at once: taken in bursts, given back one by one
    or in bursts, and waited for when it is full (a semaphore that takes many at a time)."""

    def __init__(self, size: int) -> None:
        self.room = size
        self._freed = asyncio.Event()

    async def wait(self, until: Callable[[], bool] | None = None) -> int:
        """The room there is, once there is some (and `until()` holds, when given)."""
        while self.room == 0 or (until is not None and not until()):
            self._freed.clear()
            await self._freed.wait()
        return self.room

    def take(self, messages: int) -> None:
        self.room -= messages

    def give(self, messages: int) -> None:
        self.room += messages
        self._freed.set()


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
        handler: Handler[M] | None = None,
        *,
        max_in_flight: int,
        retry_delay_s: float,
        name: str,
        on_receive_error: Callable[[Exception], None] | None = None,
        max_burst: int = 1,
        burst_handler: BurstHandler[M] | None = None,
        max_bursts_in_flight: int | None = None,
    ) -> None:
        if max_in_flight < 1 or max_burst < 1 or (max_bursts_in_flight or 1) < 1:
            raise ValueError("max_in_flight, max_burst and max_bursts_in_flight must be >= 1")
        if (handler is None) == (burst_handler is None):
            raise ValueError("give exactly one of handler and burst_handler")
        self.subscription = subscription
        self.name = name
        self._handler = handler
        self._burst_handler = burst_handler
        self._max_burst = max_burst
        self._retry_delay_s = retry_delay_s
        self._on_receive_error = on_receive_error
        self._window = Window(max_in_flight)
        self._max_bursts = max_bursts_in_flight or max_in_flight
        # Strong references (the event loop keeps only weak ones to tasks), with the number
        # of messages each holds.
        self._handlers: dict[asyncio.Task[None], int] = {}
        self._receiver: asyncio.Task[None] | None = None

    @property
    def in_flight(self) -> int:
        """Messages received and not yet done with (their handler has not finished)."""
        return sum(self._handlers.values())

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
            # Free slots first: a message is only taken off the subscription's queue when it
            # can be worked on at once, so none sits here received but unhandled.
            room = await self._window.wait(lambda: len(self._handlers) < self._max_bursts)
            try:
                burst = await subscription.receive_burst(min(room, self._max_burst))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._on_receive_error is not None:
                    self._on_receive_error(exc)
                else:
                    log.exception(
                        "receiving failed",
                        extra={"consumer": self.name, "topic": subscription.topic},
                    )
                await asyncio.sleep(self._retry_delay_s)
                continue
            for envelope in burst:
                envelope.span = consumer_span(
                    subscription.topic,
                    subscription.name,
                    len(envelope.raw.data),
                    envelope.trace_context(),
                )
            if self._burst_handler is not None:
                self._spawn(self._burst_handler(burst), burst)
            else:
                assert self._handler is not None
                for envelope in burst:
                    self._spawn(self._handler(envelope), [envelope])

    def _spawn(self, work: Coroutine[Any, Any, None], envelopes: list[Envelope[M]]) -> None:
        self._window.take(len(envelopes))
        handler = asyncio.create_task(_traced(work, envelopes), name=f"{self.name}:handle")
        self._handlers[handler] = len(envelopes)
        handler.add_done_callback(self._finished)

    def _finished(self, handler: asyncio.Task[None]) -> None:
        # Runs however the handler ended (done, failed, cancelled), so a slot is never lost.
        self._window.give(self._handlers.pop(handler))
        if not handler.cancelled() and handler.exception() is not None:
            log.error(
                "task handler failed",
                exc_info=handler.exception(),
                extra={"consumer": self.name, "topic": self.subscription.topic},
            )


async def _traced(work: Coroutine[Any, Any, None], envelopes: list[Envelope[M]]) -> None:
    """Run a handler inside its messages' CONSUMER spans (the first one current), ending
    them however it ends: each span covers the message's processing up to its ack."""
    first = envelopes[0].span
    assert first is not None
    token = otel_context.attach(in_span(first))
    try:
        await work
    except BaseException as exc:
        for envelope in envelopes:
            if envelope.span is not None:
                envelope.span.set_status(StatusCode.ERROR, type(exc).__name__)
        raise
    finally:
        otel_context.detach(token)
        for envelope in envelopes:
            if envelope.span is not None:
                envelope.span.end()
