"""Model containers side by side: the same ModelService.Predict, in Python, Go and Node.

    python -m tools.bench.models [--rate 300] [--seconds 10] [--reps 3]

Each container of the demo mesh's diabetes models (the Python incumbent and every deployment
with a `command`: the Go and TypeScript challengers) is started exactly as the supervisor
starts it (`services.supervisor.plan`: the same RDV_MODEL_* environment, the same program),
all serving the same ridge artifact. First they must agree: one row's score from each, equal
to 1e-9. Then ghz drives each in turn at the same open-loop rate, interleaved rep by rep (A B C
A B C ...) so a noisy neighbour hits all alike; per container the client-side p50/p99 and the
server's CPU per call (its /proc CPU time over the calls), and the ratios to Python measured
in the same run. Figures go to stdout and to docs/results/models/latest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from rendezvous.v1 import model_pb2, model_pb2_grpc

from services.core.mesh import load_mesh
from services.core.protos import set_values
from services.supervisor.app import check_health
from services.supervisor.plan import MODEL_LABEL, Ports, ProcessSpec, plan
from tools.bench.load import ghz
from tools.bench.report import machine

REPO = Path(__file__).resolve().parents[2]
DEMO_MESH = REPO / "deploy" / "mesh" / "demo.yaml"
OUT = REPO / "docs" / "results" / "models" / "latest.json"
OBJECTIVE = "demo"
# Every container serves this artifact, so the comparison is of the serving, not the model.
ALGORITHM = "ridge"
PYTHON_MODEL = "diabetes-ridge"
READY_TIMEOUT_S = 60.0
AGREEMENT = 1e-9
ROW = {
    "age": 0.0380759,
    "sex": 0.0506801,
    "bmi": 0.0616962,
    "bp": 0.0218724,
    "s1": -0.0442235,
    "s2": -0.0348208,
    "s3": -0.0434008,
    "s4": -0.0025923,
    "s5": 0.0199075,
    "s6": -0.0176461,
}
CALL = "rendezvous.v1.ModelService/Predict"


def log(message: str) -> None:
    print(f"models-bench: {message}", file=sys.stderr, flush=True)


@dataclass
class Container:
    """One started model container."""

    name: str
    language: str
    spec: ProcessSpec
    process: subprocess.Popen[bytes] | None = None
    runs: list[dict[str, float]] = field(default_factory=list)

    def cpu_s(self) -> float:
        assert self.process is not None
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def containers(state_dir: Path) -> list[Container]:
    """The demo mesh's Python incumbent and its polyglot deployments, all on the ridge
    artifact, planned as the supervisor plans them."""
    config = load_mesh(DEMO_MESH).objective_configs()[OBJECTIVE]
    chosen = [m for m in config.models if m.name == PYTHON_MODEL or m.command]
    del config.models[:]
    for model in chosen:
        model.args.Clear()
        model.args.update({"algorithm": ALGORITHM})
        config.models.append(model)
    specs = plan({OBJECTIVE: config}, state_dir, "pulsar://unused", "http://unused", "x:1", Ports())
    out = []
    for spec in specs:
        name = spec.labels.get(MODEL_LABEL)
        if name is None:
            continue
        language = "python" if not spec.command else _language(spec.command)
        out.append(Container(name, language, spec))
    return out


def _language(command: list[str]) -> str:
    program = Path(command[0]).name
    return "node" if program == "node" else "go" if program.endswith("-go") else program


def spawn(spec: ProcessSpec) -> subprocess.Popen[bytes]:
    """The container's process, as the supervisor runs it (program, environment, directory)."""
    spec.log_file.parent.mkdir(parents=True, exist_ok=True)
    argv = spec.command or [sys.executable, "-m", spec.module]
    with spec.log_file.open("ab") as output:
        return subprocess.Popen(
            argv,
            env={**os.environ, **spec.env},
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
        )


async def start(container: Container) -> None:
    spec = container.spec
    container.process = spawn(spec)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if container.process.poll() is not None:
            raise RuntimeError(f"{container.name} exited; see {spec.log_file}")
        if spec.ready_file.exists() and await check_health(spec.endpoint):
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{container.name} not ready in {READY_TIMEOUT_S:g}s; see {spec.log_file}")


def stop(container: Container) -> None:
    process = container.process
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()


async def score(endpoint: str) -> float:
    request = model_pb2.PredictRequest(request_id="agree", objective=OBJECTIVE)
    set_values(request.features, ROW)
    async with grpc.aio.insecure_channel(endpoint) as channel:
        response = await model_pb2_grpc.ModelServiceStub(channel).Predict(request, timeout=5)
    return float(response.score)


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="models-bench-") as state:
        started = containers(Path(state))
        try:
            for container in started:
                await start(container)
                log(f"{container.name} ({container.language}) ready at {container.spec.endpoint}")
            scores = {c.name: await score(c.spec.endpoint) for c in started}
            reference = scores[PYTHON_MODEL]
            agree = all(abs(s - reference) <= AGREEMENT for s in scores.values())
            body = {"request_id": "ghz", "objective": OBJECTIVE, "features": ROW}
            for rep in range(args.reps):
                for container in started:
                    before = container.cpu_s()
                    result = await ghz(container.spec.endpoint, CALL, body, args.rate, args.seconds)
                    cpu = container.cpu_s() - before
                    calls = max(1, result.count)
                    container.runs.append(
                        {
                            "p50_ms": result.p50_ms,
                            "p99_ms": result.p99_ms,
                            "cpu_ms_per_call": 1000 * cpu / calls,
                            "calls": result.count,
                            "errors": result.errors,
                        }
                    )
                    log(
                        f"rep {rep + 1} {container.name}: p50 {result.p50_ms:.2f} ms, "
                        f"p99 {result.p99_ms:.2f} ms, {1000 * cpu / calls:.3f} ms CPU/call"
                    )
        finally:
            for container in started:
                stop(container)
    return _summary(started, scores, agree, args)


def _summary(
    started: list[Container], scores: dict[str, float], agree: bool, args: argparse.Namespace
) -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = {}
    for container in started:
        median = {
            key: statistics.median(run[key] for run in container.runs)
            for key in ("p50_ms", "p99_ms", "cpu_ms_per_call")
        }
        rows[container.name] = {
            "language": container.language,
            "command": container.spec.command or ["python", "-m", container.spec.module],
            **median,
            "errors": sum(int(run["errors"]) for run in container.runs),
            "runs": container.runs,
            "score": scores[container.name],
        }
    python = rows[PYTHON_MODEL]
    for row in rows.values():
        row["ratio_to_python"] = {
            key: row[key] / python[key] if python[key] else None
            for key in ("p50_ms", "p99_ms", "cpu_ms_per_call")
        }
    return {
        "machine": machine("-", "tools/bin/ghz"),
        "rate": args.rate,
        "seconds": args.seconds,
        "reps": args.reps,
        "agree_to_1e-9": agree,
        "containers": rows,
    }


def print_summary(summary: dict[str, Any]) -> None:
    print(
        f"ModelService/Predict at {summary['rate']} req/s, {summary['seconds']} s x "
        f"{summary['reps']} reps (medians); scores agree to 1e-9: {summary['agree_to_1e-9']}"
    )
    header = f"{'container':18} {'lang':7} {'p50 ms':>7} {'p99 ms':>7} {'CPU ms/call':>11}"
    print(header + f" {'p50 /py':>8} {'CPU /py':>8}")
    for name, row in summary["containers"].items():
        ratio = row["ratio_to_python"]
        print(
            f"{name:18} {row['language']:7} {row['p50_ms']:7.2f} {row['p99_ms']:7.2f} "
            f"{row['cpu_ms_per_call']:11.3f} {ratio['p50_ms']:8.2f} {ratio['cpu_ms_per_call']:8.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=300, help="calls per second (open loop)")
    parser.add_argument("--seconds", type=float, default=10.0, help="per run")
    parser.add_argument("--reps", type=int, default=3, help="interleaved runs per container")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    summary = asyncio.run(measure(args))
    print_summary(summary)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"written to {args.out}")
    return 0 if summary["agree_to_1e-9"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
