"""One lifecycle for every component: start in a fixed order, stop in the reverse order.

A `Component` owns a `GrpcServer` (health, reflection, the error interceptor) built once
here, and the bus when it made one (a bus it was given stays the giver's to close). `start`
connects the bus, starts the server with health NOT_SERVING, lets the component `open` what
it needs (subscriptions, consumers, background loops: each registers its own closer on the
exit stack), turns health SERVING and writes the ready file. `stop` turns health NOT_SERVING,
runs `drain`, then closes everything in the reverse order it was opened.

A background loop a component cannot live without is `watch`ed: if it ends while the
component is not stopping, that is logged as an error and `failed` is set, so the process
exits non-zero and its supervisor restarts it, instead of staying up, healthy and useless.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import uvloop

from services.core.bus import Bus, connect
from services.core.loop_lag import LoopLag
from services.core.server import GrpcServer, Registrar, write_ready_file
from services.core.settings import ServiceSettings
from services.core.telemetry import configure_logging, start_metrics_server
from services.core.tracing import configure_tracing

log = logging.getLogger(__name__)


class Component:
    """Base of every process: build inside the running loop, then `start`, then `stop`."""

    # Whether the component talks to Pulsar (a model container does not).
    uses_bus: ClassVar[bool] = True
    # Whether `start` turns health SERVING; a component that decides later says False.
    serving_once_started: ClassVar[bool] = True

    def __init__(
        self,
        settings: ServiceSettings,
        *,
        name: str,
        bus: Bus | None = None,
        service_names: Sequence[str] = (),
        registrars: Sequence[Registrar] = (),
        uds_path: Path | None = None,
        maximum_concurrent_rpcs: int | None = None,
    ) -> None:
        self.settings = settings
        self.name = name
        self.server = GrpcServer(
            service_names=service_names,
            registrars=registrars,
            tcp_address=settings.listen,
            uds_path=uds_path,
            max_message_bytes=settings.max_message_bytes,
            maximum_concurrent_rpcs=maximum_concurrent_rpcs,
            tls=settings.tls,
            auth=settings.auth,
        )
        self._bus = bus
        self._stack = contextlib.AsyncExitStack()
        self.failed = asyncio.Event()
        self.stopping = False
        # Set by start: the event-loop lag probe every process runs.
        self.loop_lag: LoopLag | None = None

    @property
    def bus(self) -> Bus:
        if self._bus is None:
            raise RuntimeError(f"{self.name} has no bus before start()")
        return self._bus

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    async def start(self) -> None:
        stack = self._stack
        try:
            if self.uses_bus and self._bus is None:
                self._bus = connect(self.settings.pulsar, f"{self.name}-{self.settings.instance}")
                stack.push_async_callback(self._bus.close)
            lag = self.loop_lag = self.make_loop_lag()
            stack.callback(lag.stop)
            await self.server.start()
            stack.push_async_callback(self.server.stop, self.settings.shutdown_grace_s)
            await self.server.set_serving(False)
            await self.open(stack)
            if self.serving_once_started:
                await self.server.set_serving(True)
            write_ready_file(self.settings.ready_file, endpoint=self.endpoint, **self.facts())
        except BaseException:
            await stack.aclose()
            raise
        log.info(f"{self.name} started", extra={"endpoint": self.endpoint, **self.facts()})

    async def stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        await self.server.set_serving(False)
        await self.drain()
        await self._stack.aclose()

    def make_loop_lag(self) -> LoopLag:
        """The process' event-loop lag probe (`rdv_event_loop_lag_seconds`), labelled by the
        kind of process (its settings section: bounded, unlike instance names)."""
        return LoopLag(self.settings.config_section, self.settings.loop_lag_probe_interval_s)

    async def open(self, stack: contextlib.AsyncExitStack) -> None:
        """Open what the component needs, registering each closer on `stack`."""

    async def drain(self) -> None:
        """Finish in-flight work before anything is closed (default: nothing to finish)."""

    def facts(self) -> dict[str, Any]:
        """What the ready file and the start log say besides the endpoint."""
        return {}

    def watch(self, task: asyncio.Task[Any]) -> asyncio.Task[Any]:
        """Fail the component if `task`, a loop it cannot live without, ever ends by itself."""
        task.add_done_callback(self._watched_ended)
        return task

    def _watched_ended(self, task: asyncio.Task[Any]) -> None:
        if self.stopping or task.cancelled():
            return
        log.error(
            "a loop the component needs has ended; exiting so it is restarted",
            exc_info=task.exception(),
            extra={"component": self.name, "loop": task.get_name()},
        )
        self.failed.set()


async def cancel_and_wait(tasks: Sequence[asyncio.Task[Any]]) -> None:
    """Cancel `tasks` and wait until each has ended."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def serve_until_signalled(build: Callable[[], Component]) -> int:
    """Build the component inside the loop, start it, run until SIGTERM/SIGINT or until it
    fails, stop it; the process exit status (1 when it failed)."""
    loop = asyncio.get_running_loop()
    # Built here, inside the loop: grpc.aio servers bind to the loop they are made on.
    component = build()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    signalled = asyncio.create_task(stopping.wait())
    # A start can wait long (a standby control plane waits for the topic's exclusive
    # producer): a signal meanwhile cancels it, and start() closes what it had opened.
    starting = asyncio.create_task(component.start())
    await asyncio.wait({starting, signalled}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        log.info("signalled while starting; stopping", extra={"component": component.name})
        await cancel_and_wait([starting, signalled])
        return 0
    try:
        await starting
    except BaseException:
        await cancel_and_wait([signalled])
        raise
    # What start-up made (modules, servers, clients: ~50 000 objects) lives as long as the
    # process; left to the collector, each full collection walks all of it again, 23 ms on an
    # idle core here and several times that on a busy one, a stall on every process of the
    # request path every few seconds. Frozen, a full collection walks only what came later.
    gc.collect()
    gc.freeze()
    failed = asyncio.create_task(component.failed.wait())
    await asyncio.wait({signalled, failed}, return_when=asyncio.FIRST_COMPLETED)
    await cancel_and_wait([signalled, failed])
    log.info("draining", extra={"reason": "failed" if component.failed.is_set() else "signal"})
    await component.stop()
    return 1 if component.failed.is_set() else 0


def run(service: str, settings: ServiceSettings, build: Callable[[], Component]) -> None:
    """The body of every `python -m services.<name>`: logging, tracing, metrics, loop, serve."""
    configure_logging(service, settings.log_level, settings.log_format)
    configure_tracing(
        service,
        exporter=settings.trace_exporter,
        endpoint=settings.trace_endpoint,
        sample_ratio=settings.trace_sample_ratio,
        instance=settings.instance,
    )
    start_metrics_server(settings.metrics_port, settings.metrics_host)
    sys.setswitchinterval(settings.switch_interval_ms / 1000)
    status = uvloop.run(serve_until_signalled(build))
    if status:
        raise SystemExit(status)
