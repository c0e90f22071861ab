"""What the per-RPC metrics interceptor costs: server CPU per call, with and without it.

A model container's server (`GrpcServer` with the sum model's `ModelService`, as
`python -m services.models` builds it) runs in a child process, once with every interceptor
(`server_interceptors`) and once without `RpcMetricsInterceptor`, alternately, `--reps`
times each. ghz sends `--calls` `ModelService/Predict` calls to each (closed loop,
`--concurrency` at once); the server's CPU time over those calls (user + system, from
/proc) divided by the calls is its CPU per call. The interceptor alone is timed too, in
this process (`--alone-calls` wrapped calls of a handler that returns at once, less the
same calls unwrapped): a figure the machine's noise does not drown. Prints the median per
variant, the ratio and the difference, and writes them to a JSON file.

    .venv/bin/python tools/rpc_metrics_cost.py [--calls 5000] [--reps 5]

Needs tools/bin/ghz (`make tools`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "gen")]

GHZ = REPO / "tools" / "bin" / "ghz"
CALL = "rendezvous.v1.ModelService/Predict"
BODY = {"objective": "cost", "features": {"x": 1.0, "y": 2.0}}
VARIANTS = ("without", "with")
TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def serve(variant: str) -> None:
    """The child: serve the sum model until stdin closes; print the port first."""
    from rendezvous.v1 import model_pb2_grpc

    from services.core import rpc_metrics, server
    from services.models.base import ModelServicer
    from services.models.sum_model import SumModel

    if variant == "without":
        every = server.server_interceptors

        def without_metrics(auth: Any) -> list[Any]:
            return [i for i in every(auth) if not isinstance(i, rpc_metrics.RpcMetricsInterceptor)]

        server.server_interceptors = without_metrics

    async def run() -> None:
        servicer = ModelServicer(SumModel("sum", "1", {}), "sum", "1")
        grpc_server = server.GrpcServer(
            service_names=["rendezvous.v1.ModelService"],
            registrars=[lambda s: model_pb2_grpc.add_ModelServiceServicer_to_server(servicer, s)],
            tcp_address="127.0.0.1:0",
        )
        await grpc_server.start()
        await grpc_server.set_serving(True)
        print(grpc_server.endpoint, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await grpc_server.stop(0)

    import uvloop

    uvloop.run(run())


def interceptor_alone_us(calls: int) -> float:
    """CPU microseconds per call of the interceptor by itself, in this process: the handler
    look-up through it and the wrapped call of a handler that returns at once."""
    import grpc

    from services.core.rpc_metrics import RpcMetricsInterceptor

    async def behavior(request: Any, context: Any) -> Any:
        return request

    handler: grpc.RpcMethodHandler[Any, Any] = grpc.unary_unary_rpc_method_handler(behavior)

    async def continuation(details: Any) -> Any:
        return handler

    class Context:
        def code(self) -> None:
            return None

    async def run() -> float:
        interceptor = RpcMetricsInterceptor()
        # Stand-ins for what grpc hands an interceptor: only what it reads.
        details: Any = SimpleNamespace(method="/" + CALL, invocation_metadata=())
        context: Any = Context()

        async def direct() -> None:
            await (await continuation(details)).unary_unary(None, context)

        async def intercepted() -> None:
            wrapped: Any = await interceptor.intercept_service(continuation, details)
            await wrapped.unary_unary(None, context)

        spent = {}
        for name, one in (("direct", direct), ("intercepted", intercepted)):
            for _ in range(1000):
                await one()
            before = time.process_time()
            for _ in range(calls):
                await one()
            spent[name] = time.process_time() - before
        return (spent["intercepted"] - spent["direct"]) / calls * 1e6

    return asyncio.run(run())


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_S


def ghz(endpoint: str, calls: int, concurrency: int) -> dict[str, Any]:
    out = subprocess.run(
        [
            str(GHZ),
            "--insecure",
            f"--call={CALL}",
            f"--data={json.dumps(BODY)}",
            f"--total={calls}",
            f"--concurrency={concurrency}",
            "--connections=1",
            "--format=json",
            endpoint,
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    report: dict[str, Any] = json.loads(out.stdout)
    return report


def measure(variant: str, calls: int, concurrency: int, warmup: int) -> float:
    """Server CPU microseconds per call of one run of `variant`."""
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve", variant],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        endpoint = child.stdout.readline().strip()
        ghz(endpoint, warmup, concurrency)
        before = cpu_s(child.pid)
        report = ghz(endpoint, calls, concurrency)
        spent = cpu_s(child.pid) - before
        ok = report.get("statusCodeDistribution", {}).get("OK", 0)
        if ok != calls:
            raise RuntimeError(f"{variant}: {ok} of {calls} calls OK: {report}")
        child.stdin.close()
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
    return spent / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--alone-calls", type=int, default=100_000)
    parser.add_argument(
        "--out", type=Path, default=REPO / "docs" / "results" / "rpc-metrics-cost.json"
    )
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    runs: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    for rep in range(args.reps):
        for variant in VARIANTS:
            per_call = measure(variant, args.calls, args.concurrency, args.warmup)
            runs[variant].append(round(per_call, 1))
            print(f"rep {rep + 1} {variant:>7} metrics: {per_call:7.1f} us CPU per call")
    medians = {variant: statistics.median(values) for variant, values in runs.items()}
    ratio = medians["with"] / medians["without"]
    added = medians["with"] - medians["without"]
    alone = interceptor_alone_us(args.alone_calls)
    print(
        f"\nserver CPU per {CALL} call (median of {args.reps}): "
        f"without {medians['without']:.1f} us, with {medians['with']:.1f} us; "
        f"ratio {ratio:.3f}, {added:+.1f} us per call"
        f"\nthe interceptor alone (in-process, {args.alone_calls} calls): {alone:.2f} us per call, "
        f"{alone / medians['without']:.1%} of a call without it"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "what": "server CPU per call (user+system), RpcMetricsInterceptor off and on",
                "call": CALL,
                "calls_per_run": args.calls,
                "concurrency": args.concurrency,
                "reps": args.reps,
                "us_per_call": runs,
                "median_us_per_call": medians,
                "ratio_with_to_without": round(ratio, 4),
                "added_us_per_call": round(added, 2),
                "interceptor_alone_us_per_call": round(alone, 3),
                "interceptor_alone_share": round(alone / medians["without"], 4),
                "seconds": round(time.monotonic() - started, 1),
                # Other work on the machine inflates every per-call figure; this says how much.
                "load_average_1m": [round(load_before, 1), round(os.getloadavg()[0], 1)],
                "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                "python": platform.python_version(),
                "when": datetime.now(UTC).isoformat(timespec="seconds"),
            },
            indent=2,
        )
        + "\n"
    )
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
