"""What tracing costs: CPU per request of the demo mesh with spans not sampled (0 %), sampled
at 10 % and at 100 %, under the same open-loop load, in one run (the machine is shared:
compare the ratios of one run, not figures across runs).

    python -m tools.trace_overhead [--rate 50] [--slice 10] [--reps 3] [--warmup 8]
                                   [--modes 0,10,100] [--out docs/results/traces/overhead]

One supervised demo mesh with `--traces` (Jaeger on loopback, every process exporting over
OTLP) on the checkout's broker (started on --broker-port if none runs). Sampling is
parent-based everywhere, so the caller decides: each request carries a `traceparent` whose
sampled flag is set on the mode's share of requests (10 %: every tenth). 0 % takes the path
of a service without an exporter (non-recording spans; the ids still travel). The modes run
in interleaved slices of --slice seconds, --reps times round, so a neighbour's load on the
shared machine falls on every mode alike. During each slice the CPU time of every process on
the path (rendezvous, collector, enricher, runner host with the decoy, model containers) is
read from /proc; Jaeger's own is counted apart. Prints a table, writes <out>.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from rendezvous.v1 import scoring_pb2, scoring_pb2_grpc

from services.core.protos import set_values
from services.supervisor.plan import free_port
from tools.bench.environment import REPO, Mesh, ensure_broker, log
from tools.bench.load import quantile
from tools.bench.models import ROW as FEATURES  # what `rendezvous score` sends
from tools.bench.probes import CpuMeter

DEMO_MESH = REPO / "deploy" / "mesh" / "demo.yaml"
OBJECTIVE = "demo"
# The supervisor's trace_export_delay_ms (500), and some: a slice's last spans are its cost.
EXPORT_DELAY_S = 1.0


@dataclass
class ModeResult:
    mode: str
    sample_ratio: float
    requests: int
    errors: int
    p50_ms: float
    p99_ms: float
    # CPU milliseconds per request: every process on the path, and each one.
    cpu_ms_per_request: float
    by_process: dict[str, float]
    # Jaeger's own (receiving, storing), apart: a trace store elsewhere costs the mesh nothing.
    jaeger_cpu_ms_per_request: float


@dataclass
class _Tally:
    requests: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    cpu_ms: dict[str, float] = field(default_factory=dict)


def _ratio(mode: str) -> float:
    return float(mode) / 100.0


async def _slice(
    stub: scoring_pb2_grpc.ScoringServiceAsyncStub,
    ratio: float,
    rate: int,
    seconds: float,
    tally: _Tally,
) -> None:
    """Open loop: a Score every 1/rate s for `seconds`, a sampled traceparent on `ratio` of them
    (every 1/ratio-th request, so the share is exact)."""
    request = scoring_pb2.ScoreRequest(objective=OBJECTIVE)
    set_values(request.features, FEATURES)
    every = round(1 / ratio) if ratio > 0 else 0

    async def one(index: int) -> None:
        flags = "01" if every and index % every == 0 else "00"
        traceparent = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-{flags}"
        started = time.perf_counter()
        try:
            await stub.Score(request, metadata=(("traceparent", traceparent),), timeout=5.0)
            tally.latencies_ms.append((time.perf_counter() - started) * 1000)
        except grpc.aio.AioRpcError:
            tally.errors += 1
        tally.requests += 1

    calls = []
    start = time.perf_counter()
    for index in range(int(rate * seconds)):
        delay = start + index / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        calls.append(asyncio.create_task(one(index)))
    await asyncio.gather(*calls)


async def _measure(mesh: Mesh, args: argparse.Namespace) -> list[ModeResult]:
    pids = mesh.pids(OBJECTIVE)
    jaeger = next(p for p in mesh.state()["processes"] if p["name"] == "jaeger")
    roots = {**pids, "jaeger": int(jaeger["pid"])}
    tallies = {mode: _Tally() for mode in args.modes}
    async with grpc.aio.insecure_channel(mesh.endpoint) as channel:
        stub: scoring_pb2_grpc.ScoringServiceAsyncStub = scoring_pb2_grpc.ScoringServiceStub(
            channel
        )
        log(f"warm-up: {args.warmup:g}s at {args.rate} req/s, every request sampled")
        await _slice(stub, 1.0, args.rate, args.warmup, _Tally())
        for rep in range(args.reps):
            for mode in args.modes:
                meter = CpuMeter(roots)
                meter.start()
                await _slice(stub, _ratio(mode), args.rate, args.slice, tallies[mode])
                await asyncio.sleep(EXPORT_DELAY_S)
                spent = tallies[mode].cpu_ms
                for name, ms in meter.stop().items():
                    spent[name] = spent.get(name, 0.0) + ms
            log(f"round {rep + 1} of {args.reps} done")
    results = []
    for mode, tally in tallies.items():
        requests = max(tally.requests, 1)
        path = {n: ms / requests for n, ms in tally.cpu_ms.items() if n != "jaeger"}
        latencies = sorted(tally.latencies_ms) or [0.0]
        results.append(
            ModeResult(
                mode=mode,
                sample_ratio=_ratio(mode),
                requests=tally.requests,
                errors=tally.errors,
                p50_ms=round(quantile(latencies, 0.5), 2),
                p99_ms=round(quantile(latencies, 0.99), 2),
                cpu_ms_per_request=round(sum(path.values()), 3),
                by_process={n: round(ms, 3) for n, ms in sorted(path.items())},
                jaeger_cpu_ms_per_request=round(tally.cpu_ms.get("jaeger", 0.0) / requests, 3),
            )
        )
    return results


def _table(results: list[ModeResult]) -> list[str]:
    base = results[0]
    lines = [
        f"| sampled | requests | errors | p50 ms | p99 ms | CPU ms/request (path) "
        f"| vs {base.mode} % | Jaeger CPU ms/request |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        versus = r.cpu_ms_per_request / base.cpu_ms_per_request if base.cpu_ms_per_request else 0
        lines.append(
            f"| {r.mode} % | {r.requests} | {r.errors} | {r.p50_ms} | {r.p99_ms} "
            f"| {r.cpu_ms_per_request} | {versus:.2f}x | {r.jaeger_cpu_ms_per_request} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.trace_overhead", description=__doc__)
    parser.add_argument("--rate", type=int, default=50, help="Score requests per second")
    parser.add_argument("--slice", type=float, default=10.0, help="seconds per mode and round")
    parser.add_argument("--reps", type=int, default=3, help="rounds of every mode")
    parser.add_argument("--warmup", type=float, default=8.0, help="unmeasured seconds first")
    parser.add_argument(
        "--modes",
        type=lambda s: [m.strip() for m in s.split(",") if m.strip()],
        default=["0", "10", "100"],
        help="sampled percentages; the first is the base of the ratios",
    )
    parser.add_argument("--out", type=Path, default=REPO / "docs/results/traces/overhead")
    parser.add_argument("--broker-port", type=int, default=6681)
    parser.add_argument("--web-port", type=int, default=8091)
    args = parser.parse_args(argv)
    broker = ensure_broker(args.broker_port, args.web_port)
    try:
        with tempfile.TemporaryDirectory(prefix="rdv-trace-overhead-") as work:
            mesh = Mesh(
                broker,
                Path(work),
                DEMO_MESH,
                supervise_args=["--traces"],
                env={
                    "RDV_SUPERVISOR_JAEGER_OTLP_LISTEN": f"127.0.0.1:{free_port()}",
                    "RDV_SUPERVISOR_JAEGER_QUERY_LISTEN": f"127.0.0.1:{free_port()}",
                },
            )
            mesh.start()
            try:
                results = asyncio.run(_measure(mesh, args))
            finally:
                mesh.stop()
    finally:
        broker.stop()
    lines = _table(results)
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "rate": args.rate,
        "slice_s": args.slice,
        "reps": args.reps,
        "warmup_s": args.warmup,
        "mesh": str(DEMO_MESH.relative_to(REPO)),
        "when": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    args.out.with_suffix(".json").write_text(
        json.dumps({**meta, "results": [asdict(r) for r in results]}, indent=2) + "\n"
    )
    args.out.with_suffix(".md").write_text(
        f"# Tracing overhead (`python -m tools.trace_overhead`, {meta['when']})\n\n"
        f"The demo mesh ({meta['mesh']}) with `--traces`, open loop at {args.rate} req/s; the "
        f"modes in interleaved {args.slice:g} s slices, {args.reps} rounds, after "
        f"{args.warmup:g} s of warm-up; one run on a shared 2-core machine: compare the "
        "ratios, not the absolute figures. CPU of every process on the path per request; "
        "Jaeger's apart.\n\n" + "\n".join(lines) + "\n"
    )
    print(f"written to {args.out.with_suffix('.json')} and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
