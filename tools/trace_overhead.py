"""What tracing costs: CPU per request of the demo mesh with tracing off, sampled at 10 % and
at 100 %, under the same open-loop load, in one run (the machine is shared: compare the ratios
of one run, not figures across runs).

    python -m tools.trace_overhead [--rate 50] [--seconds 20] [--warmup 8]
                                   [--modes off,10,100] [--out docs/results/traces/overhead]

Each mode is its own supervised mesh on the checkout's broker (started on --broker-port if
none runs): `off` without `--traces` (no exporter: nothing recorded, ids still travel), the
others with `--traces` (Jaeger on loopback, every process exporting over OTLP) and
RDV_SUPERVISOR_TRACE_SAMPLE_RATIO. ghz sends Score at --rate for --warmup seconds
(unrecorded), then for --seconds while the CPU time of every process on the path (rendezvous,
collector, enricher, runner hosts with the decoy, model containers) is sampled from /proc;
Jaeger's own CPU is counted apart. Prints a table and writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from services.supervisor.plan import free_port
from tools.bench.environment import REPO, Mesh, ensure_broker, log
from tools.bench.load import ghz

# The diabetes dataset's first row (scaled): what `rendezvous score` sends.
from tools.bench.models import ROW as FEATURES
from tools.bench.probes import CpuMeter

DEMO_MESH = REPO / "deploy" / "mesh" / "demo.yaml"
OBJECTIVE = "demo"
SCORE = "rendezvous.v1.ScoringService/Score"


@dataclass
class ModeResult:
    mode: str
    sample_ratio: float | None
    requests: int
    errors: int
    achieved_rps: float
    p50_ms: float
    p99_ms: float
    # CPU milliseconds per request: every process on the path, and each one.
    cpu_ms_per_request: float
    by_process: dict[str, float]
    # Jaeger's own (receiving, storing), apart: a trace store elsewhere costs the mesh nothing.
    jaeger_cpu_ms_per_request: float | None


def _ratio(mode: str) -> float | None:
    return None if mode == "off" else float(mode) / 100.0


async def _measure(mesh: Mesh, rate: int, seconds: float, warmup: float) -> ModeResult:
    target = mesh.endpoint
    body = {"objective": OBJECTIVE, "features": FEATURES}
    log(f"warm-up: {warmup:g}s at {rate} req/s")
    await ghz(target, SCORE, body, rate, warmup)
    pids = mesh.pids(OBJECTIVE)
    jaeger = next((p for p in mesh.state()["processes"] if p["name"] == "jaeger"), None)
    meter = CpuMeter({**pids, **({"jaeger": int(jaeger["pid"])} if jaeger else {})})
    meter.start()
    started = time.monotonic()
    load = await ghz(target, SCORE, body, rate, seconds)
    # Spans of the last requests leave within the export delay; their export is their cost.
    await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - started - seconds)))
    spent = meter.stop()
    requests = max(load.count, 1)
    path = {name: ms / requests for name, ms in spent.items() if name != "jaeger"}
    return ModeResult(
        mode="",
        sample_ratio=None,
        requests=load.count,
        errors=load.errors,
        achieved_rps=round(load.achieved_rps, 1),
        p50_ms=round(load.p50_ms, 2),
        p99_ms=round(load.p99_ms, 2),
        cpu_ms_per_request=round(sum(path.values()), 3),
        by_process={name: round(ms, 3) for name, ms in sorted(path.items())},
        jaeger_cpu_ms_per_request=(
            round(spent["jaeger"] / requests, 3) if "jaeger" in spent else None
        ),
    )


def _run_mode(mode: str, args: argparse.Namespace, broker: Any, work: Path) -> ModeResult:
    ratio = _ratio(mode)
    env = {}
    supervise_args: list[str] = []
    if ratio is not None:
        supervise_args = ["--traces"]
        env = {
            "RDV_SUPERVISOR_TRACE_SAMPLE_RATIO": f"{ratio:g}",
            "RDV_SUPERVISOR_JAEGER_OTLP_LISTEN": f"127.0.0.1:{free_port()}",
            "RDV_SUPERVISOR_JAEGER_QUERY_LISTEN": f"127.0.0.1:{free_port()}",
        }
    mesh = Mesh(broker, work / f"mode-{mode}", DEMO_MESH, supervise_args=supervise_args, env=env)
    log(f"mode {mode}: starting the demo mesh")
    mesh.start()
    try:
        result = asyncio.run(_measure(mesh, args.rate, args.seconds, args.warmup))
    finally:
        mesh.stop()
    result.mode, result.sample_ratio = mode, ratio
    return result


def _table(results: list[ModeResult]) -> list[str]:
    off = next((r for r in results if r.mode == "off"), None)
    lines = [
        "| tracing | requests | errors | p50 ms | p99 ms | CPU ms/request (path) | vs off "
        "| Jaeger CPU ms/request |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        name = "off" if r.mode == "off" else f"sampled {r.mode} %"
        versus = f"{r.cpu_ms_per_request / off.cpu_ms_per_request:.2f}x" if off else "-"
        jaeger = "-" if r.jaeger_cpu_ms_per_request is None else f"{r.jaeger_cpu_ms_per_request}"
        lines.append(
            f"| {name} | {r.requests} | {r.errors} | {r.p50_ms} | {r.p99_ms} "
            f"| {r.cpu_ms_per_request} | {versus} | {jaeger} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.trace_overhead", description=__doc__)
    parser.add_argument("--rate", type=int, default=50, help="Score requests per second")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per mode")
    parser.add_argument("--warmup", type=float, default=8.0, help="unmeasured seconds first")
    parser.add_argument(
        "--modes",
        type=lambda s: [m.strip() for m in s.split(",") if m.strip()],
        default=["off", "10", "100"],
        help="off, or a sampled percentage",
    )
    parser.add_argument("--out", type=Path, default=REPO / "docs/results/traces/overhead")
    parser.add_argument("--broker-port", type=int, default=6681)
    parser.add_argument("--web-port", type=int, default=8091)
    args = parser.parse_args(argv)
    broker = ensure_broker(args.broker_port, args.web_port)
    results: list[ModeResult] = []
    try:
        with tempfile.TemporaryDirectory(prefix="rdv-trace-overhead-") as work:
            for mode in args.modes:
                results.append(_run_mode(mode, args, broker, Path(work)))
    finally:
        broker.stop()
    lines = _table(results)
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "rate": args.rate,
        "seconds": args.seconds,
        "warmup": args.warmup,
        "mesh": str(DEMO_MESH.relative_to(REPO)),
        "when": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    args.out.with_suffix(".json").write_text(
        json.dumps({**meta, "results": [asdict(r) for r in results]}, indent=2) + "\n"
    )
    args.out.with_suffix(".md").write_text(
        f"# Tracing overhead (`python -m tools.trace_overhead`, {meta['when']})\n\n"
        f"The demo mesh ({meta['mesh']}) under ghz at {args.rate} req/s, {args.seconds:g} s "
        f"measured per mode after {args.warmup:g} s of warm-up, one run on a shared 2-core "
        "machine: compare the ratios, not the absolute figures.\n\n" + "\n".join(lines) + "\n"
    )
    print(f"written to {args.out.with_suffix('.json')} and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
