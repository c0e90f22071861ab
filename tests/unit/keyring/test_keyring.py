"""The keyring on a real gRPC socket over MemoryBus: keys made once and kept durably, erasure
deletes them (also from the database file's bytes), is announced on the erasure topic, is
idempotent and validated; writers seal and readers open through it, and an erased subject's
records no longer open."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from rendezvous.v1 import keyring_pb2, keyring_pb2_grpc, task_pb2

from services.core.privacy import (
    Opener,
    Openness,
    Pseudonyms,
    Sealer,
    read_key_file,
    write_key_file,
)
from services.core.settings import PrivacySettings
from services.keyring.app import Keyring
from services.keyring.settings import KeyringSettings
from tests.fakes.memory_bus import MemoryBus
from tests.helpers import metric_value, published


class _Admin:
    def __init__(self) -> None:
        self.retained: list[str] = []

    async def retain_forever(self, topic: str) -> None:
        self.retained.append(topic)


@dataclass
class _Running:
    keyring: Keyring
    bus: MemoryBus
    admin: _Admin
    privacy: PrivacySettings
    settings: KeyringSettings

    @property
    def stub(self) -> keyring_pb2_grpc.KeyringServiceAsyncStub:
        return keyring_pb2_grpc.KeyringServiceStub(grpc.aio.insecure_channel(self.keyring.endpoint))

    def erasures(self) -> list[keyring_pb2.Erasure]:
        return published(self.bus, self.bus.topics.erasures(), keyring_pb2.Erasure)


def _settings(tmp_path: Path) -> KeyringSettings:
    root = tmp_path / "privacy"
    write_key_file(root / "pseudonym.key")
    write_key_file(root / "master.key")
    return KeyringSettings(
        listen="127.0.0.1:0",
        instance=f"test-{uuid.uuid4().hex[:6]}",
        database=root / "keyring.db",
        master_key_file=root / "master.key",
        privacy=PrivacySettings(pseudonym_key_file=root / "pseudonym.key"),
        shutdown_grace_s=0.5,
    )


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[_Running]:
    settings = _settings(tmp_path)
    bus, admin = MemoryBus(), _Admin()
    keyring = Keyring(settings, bus=bus, admin=admin)
    await keyring.start()
    privacy = PrivacySettings(
        keyring=keyring.endpoint,
        pseudonym_key_file=settings.privacy.pseudonym_key_file,
        retry_delay_s=0.05,
        seal_wait_s=0.2,
    )
    try:
        yield _Running(keyring, bus, admin, privacy, settings)
    finally:
        await keyring.stop()


def _pseudonym(running: _Running, subject: str) -> str:
    assert running.settings.privacy.pseudonym_key_file is not None
    return Pseudonyms(read_key_file(running.settings.privacy.pseudonym_key_file, "key")).of(subject)


def _violations(error: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(error)
    assert status is not None
    fields = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    return fields


def _wrapped(running: _Running, key_id: str) -> bytes:
    """The stored (wrapped) key of `key_id`, as the database file holds it."""
    with contextlib.closing(sqlite3.connect(running.settings.database)) as db:
        row = db.execute("SELECT wrapped FROM subject_keys WHERE key_id = ?", (key_id,)).fetchone()
    return bytes(row[0]) if row else b""


def _files(running: _Running) -> bytes:
    """The bytes of the database and of its write-ahead log."""
    database = running.settings.database
    log = database.with_name(database.name + "-wal")
    return database.read_bytes() + (log.read_bytes() if log.exists() else b"")


def _outcome(request_id: str, score: float) -> task_pb2.Outcome:
    outcome = task_pb2.Outcome(request_id=request_id, objective="demo")
    outcome.response.score = score
    candidate = outcome.candidates.add(status=task_pb2.CANDIDATE_STATUS_ANSWERED)
    candidate.prediction.model = "m1"
    candidate.prediction.prediction.score = score
    return outcome


async def test_a_subject_key_is_made_once_per_objective_and_outlives_a_restart(
    running: _Running, tmp_path: Path
) -> None:
    alice = _pseudonym(running, "alice")
    stub = running.stub
    first = await stub.GetSubjectKey(
        keyring_pb2.GetSubjectKeyRequest(objective="demo", pseudonym=alice)
    )
    again = await stub.GetSubjectKey(
        keyring_pb2.GetSubjectKeyRequest(objective="demo", pseudonym=alice)
    )
    other = await stub.GetSubjectKey(
        keyring_pb2.GetSubjectKeyRequest(objective="other", pseudonym=alice)
    )
    assert first.key == again.key and len(first.key.key) == 32
    assert other.key.key_id != first.key.key_id
    assert running.admin.retained == [running.bus.topics.erasures()]
    # The database never holds the subject id, nor a key in the clear.
    data = _files(running)
    assert b"alice" not in data and first.key.key not in data
    assert running.settings.database.stat().st_mode & 0o777 == 0o600
    # Another process on the same database and master key hands out the same key.
    await running.keyring.stop()
    restarted = Keyring(running.settings, bus=running.bus, admin=running.admin)
    await restarted.start()
    try:
        stub = keyring_pb2_grpc.KeyringServiceStub(grpc.aio.insecure_channel(restarted.endpoint))
        found = await stub.GetKeys(keyring_pb2.GetKeysRequest(key_ids=[first.key.key_id, "nope"]))
        assert list(found.keys) == [first.key] and list(found.missing) == ["nope"]
    finally:
        await restarted.stop()


async def test_erase_deletes_the_keys_announces_it_and_is_idempotent(running: _Running) -> None:
    stub = running.stub
    alice, bob = _pseudonym(running, "alice"), _pseudonym(running, "bob")
    keys = {}
    for objective in ("demo", "other"):
        reply = await stub.GetSubjectKey(
            keyring_pb2.GetSubjectKeyRequest(objective=objective, pseudonym=alice)
        )
        keys[objective] = reply.key
    wrapped = _wrapped(running, keys["demo"].key_id)
    assert len(wrapped) > 32 and wrapped in _files(running)
    bob_key = (
        await stub.GetSubjectKey(keyring_pb2.GetSubjectKeyRequest(objective="demo", pseudonym=bob))
    ).key
    erased = await stub.Erase(
        keyring_pb2.EraseRequest(subject_id="alice", objective="demo", reason="ticket-1")
    )
    assert erased.pseudonym == alice and erased.keys_deleted == 1
    found = await stub.GetKeys(
        keyring_pb2.GetKeysRequest(
            key_ids=[keys["demo"].key_id, keys["other"].key_id, bob_key.key_id]
        )
    )
    assert {k.key_id for k in found.keys} == {keys["other"].key_id, bob_key.key_id}
    assert list(found.missing) == [keys["demo"].key_id]
    # Everywhere, then again (nothing left: still OK, still announced).
    everywhere = await stub.Erase(keyring_pb2.EraseRequest(subject_id="alice"))
    assert everywhere.keys_deleted == 1
    unknown = await stub.Erase(keyring_pb2.EraseRequest(subject_id="nobody-we-know"))
    assert unknown.keys_deleted == 0
    announced = running.erasures()
    assert [(e.pseudonym, e.objective, list(e.key_ids)) for e in announced] == [
        (alice, "demo", [keys["demo"].key_id]),
        (alice, "", [keys["other"].key_id]),
        (unknown.pseudonym, "", []),
    ]
    assert announced[0].reason == "ticket-1"
    # The deleted keys' bytes are gone from the file (secure_delete), not just unlinked.
    data = _files(running)
    assert wrapped not in data
    assert b"alice" not in data and b"nobody-we-know" not in data
    # A subject erased and seen again gets a new key: the old records stay unreadable.
    fresh = await stub.GetSubjectKey(
        keyring_pb2.GetSubjectKeyRequest(objective="demo", pseudonym=alice)
    )
    assert fresh.key.key_id not in (keys["demo"].key_id, keys["other"].key_id)


async def test_bad_requests_are_refused_field_by_field(running: _Running) -> None:
    stub = running.stub
    with pytest.raises(grpc.aio.AioRpcError) as empty:
        await stub.Erase(keyring_pb2.EraseRequest(subject_id=""))
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _violations(empty.value) == ["subject_id"]
    long_id = "x" * (running.settings.subject_id_max_length + 1)
    with pytest.raises(grpc.aio.AioRpcError) as long:
        await stub.Erase(keyring_pb2.EraseRequest(subject_id=long_id))
    assert _violations(long.value) == ["subject_id"]
    assert long_id not in (long.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as bad_key:
        await stub.GetSubjectKey(keyring_pb2.GetSubjectKeyRequest(objective="", pseudonym="alice"))
    assert sorted(_violations(bad_key.value)) == ["objective", "pseudonym"]
    assert running.erasures() == []


async def test_new_keys_asked_for_together_share_one_commit(running: _Running) -> None:
    stub = running.stub
    commits = metric_value("rdv_keyring_new_keys_per_commit_count", {})
    subjects = [f"subject-{index}" for index in range(20)]
    asks = [
        stub.GetSubjectKey(
            keyring_pb2.GetSubjectKeyRequest(objective="demo", pseudonym=_pseudonym(running, s))
        )
        for s in subjects + subjects  # each asked twice, as a writer pair does
    ]
    replies = await asyncio.gather(*asks)
    first, second = replies[: len(subjects)], replies[len(subjects) :]
    assert [r.key for r in first] == [r.key for r in second]
    assert len({r.key.key_id for r in first}) == len(subjects)
    # Fewer commits (disk syncs) than keys: the asks that came together were batched.
    assert metric_value("rdv_keyring_new_keys_per_commit_count", {}) - commits < len(subjects)


async def test_records_sealed_by_a_writer_open_for_a_reader_until_the_subject_is_erased(
    running: _Running,
) -> None:
    sealer = Sealer(running.privacy)
    opener = Opener(running.privacy)
    try:
        alice = await sealer.seal(_outcome("r-a", 1.5), "alice", "demo")
        bob = await sealer.seal(_outcome("r-b", 2.5), "bob", "demo")
        nobody = await sealer.seal(_outcome("r-n", 3.5), "", "demo")
        assert alice.HasField("sealed") and bob.HasField("sealed")
        assert not nobody.HasField("sealed")  # no subject: nothing to erase, no key
        assert sealer.client.calls == 2
        await sealer.seal(_outcome("r-a2", 1.0), "alice", "demo")
        assert sealer.client.calls == 2  # the key is cached

        opened = await opener.open_all([alice, bob, nobody])
        assert [o.state for o in opened] == [Openness.OPENED, Openness.OPENED, Openness.CLEAR]
        assert opened[0].record.response.score == 1.5

        await running.stub.Erase(keyring_pb2.EraseRequest(subject_id="alice"))
        # A reader that never saw the key finds it gone; one that holds it in its cache
        # drops it when the erasure comes (the erasure topic), else after the TTL.
        fresh = Opener(running.privacy)
        try:
            after = await fresh.open_all([alice, bob])
            assert [o.state for o in after] == [Openness.ERASED, Openness.OPENED]
            assert after[0].record.response.score == 0
        finally:
            await fresh.close()
        [erasure] = running.erasures()
        opener.forget(erasure.key_ids)
        assert (await opener.open(alice)).state == Openness.ERASED
    finally:
        await sealer.close()
        await opener.close()


async def test_a_writer_without_a_keyring_withholds_rather_than_writes_readable(
    tmp_path: Path,
) -> None:
    key_file = tmp_path / "pseudonym.key"
    write_key_file(key_file)
    # Nothing listens there: every try fails, and within seal_wait_s the data is withheld.
    privacy = PrivacySettings(
        keyring="127.0.0.1:1",
        pseudonym_key_file=key_file,
        call_timeout_s=0.1,
        seal_wait_s=0.3,
        retry_delay_s=0.05,
    )
    sealer = Sealer(privacy)
    try:
        record = await sealer.seal(_outcome("r-a", 1.5), "alice", "demo")
    finally:
        await sealer.close()
    assert record.sealed.withheld and record.response.score == 0
    assert (await Opener(PrivacySettings()).open(record)).state == Openness.WITHHELD
