"""The command line: bring everything up, run the rates x reps x systems, write the results.

    python -m tools.bench [--systems D,S0,S1,S2,S3,S4] [--rates 50,100,250,500,833] [--reps 3]
                          [--duration 10] [--warmup 20] [--out docs/results/bench] [--smoke]

D, the demo mesh as `make up` runs it (tools/bench/demo.py), goes first: it needs this
checkout's broker cold, from the first request after `rendezvous up` returns. `--smoke` (1 rep
at 20 req/s for 5 s, D 10 s at 20 req/s, results under .run/bench/smoke) checks the results
are complete and sane and exits non-zero otherwise; it never judges absolute speed. S4 needs
`.venv-peers` (`make setup-peers`); a smoke without it says so and leaves S4 out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import time
from pathlib import Path
from typing import Any

from tools.bench import demo, report
from tools.bench.environment import REPO, Broker, Mesh, ensure_broker, log
from tools.bench.load import GHZ
from tools.bench.rayserve import cluster as rayserve
from tools.bench.rayserve.cluster import RayServeCluster
from tools.bench.rayserve.settings import RayServeSettings
from tools.bench.systems import (
    DESCRIPTIONS,
    FEATURES,
    ONE,
    RACE,
    Direct,
    Original,
    RayServe,
    Rendezvous,
    System,
)

ALL_SYSTEMS = ("D", "S0", "S1", "S2", "S3", "S4")
MESH_SYSTEMS = ("S0", "S1", "S2", "S3")
# The systems the climb measures: the mesh's and S4 (Ray Serve, on no broker).
CLIMB_SYSTEMS = (*MESH_SYSTEMS, "S4")
# How S4's deployments were sized and served, for the report.
S4_CONFIG = {"throughput_optimized", "replica_num_cpus", "router_max_ongoing_requests",
             "model_max_ongoing_requests", "access_log"}  # fmt: skip
SLA_MS = 50.0  # both bench objectives' SLA (deploy/mesh/bench-systems.yaml)


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__)
    parser.add_argument("--systems", type=_csv, default=list(ALL_SYSTEMS))
    parser.add_argument("--rates", type=lambda s: [int(r) for r in _csv(s)], default=None)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--duration", type=float, default=None, help="seconds per run")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds per system, unrecorded, before the climb",
    )
    parser.add_argument("--warmup-rate", type=int, default=200, help="req/s of the warm-up")
    parser.add_argument("--smoke", action="store_true", help="1 rep at 20 req/s, 5 s; check sanity")
    parser.add_argument("--broker-port", type=int, default=6681)
    parser.add_argument("--web-port", type=int, default=8091)
    args = parser.parse_args(argv)
    unknown = set(args.systems) - set(ALL_SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; choose from {ALL_SYSTEMS}")
    smoke = {"rates": [20], "reps": 1, "duration": 5.0, "warmup": 1.0,
             "out": REPO / ".run" / "bench" / "smoke"}  # fmt: skip
    full = {"rates": [50, 100, 250, 500, 833], "reps": 3, "duration": 10.0, "warmup": 20.0,
            "out": REPO / "docs" / "results" / "bench"}  # fmt: skip
    for key, value in (smoke if args.smoke else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def ghz_version() -> str:
    out = subprocess.run([str(GHZ), "--version"], capture_output=True, text=True, check=False)
    return (out.stdout or out.stderr).strip() or "unknown"


async def bench(args: argparse.Namespace, broker: Broker | None, work_dir: Path) -> dict[str, Any]:
    """Bring up what the chosen systems need, climb, stop it all. `broker` is None when no
    system on it (S0-S3) was chosen."""
    systems: dict[str, System] = {}
    unavailable: dict[str, str] = {}
    mesh = None if broker is None else Mesh(broker, work_dir)
    original: Original | None = None
    cluster: RayServeCluster | None = None
    try:
        if mesh is not None and broker is not None:
            systems, unavailable, original = await _start_mesh_systems(args, broker, mesh, work_dir)
        if "S4" in args.systems:
            try:
                ray = await RayServeCluster.start(work_dir, RACE, FEATURES)
            except Exception as exc:
                ray = f"start() failed: {type(exc).__name__}: {exc}"
            if isinstance(ray, str):
                unavailable["S4"] = ray
                log(f"S4 not available: {ray}")
            else:
                cluster = ray
                systems["S4"] = RayServe(cluster)
        return await _climb(args, systems, unavailable)
    finally:
        if cluster is not None:
            await cluster.stop()
        if original is not None:
            await original.stop()
        if mesh is not None:
            mesh.stop()


async def _start_mesh_systems(
    args: argparse.Namespace, broker: Broker, mesh: Mesh, work_dir: Path
) -> tuple[dict[str, System], dict[str, str], Original | None]:
    """S0-S3 on the bench mesh (started here): the systems, why any is unavailable, and
    S3 when it started (it must be stopped)."""
    systems: dict[str, System] = {}
    unavailable: dict[str, str] = {}
    mesh.start()
    if "S0" in args.systems:
        systems["S0"] = Direct(broker, mesh)
    if "S1" in args.systems:
        systems["S1"] = Rendezvous(broker, mesh, "S1", ONE)
    if "S2" in args.systems:
        systems["S2"] = Rendezvous(broker, mesh, "S2", RACE)
    if "S3" not in args.systems:
        return systems, unavailable, None
    (work_dir / "original").mkdir(parents=True, exist_ok=True)
    try:
        started = await Original.start(broker, mesh, work_dir / "original")
    except Exception as exc:
        started = f"start() failed: {type(exc).__name__}: {exc}"
    if isinstance(started, str):
        unavailable["S3"] = started
        log(f"S3 not available: {started}")
        return systems, unavailable, None
    systems["S3"] = started
    return systems, unavailable, started


async def _climb(
    args: argparse.Namespace, systems: dict[str, System], unavailable: dict[str, str]
) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    stopped: dict[str, str] = {}
    # The broker's JIT compiles on traffic (measured: its C2 compiler thread alone took
    # ~200 ms CPU/s during the first minute of S2 at 100 req/s), and every process warms
    # its caches: not part of any run.
    for name, system in systems.items():
        if args.warmup > 0:
            log(f"{name}: warming up for {args.warmup:g} s at {args.warmup_rate} req/s")
            await system.load(args.warmup_rate, args.warmup)
    for rate in args.rates:
        active = [name for name in systems if name not in stopped]
        if not active:
            break
        for rep in range(args.reps):
            for name in active:
                run = await systems[name].run(rate, rep, args.duration)
                record = run.record()
                runs.append(record)
                log(
                    f"{name} {rate} req/s rep {rep + 1}: p50 {record['p50_ms']:.2f} "
                    f"p99 {record['p99_ms']:.2f} ms, {record['achieved_rps']:.1f} req/s, "
                    f"{record['errors']} errors, default {record['default_share']}, "
                    f"CPU {record['cpu_ms_per_request']:.2f} ms/req"
                )
        for row in report.summarise([r for r in runs if r["rate"] == rate]):
            why = report.failed_level(row, rate, SLA_MS)
            if why is not None:
                stopped[row["system"]] = why
                log(f"{row['system']} stops climbing: {why}")
    return {"runs": runs, "stopped": stopped, "unavailable": unavailable}


def demo_plan(args: argparse.Namespace) -> demo.DemoPlan:
    if args.smoke:
        return demo.DemoPlan(20, 10, 5, 0, 0, [], 0)
    return demo.DemoPlan(50, 60, 3, args.warmup, 100, [50, 100], 3 * args.duration)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke and "S4" in args.systems and rayserve.unavailable() is not None:
        # The smoke checks what this checkout installed; Ray Serve is `make setup-peers`.
        args.systems.remove("S4")
        log(f"S4 (Ray Serve) is not in this smoke: {rayserve.unavailable()}")
    work_dir = REPO / ".run" / "bench" / time.strftime("%Y%m%d-%H%M%S")
    demo_record: dict[str, Any] | None = None
    if "D" in args.systems:
        demo_record = asyncio.run(demo.measure_demo(demo_plan(args), work_dir))
        if "unavailable" in demo_record:
            log(f"D not available: {demo_record['unavailable']}")
    pulsar_version = "unknown"
    outcome: dict[str, Any] = {"runs": [], "stopped": {}, "unavailable": {}}
    if set(args.systems) & set(MESH_SYSTEMS):
        broker = ensure_broker(args.broker_port, args.web_port)
        try:
            outcome = asyncio.run(bench(args, broker, work_dir))
            pulsar_version = broker.version()
        finally:
            broker.stop()
    elif "S4" in args.systems:
        outcome = asyncio.run(bench(args, None, work_dir))
    if demo_record is not None and "unavailable" in demo_record:
        outcome["unavailable"]["D"] = demo_record["unavailable"]
    result: dict[str, Any] = {
        "machine": {
            **report.machine(pulsar_version, ghz_version()),
            "ray": rayserve.ray_version() if "S4" in args.systems else "not run",
        },
        "config": {
            "rates": args.rates,
            "reps": args.reps,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "warmup_rate": args.warmup_rate,
            "sla_ms": SLA_MS,
            "mesh": "deploy/mesh/bench-systems.yaml",
            "s4": RayServeSettings().model_dump(mode="json", include=S4_CONFIG),
        },
        "systems": {name: DESCRIPTIONS[name] for name in args.systems},
        "unavailable": outcome["unavailable"],
        "stopped": outcome["stopped"],
        "demo": demo_record,
        "summary": report.summarise(outcome["runs"]),
        "runs": outcome["runs"],
    }
    result["ratios"] = report.ratios(result["summary"])
    result["peer_targets"] = report.peer_targets(result, SLA_MS)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "latest.md").write_text(report.markdown(result))
    report.chart(result, out / "latest.png")
    print((out / "latest.md").read_text())
    log(f"results in {out}")
    if args.smoke:
        problems = report.smoke_problems(
            result, [name for name in args.systems if name in CLIMB_SYSTEMS]
        )
        if demo_record is not None:
            problems += demo.smoke_problems(demo_record)
        for problem in problems:
            log(f"SMOKE FAILED: {problem}")
        if problems:
            return 1
        log("smoke: every system has sane figures")
    return 0
