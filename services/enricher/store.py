"""The subject state store: a bounded, in-memory memory of each subject's recent events.

Bounds (all settings): at most `max_subjects` (objective, subject) pairs, evicted least
recently used (an event or a lookup counts as a use); per subject the newest
`max_events_per_subject` events by event time; at most `max_kinds_per_subject` distinct
kinds counted, further kinds counted together under `OTHER_KIND`. Counts (`event_count`,
`counts_by_kind`) include every event seen, not only the kept ones; an evicted subject
starts again from nothing.

`subject_state` turns a subject's history into the plain values models get:

    event_count        number   every event seen for the subject
    last_event_kind    string   kind of the newest event (by event time); null without events
    last_event_age_s   number   now - that event's time, never negative; null without events
    recent_kinds       list     kinds of the kept events, newest first
    counts_by_kind     struct   events seen per kind

A task without a subject_id gets an empty state (no keys at all): there is nobody to keep
state for, and models can tell "no subject" from "a subject we know nothing about yet"
(which gets event_count 0).
"""

from __future__ import annotations

import bisect
import sys
from array import array
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

OTHER_KIND = "(other)"

StoreKey = tuple[str, str]


class SubjectHistory:
    """One subject's counts and its newest events, ordered by event time (oldest first)."""

    __slots__ = ("counts_by_kind", "event_count", "kinds", "times_ns")

    def __init__(self) -> None:
        self.event_count = 0
        self.counts_by_kind: dict[str, int] = {}
        # Parallel arrays keep 100k subjects x 20 events in tens of MB, not hundreds.
        self.times_ns: array[int] = array("q")
        self.kinds: list[str] = []

    def record(self, kind: str, time_ns: int, max_events: int, max_kinds: int) -> None:
        self.event_count += 1
        counted = kind if kind in self.counts_by_kind else None
        if counted is None:
            counted = kind if len(self.counts_by_kind) < max_kinds else OTHER_KIND
        self.counts_by_kind[counted] = self.counts_by_kind.get(counted, 0) + 1
        if len(self.times_ns) >= max_events and time_ns < self.times_ns[0]:
            # Older than everything kept (a late or replayed event): counted, not kept.
            return
        # Events can arrive out of event-time order (several producers, redelivery):
        # insert in order so "newest" means newest in time; ties keep arrival order.
        index = bisect.bisect_right(self.times_ns, time_ns)
        self.times_ns.insert(index, time_ns)
        self.kinds.insert(index, kind)
        while len(self.times_ns) > max_events:
            del self.times_ns[0]
            del self.kinds[0]


class SubjectStore:
    """The LRU over subjects; not thread-safe (one event loop owns it)."""

    def __init__(self, max_subjects: int, max_events_per_subject: int, max_kinds: int) -> None:
        self.max_subjects = max_subjects
        self.max_events = max_events_per_subject
        self.max_kinds = max_kinds
        self._subjects: OrderedDict[StoreKey, SubjectHistory] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._subjects)

    def record(self, objective: str, subject_id: str, kind: str, time_ns: int) -> None:
        """Remember one event of a subject."""
        key = (objective, subject_id)
        history = self._subjects.get(key)
        if history is None:
            history = self._subjects[key] = SubjectHistory()
            while len(self._subjects) > self.max_subjects:
                self._subjects.popitem(last=False)
                self.evicted += 1
        else:
            self._subjects.move_to_end(key)
        # Kinds repeat endlessly; one shared string per kind keeps the store small.
        history.record(sys.intern(kind), time_ns, self.max_events, self.max_kinds)

    def get(self, objective: str, subject_id: str) -> SubjectHistory | None:
        """The subject's history (a use: it becomes the most recently used), or None."""
        key = (objective, subject_id)
        history = self._subjects.get(key)
        if history is not None:
            self._subjects.move_to_end(key)
        return history

    def remove_where(self, objective: str, match: Callable[[str], bool]) -> int:
        """Forget every subject of `objective` ("": of every objective) whose id `match`es;
        how many (objective, subject) pairs were forgotten."""
        gone = [
            key
            for key in self._subjects
            if (not objective or key[0] == objective) and match(key[1])
        ]
        for key in gone:
            del self._subjects[key]
        return len(gone)

    def state(self, objective: str, subject_id: str, now_ns: int) -> dict[str, Any]:
        """The subject's state as plain values (see the module docstring)."""
        if not subject_id:
            return {}
        return subject_state(self.get(objective, subject_id), now_ns)


def subject_state(history: SubjectHistory | None, now_ns: int) -> dict[str, Any]:
    """The plain values models get for a subject with this history (None: nothing known)."""
    if history is None or not history.kinds:
        return {
            "event_count": history.event_count if history is not None else 0,
            "last_event_kind": None,
            "last_event_age_s": None,
            "recent_kinds": [],
            "counts_by_kind": dict(history.counts_by_kind) if history is not None else {},
        }
    return {
        "event_count": history.event_count,
        "last_event_kind": history.kinds[-1],
        "last_event_age_s": max(0.0, (now_ns - history.times_ns[-1]) / 1e9),
        "recent_kinds": history.kinds[::-1],
        "counts_by_kind": dict(history.counts_by_kind),
    }
