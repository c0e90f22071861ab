"""The subject state store's bounds and the state models get from it."""

from __future__ import annotations

from google.protobuf import struct_pb2
from rendezvous.v1 import scoring_pb2, task_pb2

from services.core.protos import timestamp_from_ns, values_dict
from services.enricher.enrich import Enricher
from services.enricher.store import OTHER_KIND, SubjectStore, subject_state

SECOND = 1_000_000_000
T0 = 1_700_000_000 * SECOND


def test_least_recently_used_subject_is_evicted_first() -> None:
    store = SubjectStore(max_subjects=2, max_events_per_subject=5, max_kinds=8)
    store.record("o", "alice", "view", T0)
    store.record("o", "bob", "view", T0)
    # A lookup is a use: alice becomes the most recently used, bob the least.
    assert store.get("o", "alice") is not None
    store.record("o", "carol", "view", T0)

    assert len(store) == 2
    assert store.evicted == 1
    assert store.get("o", "bob") is None
    assert store.get("o", "alice") is not None
    assert store.get("o", "carol") is not None


def test_an_event_is_a_use_too() -> None:
    store = SubjectStore(max_subjects=2, max_events_per_subject=5, max_kinds=8)
    store.record("o", "alice", "view", T0)
    store.record("o", "bob", "view", T0)
    store.record("o", "alice", "click", T0 + SECOND)
    store.record("o", "carol", "view", T0)

    assert store.get("o", "bob") is None
    history = store.get("o", "alice")
    assert history is not None
    assert history.event_count == 2


def test_subjects_are_kept_per_objective() -> None:
    store = SubjectStore(max_subjects=10, max_events_per_subject=5, max_kinds=8)
    store.record("a", "alice", "view", T0)

    assert store.state("a", "alice", T0)["event_count"] == 1
    assert store.state("b", "alice", T0)["event_count"] == 0


def test_per_subject_cap_keeps_the_newest_events_and_counts_all() -> None:
    store = SubjectStore(max_subjects=10, max_events_per_subject=3, max_kinds=8)
    for index, kind in enumerate(["view", "view", "click", "view", "buy"]):
        store.record("o", "alice", kind, T0 + index * SECOND)

    state = store.state("o", "alice", T0 + 10 * SECOND)
    assert state["recent_kinds"] == ["buy", "view", "click"]
    assert state["event_count"] == 5
    assert state["counts_by_kind"] == {"view": 3, "click": 1, "buy": 1}
    assert state["last_event_kind"] == "buy"
    assert state["last_event_age_s"] == 6.0


def test_events_out_of_time_order_are_kept_in_time_order() -> None:
    store = SubjectStore(max_subjects=10, max_events_per_subject=3, max_kinds=8)
    store.record("o", "alice", "b", T0 + 2 * SECOND)
    store.record("o", "alice", "c", T0 + 3 * SECOND)
    store.record("o", "alice", "a", T0 + 1 * SECOND)
    store.record("o", "alice", "late", T0)  # older than everything kept: counted only
    store.record("o", "alice", "middle", T0 + 2 * SECOND + 1)

    state = store.state("o", "alice", T0 + 4 * SECOND)
    assert state["recent_kinds"] == ["c", "middle", "b"]
    assert state["last_event_kind"] == "c"
    assert state["event_count"] == 5
    assert state["counts_by_kind"]["late"] == 1


def test_distinct_kinds_beyond_the_bound_are_counted_together() -> None:
    store = SubjectStore(max_subjects=10, max_events_per_subject=10, max_kinds=2)
    for kind in ["a", "b", "c", "d", "a"]:
        store.record("o", "alice", kind, T0)

    counts = store.state("o", "alice", T0)["counts_by_kind"]
    assert counts == {"a": 2, "b": 1, OTHER_KIND: 2}
    assert sum(counts.values()) == 5


def test_no_subject_id_means_an_empty_state() -> None:
    store = SubjectStore(max_subjects=10, max_events_per_subject=3, max_kinds=8)
    store.record("o", "", "view", T0)  # the store keeps what it is given...
    assert store.state("o", "", T0) == {}  # ...but nobody has an empty id


def test_unknown_subject_gets_zero_count_and_nulls() -> None:
    assert subject_state(None, T0) == {
        "event_count": 0,
        "last_event_kind": None,
        "last_event_age_s": None,
        "recent_kinds": [],
        "counts_by_kind": {},
    }


def test_an_event_from_the_future_has_age_zero() -> None:
    store = SubjectStore(max_subjects=10, max_events_per_subject=3, max_kinds=8)
    store.record("o", "alice", "view", T0 + 5 * SECOND)
    assert store.state("o", "alice", T0)["last_event_age_s"] == 0.0


def _event(subject: str, kind: str, time_ns: int | None) -> task_pb2.SubjectEvent:
    event = task_pb2.SubjectEvent(subject_id=subject, objective="o", kind=kind)
    if time_ns is not None:
        event.event_time.CopyFrom(timestamp_from_ns(time_ns))
    return event


def test_enrich_copies_the_task_and_adds_the_state_as_values() -> None:
    enricher = Enricher(["o"], SubjectStore(10, 3, 8))
    assert enricher.record_event("o", _event("alice", "view", T0), 0)
    assert enricher.record_event("o", _event("alice", "buy", T0 + SECOND), 0)
    # Without event_time, the message's publish time stands in.
    assert enricher.record_event("o", _event("alice", "click", None), (T0 + 3 * SECOND) // 10**6)
    assert not enricher.record_event("o", _event("", "view", T0), 0)

    task = task_pb2.ScoringTask(
        request=scoring_pb2.ScoreRequest(objective="o", request_id="r1", subject_id="alice"),
        mailbox_id="m1",
        return_address="persistent://public/default/rdv.predictions.x",
    )
    task.request.features["x"].number_value = 1.5
    enriched = enricher.enrich(task, now_ns=T0 + 5 * SECOND)

    assert enriched.task == task
    assert enriched.HasField("enriched_time")
    assert values_dict(enriched.subject_state) == {
        "event_count": 3.0,
        "last_event_kind": "click",
        "last_event_age_s": 2.0,
        "recent_kinds": ["click", "buy", "view"],
        "counts_by_kind": {"view": 1.0, "buy": 1.0, "click": 1.0},
    }
    assert enriched.subject_state["last_event_kind"].WhichOneof("kind") == "string_value"


def test_enrich_without_subject_adds_no_state() -> None:
    enricher = Enricher(["o"], SubjectStore(10, 3, 8))
    task = task_pb2.ScoringTask(request=scoring_pb2.ScoreRequest(objective="o", request_id="r"))
    enriched = enricher.enrich(task)
    assert len(enriched.subject_state) == 0


def test_unknown_subject_state_has_explicit_nulls() -> None:
    enricher = Enricher(["o"], SubjectStore(10, 3, 8))
    task = task_pb2.ScoringTask(
        request=scoring_pb2.ScoreRequest(objective="o", request_id="r", subject_id="nobody")
    )
    state = enricher.enrich(task).subject_state
    assert state["last_event_kind"].null_value == struct_pb2.NULL_VALUE
    assert state["last_event_kind"].WhichOneof("kind") == "null_value"
    assert state["event_count"].number_value == 0
