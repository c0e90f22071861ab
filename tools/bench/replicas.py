"""One rendezvous against two on one machine, at the same rate: what a client sees, what it costs.

    python -m tools.bench.replicas [--replicas 1,2] [--rate 100] [--seconds 30] [--warm 15]
                                   [--objective bench-race] [--out docs/results/bench/replicas.json]

For each replica count in turn, the bench mesh (deploy/mesh/bench-systems.yaml, no evaluator)
comes up under the real supervisor with that many rendezvous replicas on this checkout's broker
(started on --broker-port if none runs); after `--warm` seconds of unrecorded traffic, the
independent open-loop client of `tools.bench.userview` drives `--rate` req/s for `--seconds`
through the target the supervisor records (round robin over the replicas) and samples the CPU
time of every process of the mesh and of the broker. It prints and writes, per replica count,
the client-side p50/p90/p99, the default share, and CPU milliseconds per answered request (all
processes, and the rendezvous and collectors alone), and the ratios of 2 replicas to 1.

The figures are from one run each on whatever machine runs it: on a shared 2-core machine more
replicas add processes, not cores, so this shows the cost of scaling out, not a speed-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tools.bench.environment import REPO, Broker, Mesh, ensure_broker, log
from tools.bench.userview import drive, mesh_pids

SLA_MS = 50.0  # deploy/mesh/bench-systems.yaml
ANSWER_PATH = ("rendezvous", "collector")


def _answer_path_cpu(by_process: dict[str, float]) -> float:
    """CPU ms per request of the rendezvous replicas and their collectors."""
    return sum(ms for name, ms in by_process.items() if name.startswith(ANSWER_PATH))


async def measure(
    args: argparse.Namespace, broker: Broker, replicas: int, work_dir: Path
) -> dict[str, Any]:
    mesh = Mesh(broker, work_dir / f"x{replicas}", rendezvous_replicas=replicas)
    mesh.start()
    try:
        log(f"{replicas} replica(s) at {mesh.endpoint}: {args.warm:g}s warm, unrecorded")
        await drive(mesh.endpoint, args.objective, rate=args.rate, seconds=args.warm, sla_ms=SLA_MS)
        log(f"{replicas} replica(s): {args.seconds:g}s at {args.rate:g} req/s, recorded")
        view = await drive(
            mesh.endpoint,
            args.objective,
            rate=args.rate,
            seconds=args.seconds,
            sla_ms=SLA_MS,
            pids=mesh_pids(mesh.state_dir),
        )
    finally:
        mesh.stop()
    record = view.record(args.seconds)
    record.pop("windows")
    by_process = record["cpu_ms_per_request_by_process"]
    record["cpu_ms_per_request_answer_path"] = _answer_path_cpu(by_process)
    return {"replicas": replicas, "endpoint": mesh.endpoint, **record}


def ratios(runs: list[dict[str, Any]]) -> dict[str, float]:
    """The last run's figures over the first's."""
    first, last = runs[0], runs[-1]
    keys = ("p50_ms", "p99_ms", "cpu_ms_per_request", "cpu_ms_per_request_answer_path")
    return {key: last[key] / first[key] for key in keys if first[key]}


def table(runs: list[dict[str, Any]]) -> str:
    lines = [
        "| replicas | p50 ms | p90 ms | p99 ms | default share | errors "
        "| CPU ms/request (all) | CPU ms/request (rendezvous + collectors) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        lines.append(
            f"| {run['replicas']} | {run['p50_ms']:.1f} | {run['p90_ms']:.1f} "
            f"| {run['p99_ms']:.1f} | {run['default_share']:.2%} "
            f"| {sum(run['errors'].values())} | {run['cpu_ms_per_request']:.2f} "
            f"| {run['cpu_ms_per_request_answer_path']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.replicas", description=__doc__)
    parser.add_argument("--replicas", default="1,2", help="replica counts, in run order")
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--warm", type=float, default=15.0)
    parser.add_argument("--objective", default="bench-race")
    parser.add_argument(
        "--out", type=Path, default=REPO / "docs" / "results" / "bench" / "replicas.json"
    )
    parser.add_argument("--broker-port", type=int, default=6681)
    parser.add_argument("--web-port", type=int, default=8091)
    args = parser.parse_args(argv)
    counts = [int(part) for part in args.replicas.split(",") if part.strip()]
    broker = ensure_broker(args.broker_port, args.web_port)
    try:
        with tempfile.TemporaryDirectory(prefix="rdv-replicas-") as work:
            runs = [asyncio.run(measure(args, broker, count, Path(work))) for count in counts]
    finally:
        broker.stop()
    result = {
        "taken": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores, "
        f"load average {os.getloadavg()[0]:.1f} at the end",
        "objective": args.objective,
        "rate": args.rate,
        "seconds": args.seconds,
        "runs": runs,
        "ratios_last_to_first": ratios(runs),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(runs))
    print(
        "ratios (last / first): "
        + ", ".join(f"{k} {v:.2f}" for k, v in result["ratios_last_to_first"].items())
    )
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
