"""A whole mesh under the real supervisor, for integration tests: `supervised_mesh`.

The supervisor runs as `rendezvous supervise` would run it for `rendezvous up`, on the test
session's broker, with a control plane on a port of its own (beside whatever listens on the
default one), and is stopped (SIGTERM, then SIGKILL) when the block ends. A broker with
token authentication gives the supervisor its token file, one on TLS its CA.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from rendezvous.v1 import task_pb2

from services.core.bus import PulsarBus
from services.supervisor.plan import free_port
from tests.conftest import REPO, PulsarBroker

R = TypeVar("R", task_pb2.ArchiveRecord, task_pb2.Outcome)

READY_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 60.0


@dataclass
class RunningMesh:
    """Where a supervised mesh answers, and its supervisor's view of it."""

    endpoint: str
    state_dir: Path
    broker: PulsarBroker

    def state(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.state_dir / "state.json").read_text())
        return data

    def process(self, name: str) -> dict[str, Any]:
        return next(p for p in self.state()["processes"] if p["name"] == name)

    @property
    def control_endpoint(self) -> str:
        return str(self.state()["control_endpoint"])

    async def outcomes(
        self, objective: str, ids: set[str], quiet_s: float = 30.0
    ) -> dict[str, task_pb2.Outcome]:
        """The outcomes of `ids` on the objective's results topic, read from the start until
        every one is found or nothing more came for `quiet_s` (what was found, then)."""
        bus = PulsarBus(self.broker.settings(), f"test-outcomes-{uuid.uuid4().hex[:6]}")
        found: dict[str, task_pb2.Outcome] = {}
        try:
            reader = await bus.reader(bus.topics.results(objective), task_pb2.Outcome)
            while len(found) < len(ids):
                try:
                    envelope = await asyncio.wait_for(reader.read_next(), quiet_s)
                except TimeoutError:
                    break
                if envelope.message.request_id in ids:
                    found[envelope.message.request_id] = envelope.message
            await reader.close()
        finally:
            await bus.close()
        return found

    @property
    def keyring_endpoint(self) -> str:
        return str(self.state()["keyring_endpoint"])

    async def open_records(self, records: list[R]) -> list[R]:
        """Sealed records (archive, outcomes) opened with the mesh's keyring, as a reader of
        the topics does; a record that cannot be opened fails the test."""
        from services.core.privacy import Opener, Openness
        from services.core.settings import PrivacySettings

        opener = Opener(PrivacySettings(keyring=self.keyring_endpoint))
        try:
            opened = await opener.open_all(records)
        finally:
            await opener.close()
        assert all(o.state in (Openness.OPENED, Openness.CLEAR) for o in opened), [
            o.state for o in opened
        ]
        return [o.record for o in opened]


@contextmanager
def supervised_mesh(
    pulsar: PulsarBroker,
    root: Path,
    document: dict[str, Any],
    env: dict[str, str] | None = None,
    supervise_args: Sequence[str] = (),
) -> Iterator[RunningMesh]:
    """Run the mesh `document` (a mesh file's content; `rendezvous.listen` is where it
    answers, the first replica's address with `rendezvous.replicas` or
    `--rendezvous-replicas`) until the block ends; yields once the supervisor says it is
    ready.
    `supervise_args` are more options of `rendezvous supervise` (e.g. `--tls`)."""
    mesh_file = root / "mesh.yaml"
    mesh_file.write_text(yaml.safe_dump(document))
    state_dir = root / "state"
    log = (root / "supervisor.log").open("wb")
    supervisor = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli",
            "--state-dir",
            str(state_dir),
            "supervise",
            "--mesh",
            str(mesh_file),
            "--pulsar-url",
            pulsar.service_url,
            "--pulsar-admin-url",
            pulsar.admin_url,
            *supervise_args,
        ],
        cwd=REPO,
        env={
            **os.environ,
            "RDV_SUPERVISOR_CONTROL_LISTEN": f"127.0.0.1:{free_port()}",
            "RDV_SUPERVISOR_EVALUATOR_LISTEN": f"127.0.0.1:{free_port()}",
            "RDV_SUPERVISOR_DASHBOARD_LISTEN": f"127.0.0.1:{free_port()}",
            "RDV_SUPERVISOR_KEYRING_LISTEN": f"127.0.0.1:{free_port()}",
            # The broker's token and CA, for the supervisor and (passed on) every process.
            **pulsar.supervisor_env(),
            **(env or {}),
        },
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
    )
    running = RunningMesh(document["rendezvous"]["listen"], state_dir, pulsar)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if supervisor.poll() is not None:
                pytest.fail(f"the supervisor exited; see {root}")
            if (state_dir / "state.json").exists() and running.state()["phase"] in (
                "ready",
                "failed",
            ):
                break
            time.sleep(0.5)
        assert running.state()["phase"] == "ready", f"mesh not ready; logs in {state_dir}/logs"
        # What clients dial: the round-robin target of every replica when there are several.
        running.endpoint = str(running.state()["endpoint"])
        yield running
    finally:
        supervisor.send_signal(signal.SIGTERM)
        try:
            supervisor.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            supervisor.kill()
        log.close()
