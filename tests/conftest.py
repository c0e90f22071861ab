"""Fixtures every test may use: the real Pulsar broker (integration) and the in-memory twin.

`pulsar` is session-scoped and only started when an integration test asks for it, so
unit tests never need the broker. When a healthy broker is already up (`tools/pulsar.sh
status` exits 0, e.g. because `tools/run-tests.sh` started it), the fixture uses it and
leaves it running; otherwise it starts one with `tools/pulsar.sh up` and stops it when the
session ends. `broker_started` starts a broker of a test module's own (other ports, a run
dir of its own, `PULSAR_AUTH=token`, `PULSAR_TLS=only`, ...). A broker with token
authentication hands its token file, one on TLS its CA, to the settings and the admin
helpers.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from services.core.bus import Bus, connect
from services.core.settings import PulsarSettings
from tests.fakes.memory_bus import MemoryBus

# The browser fixtures (headless Chromium, a page that records errors) for every test module.
pytest_plugins = ["tests.browser.fixtures"]

REPO = Path(__file__).resolve().parents[1]
PULSAR_SH = REPO / "tools" / "pulsar.sh"

# Tests wait for nack redeliveries; the production default (1 s) would make them slow.
TEST_NACK_DELAY_MS = 100
# Starting the standalone broker takes 15-40 s on 2 cores; `up` waits until it works.
BROKER_START_TIMEOUT_S = 240.0
BROKER_STOP_TIMEOUT_S = 60.0
ADMIN_TIMEOUT_S = 10.0


def quick_settings(**overrides: Any) -> PulsarSettings:
    """PulsarSettings for tests: short nack delay; anything else as given."""
    values: dict[str, Any] = {"negative_ack_redelivery_delay_ms": TEST_NACK_DELAY_MS}
    values.update(overrides)
    return PulsarSettings(**values)


@dataclass(frozen=True)
class PulsarBroker:
    """A running Apache Pulsar standalone: where it listens, and its admin API."""

    service_url: str
    admin_url: str
    # The clients' token when the broker runs with token authentication.
    token_file: Path | None = None
    # The CA its certificate chains to when it runs with TLS (pulsar+ssl://, https://).
    tls_trust_certs_file: Path | None = None

    def settings(self, **overrides: Any) -> PulsarSettings:
        """PulsarSettings pointing at this broker, tuned for tests (short nack delay)."""
        values: dict[str, Any] = {"service_url": self.service_url, "admin_url": self.admin_url}
        if self.token_file is not None:
            values["token_file"] = self.token_file
        if self.tls_trust_certs_file is not None:
            values["tls_trust_certs_file"] = self.tls_trust_certs_file
        return quick_settings(**{**values, **overrides})

    def supervisor_env(self) -> dict[str, str]:
        """The supervisor's settings for this broker's token and CA (it passes them on)."""
        env: dict[str, str] = {}
        if self.token_file is not None:
            env["RDV_SUPERVISOR_PULSAR__TOKEN_FILE"] = str(self.token_file)
        if self.tls_trust_certs_file is not None:
            env["RDV_SUPERVISOR_PULSAR__TLS_TRUST_CERTS_FILE"] = str(self.tls_trust_certs_file)
        return env

    def admin_headers(self) -> dict[str, str]:
        """What every admin REST call carries (the bearer token when there is one)."""
        return {"Accept": "application/json", **self.settings().admin_headers()}

    def admin_get(self, path: str) -> Any:
        """GET `path` from the admin REST API (e.g. `/admin/v2/persistent/public/default`)."""
        url = self.admin_url.rstrip("/") + "/" + path.lstrip("/")
        request = urllib.request.Request(url, headers=self.admin_headers())
        context = self.settings().admin_ssl_context()
        with urllib.request.urlopen(request, timeout=ADMIN_TIMEOUT_S, context=context) as response:
            body = response.read()
        return json.loads(body) if body else None

    def topic_stats(self, topic: str) -> Any:
        """The admin stats of a persistent topic given by its full name."""
        parsed = urllib.parse.urlparse(topic)
        if parsed.scheme != "persistent":
            raise ValueError(f"not a persistent topic: {topic}")
        rest = urllib.parse.quote(f"{parsed.netloc}{parsed.path}", safe="/")
        return self.admin_get(f"/admin/v2/persistent/{rest}/stats")


def _broker_urls(env: Mapping[str, str] | None = None) -> PulsarBroker:
    """Where tools/pulsar.sh says the broker listens (it reads PULSAR_BROKER_PORT etc.)."""
    printed = _pulsar_sh("env", ADMIN_TIMEOUT_S, env)
    values = dict(
        line.split("=", 1) for line in printed.stdout.splitlines() if line.startswith("PULSAR_")
    )
    if printed.returncode != 0 or not {"PULSAR_SERVICE_URL", "PULSAR_ADMIN_URL"} <= set(values):
        pytest.fail(
            f"tools/pulsar.sh env printed no URLs (exit {printed.returncode}):\n{printed.stdout}"
        )
    token_file = values.get("PULSAR_TOKEN_FILE")
    trust_file = values.get("PULSAR_TLS_TRUST_CERTS_FILE")
    return PulsarBroker(
        service_url=values["PULSAR_SERVICE_URL"],
        admin_url=values["PULSAR_ADMIN_URL"],
        token_file=Path(token_file) if token_file else None,
        tls_trust_certs_file=Path(trust_file) if trust_file else None,
    )


def _pulsar_sh(
    command: str, timeout: float, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(PULSAR_SH), command],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )


@contextmanager
def broker_started(env: Mapping[str, str] | None = None) -> Iterator[PulsarBroker]:
    """A fresh broker (`tools/pulsar.sh up` with `env` on top of this process's
    environment) until the block ends."""
    if not PULSAR_SH.exists():
        pytest.fail(f"{PULSAR_SH} is missing: integration tests need the real broker")
    up = _pulsar_sh("up", BROKER_START_TIMEOUT_S, env)
    try:
        if up.returncode != 0:
            # `up` may have left a half-started broker behind (stopped on the way out).
            pytest.fail(f"tools/pulsar.sh up failed (exit {up.returncode}):\n{up.stdout}")
        yield _broker_urls(env)
    finally:
        _pulsar_sh("down", BROKER_STOP_TIMEOUT_S, env)


@pytest.fixture(scope="session")
def pulsar() -> Iterator[PulsarBroker]:
    """The real broker: reused when healthy, otherwise started here and stopped at the end."""
    if PULSAR_SH.exists() and _pulsar_sh("status", ADMIN_TIMEOUT_S * 3).returncode == 0:
        yield _broker_urls()
        return
    with broker_started() as broker:
        yield broker


@pytest.fixture
async def client_bus(pulsar: PulsarBroker) -> AsyncIterator[Bus]:
    """A test's own client on the real broker (publish inputs, observe outputs)."""
    bus = connect(pulsar.settings(), f"itest-{uuid.uuid4().hex[:6]}")
    try:
        yield bus
    finally:
        await bus.close()


@pytest.fixture
async def memory_bus() -> AsyncIterator[MemoryBus]:
    """A fresh in-memory twin of the bus, with the test settings."""
    bus = MemoryBus(quick_settings())
    try:
        yield bus
    finally:
        await bus.close()
