"""Open-loop load: ghz for the gRPC systems, a small asyncio HTTP/1.1 generator for S3.

Both report one `LoadResult`. ghz (`--async --rps`) measures each call from its send; the
HTTP generator measures from each request's *scheduled* send time, so a server that falls
behind cannot hide its queueing (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[2]
GHZ = REPO / "tools" / "bin" / "ghz"
CLIENT_CLOSED = "use of closed network connection"


@dataclass
class LoadResult:
    """One run at one rate: what the client saw."""

    count: int
    errors: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    # Answers the client saw come from the default (None when the client cannot tell).
    default_answers: int | None = None
    error_kinds: dict[str, int] = field(default_factory=dict)
    # What the errors said (ghz's errorDistribution), the most frequent first, cut short.
    error_messages: dict[str, int] = field(default_factory=dict)

    @property
    def achieved_rps(self) -> float:
        return (self.count - self.errors) / self.seconds if self.seconds > 0 else 0.0


def quantile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank quantile of an ascending list (0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


async def ghz(  # noqa: PLR0917 (one ghz invocation, each flag a parameter)
    target: str,
    call: str,
    body: dict[str, Any],
    rps: int,
    seconds: float,
    connections: int = 2,
    concurrency: int = 50,
    proto: tuple[Path, Path] | None = None,
) -> LoadResult:
    """ghz open loop at `rps` for `seconds` against a gRPC server with reflection, or, for
    one without (MLServer), with `proto` = (.proto file, its import path)."""
    described = [] if proto is None else [f"--proto={proto[0]}", f"--import-paths={proto[1]}"]
    process = await asyncio.create_subprocess_exec(
        str(GHZ),
        "--insecure",
        "--async",
        f"--rps={rps}",
        f"--duration={seconds:g}s",
        f"--call={call}",
        f"--data={json.dumps(body)}",
        "-O",
        "json",
        f"--connections={connections}",
        f"--concurrency={concurrency}",
        "--timeout=10s",
        *described,
        target,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    if process.returncode != 0 and not out:
        raise RuntimeError(f"ghz failed ({process.returncode}): {err.decode()[-500:]}")
    report: dict[str, Any] = json.loads(out)
    by_percentage = {
        d["percentage"]: d["latency"] / 1e6 for d in report.get("latencyDistribution") or []
    }
    codes: dict[str, int] = report.get("statusCodeDistribution") or {}
    messages: dict[str, int] = report.get("errorDistribution") or {}
    # ghz cancels the calls still open when --duration ends: the cut-off, not the server.
    # Some it reports as Canceled, some as Unavailable "...use of closed network connection"
    # (its own closed connection, seen with many calls in flight at the end).
    cut_off = sum(n for message, n in messages.items() if CLIENT_CLOSED in message)
    errors = sum(n for code, n in codes.items() if code not in ("OK", "Canceled")) - cut_off
    return LoadResult(
        count=int(report["count"]),
        errors=errors,
        seconds=float(report["total"]) / 1e9,
        p50_ms=by_percentage.get(50, 0.0),
        p90_ms=by_percentage.get(90, 0.0),
        p99_ms=by_percentage.get(99, 0.0),
        error_kinds={code: n for code, n in codes.items() if code != "OK"},
        error_messages=_top_messages(messages),
    )


def _top_messages(distribution: dict[str, int], most: int = 5, width: int = 200) -> dict[str, int]:
    ranked = sorted(distribution.items(), key=lambda kv: -kv[1])[:most]
    return {message[:width]: count for message, count in ranked}


class _Connection:
    """One HTTP/1.1 keep-alive connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def exchange(self, request: bytes) -> tuple[int, bytes, bool]:
        """Send one request; the status, the body and whether the connection stays open."""
        self.writer.write(request)
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("connection closed")
        status = int(status_line.split()[1])
        length: int | None = None
        keep = True
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value.strip())
            elif name == "connection" and value.strip().lower() == "close":
                keep = False
        if length is None:
            body = await self.reader.read()
            keep = False
        else:
            body = await self.reader.readexactly(length)
        return status, body, keep

    def close(self) -> None:
        self.writer.close()


async def http_open_loop(  # noqa: PLR0917 (one generator, each knob a parameter)
    url: str,
    body: dict[str, Any],
    rps: int,
    seconds: float,
    max_connections: int = 256,
    timeout: float = 10.0,
) -> LoadResult:
    """POST `body` as JSON to `url` at `rps` for `seconds`, open loop.

    Request i is due at start + i/rps whatever happened to the ones before; it takes an idle
    keep-alive connection or opens one (up to `max_connections`, then it waits for one, and
    that wait counts in its latency). Latency runs from the due time to the whole response.
    A response counts as a default answer when its JSON says `"source": "default"`.
    """
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    payload = json.dumps(body).encode()
    request = (
        f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        "Connection: keep-alive\r\n\r\n"
    ).encode() + payload

    idle: list[_Connection] = []
    slots = asyncio.Semaphore(max_connections)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    defaults = 0

    async def one(due: float) -> None:
        nonlocal defaults
        async with slots:
            connection = idle.pop() if idle else None
            try:
                if connection is not None:
                    try:
                        status, answer, keep = await asyncio.wait_for(
                            connection.exchange(request), timeout
                        )
                    except (ConnectionError, asyncio.IncompleteReadError):
                        # The server closed an idle keep-alive connection: as any HTTP client
                        # does, retry once on a fresh one (the latency still runs from `due`).
                        connection.close()
                        connection = None
                if connection is None:
                    connection = _Connection(*await asyncio.open_connection(host, port))
                    status, answer, keep = await asyncio.wait_for(
                        connection.exchange(request), timeout
                    )
            except (
                OSError,
                TimeoutError,
                ValueError,
                IndexError,
                asyncio.IncompleteReadError,
            ) as exc:
                kind = type(exc).__name__
                errors[kind] = errors.get(kind, 0) + 1
                if connection is not None:
                    connection.close()
                return
            done = time.perf_counter()
            if keep:
                idle.append(connection)
            else:
                connection.close()
        if status != 200:
            errors[f"HTTP {status}"] = errors.get(f"HTTP {status}", 0) + 1
            return
        latencies.append((done - due) * 1000.0)
        with contextlib.suppress(ValueError, AttributeError):
            if json.loads(answer).get("source") == "default":
                defaults += 1

    total = max(1, round(rps * seconds))
    start = time.perf_counter() + 0.05
    tasks: list[asyncio.Task[None]] = []
    for index in range(total):
        due = start + index / rps
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(due)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    for connection in idle:
        connection.close()
    latencies.sort()
    return LoadResult(
        count=total,
        errors=sum(errors.values()),
        seconds=elapsed,
        p50_ms=quantile(latencies, 0.50),
        p90_ms=quantile(latencies, 0.90),
        p99_ms=quantile(latencies, 0.99),
        default_answers=defaults,
        error_kinds=errors,
    )
