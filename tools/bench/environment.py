"""What the benchmark runs against: the broker, the bench mesh (S0-S2) and the original (S3)."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from services.core.mesh import RendezvousEntry
from services.supervisor.plan import free_port, free_port_series

REPO = Path(__file__).resolve().parents[2]
PULSAR_SH = REPO / "tools" / "pulsar.sh"
PULSAR_RUN = REPO / ".run" / "pulsar"
BENCH_MESH = REPO / "deploy" / "mesh" / "bench-systems.yaml"
STANDALONE = "org.apache.pulsar.PulsarStandaloneStarter"
RENDEZVOUS_PORT_STEP = RendezvousEntry().port_step


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


@dataclass
class Broker:
    """A healthy broker: its URLs, its JVM's pid, and whether the harness started it."""

    service_url: str
    admin_url: str
    pid: int
    owned: bool
    env: dict[str, str]

    def version(self) -> str:
        try:
            with urllib.request.urlopen(
                f"{self.admin_url}/admin/v2/brokers/version", timeout=5
            ) as r:
                return str(r.read().decode().strip().strip('"'))
        except OSError:
            return "unknown"

    def stop(self) -> None:
        if self.owned:
            log("stopping the broker the bench started")
            subprocess.run([str(PULSAR_SH), "down"], env=self.env, check=False)


def _running_broker_pid() -> int | None:
    try:
        pid = int((PULSAR_RUN / "pulsar.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if STANDALONE.encode() in cmdline else None


def _healthy(admin_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{admin_url}/admin/v2/brokers/health", timeout=5) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _conf_port(key: str) -> int:
    for line in (PULSAR_RUN / "standalone.conf").read_text().splitlines():
        if line.startswith(f"{key}="):
            return int(line.split("=", 1)[1])
    raise RuntimeError(f"no {key} in {PULSAR_RUN / 'standalone.conf'}")


def ensure_broker(broker_port: int, web_port: int) -> Broker:
    """The checkout's broker if one runs (whatever its ports), else a new one on ours.

    tools/pulsar.sh keeps one run dir per checkout, so two brokers cannot run side by side here.
    """
    pid = _running_broker_pid()
    if pid is not None:
        broker_port, web_port = _conf_port("brokerServicePort"), _conf_port("webServicePort")
    # The ports the broker listens on: a `restart` (the chaos matrix's broker kill) must bring
    # it back on those, not on the ports asked for.
    env = {**os.environ, "PULSAR_BROKER_PORT": str(broker_port), "PULSAR_WEB_PORT": str(web_port)}
    if pid is not None:
        admin = f"http://127.0.0.1:{web_port}"
        if not _healthy(admin):
            raise RuntimeError(
                f"a broker (pid {pid}) runs from this checkout but {admin} is unhealthy"
            )
        log(f"using the running broker (pid {pid}, port {broker_port}); it is left running")
        return Broker(f"pulsar://127.0.0.1:{broker_port}", admin, pid, owned=False, env=env)
    log(f"starting a broker on 127.0.0.1:{broker_port} (admin :{web_port})")
    subprocess.run([str(PULSAR_SH), "up"], env=env, check=True, stdout=subprocess.DEVNULL)
    pid = _running_broker_pid()
    if pid is None:
        raise RuntimeError("tools/pulsar.sh up returned but no broker pid is recorded")
    return Broker(
        f"pulsar://127.0.0.1:{broker_port}", f"http://127.0.0.1:{web_port}", pid, True, env
    )


class Mesh:
    """The bench mesh under the real supervisor (`services.cli supervise`), as the tests run it."""

    def __init__(
        self,
        broker: Broker,
        work_dir: Path,
        mesh_template: Path = BENCH_MESH,
        rendezvous_replicas: int = 1,
        *,
        supervise_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        """`supervise_args` and `env`: more options of `rendezvous supervise` (e.g. `--traces`)
        and more environment for the supervisor (e.g. RDV_SUPERVISOR_*)."""
        self.broker = broker
        self.supervise_args = list(supervise_args)
        self.env = dict(env or {})
        self.root = work_dir / "mesh"
        self.state_dir = self.root / "state"
        self.document: dict[str, Any] = yaml.safe_load(mesh_template.read_text())
        rendezvous = self.document.setdefault("rendezvous", {})
        step = int(rendezvous.get("port_step", RENDEZVOUS_PORT_STEP))
        first = free_port_series(rendezvous_replicas, step)
        rendezvous.update(listen=f"127.0.0.1:{first}", replicas=rendezvous_replicas)
        # The first replica's address until the supervisor says what clients dial.
        self.endpoint = str(rendezvous["listen"])
        self.control_endpoint = f"127.0.0.1:{free_port()}"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 240.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        mesh_file = self.root / "mesh.yaml"
        mesh_file.write_text(yaml.safe_dump(self.document))
        with (self.root / "supervisor.log").open("wb") as output:
            self._process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "services.cli",
                    "--state-dir",
                    str(self.state_dir),
                    "supervise",
                    "--mesh",
                    str(mesh_file),
                    "--pulsar-url",
                    self.broker.service_url,
                    "--pulsar-admin-url",
                    self.broker.admin_url,
                    *self.supervise_args,
                ],
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                # A control plane of its own, beside whatever else listens on the default.
                # No evaluator: the bench measures serving, and the systems it is compared
                # with run no evaluation either; its CPU would only blur the figures.
                env={
                    **os.environ,
                    "RDV_SUPERVISOR_CONTROL_LISTEN": self.control_endpoint,
                    "RDV_SUPERVISOR_EVALUATOR_LISTEN": "",
                    **self.env,
                },
            )
        log(f"mesh starting (supervisor pid {self._process.pid}, logs in {self.root})")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"the supervisor exited; see {self.root}")
            if (self.state_dir / "state.json").exists() and self.state()["phase"] in (
                "ready",
                "failed",
            ):
                break
            time.sleep(0.5)
        if self.state()["phase"] != "ready":
            raise RuntimeError(f"mesh not ready; logs in {self.state_dir}/logs")
        # One address, or the round-robin target of every rendezvous replica.
        self.endpoint = str(self.state()["endpoint"])
        log(f"mesh ready: rendezvous on {self.endpoint}")

    def stop(self) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(60)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def state(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.state_dir / "state.json").read_text())
        return data

    def process(self, name: str) -> dict[str, Any]:
        return next(p for p in self.state()["processes"] if p["name"] == name)

    def model_names(self, objective: str) -> list[str]:
        models = self.document["objectives"][objective]["models"]
        return [m["name"] for m in models]

    def pids(self, objective: str) -> dict[str, int]:
        """Every process on `objective`'s path: its models, runner hosts and decoy, and the
        shared enricher (when the mesh has one), rendezvous and collector."""
        names = set(self.model_names(objective))
        pids: dict[str, int] = {}
        for process in self.state()["processes"]:
            name: str = process["name"]
            shared = name in ("enricher", "rendezvous", "collector") or name.startswith(
                ("rendezvous-", "collector-")
            )
            own = (
                name == f"decoy-{objective}"
                or name.startswith(f"runners-{objective}-")
                or any(name == f"model-{m}" for m in names)
            )
            if shared or own:
                pids[name] = int(process["pid"])
        return pids

    def metrics_address(self) -> str:
        return str(self.process("rendezvous")["metrics"])


class OriginalSystem(Protocol):
    """What `tools.bench.original.start()` returns (S3, written separately)."""

    @property
    def endpoint(self) -> str: ...  # the HTTP URL of `POST /score`

    @property
    def named_pids(self) -> dict[str, int]: ...  # its processes by name (descendants count)

    async def stop(self) -> None: ...


class StartOriginal(Protocol):
    async def __call__(
        self, pulsar_url: str, model_endpoints: dict[str, str], state_dir: Path
    ) -> OriginalSystem: ...


def original_starter() -> tuple[StartOriginal | None, str]:
    """`tools.bench.original.start`, or None and why it is not available."""
    try:
        module = importlib.import_module("tools.bench.original")
    except ImportError as exc:
        return None, f"tools.bench.original does not import ({exc})"
    start = getattr(module, "start", None)
    if start is None:
        return None, "tools.bench.original has no start()"
    starter: StartOriginal = start
    return starter, ""
