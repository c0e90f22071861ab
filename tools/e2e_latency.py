"""End-to-end latency of a running mesh beside a direct call to the same model.

ghz (open loop: --async --rps) calls, alternately in one run so both see the same
machine, the incumbent's model container directly (`ModelService/Predict`, the floor)
and the rendezvous (`ScoringService/Score`, every hop through Pulsar). Prints the
median over the reps of each percentile and writes them to a JSON file.

    .venv/bin/python tools/e2e_latency.py [--rps 50] [--seconds 20] [--reps 2]

Needs a running mesh (`make up`) and tools/bin/ghz (`make tools`).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
GHZ = REPO / "tools" / "bin" / "ghz"
FEATURES = {
    "age": 0.0380759, "sex": 0.0506801, "bmi": 0.0616962, "bp": 0.0218724,
    "s1": -0.0442235, "s2": -0.0348208, "s3": -0.0434008, "s4": -0.0025923,
    "s5": 0.0199075, "s6": -0.0176461,
}  # fmt: skip
PERCENTILES = (50, 90, 99)


def ghz(target: str, call: str, body: dict[str, Any], rps: int, seconds: int) -> dict[str, Any]:
    out = subprocess.run(
        [
            str(GHZ),
            "--insecure",
            "--async",
            f"--rps={rps}",
            f"--duration={seconds}s",
            f"--call={call}",
            f"--data={json.dumps(body)}",
            "--format=json",
            "--connections=1",
            "--concurrency=50",
            target,
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    report: dict[str, Any] = json.loads(out.stdout)
    return report


def summary(report: dict[str, Any]) -> dict[str, float]:
    by_percentage = {d["percentage"]: d["latency"] / 1e6 for d in report["latencyDistribution"]}
    codes = report.get("statusCodeDistribution", {})
    return {
        **{f"p{p}_ms": by_percentage[p] for p in PERCENTILES},
        "count": float(report["count"]),
        "rps": float(report["rps"]),
        "errors": float(sum(n for code, n in codes.items() if code != "OK")),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rps", type=int, default=50)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--state", type=Path, default=REPO / ".run" / "mesh" / "state.json")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "e2e-latency.json")
    args = parser.parse_args()

    state = json.loads(args.state.read_text())
    if "," in state["endpoint"]:
        # ghz (grpc-go) dials one address: it cannot balance over the replicas' list.
        sys.exit(
            f"the mesh runs rendezvous replicas ({state['endpoint']}); ghz dials one "
            "address: measure a mesh with one (tools/bench/replicas.py compares them)"
        )
    model = next(p for p in state["processes"] if p["name"] == "model-diabetes-ridge")
    systems = {
        "direct model call": (model["endpoint"], "rendezvous.v1.ModelService/Predict",
                              {"objective": "demo", "features": FEATURES}),
        "rendezvous (every hop)": (state["endpoint"], "rendezvous.v1.ScoringService/Score",
                                   {"objective": "demo", "features": FEATURES}),
    }  # fmt: skip
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in systems}
    for rep in range(args.reps):
        for name, (target, call, body) in systems.items():
            runs[name].append(summary(ghz(target, call, body, args.rps, args.seconds)))
            print(f"rep {rep + 1}: {name}: {runs[name][-1]}", file=sys.stderr)

    result = {
        "taken": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores",
        "rps": args.rps,
        "seconds_per_rep": args.seconds,
        "reps": args.reps,
        "systems": {
            name: {key: statistics.median(r[key] for r in reps) for key in reps[0]}
            for name, reps in runs.items()
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'system':26} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for name, figures in result["systems"].items():
        print(
            f"{name:26} {figures['p50_ms']:>8.2f} {figures['p90_ms']:>8.2f} "
            f"{figures['p99_ms']:>8.2f} {figures['errors']:>7.0f}"
        )
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
