"""The local supervisor: starts every process of a mesh, keeps them running, stops them.

Processes start stage by stage (the control component, then models, then consumers, then
the rendezvous and its collector); a stage is ready when each process wrote its ready file
and answers the standard gRPC health check with SERVING. A process that exits
unexpectedly is restarted on the same port with a growing backoff. SIGTERM
stops everything in reverse order: SIGTERM, then SIGKILL after the grace.
The supervisor's view is written to `state.json` for `rendezvous status`, and every
process's metrics endpoint (and the broker's) to `prometheus-targets.json` beside it, a
Prometheus file-based service discovery file (`deploy/prometheus/prometheus.yml` reads it).

With a `LiveMesh`, only the control component is planned up front; once it is ready the
mesh is planned from the control topic, and planned again for every new version. The
difference is applied at once: the model directory is rewritten (new containers' endpoints,
which the runner hosts wait for), new model containers, runner hosts (a new replica group)
and the enricher start, processes whose settings changed restart, runner hosts of a group
that became empty stop, and the container of a removed model stops `model_stop_grace_s`
later, once the runner hosts have drained it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.core.channels import aio_channel
from services.core.settings import REPO_ROOT, PulsarSettings, TlsSettings
from services.supervisor.live import LiveMesh
from services.supervisor.plan import STAGE_MODELS, STARTED_FIRST, ProcessSpec, TraceStore, diff

log = logging.getLogger(__name__)

# Beside state.json: the scrape targets, in Prometheus' file_sd format.
PROMETHEUS_TARGETS = "prometheus-targets.json"
# The target label naming the process (a process's own metrics use `process` already).
COMPONENT_LABEL = "component"


def prometheus_targets(
    processes: list[dict[str, Any]], pulsar_admin_url: str | None
) -> list[dict[str, Any]]:
    """A file_sd target group per process serving metrics (its `metrics` address), labelled
    with its name; the broker's own /metrics/ on its admin port when it is known."""
    groups: list[dict[str, Any]] = [
        {"targets": [process["metrics"]], "labels": {COMPONENT_LABEL: process["name"]}}
        for process in processes
        if process.get("metrics")
    ]
    if pulsar_admin_url:
        broker = urllib.parse.urlsplit(pulsar_admin_url)
        if broker.netloc:
            groups.append(
                {
                    "targets": [broker.netloc],
                    "labels": {
                        COMPONENT_LABEL: "pulsar",
                        "__metrics_path__": "/metrics/",
                        "__scheme__": broker.scheme or "http",
                    },
                }
            )
    return groups


class SupervisorSettings(BaseSettings):
    """How patient the supervisor is (env RDV_SUPERVISOR_*)."""

    model_config = SettingsConfigDict(
        env_prefix="RDV_SUPERVISOR_", extra="forbid", env_nested_delimiter="__"
    )

    # The broker's authentication and TLS (RDV_SUPERVISOR_PULSAR__TOKEN_FILE, ...), for the
    # supervisor's client and passed on to every process; its URLs come from the command line.
    pulsar: PulsarSettings = Field(default_factory=PulsarSettings)

    # Long enough for the rendezvous' warm-up (RendezvousSettings.warmup_max_s) on a cold broker.
    ready_timeout_s: float = 240.0
    stop_grace_s: float = 10.0
    restart_backoff_initial_s: float = 0.5
    restart_backoff_max_s: float = 10.0
    # Nice value of the answer path (rendezvous, collector); a replica restarted while others
    # serve gets it once ready (Supervised._prioritise_when_ready). On 2 cores a booting
    # broker or a burst of model work starves them; measured during broker restarts: 2-3
    # answers in 450 missed a 50 ms SLA by 15-40 ms at nice 0, none at -10. Needs root or
    # CAP_SYS_NICE; without it the processes run at the default priority and a warning says so.
    latency_critical_nice: int = -10
    # Real-time round-robin priority (1-99) for the answer path (likewise), above every
    # ordinary process: nice -10 still left the rendezvous waiting 30-55 ms behind a
    # CPU-bound neighbour now and then (CFS wake-up granularity on 2 busy cores), and the SLA
    # test failed beside stress-ng. The kernel's RT throttling (95 % of each second) keeps a
    # runaway from starving the box. 0: nice only. Needs root or CAP_SYS_NICE; without it,
    # nice alone, then nothing.
    latency_critical_rt_priority: int = Field(default=1, ge=0, le=99)
    # Where the control component (ControlPlaneService) listens.
    control_listen: str = "127.0.0.1:50052"
    # Where the evaluator serves EvaluationService and FeedbackService ("" runs none), and
    # its live dashboard (HTTP; "" serves none).
    evaluator_listen: str = "127.0.0.1:50053"
    dashboard_listen: str = "127.0.0.1:8053"
    # Where the keyring (KeyringService: subject keys, erasure) listens; "" runs none, and
    # records about subjects are then written readable and cannot be erased.
    keyring_listen: str = "127.0.0.1:50054"
    # The token the mesh's own processes present to the keyring when its auth is on
    # (`rendezvous up --auth` mints one with the scope privacy:keys).
    keyring_token_file: Path | None = None
    # How long a removed model's container keeps running after the change: the runner hosts
    # drain it first (RunnerSettings.drain_timeout_s, 5 s by default).
    model_stop_grace_s: float = Field(default=10.0, ge=0)
    # Traces (`rendezvous up --traces`): Jaeger on loopback, in memory, and every process
    # exporting to it (the standard OTEL_* variables; any already in the environment win).
    traces: bool = False
    jaeger_otlp_listen: str = "127.0.0.1:4317"
    jaeger_query_listen: str = "127.0.0.1:16686"
    jaeger_max_traces: int = Field(default=100_000, gt=0)
    # The share of new traces kept (parent-based: a caller's decision is kept).
    trace_sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)
    # How often each process sends its spans (the SDK's default, 5 s, makes a fresh
    # request's trace take that long to appear in `rendezvous trace`).
    trace_export_delay_ms: int = Field(default=500, gt=0)

    def trace_store(self) -> TraceStore | None:
        if not self.traces:
            return None
        return TraceStore(
            otlp_listen=self.jaeger_otlp_listen,
            query_listen=self.jaeger_query_listen,
            max_traces=self.jaeger_max_traces,
            sample_ratio=self.trace_sample_ratio,
            export_delay_ms=self.trace_export_delay_ms,
        )


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


async def check_health(
    endpoint: str, service: str = "", timeout: float = 1.0, tls: TlsSettings | None = None
) -> bool:
    """True when the process at `endpoint` reports SERVING (over TLS per `tls`)."""
    try:
        async with aio_channel(endpoint, tls) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = await stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
    except (grpc.aio.AioRpcError, OSError):
        return False


def _threads(pid: int) -> list[int]:
    """The thread ids of process `pid` (none once it is gone)."""
    try:
        return [int(thread) for thread in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return []


def _each_thread(threads: list[int], apply: Callable[[int], None]) -> bool:
    """`apply` to each thread still there (one that ended meanwhile is passed over); False
    when the kernel does not permit it."""
    for thread in threads:
        try:
            apply(thread)
        except ProcessLookupError:
            continue
        except PermissionError:
            return False
    return True


class Supervised:
    """One process and its restarts."""

    def __init__(
        self, spec: ProcessSpec, settings: SupervisorSettings, traces: TraceStore | None = None
    ) -> None:
        self.spec = spec
        self.settings = settings
        self.traces = traces
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.status = "pending"
        self.started_at = 0.0
        self._stopping = False
        self._watcher: asyncio.Task[None] | None = None
        self._ready_check: asyncio.Task[bool] | None = None

    async def start(self) -> None:
        self.spec.log_file.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.spec.ready_file.unlink()
        log_handle = self.spec.log_file.open("ab")
        # Export to the mesh's trace store, each process as its own service; a variable the
        # environment already sets wins.
        traced = self.traces.env(self.spec.name) if self.traces and self.spec.traced else {}
        restart_env = self.spec.restart_env if self.restarts > 0 else {}
        env = {**traced, **os.environ, **self.spec.env, **restart_env, "PYTHONUNBUFFERED": "1"}
        argv = self.spec.command or [sys.executable, "-m", self.spec.module]
        self.process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_handle,
            stderr=log_handle,
            env=env,
            # A polyglot container's relative paths mean the repository's (ModelDeployment.command).
            cwd=REPO_ROOT if self.spec.command else None,
        )
        log_handle.close()
        if self.spec.latency_critical and not self._prioritise_when_ready:
            # Quickest back (and warm) at the priority it serves at.
            self._prioritise(self.process.pid)
        self.started_at = time.time()
        self.status = "starting"
        if self._watcher is None:
            self._watcher = asyncio.create_task(self._watch())
            self._watcher.add_done_callback(self._watcher_ended)

    @property
    def _prioritise_when_ready(self) -> bool:
        """Whether this start gets its priority once ready rather than from exec: a replica
        restarted while the others serve (`ProcessSpec.replicated`). Starting up (seconds of
        imports and connections, on a busy machine) and warming up at a high priority, it
        would take the CPU from the runners, models and broker the others' answers wait for
        (measured, one run on the shared 2-core machine: the other replica's answers, 12-20
        ms before, took 50-370 ms for the 5 s a rendezvous replica took to start at nice
        -10, and its default share rose from 2 % to 64 %; started at nice 0, 16 % against
        12 % before). Anything else gets it from exec: on a first start nothing
        serves yet, and a lone rendezvous is quickest back and warm at that priority."""
        return self.spec.latency_critical and self.spec.replicated and self.restarts > 0

    def _prioritise(self, pid: int) -> None:
        """Nice and real-time priority for a latency-critical process."""
        # On Linux both are per thread: each thread it has by now (threads started later
        # inherit their creator's).
        threads = _threads(pid)
        nice = self.settings.latency_critical_nice
        if not _each_thread(threads, lambda thread: os.setpriority(os.PRIO_PROCESS, thread, nice)):
            log.warning(
                "cannot raise the answer path's CPU priority; it runs at the default",
                extra={"component": self.spec.name},
            )
            return
        priority = self.settings.latency_critical_rt_priority
        if priority > 0 and not _each_thread(
            threads,
            lambda thread: os.sched_setscheduler(thread, os.SCHED_RR, os.sched_param(priority)),
        ):
            log.warning(
                "no real-time priority for the answer path; nice only",
                extra={"component": self.spec.name},
            )

    def _watcher_ended(self, task: asyncio.Task[None]) -> None:
        # A watcher that dies leaves its process unsupervised: say so loudly.
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "watcher failed", exc_info=task.exception(), extra={"component": self.spec.name}
            )
            self.status = "unsupervised (watcher failed)"

    async def wait_ready(self) -> bool:
        deadline = time.monotonic() + self.settings.ready_timeout_s
        while time.monotonic() < deadline:
            if self._stopping:
                return False
            written = self.spec.ready_file.exists() or not self.spec.writes_ready_file
            if written and await check_health(
                self.spec.endpoint, self.spec.health_service, tls=self.spec.client_tls
            ):
                self.status = "ready"
                if self._prioritise_when_ready and self.process is not None:
                    self._prioritise(self.process.pid)
                return True
            await asyncio.sleep(0.2)
        self.status = "not ready"
        return False

    async def _watch(self) -> None:
        backoff = self.settings.restart_backoff_initial_s
        while not self._stopping:
            assert self.process is not None
            code = await self.process.wait()
            if self._stopping:
                break
            self.status = f"exited {code}, restarting"
            log.warning("process exited", extra={"component": self.spec.name, "code": code})
            await asyncio.sleep(backoff)
            if self._stopping:
                break
            # A process that stayed up for a while earns a fresh backoff.
            if time.time() - self.started_at > self.settings.restart_backoff_max_s:
                backoff = self.settings.restart_backoff_initial_s
            else:
                backoff = min(backoff * 2, self.settings.restart_backoff_max_s)
            self.restarts += 1
            await self.start()
            # Readiness is tracked on the side: the watcher must see the next exit at once.
            self._ready_check = asyncio.create_task(self.wait_ready())

    async def stop(self) -> None:
        self._stopping = True
        if self._watcher is not None:
            self._watcher.cancel()
        process = self.process
        if process is None or process.returncode is not None:
            self.status = "stopped"
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), self.settings.stop_grace_s)
        except TimeoutError:
            process.kill()
            await process.wait()
        self.status = "stopped"

    def ready_facts(self) -> dict[str, Any]:
        """What the process wrote into its ready file (e.g. the rendezvous' warm-up)."""
        try:
            facts: dict[str, Any] = json.loads(self.spec.ready_file.read_text())
        except (OSError, ValueError):
            return {}
        return facts

    def describe(self) -> dict[str, Any]:
        warmup = self.ready_facts().get("warmup")
        return {
            "name": self.spec.name,
            "module": self.spec.module,
            "role": self.spec.role,
            "endpoint": self.spec.endpoint,
            "pid": self.process.pid if self.process else None,
            "status": self.status,
            "restarts": self.restarts,
            # Wall clock of the last exec: state.json is rewritten once a second, so a reader
            # that needs to know when a restart happened takes it from here, not from polling.
            "started_at": self.started_at,
            "log": str(self.spec.log_file),
            **({"warmup": warmup} if warmup else {}),
            **self.spec.labels,
        }


class Supervisor:
    """Starts a planned mesh stage by stage and keeps it running until signalled; with a
    `LiveMesh`, plans the rest from the control topic and follows it."""

    def __init__(
        self,
        specs: list[ProcessSpec],
        state_file: Path,
        facts: dict[str, Any],
        settings: SupervisorSettings | None = None,
        live: LiveMesh | None = None,
    ) -> None:
        self.settings = settings or SupervisorSettings()
        self.traces = self.settings.trace_store()
        self.processes = [self._supervised(spec) for spec in specs]
        self.state_file = state_file
        self.facts = facts
        self.phase = "starting"
        self.live = live
        # Containers of removed models waiting out model_stop_grace_s, by process name.
        self._retiring: dict[str, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._apply_lock = asyncio.Lock()
        self._targets_written = ""

    def write_state(self) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        versions = self.live.versions if self.live is not None else {}
        processes = [p.describe() for p in self.processes]
        _write_atomically(
            self.state_file,
            json.dumps(
                {
                    "phase": self.phase,
                    "supervisor_pid": os.getpid(),
                    **self.facts,
                    **({"objective_versions": versions} if versions else {}),
                    "processes": processes,
                },
                indent=2,
            ),
        )
        targets = json.dumps(
            prometheus_targets(processes, self.facts.get("pulsar_admin_url")), indent=2
        )
        # Rewritten only when it changes: Prometheus re-reads the file on every write.
        if targets != self._targets_written:
            _write_atomically(self.state_file.parent / PROMETHEUS_TARGETS, targets)
            self._targets_written = targets

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        ok = await self._start_stages(list(self.processes), stopping)
        if ok and self.live is not None:
            ok = await self._start_live(self.live, stopping)
        self.phase = "ready" if ok else "failed"
        self.write_state()
        if ok:
            while not stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), 1.0)
                self.write_state()
        self.phase = "stopping"
        self.write_state()
        if self.live is not None:
            # No change is applied while everything stops.
            await self.live.close()
        for task in [*self._retiring.values(), *self._background]:
            task.cancel()
        for process in reversed(self.processes):
            await process.stop()
        self.phase = "stopped"
        self.write_state()
        return 0 if ok else 1

    async def _start_live(self, live: LiveMesh, stopping: asyncio.Event) -> bool:
        """The mesh planned from the control topic, started stage by stage, then followed."""
        try:
            await live.open(self.settings.ready_timeout_s, self._changed)
        except TimeoutError:
            log.error("the control topic does not hold the mesh's objectives")
            return False
        async with self._apply_lock:
            try:
                specs = live.plan()
            except ValueError as error:
                # A mesh this supervisor cannot run (e.g. a command container under TLS).
                log.error("cannot plan the mesh", extra={"reason": str(error)})
                return False
            live.write_directory(specs)
            started = [self._supervised(spec) for spec in specs]
            self.processes.extend(started)
            return await self._start_stages(started, stopping)

    async def _changed(self) -> None:
        """A new version: start, restart and stop what the new plan says."""
        live = self.live
        assert live is not None
        async with self._apply_lock:
            if self.phase not in ("ready", "starting"):
                return
            try:
                specs = live.plan()
            except ValueError as error:
                log.error(
                    "cannot apply the new version; the mesh runs on as it was",
                    extra={"reason": str(error)},
                )
                return
            planned = {spec.name: spec for spec in specs}
            for name in [name for name in self._retiring if name in planned]:
                # Removed and added back within the grace: it never stopped.
                retiring = self._retiring.pop(name)
                retiring.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await retiring
                kept = self._process(name)
                if kept is not None:
                    kept.status = "ready"
            running = [
                p.spec
                for p in self.processes
                if p.spec.name not in STARTED_FIRST and p.spec.name not in self._retiring
            ]
            change = diff(running, specs)
            # Kept processes take the new plan's labels (e.g. a host now hosting the decoy).
            for process in self.processes:
                spec = planned.get(process.spec.name)
                if spec is not None and spec.env == process.spec.env:
                    process.spec.role, process.spec.labels = spec.role, spec.labels
            # Before any host can look: the endpoints of containers started below.
            live.write_directory(specs)
            for spec in change.start:
                await self._launch(spec)
            for spec in change.restart:
                old = self._process(spec.name)
                if old is not None:
                    await self._remove(old)
                await self._launch(spec)
            for spec in change.stop:
                gone = self._process(spec.name)
                if gone is None:
                    continue
                if spec.stage == STAGE_MODELS:
                    # Runner hosts drain the model first; its container goes after the grace.
                    gone.status = "draining"
                    self._retiring[spec.name] = asyncio.create_task(self._retire(gone))
                else:
                    await self._remove(gone)
            if change:
                log.info(
                    "mesh changed",
                    extra={
                        "started": ",".join(s.name for s in change.start),
                        "restarted": ",".join(s.name for s in change.restart),
                        "stopped": ",".join(s.name for s in change.stop),
                    },
                )
            self.write_state()

    def _process(self, name: str) -> Supervised | None:
        return next((p for p in self.processes if p.spec.name == name), None)

    def _supervised(self, spec: ProcessSpec) -> Supervised:
        return Supervised(spec, self.settings, self.traces)

    async def _launch(self, spec: ProcessSpec) -> None:
        process = self._supervised(spec)
        self.processes.append(process)
        await process.start()
        # Readiness is tracked on the side: a change is applied at once, and whoever needs
        # the process (a runner host its model) waits for its health on its own.
        ready = asyncio.create_task(process.wait_ready())
        self._background.add(ready)
        ready.add_done_callback(self._background.discard)

    async def _remove(self, process: Supervised) -> None:
        await process.stop()
        with contextlib.suppress(ValueError):
            self.processes.remove(process)

    async def _retire(self, process: Supervised) -> None:
        await asyncio.sleep(self.settings.model_stop_grace_s)
        async with self._apply_lock:
            self._retiring.pop(process.spec.name, None)
            await self._remove(process)
            self.write_state()

    async def _start_stages(self, processes: list[Supervised], stopping: asyncio.Event) -> bool:
        for stage in sorted({p.spec.stage for p in processes}):
            batch = [p for p in processes if p.spec.stage == stage]
            for process in batch:
                await process.start()
            self.write_state()
            ready: asyncio.Future[list[bool]] = asyncio.gather(*(p.wait_ready() for p in batch))
            signalled: asyncio.Future[Any] = asyncio.create_task(stopping.wait())
            # A signal during start-up stops at once rather than after the stage's readiness.
            await asyncio.wait({ready, signalled}, return_when=asyncio.FIRST_COMPLETED)
            signalled.cancel()
            self.write_state()
            if stopping.is_set():
                ready.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ready
                return False
            results = ready.result()
            if not all(results):
                failed = [p.spec.name for p, ok in zip(batch, results, strict=True) if not ok]
                log.error("processes not ready", extra={"processes": ",".join(failed)})
                return False
        return True
