"""The mesh as a user meets it: an independent open-loop client against `Score`.

    python -m tools.bench.userview [--target 127.0.0.1:50051] [--rate 50] [--seconds 30]
                                   [--window 3] [--state-dir .run/mesh] [--json FILE]

Request i is due at start + i/rate whatever happened to the ones before, and its latency runs
from that due time to the answer (no coordinated omission). The client reads who answered
from each response, so the default share needs nothing from the server. Beside the latency it
samples the CPU time of every process of the mesh (the supervisor's `state.json`) and of the
broker, and reports milliseconds of CPU per answered request, per process.

It runs in its own process, with the generated stubs only: what a gRPC client in any language
sees, one loopback connection per rendezvous replica (round robin over a replicated target),
no server-side figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from rendezvous.v1 import scoring_pb2, scoring_pb2_grpc

from services.core.channels import aio_channel
from services.core.protos import set_values
from tools.bench.load import quantile
from tools.bench.probes import CpuMeter
from tools.bench.systems import FEATURES

REPO = Path(__file__).resolve().parents[2]
# An answer this much past the SLA at the client is "late" in the report.
LATE_MARGIN_MS = 10.0


@dataclass
class Answer:
    """One call as the client saw it."""

    due_s: float  # since the run started
    latency_ms: float
    source: str  # "model", "default" or the gRPC status name of an error
    model: str = ""


@dataclass
class UserView:
    """Every answer of one run, and what the mesh spent on them."""

    sla_ms: float
    answers: list[Answer] = field(default_factory=list)
    cpu_ms_by_process: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self, answers: list[Answer] | None = None) -> dict[str, Any]:
        chosen = self.answers if answers is None else answers
        ok = [a for a in chosen if a.source in ("model", "default")]
        latencies = sorted(a.latency_ms for a in ok)
        defaults = sum(1 for a in ok if a.source == "default")
        late = sum(1 for a in ok if a.latency_ms > self.sla_ms + LATE_MARGIN_MS)
        errors: dict[str, int] = {}
        for a in chosen:
            if a.source not in ("model", "default"):
                errors[a.source] = errors.get(a.source, 0) + 1
        return {
            "requests": len(chosen),
            "answered": len(ok),
            "errors": errors,
            "default_share": defaults / len(ok) if ok else None,
            "defaults": defaults,
            "late_share": late / len(ok) if ok else None,
            "late": late,
            "p50_ms": quantile(latencies, 0.50),
            "p90_ms": quantile(latencies, 0.90),
            "p99_ms": quantile(latencies, 0.99),
            "max_ms": latencies[-1] if latencies else 0.0,
        }

    def windows(self, width_s: float) -> list[dict[str, Any]]:
        """The summary per `width_s` window of due times (the first minute, in slices)."""
        out = []
        start = 0.0
        while start < self.seconds:
            inside = [a for a in self.answers if start <= a.due_s < start + width_s]
            if inside:
                out.append({"from_s": start, **self.summary(inside)})
            start += width_s
        return out

    def record(self, width_s: float) -> dict[str, Any]:
        answered = max(1, sum(1 for a in self.answers if a.source in ("model", "default")))
        return {
            **self.summary(),
            "seconds": self.seconds,
            "cpu_ms_per_request": sum(self.cpu_ms_by_process.values()) / answered,
            "cpu_ms_per_request_by_process": {
                name: spent / answered for name, spent in sorted(self.cpu_ms_by_process.items())
            },
            "windows": self.windows(width_s),
        }


def mesh_pids(state_dir: Path) -> dict[str, int]:
    """Every process of the running mesh, and the broker when this checkout runs one."""
    state = json.loads((state_dir / "state.json").read_text())
    pids = {p["name"]: int(p["pid"]) for p in state["processes"] if p.get("pid")}
    broker_pid = REPO / ".run" / "pulsar" / "pulsar.pid"
    if broker_pid.exists():
        pids["broker"] = int(broker_pid.read_text().strip())
    return pids


async def drive(
    target: str,
    objective: str,
    *,
    rate: float,
    seconds: float,
    sla_ms: float,
    pids: dict[str, int] | None = None,
) -> UserView:
    """Open loop at `rate` for `seconds` against `target`; CPU of `pids` over the run."""
    view = UserView(sla_ms=sla_ms)
    request = scoring_pb2.ScoreRequest(objective=objective)
    set_values(request.features, FEATURES)
    meter = CpuMeter(pids or {})
    # The mesh's channel builder: round robin over the replicas of a replicated target.
    async with aio_channel(target) as channel:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        await channel.channel_ready()

        async def one(due: float, started: float) -> None:
            try:
                response = await stub.Score(request, timeout=10.0)
            except grpc.aio.AioRpcError as err:
                view.answers.append(
                    Answer(due - started, (time.perf_counter() - due) * 1000, err.code().name)
                )
                return
            latency = (time.perf_counter() - due) * 1000
            source = (
                "default"
                if response.decision.source == scoring_pb2.ANSWER_SOURCE_DEFAULT
                else "model"
            )
            view.answers.append(Answer(due - started, latency, source, response.decision.model))

        meter.start()
        started = time.perf_counter()
        total = round(rate * seconds)
        calls = []
        for index in range(total):
            due = started + index / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            calls.append(asyncio.create_task(one(due, started)))
        await asyncio.gather(*calls)
        view.seconds = time.perf_counter() - started
        # Outcomes and archive writes after the last answer still belong to the run.
        await asyncio.sleep(1.0)
        view.cpu_ms_by_process = meter.stop()
    view.answers.sort(key=lambda a: a.due_s)
    return view


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.userview", description=__doc__)
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--objective", default="demo")
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--window", type=float, default=3.0)
    parser.add_argument("--sla-ms", type=float, default=50.0)
    parser.add_argument("--state-dir", type=Path, default=REPO / ".run" / "mesh")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    pids = mesh_pids(args.state_dir) if (args.state_dir / "state.json").exists() else {}
    view = asyncio.run(
        drive(
            args.target,
            args.objective,
            rate=args.rate,
            seconds=args.seconds,
            sla_ms=args.sla_ms,
            pids=pids,
        )
    )
    record = view.record(args.window)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    windows = record.pop("windows")
    by_process = record.pop("cpu_ms_per_request_by_process")
    print(json.dumps(record, indent=2))
    print("cpu ms/request by process:", json.dumps({k: round(v, 2) for k, v in by_process.items()}))
    for w in windows:
        print(
            f"  {w['from_s']:5.1f}s: default {w['default_share']:.1%} late {w['late_share']:.1%}"
            f" p50 {w['p50_ms']:.1f} p99 {w['p99_ms']:.1f} max {w['max_ms']:.1f} ms",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
