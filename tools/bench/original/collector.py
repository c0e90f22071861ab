"""S3's collector loop: scores from Pulsar, handed to each request's unix socket.

As the original describes it: consume the prediction topic, and for every score connect
to the socket of the request it belongs to (the path is derived from the mailbox id the
score carries), write the score and hang up. A socket that is gone means the request was
already answered (by the first score or the default): the score is late and dropped.

Runs as its own process: `python -m tools.bench.original.collector`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from pathlib import Path

from rendezvous.v1 import task_pb2

from services.core.bus import Envelope, Subscription, SubscriptionMode, connect
from services.core.settings import PulsarSettings
from tools.bench.original.settings import OriginalSettings

log = logging.getLogger("s3.collector")


class Collector:
    """Receives predictions and delivers each over a fresh unix-socket connection."""

    def __init__(self, settings: OriginalSettings) -> None:
        self.settings = settings
        self.delivered = 0
        self.late = 0
        self.failed = 0
        self._slots = asyncio.Semaphore(settings.collector_concurrency)
        self._pending: set[asyncio.Task[None]] = set()

    async def run(self, stop: asyncio.Event) -> None:
        settings = self.settings
        bus = connect(
            PulsarSettings(
                service_url=settings.pulsar_url, tenant_namespace=settings.tenant_namespace
            ),
            f"s3-collector-{settings.instance}",
        )
        topic = bus.topics.predictions(settings.instance)
        subscription = await bus.subscribe(
            topic,
            f"s3-collector-{settings.instance}",
            task_pb2.PredictionEvent,
            mode=SubscriptionMode.SHARED,
            start="earliest",
        )
        if settings.collector_ready_file is not None:
            settings.collector_ready_file.parent.mkdir(parents=True, exist_ok=True)
            settings.collector_ready_file.write_text(json.dumps({"topic": topic}))
        receiving = asyncio.create_task(self._receive_loop(subscription))
        await stop.wait()
        receiving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await receiving
        if self._pending:
            await asyncio.wait(self._pending, timeout=2.0)
        await subscription.close()
        await bus.close()
        log.warning(
            "collector stopped: delivered=%d late=%d failed=%d",
            self.delivered,
            self.late,
            self.failed,
        )

    async def _receive_loop(self, subscription: Subscription[task_pb2.PredictionEvent]) -> None:
        while True:
            envelope = await subscription.receive()
            await self._slots.acquire()
            task = asyncio.create_task(self._deliver(subscription, envelope))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _deliver(
        self,
        subscription: Subscription[task_pb2.PredictionEvent],
        envelope: Envelope[task_pb2.PredictionEvent],
    ) -> None:
        try:
            mailbox_id = envelope.message.mailbox_id
            # The mailbox id becomes a file name: only plain ids, never a path.
            if not mailbox_id.isalnum():
                self.failed += 1
            else:
                await self._write(
                    self.settings.socket_dir / f"{mailbox_id}.sock", envelope.raw.data
                )
            await subscription.ack(envelope)
        except Exception:
            self.failed += 1
            log.exception("delivery failed")
        finally:
            self._slots.release()

    async def _write(self, path: Path, data: bytes) -> None:
        try:
            _, writer = await asyncio.open_unix_connection(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            self.late += 1
            return
        try:
            writer.write(data)
            await writer.drain()
            self.delivered += 1
        except (ConnectionResetError, BrokenPipeError):
            self.late += 1
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def _main() -> None:
    settings = OriginalSettings()
    logging.basicConfig(level=settings.log_level)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await Collector(settings).run(stop)


def main() -> None:
    """Run the collector until SIGTERM/SIGINT."""
    asyncio.run(_main())


if __name__ == "__main__":
    main()
