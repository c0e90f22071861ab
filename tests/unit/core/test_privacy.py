"""Crypto-shredding logic (services.core.privacy): pseudonyms, sealing and opening records,
what the readable copy keeps, and the caches' bound."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from rendezvous.v1 import common_pb2, scoring_pb2, task_pb2

from services.core.privacy import (
    Pseudonyms,
    _Cache,
    open_with,
    read_key_file,
    seal_with,
    withhold,
    write_key_file,
)
from services.core.protos import redact_pii

MARKER = "MARKER-7f3a"
KEY = bytes(range(32))


def _archive_record() -> task_pb2.ArchiveRecord:
    request = scoring_pb2.ScoreRequest(
        objective="demo",
        request_id="r-1",
        subject_id=f"{MARKER}-subject",
        payload=common_pb2.Payload(data=MARKER.encode(), content_type="text/plain"),
    )
    request.features["age"].string_value = f"{MARKER}-age"
    enriched = task_pb2.EnrichedTask(task=task_pb2.ScoringTask(request=request, scorers=["m1"]))
    enriched.subject_state["last_event_kind"].string_value = f"{MARKER}-state"
    record = task_pb2.ArchiveRecord(task=enriched)
    record.redacted_fields.extend(redact_pii(record))
    return record


def _outcome() -> task_pb2.Outcome:
    outcome = task_pb2.Outcome(request_id="r-1", objective="demo", rendezvous_instance="rdv-0")
    outcome.response.score = 123.456
    outcome.response.decision.model = "m1"
    outcome.response.outputs["why"].string_value = MARKER
    answered = outcome.candidates.add(status=task_pb2.CANDIDATE_STATUS_ANSWERED)
    answered.prediction.model = "m1"
    answered.prediction.prediction.score = 123.456
    answered.arrival.FromMilliseconds(3)
    failed = outcome.candidates.add(status=task_pb2.CANDIDATE_STATUS_ERROR)
    failed.prediction.model = "m2"
    failed.prediction.error.reason = "INTERNAL"
    failed.prediction.error.message = f"bad input {MARKER}"
    return outcome


def test_a_pseudonym_is_a_keyed_hash_of_the_subject_id() -> None:
    pseudonyms = Pseudonyms(KEY)
    first = pseudonyms.of("alice")
    assert first == pseudonyms.of("alice")
    assert len(first) == 64 and int(first, 16) >= 0
    assert first != pseudonyms.of("bob")
    # Another mesh's key gives another pseudonym: nothing links the two.
    assert first != Pseudonyms(bytes(32)).of("alice")
    assert "alice" not in first
    with pytest.raises(ValueError, match="at least 32 bytes"):
        Pseudonyms(b"short")


def test_key_files_are_private_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "privacy" / "pseudonym.key"
    write_key_file(path)
    key = read_key_file(path, "pseudonym key")
    assert len(key) == 32
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    # A second write keeps the key: records sealed so far stay readable.
    write_key_file(path)
    assert read_key_file(path, "pseudonym key") == key
    path.write_text("not hex")
    with pytest.raises(ValueError, match="not hex"):
        read_key_file(path, "pseudonym key")


@pytest.mark.parametrize("make", [_archive_record, _outcome])
def test_a_sealed_record_opens_whole_and_its_readable_copy_holds_no_subject_data(
    make: Callable[[], task_pb2.Outcome],
) -> None:
    record = make()
    aead = AESGCM(KEY)
    sealed = seal_with(record, "key-1", aead)
    assert not record.HasField("sealed")  # the record given is left unchanged
    assert sealed.sealed.key_id == "key-1" and len(sealed.sealed.nonce) == 12
    readable = type(record)()
    readable.CopyFrom(sealed)
    readable.ClearField("sealed")
    assert MARKER.encode() not in readable.SerializeToString()
    assert MARKER.encode() not in sealed.SerializeToString()  # nor in the ciphertext's clear
    assert open_with(sealed, aead) == record


def test_what_stays_readable_is_what_routing_and_counting_need() -> None:
    sealed = seal_with(_outcome(), "key-1", AESGCM(KEY))
    assert (sealed.request_id, sealed.objective) == ("r-1", "demo")
    assert sealed.response.decision.model == "m1"
    assert sealed.response.score == 0 and not sealed.response.outputs
    statuses = [(c.prediction.model, c.status) for c in sealed.candidates]
    assert statuses == [
        ("m1", task_pb2.CANDIDATE_STATUS_ANSWERED),
        ("m2", task_pb2.CANDIDATE_STATUS_ERROR),
    ]
    assert sealed.candidates[0].arrival.ToMilliseconds() == 3
    assert sealed.candidates[0].prediction.WhichOneof("result") == "prediction"
    assert sealed.candidates[0].prediction.prediction.score == 0
    assert sealed.candidates[1].prediction.error.reason == "INTERNAL"
    assert sealed.candidates[1].prediction.error.message == ""

    archived = seal_with(_archive_record(), "key-1", AESGCM(KEY))
    request = archived.task.task.request
    assert (request.objective, request.request_id) == ("demo", "r-1")
    assert list(archived.task.task.scorers) == ["m1"]
    assert not request.features and not request.HasField("payload")
    assert not archived.task.subject_state and request.subject_id == ""


def test_a_sealed_record_does_not_open_with_another_key_or_as_another_record() -> None:
    sealed = seal_with(_outcome(), "key-1", AESGCM(KEY))
    with pytest.raises(InvalidTag):
        open_with(sealed, AESGCM(bytes(32)))
    moved = task_pb2.Outcome()
    moved.CopyFrom(sealed)
    moved.request_id = "r-2"  # the ciphertext is bound to its record's identity
    with pytest.raises(InvalidTag):
        open_with(moved, AESGCM(KEY))
    with pytest.raises(ValueError, match="sealed already"):
        seal_with(sealed, "key-1", AESGCM(KEY))


def test_a_withheld_record_keeps_no_subject_data_and_says_so() -> None:
    withheld = withhold(_archive_record())
    assert withheld.sealed.withheld and not withheld.sealed.ciphertext
    assert MARKER.encode() not in withheld.SerializeToString()


def test_the_key_cache_expires_and_is_bounded() -> None:
    now = [0.0]
    cache = _Cache(ttl_s=10.0, max_entries=2, clock=lambda: now[0])
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1
    cache.put("c", 3)  # "b" is the least recently used
    assert cache.get("b") is None and cache.get("c") == 3
    now[0] = 10.0
    assert cache.get("a") is None and cache.get("c") is None
    cache.put("d", 4)
    cache.drop_where(lambda value: value == 4)
    assert cache.get("d") is None
