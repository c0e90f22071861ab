"""The bench's side of S4: a Ray head of its own on loopback, the Serve app, then stop.

    cluster = await RayServeCluster.start(work_dir)    # or a str: why S4 is unavailable
    ... ghz at cluster.grpc_endpoint; cluster.answers(); cluster.named_pids() ...
    await cluster.stop()

`ray start --head --block` runs as a child of the bench, so every Ray process (GCS, raylet,
its agents, the Serve controller, proxy and replicas, idle workers) is one of its
descendants: that tree is what S4's CPU counts, and SIGTERM to it drains and stops exactly
this head and nothing else (`ray stop` would kill every Ray on the machine). Its temporary
directory is a short one under /tmp (Ray's unix sockets live below it, and a socket path
holds 107 bytes); its logs are copied to the run directory before it is removed.

Loopback only: `--node-ip-address 127.0.0.1` alone is not enough, since Ray replaces a
loopback address with the host's own on Linux; RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is the
switch that keeps it (what Ray does on a laptop). Every port Ray would otherwise take by a
fixed default (6379, 8265, 10001, 52365...) is a free one. Serve's gRPC proxy binds
`[::]:port` (not configurable in Ray 2.60); nothing but the bench connects to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from rendezvous.v1 import scoring_pb2, scoring_pb2_grpc

from services.core.protos import set_values
from services.supervisor.plan import free_port
from tools.bench.environment import log
from tools.bench.probes import process_tree
from tools.bench.rayserve.settings import REPO, RayServeSettings

PEERS_VENV = REPO / ".venv-peers"
RAY = PEERS_VENV / "bin" / "ray"
PEERS_PYTHON = PEERS_VENV / "bin" / "python"
# On this 2-core machine, loaded, `ray start` took 18-46 s and the deploy 45-100 s.
START_TIMEOUT_S = 120.0
# Ray gives its raylet 30 s (not configurable) to register with the GCS; on a machine loaded
# by other work it can miss that, and `ray start` exits. Once more, then S4 is unavailable.
HEAD_ATTEMPTS = 2
AGENT_REGISTER_TIMEOUT_MS = 120_000
DEPLOY_TIMEOUT_S = 240.0
# Ray drains for up to 30 s on SIGTERM before it stops its processes.
STOP_TIMEOUT_S = 45.0
# Plasma's shared memory: the requests are a few hundred bytes, passed inline.
OBJECT_STORE_BYTES = 128 * 1024 * 1024
SCORE = "rendezvous.v1.ScoringService/Score"


def unavailable() -> str | None:
    """Why S4 cannot run here, or None."""
    if not RAY.exists() or not PEERS_PYTHON.exists():
        return f"no Ray Serve: {PEERS_VENV.name} is missing (`make setup-peers` installs it)"
    return None


def ray_version() -> str:
    out = subprocess.run([str(RAY), "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip().rsplit(" ", 1)[-1] if out.returncode == 0 else "unknown"


@dataclass
class RayServeCluster:
    """A running Ray head with S4 deployed."""

    head: asyncio.subprocess.Process
    temp_dir: Path
    log_dir: Path
    grpc_endpoint: str
    http_url: str
    objective: str
    _stopped: bool = field(default=False, repr=False)

    @classmethod
    async def start(
        cls, work_dir: Path, objective: str, features: Mapping[str, float]
    ) -> RayServeCluster | str:
        """Start the head, deploy the app, check one request is answered by a model; or
        say why S4 is not available (nothing of it is left running then)."""
        why = unavailable()
        if why is not None:
            return why
        log_dir = work_dir / "ray"
        log_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, HEAD_ATTEMPTS + 1):
            cluster, env = await cls._launch(log_dir, objective)
            began = time.monotonic()
            try:
                await cluster._wait_for_head(START_TIMEOUT_S)
            except RuntimeError as exc:
                await cluster.stop()
                if attempt == HEAD_ATTEMPTS:
                    return f"{exc} ({attempt} attempts)"
                log(f"S4: {exc}; starting it again")
                continue
            log(f"S4: Ray head up in {time.monotonic() - began:.1f} s; deploying")
            began = time.monotonic()
            try:
                await cluster._deploy(env, DEPLOY_TIMEOUT_S)
                await cluster._check_answer(features)
            except Exception as exc:
                await cluster.stop()
                return f"{type(exc).__name__}: {exc}"
            log(f"S4: Serve app deployed in {time.monotonic() - began:.1f} s")
            return cluster
        raise AssertionError("unreachable: every attempt returns or continues")

    @classmethod
    async def _launch(cls, log_dir: Path, objective: str) -> tuple[RayServeCluster, dict[str, str]]:
        """`ray start --head --block` on fresh ports and a fresh temporary directory; the
        cluster and the environment its processes (and the deploy) get."""
        temp_dir = Path(tempfile.mkdtemp(prefix="rdv-ray-"))
        gcs_port, grpc_port, http_port = free_port(), free_port(), free_port()
        env = {
            **os.environ,
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
            # The raylet waits this long for its agents' port files, then aborts: measured
            # past its default on this machine under load, when the agents' imports crawl.
            "RAY_agent_register_timeout_ms": str(AGENT_REGISTER_TIMEOUT_MS),
            # Our packages for the replicas and the proxy (which imports the servicer).
            "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'gen'}",
            "RDV_RAYSERVE_ADDRESS": f"127.0.0.1:{gcs_port}",
            "RDV_RAYSERVE_OBJECTIVE": objective,
            "RDV_RAYSERVE_GRPC_PORT": str(grpc_port),
            "RDV_RAYSERVE_HTTP_PORT": str(http_port),
        }
        if RayServeSettings().throughput_optimized:
            env |= throughput_optimized(grpc_port, http_port)
        # fmt: off
        argv = [
            str(RAY), "start", "--head", "--block", "--disable-usage-stats",
            "--node-ip-address=127.0.0.1", f"--port={gcs_port}", "--num-cpus=2",
            "--include-dashboard=false", "--include-log-monitor=false",
            f"--temp-dir={temp_dir}", f"--object-store-memory={OBJECT_STORE_BYTES}",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
        ]
        # fmt: on
        # Truncated: its "started" line is what the start waits for.
        with (log_dir / "head.log").open("wb") as output:
            head = await asyncio.create_subprocess_exec(
                *argv, cwd=REPO, env=env, stdout=output, stderr=output
            )
        log(f"S4: ray start (pid {head.pid}, GCS 127.0.0.1:{gcs_port}, logs in {log_dir})")
        endpoint, url = f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}/"
        return cls(head, temp_dir, log_dir, endpoint, url, objective), env

    async def _wait_for_head(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        marker = b"Ray runtime started"
        while marker not in (self.log_dir / "head.log").read_bytes():
            if self.head.returncode is not None:
                raise RuntimeError(f"ray start exited ({self.head.returncode}); see head.log")
            if time.monotonic() > deadline:
                raise RuntimeError(f"ray start not ready after {timeout_s:g} s; see head.log")
            await asyncio.sleep(0.25)

    async def _deploy(self, env: dict[str, str], timeout_s: float) -> None:
        with (self.log_dir / "deploy.log").open("wb") as output:
            deployer = await asyncio.create_subprocess_exec(
                str(PEERS_PYTHON),
                "-m",
                "tools.bench.rayserve.app",
                cwd=REPO,
                env=env,
                stdout=output,
                stderr=output,
            )
        try:
            code = await asyncio.wait_for(deployer.wait(), timeout_s)
        except TimeoutError:
            deployer.kill()
            await deployer.wait()
            raise RuntimeError(f"the deploy took over {timeout_s:g} s; see deploy.log") from None
        if code != 0:
            raise RuntimeError(f"the deploy failed ({code}); see deploy.log")

    async def _check_answer(self, features: Mapping[str, float]) -> None:
        """One request through the gRPC ingress, answered by a model."""
        request = scoring_pb2.ScoreRequest(objective=self.objective)
        set_values(request.features, features)
        async with grpc.aio.insecure_channel(self.grpc_endpoint) as channel:
            stub = scoring_pb2_grpc.ScoringServiceStub(channel)
            # The first requests warm the replicas' handles up: a few tries.
            for _ in range(20):
                response = await stub.Score(request, timeout=10)
                if response.decision.source == scoring_pb2.ANSWER_SOURCE_MODEL:
                    return
            raise RuntimeError("S4 answers, but only with the default")

    def stats(self) -> dict[str, Any]:
        """The router's counters (over Serve's HTTP ingress)."""
        with urllib.request.urlopen(self.http_url, timeout=5) as response:
            data: dict[str, Any] = json.loads(response.read())
        return data

    def answers(self) -> dict[str, float]:
        """Answers so far by source (MODEL, DEFAULT), as S2's rdv_answers_total gives them."""
        return {
            source.removeprefix("ANSWER_SOURCE_"): float(count)
            for source, count in self.stats().get("answers", {}).items()
        }

    def named_pids(self) -> dict[str, int]:
        """Every Ray process by a readable name, the deepest first (so that a process born
        during a run is billed to its parent, a worker to the raylet)."""
        out: dict[str, int] = {}
        for pid, argv in process_tree(self.head.pid):
            name = ray_process_name(argv)
            unique, n = name, 1
            while unique in out:
                n += 1
                unique = f"{name}-{n}"
            out[unique] = pid
        return out

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        leftovers = [pid for pid, _ in process_tree(self.head.pid)]
        if self.head.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.head.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.head.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                log("S4: ray start did not stop in time; killing its processes")
        # Only the processes of this head, by pid, whatever state it left them in.
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            await self.head.wait()
        with contextlib.suppress(OSError):
            shutil.copytree(
                self.temp_dir / "session_latest" / "logs",
                self.log_dir / "logs",
                dirs_exist_ok=True,
            )
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def throughput_optimized(grpc_port: int, http_port: int) -> dict[str, str]:
    """Serve's high-throughput mode, its direct ingress pinned to our two ports (the range
    it allocates an ingress replica's ports from holds only them), its proxy elsewhere."""
    return {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RDV_RAYSERVE_PROXY_GRPC_PORT": str(free_port()),
        "RDV_RAYSERVE_PROXY_HTTP_PORT": str(free_port()),
        "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(grpc_port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(grpc_port + 1),
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(http_port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(http_port + 1),
    }


def ray_process_name(argv: list[str]) -> str:
    """A short name for one Ray process from its command line (Ray workers retitle
    themselves `ray::ServeReplica:<app>:<deployment>[.<method>]`, `ray::ProxyActor`,
    `ray::IDLE`...)."""
    if not argv:
        return "ray-other"
    first = argv[0]
    if first.startswith("ray::"):
        # A worker's title also names the method it runs at the moment: not part of its name.
        title = first.split()[0].removeprefix("ray::").split(".", 1)[0]
        if title.startswith("ServeReplica:"):
            return "serve-" + title.rsplit(":", 1)[-1]
        return {
            "ProxyActor": "serve-proxy",
            "ServeController": "serve-controller",
            "IDLE": "ray-idle-worker",
            "DashboardAgent": "ray-dashboard-agent",
            "RuntimeEnvAgent": "ray-runtime-env-agent",
        }.get(title, "ray-" + title.lower())
    program = Path(first).name
    if program in ("gcs_server", "raylet"):
        return program
    text = " ".join(argv)
    for needle, name in (
        ("monitor.py", "ray-monitor"),
        ("ray.util.client.server", "ray-client-server"),
        ("dashboard.py", "ray-dashboard"),
        ("ray start", "ray-start"),
    ):
        if needle in text:
            return name
    return "ray-other"
