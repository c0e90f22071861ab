"""What the bench's systems cost when nothing drives them, and one system rep after rep alone.

    python -m tools.bench.background [--rate 50] [--reps 5] [--seconds 10] [--warm 20]
                                     [--out docs/results/bench/background.json]

`make bench` keeps every system up at once and interleaves them rep by rep, so each is
measured beside the others' idle processes. This measures that background, and what a system
does without the others' reps between its own:

1. the bench mesh and its broker, idle: CPU milliseconds per second, per process;
2. after `--warm` seconds at 200 req/s (as `make bench` warms up), S1 and S2 alternately at
   `--rate` req/s, `--reps` times: p50/p99, default share and CPU per request, per rep;
3. S4's Ray head with the Serve app deployed, idle (when `.venv-peers` exists).

It prints each figure as it is taken and writes them all to `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from tools.bench.environment import REPO, Mesh, ensure_broker, log
from tools.bench.probes import CpuMeter
from tools.bench.rayserve.cluster import RayServeCluster
from tools.bench.report import machine
from tools.bench.systems import FEATURES, ONE, RACE, Rendezvous

# What `make bench` warms each system up with (tools.bench.cli's default).
WARM_RATE = 200


async def idle_cpu(pids: dict[str, int], seconds: float) -> dict[str, float]:
    """CPU milliseconds per second of each process over `seconds` with no load."""
    meter = CpuMeter(pids)
    meter.start()
    await asyncio.sleep(seconds)
    spent = meter.stop()
    return {name: round(ms / seconds, 1) for name, ms in sorted(spent.items())}


def _summary(figures: dict[str, float]) -> str:
    ranked = sorted(figures.items(), key=lambda item: -item[1])
    return f"{sum(figures.values()):.0f} ms/s: " + ", ".join(f"{n} {v:g}" for n, v in ranked)


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    work = REPO / ".run" / "bench" / "background"
    work.mkdir(parents=True, exist_ok=True)
    broker = ensure_broker(args.broker_port, args.web_port)
    mesh = Mesh(broker, work)
    result: dict[str, Any] = {"rate": args.rate, "seconds": args.seconds, "reps": []}
    try:
        mesh.start()
        systems = [Rendezvous(broker, mesh, "S1", ONE), Rendezvous(broker, mesh, "S2", RACE)]
        pids = {name: pid for system in systems for name, pid in system.pids().items()}
        await asyncio.sleep(args.settle)
        result["mesh_idle_ms_per_s"] = await idle_cpu(pids, args.seconds)
        log(f"bench mesh idle: {_summary(result['mesh_idle_ms_per_s'])}")
        for system in systems:
            await system.load(WARM_RATE, args.warm)
        for rep in range(1, args.reps + 1):
            for system in systems:
                record = (await system.run(args.rate, rep, args.seconds)).record()
                result["reps"].append(record)
                log(
                    f"{system.name} rep {rep}: p50 {record['p50_ms']:.1f} ms, "
                    f"p99 {record['p99_ms']:.1f} ms, "
                    f"defaults {100 * (record['default_share'] or 0.0):.2f} %, "
                    f"CPU {record['cpu_ms_per_request']:.2f} ms/request"
                )
    finally:
        mesh.stop()
        broker.stop()
    cluster = await RayServeCluster.start(work, RACE, FEATURES)
    if isinstance(cluster, str):
        result["ray_idle_ms_per_s"] = None
        result["ray_unavailable"] = cluster
        log(f"S4 left out: {cluster}")
        return result
    try:
        await asyncio.sleep(args.settle)
        result["ray_idle_ms_per_s"] = await idle_cpu(cluster.named_pids(), args.seconds)
        log(f"Ray head with S4 deployed, idle: {_summary(result['ray_idle_ms_per_s'])}")
    finally:
        await cluster.stop()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench.background", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--rate", type=int, default=50)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=10.0, help="per rep and per idle sample")
    parser.add_argument("--warm", type=float, default=20.0, help="seconds per system at 200 req/s")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds before an idle sample")
    parser.add_argument("--out", type=Path, default=REPO / "docs/results/bench/background.json")
    parser.add_argument("--broker-port", type=int, default=6681)
    parser.add_argument("--web-port", type=int, default=8091)
    args = parser.parse_args()
    result = asyncio.run(measure(args))
    result["machine"] = machine("(this checkout's, tools/pulsar.sh)", "-")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"written to {args.out}")


if __name__ == "__main__":
    main()
