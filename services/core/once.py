"""Work done once per key, for consumers of a topic Pulsar delivers at least once.

A message comes again when its acknowledgement was lost (a broker killed before it stored the
subscription's position, a consumer killed before its acks left) or when an upstream producer
sent it twice. A consumer whose work is to publish something for each message (the decoy's
archive record, the enricher's task) would publish it twice. `Once` remembers the keys it
did the work for, the most recent `capacity` of them (the oldest forgotten first), so a
message that comes again within that window is acknowledged without doing it again; and a
key whose work is still running when it comes again waits for that work instead of starting
it twice. Only work that succeeded is remembered: a failure is tried again on redelivery.

A process remembers only what it did itself: a restarted process, or another replica of a
shared subscription, does the work again (one duplicate, never a loss).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable


class Once:
    """The keys done recently (bounded) and the keys being done."""

    def __init__(self, capacity: int, on_skip: Callable[[], None] | None = None) -> None:
        """Remember `capacity` keys (0: nothing, every call does the work); `on_skip` is
        called each time work is not done again."""
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, not {capacity}")
        self.capacity = capacity
        self._on_skip = on_skip
        # The keys done, and the same keys oldest first (to forget the oldest in O(1)).
        self._done: set[str] = set()
        self._order: deque[str] = deque()
        self._running: dict[str, asyncio.Future[bool]] = {}
        self.skipped = 0

    def __len__(self) -> int:
        return len(self._done)

    def __contains__(self, key: str) -> bool:
        return key in self._done

    async def run(self, key: str, work: Callable[[], Awaitable[bool]]) -> bool:
        """`work()`'s result (True: done), unless `key` was done already (True) or is being
        done (that work's result). An empty key is never remembered."""
        if not key or not self.capacity:
            return await work()
        if key in self._done:
            self._skip()
            return True
        running = self._running.get(key)
        if running is not None:
            self._skip()
            return await asyncio.shield(running)
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._running[key] = future
        done = False
        try:
            done = await work()
        finally:
            del self._running[key]
            # A failure (or a bug) leaves the key to be tried again; whoever waited gets False.
            future.set_result(done)
        if done:
            self._remember(key)
        return done

    def _skip(self) -> None:
        self.skipped += 1
        if self._on_skip is not None:
            self._on_skip()

    def _remember(self, key: str) -> None:
        self._done.add(key)
        self._order.append(key)
        while len(self._order) > self.capacity:
            self._done.discard(self._order.popleft())
