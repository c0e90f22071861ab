"""The few Pulsar admin REST calls the control plane makes on its own topic.

The control topic is both the current state (compacted reads) and the audit trail (its
retained, non-compacted history), so the control plane makes sure of it at start: the topic
exists, its topic-level retention is infinite (without it, ledgers nobody subscribes to are
trimmed and old versions vanish from the history) and Pulsar compacts it by itself past a
threshold. After each change it asks for a compaction, best effort: compacted readers are
correct either way (they read the compacted ledger, then the rest of the topic).

Blocking urllib calls run in a worker thread; nothing here runs on the request path.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Protocol

from services.core.settings import PulsarSettings

log = logging.getLogger(__name__)

# Pulsar's way of saying "keep every message, whatever its age or the topic's size".
INFINITE_RETENTION = {"retentionTimeInMinutes": -1, "retentionSizeInMB": -1}


class AdminError(Exception):
    """An admin call failed; the message names the call and the broker's answer."""


class TopicAdmin(Protocol):
    """What the control plane asks of the broker's admin API (a fake in unit tests)."""

    async def prepare(self, topic: str, compaction_threshold_bytes: int) -> None: ...

    async def compact(self, topic: str) -> None: ...


def topic_path(topic: str) -> str:
    """`persistent://tenant/ns/name` as the admin API's path `persistent/tenant/ns/name`."""
    parsed = urllib.parse.urlparse(topic)
    if parsed.scheme != "persistent":
        raise ValueError(f"not a persistent topic: {topic}")
    return "persistent/" + urllib.parse.quote(f"{parsed.netloc}{parsed.path}", safe="/")


class PulsarAdmin:
    """`TopicAdmin` over the broker's admin REST API (`PulsarSettings.admin_url`), with the
    settings' bearer token and TLS trust on every call."""

    def __init__(self, pulsar: PulsarSettings, *, timeout_s: float, attempts: int, retry_s: float):
        self._pulsar = pulsar
        self._base = pulsar.admin_url.rstrip("/") + "/admin/v2/"
        self._timeout_s = timeout_s
        self._attempts = attempts
        self._retry_s = retry_s

    def _call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        try:
            # Inside: an unreadable token file is an AdminError like an unreachable broker.
            request = urllib.request.Request(
                self._base + path,
                data=data,
                method=method,
                headers={
                    "Content-Type": "application/json",
                    "Accept": "application/json",
                    **self._pulsar.admin_headers(),
                },
            )
            with urllib.request.urlopen(
                request, timeout=self._timeout_s, context=self._pulsar.admin_ssl_context()
            ) as response:
                raw = response.read()
                return response.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")[:500]
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise AdminError(f"{method} {path}: {exc}") from exc

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """One call: its HTTP status and decoded body (or the error text)."""
        return await asyncio.to_thread(self._call, method, path, body)

    async def _must(
        self, method: str, path: str, body: Any = None, ok: tuple[int, ...] = ()
    ) -> Any:
        """A call that must succeed, tried `attempts` times (the broker applies topic
        policies through a system topic it may still be creating)."""
        last = ""
        for attempt in range(1, self._attempts + 1):
            try:
                status, answer = await self.call(method, path, body)
            except AdminError as exc:
                last = str(exc)
            else:
                if 200 <= status < 300 or status in ok:
                    return answer
                last = f"{method} {path}: HTTP {status} {answer}"
            log.warning("admin call failed; retrying", extra={"attempt": attempt, "error": last})
            await asyncio.sleep(self._retry_s)
        raise AdminError(last)

    async def retain_forever(self, topic: str) -> None:
        """The topic exists and keeps every message (topic-level infinite retention)."""
        path = topic_path(topic)
        # 409: it already exists, which is what we want.
        await self._must("PUT", path, ok=(409,))
        await self._must("POST", f"{path}/retention", INFINITE_RETENTION)

    async def prepare(self, topic: str, compaction_threshold_bytes: int) -> None:
        path = topic_path(topic)
        await self.retain_forever(topic)
        await self._must("POST", f"{path}/compactionThreshold", compaction_threshold_bytes)
        log.info(
            "control topic ready: infinite retention, compaction threshold set",
            extra={"topic": topic, "compaction_threshold_bytes": compaction_threshold_bytes},
        )

    async def retention(self, topic: str) -> Any:
        """The topic's own retention policy (None when it has none)."""
        status, answer = await self.call("GET", f"{topic_path(topic)}/retention")
        if status != 200:
            raise AdminError(f"GET retention: HTTP {status} {answer}")
        return answer

    async def compact(self, topic: str) -> None:
        try:
            status, answer = await self.call("PUT", f"{topic_path(topic)}/compaction")
        except AdminError as exc:
            log.warning("could not ask for a compaction", extra={"error": str(exc)})
            return
        # 409: a compaction is already running; it or the threshold will catch this change.
        if status not in (200, 204, 409):
            log.warning(
                "the broker refused a compaction", extra={"status": status, "answer": answer}
            )
