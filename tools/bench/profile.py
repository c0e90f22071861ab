"""Where the CPU goes: py-spy on every Python process of one system under open-loop load.

    python -m tools.bench.profile [--system S2] [--rate 250] [--duration 10] [--top 12]

Brings up the broker and the bench mesh, warms the system up, then samples every process on
its path with `py-spy record` (native frames off, idle frames off) while ghz drives the load.
Per process it prints the CPU milliseconds per request and the functions with the most own
samples; the raw collapsed stacks (flame-graph input) stay under .run/bench/profile/.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

from tools.bench.environment import REPO, Mesh, ensure_broker, log
from tools.bench.probes import CpuMeter
from tools.bench.systems import ONE, RACE, Rendezvous

PY_SPY = Path(sys.executable).with_name("py-spy")


def own_samples(collapsed: Path) -> tuple[int, Counter[str]]:
    """Total samples and samples per innermost frame from py-spy's raw (collapsed) output."""
    total = 0
    own: Counter[str] = Counter()
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frame = stack.rsplit(";", 1)[-1]
        own[frame] += int(count)
        total += int(count)
    return total, own


async def profile(args: argparse.Namespace) -> None:
    out = REPO / ".run" / "bench" / "profile" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    broker = ensure_broker(args.broker_port, args.web_port)
    mesh = Mesh(broker, out)
    try:
        mesh.start()
        system = Rendezvous(broker, mesh, args.system, ONE if args.system == "S1" else RACE)
        log(f"warming up: {args.warmup:g} s at {args.rate} req/s")
        await system.load(args.rate, args.warmup)
        python = {name: pid for name, pid in system.pids().items() if name != "broker"}
        spies = {
            name: await asyncio.create_subprocess_exec(
                str(PY_SPY), "record", "--pid", str(pid), "--duration", str(int(args.duration)),
                "--rate", "250", "--format", "raw", "--output", str(out / f"{name}.txt"),
                "--nonblocking",
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )
            for name, pid in python.items()
        }  # fmt: skip
        meter = CpuMeter(system.pids())
        meter.start()
        result = await system.load(args.rate, args.duration)
        spent = meter.stop()
        for spy in spies.values():
            await spy.wait()
    finally:
        mesh.stop()
        broker.stop()
    answered = max(1, result.count - result.errors)
    print(
        f"\n{args.system} at {args.rate} req/s: p50 {result.p50_ms:.2f} ms, "
        f"p99 {result.p99_ms:.2f} ms, {result.errors} errors; "
        f"CPU {sum(spent.values()) / answered:.2f} ms/request in all"
    )
    for name, ms in sorted(spent.items(), key=lambda item: -item[1]):
        print(f"\n== {name}: {ms / answered:.2f} ms CPU/request")
        collapsed = out / f"{name}.txt"
        if not collapsed.exists():
            continue
        total, own = own_samples(collapsed)
        for frame, count in own.most_common(args.top):
            print(f"  {100 * count / max(1, total):5.1f}%  {frame}")
    log(f"collapsed stacks in {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.profile", description=__doc__)
    parser.add_argument("--system", choices=("S1", "S2"), default="S2")
    parser.add_argument("--rate", type=int, default=250)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--broker-port", type=int, default=6681)
    parser.add_argument("--web-port", type=int, default=8091)
    args = parser.parse_args(argv)
    if not PY_SPY.exists() and shutil.which("py-spy") is None:
        parser.error("py-spy is not installed: make setup installs it with the bench extra")
    asyncio.run(profile(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
