"""Erasure in the enricher: the subject's state goes, and its events published up to the
erasure never come back (also when the state is rebuilt from the events topic); later
events, and other subjects, are kept."""

from __future__ import annotations

from rendezvous.v1 import keyring_pb2, task_pb2

from services.core.privacy import Pseudonyms
from services.core.protos import timestamp_from_ns
from services.enricher.enrich import Enricher
from services.enricher.store import SubjectStore

PSEUDONYMS = Pseudonyms(bytes(range(32)))
MS = 1_000_000


def _enricher() -> Enricher:
    return Enricher(["a", "b"], SubjectStore(100, 20, 32), PSEUDONYMS)


def _event(objective: str, subject: str) -> task_pb2.SubjectEvent:
    return task_pb2.SubjectEvent(
        subject_id=subject, objective=objective, kind="view", event_time=timestamp_from_ns(MS)
    )


def _erasure(subject: str, objective: str, at_ms: int) -> keyring_pb2.Erasure:
    return keyring_pb2.Erasure(
        pseudonym=PSEUDONYMS.of(subject),
        objective=objective,
        erased_time=timestamp_from_ns(at_ms * MS),
    )


def _count(enricher: Enricher, objective: str, subject: str) -> int:
    state = enricher.store.state(objective, subject, 10_000 * MS)
    return int(state["event_count"])


def test_an_erased_subject_is_forgotten_and_its_earlier_events_stay_out() -> None:
    enricher = _enricher()
    for objective in ("a", "b"):
        for subject in ("alice", "bob"):
            assert enricher.record_event(objective, _event(objective, subject), 1_000)
    assert enricher.erase(_erasure("alice", "", at_ms=2_000)) == 2
    assert [_count(enricher, o, "alice") for o in ("a", "b")] == [0, 0]
    assert [_count(enricher, o, "bob") for o in ("a", "b")] == [1, 1]
    # A late copy of an event published before the erasure is not kept ...
    assert not enricher.record_event("a", _event("a", "alice"), 1_500)
    # ... one published after it is: a subject who comes back is new data.
    assert enricher.record_event("a", _event("a", "alice"), 2_500)
    assert _count(enricher, "a", "alice") == 1


def test_a_restarted_enricher_that_read_the_erasure_first_never_rebuilds_the_state() -> None:
    erasure = _erasure("alice", "a", at_ms=2_000)
    restarted = _enricher()
    # The erasure topic is read to its end before the first event (EnricherComponent.open).
    restarted.erase(erasure)
    for objective in ("a", "b"):
        restarted.record_event(objective, _event(objective, "alice"), 1_000)
    # Erased for objective "a" only.
    assert _count(restarted, "a", "alice") == 0
    assert _count(restarted, "b", "alice") == 1


def test_without_a_pseudonym_key_nothing_is_matched() -> None:
    enricher = Enricher(["a"], SubjectStore(100, 20, 32))
    enricher.record_event("a", _event("a", "alice"), 1_000)
    assert enricher.erase(_erasure("alice", "", at_ms=2_000)) == 0
    assert _count(enricher, "a", "alice") == 1
