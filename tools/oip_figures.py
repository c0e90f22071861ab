"""What MLServer costs as an `oip` model: its start, and a call, beside the Python container.

    python -m tools.oip_figures [--rate 200] [--seconds 10] [--reps 3] [--starts 3]

1. Start: MLServer (`.venv-mlserver`, `make mlserver`) serving the diabetes ridge model
   (tools/oip_diabetes_model.py), from the process start to `ModelReady` true; `--starts`
   times, the median.
2. A call: ghz at the same open-loop rate, concurrency and duration against MLServer's
   `inference.GRPCInferenceService/ModelInfer` (one row; MLServer has no gRPC reflection, so
   ghz reads our protos/third_party copy of the contract) and against
   `rendezvous.v1.ModelService/Predict` on the Python diabetes container (`python -m
   services.models`, kind diabetes, ridge: the same model), interleaved rep by rep (A B A B
   ...) so a noisy neighbour hits both alike. Per server: client-side p50/p99 and the CPU per
   call of the server's processes (from /proc, the process and its children), medians over
   the reps, and MLServer's ratios to the Python container measured in the same run.

Figures go to stdout and to docs/results/oip/latest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from tools.bench.load import ghz
from tools.bench.models import CALL as PREDICT
from tools.bench.models import PYTHON_MODEL, ROW, containers, start
from tools.bench.models import stop as stop_container
from tools.bench.report import machine
from tools.mlserver import INPUT, MODEL_NAME, prepare, serve_mlserver

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "results" / "oip" / "latest.json"
PROTOS = REPO / "protos" / "third_party"
PROTO = PROTOS / "inference" / "v2" / "grpc_predict_v2.proto"
INFER = "inference.GRPCInferenceService/ModelInfer"
KEYS = ("p50_ms", "p99_ms", "cpu_ms_per_call")


def log(message: str) -> None:
    print(f"oip-figures: {message}", file=sys.stderr, flush=True)


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of `pid` and its live descendants."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        total += times.get(current, 0.0)
        todo.extend(child for child, parent in parents.items() if parent == current)
    return total


async def run_once(
    endpoint: str, call: str, body: dict[str, Any], pid: int, args: argparse.Namespace
) -> dict[str, Any]:
    proto = (PROTO, PROTOS) if call == INFER else None
    before = tree_cpu_s(pid)
    result = await ghz(endpoint, call, body, args.rate, args.seconds, proto=proto)
    cpu = tree_cpu_s(pid) - before
    calls = max(1, result.count)
    return {
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
        "cpu_ms_per_call": 1000 * cpu / calls,
        "calls": result.count,
        "errors": result.errors,
        # By status code (ghz's cut-off at the end of a run shows as Canceled, not an error).
        "codes": result.error_kinds,
    }


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        **{key: statistics.median(run[key] for run in runs) for key in KEYS},
        "errors": sum(int(run["errors"]) for run in runs),
        "runs": runs,
    }


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="oip-figures-") as tmp:
        root = Path(tmp) / "mlserver"
        prepare(root)
        starts = []
        for attempt in range(args.starts):
            with serve_mlserver(root, prepared=True) as server:
                starts.append(server.ready_s)
                log(f"start {attempt + 1}: ModelReady after {server.ready_s:.2f} s")
        features = json.loads((root / "expected.json").read_text())["features"]
        infer_body = {
            "model_name": MODEL_NAME,
            "id": "ghz",
            "inputs": [
                {
                    "name": INPUT,
                    "datatype": "FP64",
                    "shape": [1, len(features)],
                    "contents": {"fp64_contents": [ROW[name] for name in features]},
                }
            ],
        }
        predict_body = {"request_id": "ghz", "objective": "demo", "features": ROW}
        [python] = [c for c in containers(Path(tmp) / "state") if c.name == PYTHON_MODEL]
        runs: dict[str, list[dict[str, Any]]] = {"python": [], "mlserver": []}
        with serve_mlserver(root, prepared=True) as server:
            await start(python)
            assert python.process is not None
            try:
                for rep in range(args.reps):
                    for name, endpoint, call, body, pid in (
                        ("python", python.spec.endpoint, PREDICT, predict_body, python.process.pid),
                        ("mlserver", server.grpc_endpoint, INFER, infer_body, server.process.pid),
                    ):
                        run = await run_once(endpoint, call, body, pid, args)
                        runs[name].append(run)
                        log(
                            f"rep {rep + 1} {name}: p50 {run['p50_ms']:.2f} ms, p99 "
                            f"{run['p99_ms']:.2f} ms, {run['cpu_ms_per_call']:.3f} ms CPU/call, "
                            f"{run['errors']:g} errors"
                        )
            finally:
                stop_container(python)
    rows = {name: median_of(found) for name, found in runs.items()}
    return {
        "machine": machine("-", "tools/bin/ghz"),
        "rate": args.rate,
        "seconds": args.seconds,
        "reps": args.reps,
        "concurrency": 50,
        "mlserver_start_s": {"median": statistics.median(starts), "runs": starts},
        "calls": {
            "python": {"call": PREDICT, **rows["python"]},
            "mlserver": {"call": INFER, **rows["mlserver"]},
        },
        "mlserver_to_python": {
            key: rows["mlserver"][key] / rows["python"][key] if rows["python"][key] else None
            for key in KEYS
        },
    }


def print_summary(summary: dict[str, Any]) -> None:
    start = summary["mlserver_start_s"]
    print(
        f"MLServer start (process -> ModelReady true): median {start['median']:.2f} s "
        f"of {', '.join(f'{s:.2f}' for s in start['runs'])}"
    )
    print(
        f"One-row call at {summary['rate']} req/s open loop, {summary['seconds']:g} s x "
        f"{summary['reps']} interleaved reps (medians), ghz concurrency {summary['concurrency']}"
    )
    print(f"{'server':9} {'call':44} {'p50 ms':>7} {'p99 ms':>7} {'CPU ms/call':>11} {'errors':>6}")
    for name, row in summary["calls"].items():
        print(
            f"{name:9} {row['call']:44} {row['p50_ms']:7.2f} {row['p99_ms']:7.2f} "
            f"{row['cpu_ms_per_call']:11.3f} {row['errors']:6d}"
        )
    ratio = summary["mlserver_to_python"]
    print(
        "MLServer / Python: "
        + ", ".join(f"{key} x{ratio[key]:.2f}" for key in KEYS if ratio[key] is not None)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=200, help="calls per second (open loop)")
    parser.add_argument("--seconds", type=float, default=10.0, help="per run")
    parser.add_argument("--reps", type=int, default=3, help="interleaved runs per server")
    parser.add_argument("--starts", type=int, default=3, help="MLServer starts timed")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    summary = asyncio.run(measure(args))
    print_summary(summary)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
