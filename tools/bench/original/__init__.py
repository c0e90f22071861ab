"""S3: a re-implementation of the original rendezvous design, for the side-by-side bench.

Jan Teichmann's "Rendezvous Architecture for Data Science in Production" (2019) built the
architecture with Flask, Python asyncio and Apache Pulsar. S3 follows that description
(see MAPPING.md): a Flask route served by gunicorn that makes a fresh event loop and a
unix-socket server per request and waits for the first score with a timeout (`app`), and
a collector loop that hands each score from Pulsar to its request's socket (`collector`).
It runs on the same model containers, the same model runners and the same broker as our
system.

    system = await start(pulsar_url, {"diabetes-ridge": "127.0.0.1:PORT"}, state_dir)
    ... POST JSON {"objective": "demo", "features": {...}} to system.endpoint ...
    await system.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from services.supervisor.plan import free_port

REPO = Path(__file__).resolve().parents[3]
OBJECTIVE = "original"
# sun_path holds 108 bytes; a mailbox socket name adds 38 to its directory.
MAX_SOCKET_DIR_CHARS = 64


@dataclass
class OriginalSystem:
    """The running S3: where to send requests, which processes to account CPU to."""

    endpoint: str
    gunicorn: asyncio.subprocess.Process
    collector: asyncio.subprocess.Process
    runners: list[asyncio.subprocess.Process]
    socket_dir: Path
    remove_socket_dir: bool = False
    _stopped: bool = field(default=False, repr=False)

    @property
    def named_pids(self) -> dict[str, int]:
        """Every process of S3 by name; gunicorn's workers count under "s3-web" as its
        descendants."""
        return {
            "s3-web": self.gunicorn.pid,
            "s3-collector": self.collector.pid,
            **{f"s3-runner-{i}": runner.pid for i, runner in enumerate(self.runners)},
        }

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop the front end first (no new requests), then the collector, then the runners."""
        if self._stopped:
            return
        self._stopped = True
        await _terminate([self.gunicorn], grace_s)
        await _terminate([self.collector], grace_s)
        await _terminate(self.runners, grace_s)
        if self.remove_socket_dir:
            shutil.rmtree(self.socket_dir, ignore_errors=True)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(child) for child in text.split()]


async def _terminate(processes: list[asyncio.subprocess.Process], grace_s: float) -> None:
    for process in processes:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
    for process in processes:
        try:
            await asyncio.wait_for(process.wait(), grace_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


async def _spawn(
    args: list[str], env: dict[str, str], log_file: Path
) -> asyncio.subprocess.Process:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as log:
        return await asyncio.create_subprocess_exec(
            *args, cwd=REPO, env={**os.environ, **env}, stdout=log, stderr=log
        )


async def _wait_until(
    check: Callable[[], bool],
    processes: list[asyncio.subprocess.Process],
    what: str,
    timeout_s: float,
) -> None:
    """Poll `check()` until true; fail early when one of `processes` died."""
    deadline = time.monotonic() + timeout_s
    while True:
        if await asyncio.to_thread(check):
            return
        dead = [p.pid for p in processes if p.returncode is not None]
        if dead:
            raise RuntimeError(f"S3: {what} exited before it was ready (pids {dead})")
        if time.monotonic() > deadline:
            raise RuntimeError(f"S3: {what} not ready after {timeout_s}s")
        await asyncio.sleep(0.1)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _prepare(state_dir: Path) -> tuple[Path, Path, bool]:
    """S3's own folder under state_dir, and the mailbox socket folder (short enough)."""
    base = Path(state_dir).resolve() / "s3"
    shutil.rmtree(base / "ready", ignore_errors=True)
    socket_dir = base / "mailboxes"
    remove_socket_dir = False
    if len(str(socket_dir)) > MAX_SOCKET_DIR_CHARS:
        socket_dir = Path(tempfile.mkdtemp(prefix="rdv-s3-"))
        remove_socket_dir = True
    socket_dir.mkdir(parents=True, exist_ok=True)
    return base, socket_dir, remove_socket_dir


async def start(
    pulsar_url: str,
    model_endpoints: dict[str, str],
    state_dir: Path,
    *,
    workers: int = 2,
    threads: int = 16,
    timeout_s: float = 0.05,
    ready_timeout_s: float = 60.0,
) -> OriginalSystem:
    """Start S3's runners, collector and gunicorn front end; return once /healthz answers.

    One runner per model (role incumbent) consumes the tasks of objective `original`. On
    2 cores, gunicorn runs 2 gthread workers (one per core: each request holds the GIL
    while it builds its loop and socket) with 16 threads each, so requests that wait up
    to the timeout for their score never queue behind each other below ~600 in flight/s.
    """
    if not model_endpoints:
        raise ValueError("S3 needs at least one model endpoint")
    instance = f"s3-{uuid.uuid4().hex[:8]}"
    base, socket_dir, remove_socket_dir = _prepare(state_dir)
    logs = base / "logs"
    ready = base / "ready"
    common = {
        "RDV_ORIGINAL_PULSAR_URL": pulsar_url,
        "RDV_ORIGINAL_OBJECTIVE": OBJECTIVE,
        "RDV_ORIGINAL_INSTANCE": instance,
        "RDV_ORIGINAL_SOCKET_DIR": str(socket_dir),
        "RDV_ORIGINAL_TIMEOUT_S": str(timeout_s),
    }
    started: list[asyncio.subprocess.Process] = []
    try:
        runners: list[asyncio.subprocess.Process] = []
        runner_ready: list[Path] = []
        for name, endpoint in model_endpoints.items():
            ready_file = ready / f"runner-{name}.json"
            runner_ready.append(ready_file)
            runner = await _spawn(
                [sys.executable, "-m", "services.runner"],
                {
                    "RDV_RUNNER_OBJECTIVE": OBJECTIVE,
                    "RDV_RUNNER_MODEL": name,
                    "RDV_RUNNER_ROLE": "incumbent",
                    "RDV_RUNNER_ENDPOINT": endpoint,
                    "RDV_RUNNER_PULSAR__SERVICE_URL": pulsar_url,
                    "RDV_RUNNER_LISTEN": "127.0.0.1:0",
                    "RDV_RUNNER_READY_FILE": str(ready_file),
                    "RDV_RUNNER_INSTANCE": f"{instance}-runner-{name}",
                    "RDV_RUNNER_LOG_LEVEL": "WARNING",
                },
                logs / f"runner-{name}.log",
            )
            runners.append(runner)
            started.append(runner)
        collector_ready = ready / "collector.json"
        collector = await _spawn(
            [sys.executable, "-m", "tools.bench.original.collector"],
            {**common, "RDV_ORIGINAL_COLLECTOR_READY_FILE": str(collector_ready)},
            logs / "collector.log",
        )
        started.append(collector)
        # Runners subscribe at the live end: requests sent before they are ready are lost.
        await _wait_until(
            lambda: all(path.exists() for path in [*runner_ready, collector_ready]),
            started,
            "runners/collector",
            ready_timeout_s,
        )
        port = free_port()
        gunicorn = await _spawn(
            [
                sys.executable,
                "-m",
                "gunicorn",
                f"--bind=127.0.0.1:{port}",
                "--worker-class=gthread",
                f"--workers={workers}",
                f"--threads={threads}",
                "--log-level=warning",
                "--graceful-timeout=5",
                "tools.bench.original.app:create_app()",
            ],
            common,
            logs / "gunicorn.log",
        )
        started.append(gunicorn)
        await _wait_until(
            lambda: _healthy(f"http://127.0.0.1:{port}/healthz"),
            [gunicorn],
            "gunicorn",
            ready_timeout_s,
        )
        # /healthz reached one worker; wait until every worker is up (each makes its client).
        await _wait_until(
            lambda: len(_children(gunicorn.pid)) >= workers,
            [gunicorn],
            "gunicorn workers",
            ready_timeout_s,
        )
    except BaseException:
        await _terminate(list(reversed(started)), 5.0)
        if remove_socket_dir:
            shutil.rmtree(socket_dir, ignore_errors=True)
        raise
    return OriginalSystem(
        endpoint=f"http://127.0.0.1:{port}/score",
        gunicorn=gunicorn,
        collector=collector,
        runners=runners,
        socket_dir=socket_dir,
        remove_socket_dir=remove_socket_dir,
    )


__all__ = ["OriginalSystem", "start"]
