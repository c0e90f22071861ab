"""The keyring component (`python -m services.keyring`): `KeyringService` over the key store.

Start order (the common lifecycle): the gRPC server listens (health NOT_SERVING), the key
store opens (created 0600 in a 0700 directory), the erasure topic is made to keep every
message (erasures must outlive the events an enricher rebuilds its state from), its
publisher opens, erasures recorded but not yet announced (a crash between the commit and
the publish) are published, and health turns SERVING.

Erase: the subject id is turned into its pseudonym here (it is never stored), the keys are
deleted and the erasure recorded in one durable transaction, then it is published on the
erasure topic (`rdv.privacy.erasures`); only then does the call answer OK. A publish that
fails leaves the erasure in the store's outbox, retried every `retry_delay_s`; the call
answers UNAVAILABLE meanwhile (calling again is safe). Every erasure is audited by one log
line naming the pseudonym, never the subject id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable
from typing import Any, Protocol

import grpc
from rendezvous.v1 import keyring_pb2, keyring_pb2_grpc

from services.control.admin import PulsarAdmin
from services.core.auth import current_principal
from services.core.bus import Bus, BusError, Publisher
from services.core.errors import InvalidArgument, Unavailable
from services.core.lifecycle import Component, cancel_and_wait, run
from services.core.privacy import Pseudonyms, read_key_file
from services.core.protos import timestamp_from_ns
from services.core.telemetry import counter, histogram
from services.keyring.settings import KeyringSettings
from services.keyring.store import ErasureRow, KeyStore

log = logging.getLogger(__name__)

SERVICE_NAME: str = keyring_pb2.DESCRIPTOR.services_by_name["KeyringService"].full_name
PSEUDONYM = re.compile(r"^[0-9a-f]{64}$")

KEY_REQUESTS = counter("rdv_keyring_key_requests", "Keys handed out, by method", ("method",))
ERASURES = counter("rdv_keyring_erasures", "Erasures, by outcome", ("outcome",))
KEY_BATCH = histogram(
    "rdv_keyring_new_keys_per_commit",
    "New subject keys committed by one disk sync",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)


class TopicRetention(Protocol):
    """What the keyring asks of the broker's admin API (a fake in unit tests)."""

    async def retain_forever(self, topic: str) -> None: ...


class Keyring(Component):
    """One keyring process. Pass `bus` (and `admin`) to run on given ones (tests)."""

    def __init__(
        self, settings: KeyringSettings, bus: Bus | None = None, admin: TopicRetention | None = None
    ) -> None:
        super().__init__(
            settings,
            name=f"keyring-{settings.instance}",
            bus=bus,
            service_names=[SERVICE_NAME],
            registrars=[registrar(_KeyringServicer(self))],
        )
        self.settings: KeyringSettings = settings
        self.pseudonyms = Pseudonyms.from_settings(settings.privacy)
        self.store: KeyStore | None = None
        self._publisher: Publisher[keyring_pb2.Erasure] | None = None
        self._announcing = asyncio.Lock()
        self._pending = asyncio.Event()
        # New keys asked for and not yet committed, and the writer's wake-up.
        self._wanted: dict[tuple[str, str], asyncio.Future[tuple[str, bytes]]] = {}
        self._wanted_event = asyncio.Event()
        self._admin = admin or PulsarAdmin(
            settings.pulsar,
            timeout_s=settings.admin_timeout_s,
            attempts=settings.admin_attempts,
            retry_s=settings.retry_delay_s,
        )

    async def open(self, stack: contextlib.AsyncExitStack) -> None:
        settings = self.settings
        master = read_key_file(settings.master_key_file, "keyring master key")
        store = self.store = KeyStore(settings.database, master)
        stack.callback(store.close)
        topic = self.bus.topics.erasures()
        await self._admin.retain_forever(topic)
        self._publisher = await self.bus.publisher(topic, keyring_pb2.Erasure)
        # Anything recorded before a crash goes out now, then whenever an announce failed.
        self._pending.set()
        outbox = self.watch(asyncio.create_task(self._outbox(), name="keyring:outbox"))
        writer = self.watch(asyncio.create_task(self._create_keys(), name="keyring:keys"))
        stack.push_async_callback(cancel_and_wait, [outbox, writer])

    def facts(self) -> dict[str, Any]:
        counts = self.store.counts() if self.store is not None else {}
        return {"database": str(self.settings.database), **counts}

    # ------------------------------------------------------------------------ keys

    async def subject_key(self, objective: str, pseudonym: str) -> keyring_pb2.SubjectKey:
        violations = []
        if not objective:
            violations.append(("objective", "required"))
        elif len(objective) > self.settings.objective_max_length:
            violations.append(
                ("objective", f"longer than {self.settings.objective_max_length} characters")
            )
        if not PSEUDONYM.match(pseudonym):
            violations.append(("pseudonym", "must be 64 lowercase hex digits (HMAC-SHA256)"))
        if violations:
            raise InvalidArgument(violations)
        store = self._store()
        # Most asks are for a key that exists (the decoy's after the rendezvous', a subject
        # seen before): read at once; only a new key waits for the disk, in a thread.
        found = store.existing_key(objective, pseudonym)
        if found is None:
            found = await self._new_key(objective, pseudonym)
        key_id, key = found
        KEY_REQUESTS.labels("GetSubjectKey").inc()
        return keyring_pb2.SubjectKey(key_id=key_id, key=key)

    async def _new_key(self, objective: str, pseudonym: str) -> tuple[str, bytes]:
        """A new key, committed with every other new key asked for meanwhile: one disk sync
        per batch, not per key (a subject's first request asks twice, the rendezvous and
        the decoy; a burst of new subjects asks at once)."""
        wanted = (objective, pseudonym)
        waiting = self._wanted.get(wanted)
        if waiting is None:
            waiting = self._wanted[wanted] = asyncio.get_running_loop().create_future()
            self._wanted_event.set()
        return await asyncio.shield(waiting)

    async def _create_keys(self) -> None:
        """The one writer of new keys: whatever was asked for since the last commit, at once."""
        store = self._store()
        while True:
            await self._wanted_event.wait()
            self._wanted_event.clear()
            batch, self._wanted = self._wanted, {}
            try:
                made = await asyncio.to_thread(store.create_keys, list(batch))
            except Exception:
                log.exception("making subject keys failed", extra={"keys": len(batch)})
                for waiting in batch.values():
                    waiting.set_exception(Unavailable("the key store cannot be written"))
                    waiting.exception()  # retrieved: a caller may have gone away
                continue
            KEY_BATCH.observe(len(batch))
            for wanted, waiting in batch.items():
                waiting.set_result(made[wanted])

    async def keys(self, key_ids: list[str]) -> keyring_pb2.GetKeysResponse:
        if len(key_ids) > self.settings.max_key_ids:
            raise InvalidArgument([("key_ids", f"more than {self.settings.max_key_ids}")])
        # A read, no disk sync: answered on the loop (a thread hop cost more than the read).
        found = self._store().keys(key_ids)
        KEY_REQUESTS.labels("GetKeys").inc(len(found))
        return keyring_pb2.GetKeysResponse(
            keys=[keyring_pb2.SubjectKey(key_id=i, key=k) for i, k in found.items()],
            missing=[key_id for key_id in dict.fromkeys(key_ids) if key_id not in found],
        )

    def _store(self) -> KeyStore:
        if self.store is None or self.stopping:
            raise Unavailable("the keyring is not serving")
        return self.store

    # ------------------------------------------------------------------------ erasure

    async def erase(self, request: keyring_pb2.EraseRequest) -> keyring_pb2.EraseResponse:
        settings = self.settings
        violations = []
        if not request.subject_id:
            violations.append(("subject_id", "required"))
        elif len(request.subject_id) > settings.subject_id_max_length:
            violations.append(
                ("subject_id", f"longer than {settings.subject_id_max_length} characters")
            )
        if len(request.objective) > settings.objective_max_length:
            violations.append(
                ("objective", f"longer than {settings.objective_max_length} characters")
            )
        if len(request.reason) > settings.reason_max_length:
            violations.append(("reason", f"longer than {settings.reason_max_length} characters"))
        if violations:
            raise InvalidArgument(violations)
        principal = current_principal()
        requested_by = principal.subject if principal is not None else ""
        pseudonym = self.pseudonyms.of(request.subject_id)
        row = await asyncio.to_thread(
            self._store().erase, pseudonym, request.objective, requested_by, request.reason
        )
        # The audit trail: the pseudonym, never the subject id (nor the free-text reason,
        # which stays in the store and on the erasure topic).
        log.info(
            "subject erased",
            extra={
                "audit": "erasure",
                "pseudonym": pseudonym,
                "objective": request.objective or "*",
                "keys_deleted": len(row.key_ids),
                "requested_by": requested_by or "-",
                "erasure_id": row.id,
            },
        )
        if not await self._announce():
            ERASURES.labels("not_announced").inc()
            self._pending.set()
            raise Unavailable(
                "the keys are deleted but the erasure is not announced yet; it is retried, "
                "and calling again is safe"
            )
        ERASURES.labels("done").inc()
        return keyring_pb2.EraseResponse(
            pseudonym=pseudonym,
            keys_deleted=len(row.key_ids),
            erased_time=timestamp_from_ns(row.erased_ns),
        )

    async def _announce(self) -> bool:
        """Publish every recorded erasure not yet on the erasure topic; True when none is
        left."""
        publisher, store = self._publisher, self._store()
        assert publisher is not None
        async with self._announcing:
            for row in await asyncio.to_thread(store.unpublished):
                try:
                    await publisher.publish(
                        _erasure(row), key=row.pseudonym, timeout=self.settings.publish_timeout_s
                    )
                except BusError as error:
                    log.warning(
                        "announcing an erasure failed; retried",
                        extra={"erasure_id": row.id, "error": type(error).__name__},
                    )
                    return False
                await asyncio.to_thread(store.mark_published, row.id)
        return True

    async def _outbox(self) -> None:
        while True:
            await self._pending.wait()
            self._pending.clear()
            if not await self._announce():
                await asyncio.sleep(self.settings.retry_delay_s)
                self._pending.set()


def _erasure(row: ErasureRow) -> keyring_pb2.Erasure:
    return keyring_pb2.Erasure(
        pseudonym=row.pseudonym,
        objective=row.objective,
        key_ids=row.key_ids,
        erased_time=timestamp_from_ns(row.erased_ns),
        requested_by=row.requested_by,
        reason=row.reason,
    )


class _KeyringServicer(keyring_pb2_grpc.KeyringServiceServicer):
    def __init__(self, keyring: Keyring) -> None:
        self._keyring = keyring

    async def GetSubjectKey(
        self,
        request: keyring_pb2.GetSubjectKeyRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> keyring_pb2.GetSubjectKeyResponse:
        key = await self._keyring.subject_key(request.objective, request.pseudonym)
        return keyring_pb2.GetSubjectKeyResponse(key=key)

    async def GetKeys(
        self, request: keyring_pb2.GetKeysRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> keyring_pb2.GetKeysResponse:
        return await self._keyring.keys(list(request.key_ids))

    async def Erase(
        self, request: keyring_pb2.EraseRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> keyring_pb2.EraseResponse:
        return await self._keyring.erase(request)


def registrar(servicer: _KeyringServicer) -> Callable[[grpc.aio.Server], None]:
    def register(server: grpc.aio.Server) -> None:
        keyring_pb2_grpc.add_KeyringServiceServicer_to_server(servicer, server)

    return register


def main() -> None:
    # `database` and `master_key_file` are required and come from the environment or YAML.
    settings = KeyringSettings()  # type: ignore[call-arg]
    run("keyring", settings, lambda: Keyring(settings))
