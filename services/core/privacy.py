"""Crypto-shredding: records about a subject sealed under the subject's key, erased by
deleting the key (docs/privacy.md, "Erasure").

- `Pseudonyms`: a subject id's pseudonym, hex HMAC-SHA256 with the mesh's pseudonym key.
  The keyring, the erasure topic and the audit log know subjects by it only.
- `seal_with` / `open_with`: a record (an `ArchiveRecord` or an `Outcome`) sealed with
  AES-256-GCM: the whole record serialized is the ciphertext, and around it a readable copy
  keeps what routing, deduplication and aggregate evaluation need, with every field marked
  `(rendezvous.v1.subject_data)` cleared. The associated data binds the ciphertext to the
  record's type, objective and request id, so it cannot be moved to another record.
- `KeyringClient`: `KeyringService` calls with bounded caches (`key_cache_ttl_s`):
  writers ask for a subject's key by pseudonym, readers for keys by id; concurrent asks
  for one key share one call.
- `Sealer` (writers, after the answer: the rendezvous' outcomes, the decoy's archive) and
  `Opener` (readers: the evaluator, replay, tests) on top of it.
- `ErasureFollower`: the erasure topic read from its earliest message (enricher, evaluator).

A request without a subject_id has nobody to erase: its records stay readable, no key.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import hmac
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from rendezvous.v1 import keyring_pb2, keyring_pb2_grpc, task_pb2

from services.core.bus import Bus, Envelope
from services.core.protos import clear_subject_data
from services.core.settings import PrivacySettings, TlsSettings
from services.core.telemetry import counter
from services.core.topic_follower import TopicFollower

log = logging.getLogger(__name__)

KEY_BYTES = 32
NONCE_BYTES = 12
# A pseudonym key shorter than the hash's output would weaken the HMAC (RFC 2104 §3).
MIN_PSEUDONYM_KEY_BYTES = 32

SEALED = counter(
    "rdv_privacy_sealed",
    "Records written about a subject, by what happened to its subject data",
    ("record", "result"),
)

Record = TypeVar("Record", task_pb2.ArchiveRecord, task_pb2.Outcome)


class KeyringUnavailable(Exception):
    """The keyring did not answer in time; nothing was decided."""


# ---------------------------------------------------------------------------- pseudonyms


def write_key_file(path: Path, n_bytes: int = KEY_BYTES) -> None:
    """A fresh random key at `path` (hex), readable by its owner only, in a 0700 directory;
    an existing file is kept (its key seals records already written)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.exists():
        return
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(os.urandom(n_bytes).hex())


def read_key_file(path: Path, what: str, min_bytes: int = KEY_BYTES) -> bytes:
    """The key a `write_key_file` file holds; a clear error when it cannot be used."""
    try:
        key = bytes.fromhex(path.read_text().strip())
    except OSError as error:
        raise ValueError(f"cannot read the {what} {path}: {error.strerror}") from error
    except ValueError:
        raise ValueError(f"the {what} {path} is not hex") from None
    if len(key) < min_bytes:
        raise ValueError(f"the {what} {path} must hold at least {min_bytes} bytes")
    return key


class Pseudonyms:
    """Subject id -> pseudonym (hex HMAC-SHA256 with the mesh's pseudonym key)."""

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_PSEUDONYM_KEY_BYTES:
            raise ValueError(f"the pseudonym key needs at least {MIN_PSEUDONYM_KEY_BYTES} bytes")
        self._key = key

    @classmethod
    def from_settings(cls, settings: PrivacySettings) -> Pseudonyms:
        if settings.pseudonym_key_file is None:
            raise ValueError("privacy.pseudonym_key_file is required with privacy.keyring")
        return cls(read_key_file(settings.pseudonym_key_file, "pseudonym key"))

    def of(self, subject_id: str) -> str:
        return hmac.new(self._key, subject_id.encode(), hashlib.sha256).hexdigest()


# ---------------------------------------------------------------------------- sealing


def _identity(record: task_pb2.ArchiveRecord | task_pb2.Outcome) -> bytes:
    """The associated data: what the readable copy says the record is."""
    if isinstance(record, task_pb2.Outcome):
        objective, request_id = record.objective, record.request_id
    else:
        request = record.task.task.request
        objective, request_id = request.objective, request.request_id
    return f"{record.DESCRIPTOR.full_name}|{objective}|{request_id}".encode()


def seal_with(record: Record, key_id: str, aead: AESGCM) -> Record:
    """The readable copy of `record` around its sealed whole; `record` is left unchanged."""
    if record.HasField("sealed"):
        raise ValueError("the record is sealed already")
    nonce = os.urandom(NONCE_BYTES)
    ciphertext = aead.encrypt(nonce, record.SerializeToString(), _identity(record))
    readable = type(record)()
    readable.CopyFrom(record)
    clear_subject_data(readable)
    readable.sealed.key_id = key_id
    readable.sealed.nonce = nonce
    readable.sealed.ciphertext = ciphertext
    return readable


def withhold(record: Record) -> Record:
    """The readable copy of `record` with its subject data dropped (no key to seal it)."""
    readable = type(record)()
    readable.CopyFrom(record)
    clear_subject_data(readable)
    readable.sealed.withheld = True
    return readable


def open_with(record: Record, aead: AESGCM) -> Record:
    """The whole record a sealed one holds; `InvalidTag` when the key or the record is not
    the one it was sealed with (or was altered)."""
    sealed = record.sealed
    plaintext = aead.decrypt(sealed.nonce, sealed.ciphertext, _identity(record))
    return type(record).FromString(plaintext)


# ---------------------------------------------------------------------------- the keyring client


@dataclass(frozen=True)
class SubjectKey:
    key_id: str
    aead: AESGCM


# A key id the keyring said it does not have (cached like a key: ids are never reused).
_GONE = object()


class _Cache:
    """A bounded LRU whose entries expire `ttl_s` after they were put."""

    def __init__(self, ttl_s: float, max_entries: int, clock: Callable[[], float]) -> None:
        self._ttl_s = ttl_s
        self._max = max_entries
        self._clock = clock
        self._entries: OrderedDict[Any, tuple[float, Any]] = OrderedDict()

    def get(self, key: Any) -> Any:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, key: Any, value: Any) -> None:
        self._entries[key] = (self._clock() + self._ttl_s, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def drop(self, key: Any) -> None:
        self._entries.pop(key, None)

    def drop_where(self, predicate: Callable[[Any], bool]) -> None:
        for key in [key for key, (_, value) in self._entries.items() if predicate(value)]:
            del self._entries[key]


class KeyringClient:
    """`KeyringService` with caches; build inside the running loop."""

    def __init__(
        self,
        settings: PrivacySettings,
        tls: TlsSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
        token: str | None = None,
    ) -> None:
        from services.core.channels import aio_channel

        self.settings = settings
        # A caller's own token (a command's --token) instead of `token_file`.
        self._token = token
        self._channel = aio_channel(settings.keyring, tls)
        self._stub = keyring_pb2_grpc.KeyringServiceStub(self._channel)
        ttl, size = settings.key_cache_ttl_s, settings.max_cached_keys
        # (objective, pseudonym) -> SubjectKey: what writers seal with.
        self._by_subject = _Cache(ttl, size, clock)
        # key id -> SubjectKey, or None for a key the keyring does not have (erased).
        self._by_id = _Cache(ttl, size, clock)
        self._asking: dict[tuple[str, str], asyncio.Future[SubjectKey]] = {}
        self.calls = 0

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        token, token_file = self._token, self.settings.token_file
        if token is None and token_file is not None:
            token = token_file.read_text().strip()
        return (("authorization", f"Bearer {token}"),) if token else ()

    async def subject_key(self, objective: str, pseudonym: str) -> SubjectKey:
        """The subject's current key for `objective` (KeyringUnavailable when it cannot be
        had within one call's deadline)."""
        wanted = (objective, pseudonym)
        cached: SubjectKey | None = self._by_subject.get(wanted)
        if cached is not None:
            return cached
        asking = self._asking.get(wanted)
        if asking is not None:
            return await asyncio.shield(asking)
        future: asyncio.Future[SubjectKey] = asyncio.get_running_loop().create_future()
        self._asking[wanted] = future
        try:
            self.calls += 1
            reply = await self._stub.GetSubjectKey(
                keyring_pb2.GetSubjectKeyRequest(objective=objective, pseudonym=pseudonym),
                timeout=self.settings.call_timeout_s,
                metadata=self._metadata(),
            )
            key = SubjectKey(reply.key.key_id, AESGCM(reply.key.key))
            self._by_subject.put(wanted, key)
            self._by_id.put(key.key_id, key)
            future.set_result(key)
            return key
        except grpc.aio.AioRpcError as error:
            failure = KeyringUnavailable(error.code().name)
            future.set_exception(failure)
            # Nobody else may be waiting: the exception is retrieved here either way.
            future.exception()
            raise failure from None
        finally:
            del self._asking[wanted]

    async def keys(self, key_ids: Iterable[str]) -> dict[str, SubjectKey | None]:
        """Each key id's key, or None when the keyring has none (erased); one call for every
        id not cached (KeyringUnavailable when it fails)."""
        found: dict[str, SubjectKey | None] = {}
        unknown: list[str] = []
        for key_id in dict.fromkeys(key_ids):
            cached = self._by_id.get(key_id)
            if cached is None:
                unknown.append(key_id)
            else:
                found[key_id] = None if cached is _GONE else cached
        if unknown:
            self.calls += 1
            try:
                reply = await self._stub.GetKeys(
                    keyring_pb2.GetKeysRequest(key_ids=unknown),
                    timeout=self.settings.call_timeout_s,
                    metadata=self._metadata(),
                )
            except grpc.aio.AioRpcError as error:
                raise KeyringUnavailable(error.code().name) from None
            for key in reply.keys:
                subject_key = found[key.key_id] = SubjectKey(key.key_id, AESGCM(key.key))
                self._by_id.put(key.key_id, subject_key)
            for key_id in reply.missing:
                found[key_id] = None
                self._by_id.put(key_id, _GONE)
        return found

    def forget(self, key_ids: Iterable[str]) -> None:
        """Drop erased keys at once (an erasure read from the erasure topic)."""
        erased = set(key_ids)
        for key_id in erased:
            self._by_id.put(key_id, _GONE)
        self._by_subject.drop_where(lambda key: key.key_id in erased)

    async def close(self) -> None:
        await self._channel.close()


# ---------------------------------------------------------------------------- writers and readers


class Sealer:
    """Seals the records a writer puts on a topic; a no-op without a keyring."""

    def __init__(self, settings: PrivacySettings, tls: TlsSettings | None = None) -> None:
        self.settings = settings
        self.enabled = settings.enabled
        self._pseudonyms = Pseudonyms.from_settings(settings) if self.enabled else None
        self._client: KeyringClient | None = None
        self._tls = tls

    @property
    def client(self) -> KeyringClient:
        if self._client is None:
            self._client = KeyringClient(self.settings, self._tls)
        return self._client

    async def seal(self, record: Record, subject_id: str, objective: str) -> Record:
        """`record` as it may go on a topic: sealed under the subject's key; unchanged when
        there is no subject or no keyring; withheld when no key came within `seal_wait_s`."""
        name = record.DESCRIPTOR.name
        if not self.enabled or not subject_id:
            return record
        assert self._pseudonyms is not None
        pseudonym = self._pseudonyms.of(subject_id)
        deadline = time.monotonic() + self.settings.seal_wait_s
        while True:
            try:
                key = await self.client.subject_key(objective, pseudonym)
                break
            except KeyringUnavailable as error:
                if time.monotonic() + self.settings.retry_delay_s >= deadline:
                    SEALED.labels(name, "withheld").inc()
                    log.warning(
                        "no subject key in time: the record's subject data is withheld",
                        extra={"record": name, "objective": objective, "error": str(error)},
                    )
                    return withhold(record)
                await asyncio.sleep(self.settings.retry_delay_s)
        SEALED.labels(name, "sealed").inc()
        return seal_with(record, key.key_id, key.aead)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()


class Openness(enum.Enum):
    """What a reader could make of a record."""

    CLEAR = "clear"  # never sealed (no subject, or a mesh without a keyring)
    OPENED = "opened"  # sealed, and its key was there
    ERASED = "erased"  # sealed, and its key is gone: the subject was erased
    WITHHELD = "withheld"  # written without its subject data (no key could be had)
    DAMAGED = "damaged"  # the key is there but does not open it (altered, or misplaced)
    LOCKED = "locked"  # sealed, and this reader has no keyring to ask


@dataclass(frozen=True)
class Opened:
    """A record as a reader sees it: the whole one when it could be opened, else the
    readable copy (subject data cleared)."""

    record: Any
    state: Openness
    key_id: str = ""


class Opener:
    """Opens sealed records for a reader; the keyring is asked once per unknown key id."""

    def __init__(
        self, settings: PrivacySettings, tls: TlsSettings | None = None, token: str | None = None
    ) -> None:
        self.settings = settings
        self.client = KeyringClient(settings, tls, token=token) if settings.enabled else None

    async def open(self, record: Record) -> Opened:
        return (await self.open_all([record]))[0]

    async def open_all(self, records: list[Record]) -> list[Opened]:
        """Each record opened (KeyringUnavailable when a key could not be asked for)."""
        key_ids = [r.sealed.key_id for r in records if r.HasField("sealed") and r.sealed.key_id]
        keys: dict[str, SubjectKey | None] = {}
        if key_ids and self.client is not None:
            keys = await self.client.keys(key_ids)
        return [self._open(record, keys) for record in records]

    def _open(self, record: Record, keys: dict[str, SubjectKey | None]) -> Opened:
        if not record.HasField("sealed"):
            return Opened(record, Openness.CLEAR)
        sealed = record.sealed
        if sealed.withheld:
            return Opened(record, Openness.WITHHELD)
        if self.client is None:
            return Opened(record, Openness.LOCKED, sealed.key_id)
        key = keys.get(sealed.key_id)
        if key is None:
            return Opened(record, Openness.ERASED, sealed.key_id)
        try:
            return Opened(open_with(record, key.aead), Openness.OPENED, sealed.key_id)
        except InvalidTag:
            log.warning("a sealed record does not open with its key", extra={"key_id": key.key_id})
            return Opened(record, Openness.DAMAGED, sealed.key_id)

    def forget(self, key_ids: Iterable[str]) -> None:
        if self.client is not None:
            self.client.forget(key_ids)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()


# ---------------------------------------------------------------------------- the erasure topic


class ErasureFollower(TopicFollower[keyring_pb2.Erasure]):
    """Reads the erasure topic from its earliest message, handing each erasure on."""

    def __init__(
        self,
        bus: Bus,
        on_erasure: Callable[[keyring_pb2.Erasure, int], Awaitable[None] | None],
        retry_delay_s: float,
    ) -> None:
        super().__init__(
            bus, bus.topics.erasures(), keyring_pb2.Erasure, retry_delay_s=retry_delay_s
        )
        self._on_erasure = on_erasure

    async def take(self, envelope: Envelope[keyring_pb2.Erasure]) -> None:
        done = self._on_erasure(envelope.message, envelope.publish_time_ms)
        if done is not None:
            await done

    def on_caught_up(self) -> None:
        log.info("caught up with the erasure topic", extra={"erasures": self.read})
