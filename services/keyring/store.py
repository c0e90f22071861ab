"""The keyring's durable store: SQLite, one file, every write synced before it is reported.

    subject_keys(key_id PRIMARY KEY, objective, pseudonym, wrapped, created_ns)
                 UNIQUE(objective, pseudonym): one current key per subject and objective
    erasures(id, pseudonym, objective, key_ids, erased_ns, requested_by, reason, published)
                 the audit trail, and the outbox of the erasure topic

Data keys are stored wrapped (AES-256-GCM under the master key, the key id as associated
data), so the file alone opens nothing. `synchronous=FULL` makes a commit durable before it
returns (a key handed out is never lost in a crash, an erasure reported done stays done);
in WAL mode a commit is one disk sync, and `create_keys` makes many keys in one commit (the
keyring batches the asks that arrive together). `secure_delete` overwrites a deleted key's
bytes instead of leaving them in a free page, and after every erasure the log is
checkpointed into the database and truncated, so no earlier copy of the page survives in it.

Reads are quick (no disk sync) and run on the caller's thread; writes (a new key, an
erasure) wait for the disk and run in a worker thread (`asyncio.to_thread`). One lock
serializes the connection.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from services.core.privacy import KEY_BYTES, NONCE_BYTES

_SCHEMA = """
CREATE TABLE IF NOT EXISTS subject_keys (
    key_id TEXT PRIMARY KEY,
    objective TEXT NOT NULL,
    pseudonym TEXT NOT NULL,
    wrapped BLOB NOT NULL,
    created_ns INTEGER NOT NULL,
    UNIQUE (objective, pseudonym)
);
CREATE TABLE IF NOT EXISTS erasures (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    pseudonym TEXT NOT NULL,
    objective TEXT NOT NULL,
    key_ids TEXT NOT NULL,
    erased_ns INTEGER NOT NULL,
    requested_by TEXT NOT NULL,
    reason TEXT NOT NULL,
    published INTEGER NOT NULL DEFAULT 0
);
"""


@dataclass(frozen=True)
class ErasureRow:
    """One erasure as recorded."""

    id: int
    pseudonym: str
    objective: str
    key_ids: list[str]
    erased_ns: int
    requested_by: str
    reason: str


class KeyStore:
    """Keys by (objective, pseudonym) and by id; erasures and their announcement."""

    def __init__(self, path: Path, master_key: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.touch(mode=0o600, exist_ok=True)
        path.chmod(0o600)
        self._master = AESGCM(master_key)
        # Autocommit mode: every transaction below is an explicit BEGIN IMMEDIATE ... COMMIT.
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        for pragma in ("journal_mode=WAL", "synchronous=FULL", "secure_delete=ON"):
            self._db.execute(f"PRAGMA {pragma}")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _wrap(self, key_id: str, key: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._master.encrypt(nonce, key, key_id.encode())

    def _unwrap(self, key_id: str, wrapped: bytes) -> bytes:
        return self._master.decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], key_id.encode())

    def existing_key(self, objective: str, pseudonym: str) -> tuple[str, bytes] | None:
        """The subject's key for `objective` if it has one (a read: no disk sync)."""
        with self._lock:
            row = self._db.execute(
                "SELECT key_id, wrapped FROM subject_keys WHERE objective = ? AND pseudonym = ?",
                (objective, pseudonym),
            ).fetchone()
        return None if row is None else (row[0], self._unwrap(row[0], row[1]))

    def create_keys(
        self, wanted: list[tuple[str, str]]
    ) -> dict[tuple[str, str], tuple[str, bytes]]:
        """The key of each (objective, pseudonym), made for those without one; every new key
        committed (and synced) in one transaction before it returns."""
        found: dict[tuple[str, str], tuple[str, bytes]] = {}
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for objective, pseudonym in dict.fromkeys(wanted):
                    row = self._db.execute(
                        "SELECT key_id, wrapped FROM subject_keys "
                        "WHERE objective = ? AND pseudonym = ?",
                        (objective, pseudonym),
                    ).fetchone()
                    if row is not None:
                        found[objective, pseudonym] = (row[0], self._unwrap(row[0], row[1]))
                        continue
                    key_id, key = uuid.uuid4().hex, os.urandom(KEY_BYTES)
                    self._db.execute(
                        "INSERT INTO subject_keys VALUES (?, ?, ?, ?, ?)",
                        (key_id, objective, pseudonym, self._wrap(key_id, key), time.time_ns()),
                    )
                    found[objective, pseudonym] = (key_id, key)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return found

    def subject_key(self, objective: str, pseudonym: str) -> tuple[str, bytes]:
        """The subject's key for `objective`, made and committed on first use."""
        return self.create_keys([(objective, pseudonym)])[(objective, pseudonym)]

    def keys(self, key_ids: list[str]) -> dict[str, bytes]:
        """The keys of those ids that exist."""
        found: dict[str, bytes] = {}
        with self._lock:
            for key_id in key_ids:
                row = self._db.execute(
                    "SELECT wrapped FROM subject_keys WHERE key_id = ?", (key_id,)
                ).fetchone()
                if row is not None:
                    found[key_id] = self._unwrap(key_id, row[0])
        return found

    def erase(self, pseudonym: str, objective: str, requested_by: str, reason: str) -> ErasureRow:
        """Delete the subject's keys (of `objective`, or all with ""), record the erasure;
        one transaction, committed (and synced) before it returns."""
        where = "pseudonym = ?" + (" AND objective = ?" if objective else "")
        args: tuple[str, ...] = (pseudonym, objective) if objective else (pseudonym,)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                key_ids = [
                    row[0]
                    for row in self._db.execute(
                        f"SELECT key_id FROM subject_keys WHERE {where}",
                        args,
                    )
                ]
                self._db.execute(f"DELETE FROM subject_keys WHERE {where}", args)
                erased_ns = time.time_ns()
                cursor = self._db.execute(
                    "INSERT INTO erasures (pseudonym, objective, key_ids, erased_ns, "
                    "requested_by, reason) VALUES (?, ?, ?, ?, ?, ?)",
                    (pseudonym, objective, json.dumps(key_ids), erased_ns, requested_by, reason),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            # The log still holds the pages as they were before the delete: fold it into
            # the database (whose deleted bytes secure_delete zeroed) and empty it.
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        assert cursor.lastrowid is not None
        return ErasureRow(
            cursor.lastrowid, pseudonym, objective, key_ids, erased_ns, requested_by, reason
        )

    def unpublished(self) -> list[ErasureRow]:
        """Erasures not yet announced on the erasure topic, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, pseudonym, objective, key_ids, erased_ns, requested_by, reason "
                "FROM erasures WHERE published = 0 ORDER BY id"
            ).fetchall()
        return [
            ErasureRow(row[0], row[1], row[2], json.loads(row[3]), row[4], row[5], row[6])
            for row in rows
        ]

    def mark_published(self, erasure_id: int) -> None:
        with self._lock:
            self._db.execute("UPDATE erasures SET published = 1 WHERE id = ?", (erasure_id,))

    def counts(self) -> dict[str, int]:
        with self._lock:
            keys = self._db.execute("SELECT COUNT(*) FROM subject_keys").fetchone()[0]
            erasures = self._db.execute("SELECT COUNT(*) FROM erasures").fetchone()[0]
        return {"keys": int(keys), "erasures": int(erasures)}
