"""How far behind the event loop runs: a metric, and the rendezvous' clock correction.

A probe timer is due every `interval_s`; when it runs late, the loop was busy (or the process
was not scheduled) for that long, and every callback queued meanwhile waited as well. Two
figures come from it:
- `rdv_event_loop_lag_seconds`, a histogram of each probe's lateness;
- `behind_s()`, a lower bound of how long work that becomes runnable now has been waiting:
  the larger of how overdue the pending probe is and what the last probe measured (for
  `backlog_window_s` after it ran: what queued during a stall is worked off within a few
  milliseconds, and a request that arrives later did not wait; charging it the whole stall
  would shed requests that could be answered in time). The rendezvous starts a request's
  clock that much earlier, since the request reached the process before its handler ran.
"""

from __future__ import annotations

import asyncio
import time

from services.core.telemetry import histogram

# Every asyncio process runs a probe (`Component.start`); `process` is its kind (rendezvous,
# runner, model, ...), the process itself being the scrape target.
LOOP_LAG = histogram(
    "rdv_event_loop_lag_seconds",
    "How late the event loop ran a timer that was due (per probe)",
    ("process",),
)


class LoopLag:
    """A probe timer on the running loop; `stop` cancels it."""

    def __init__(self, process: str, interval_s: float, backlog_window_s: float = 0.0) -> None:
        self._interval_s = interval_s
        self._backlog_window_s = backlog_window_s
        self._histogram = LOOP_LAG.labels(process)
        self._loop = asyncio.get_running_loop()
        self._due = time.monotonic() + interval_s
        self._last_lag_s = 0.0
        self._last_run = time.monotonic()
        self._handle = self._loop.call_at(self._loop.time() + interval_s, self._probe)

    def _probe(self) -> None:
        now = time.monotonic()
        lag = max(0.0, now - self._due)
        self._histogram.observe(lag)
        self._last_lag_s = lag
        self._last_run = now
        self._due = now + self._interval_s
        self._handle = self._loop.call_at(self._loop.time() + self._interval_s, self._probe)

    def behind_s(self) -> float:
        """A lower bound of how long runnable work has waited for the loop, right now."""
        now = time.monotonic()
        overdue = now - self._due
        # Right after a stall the loop works off what queued during it: for that short while
        # the last probe's lateness still describes the wait.
        window = min(self._last_lag_s, self._backlog_window_s)
        recent = self._last_lag_s if now - self._last_run < window else 0.0
        return max(0.0, overdue, recent)

    def stop(self) -> None:
        self._handle.cancel()
