"""System D: the demo mesh exactly as `make up` runs it, measured as its user meets it.

A fresh broker and every process of `deploy/mesh/demo.yaml` (enricher and flaky challenger
included) come up through `rendezvous up`; the first request is sent the moment that command
returns, by an independent open-loop client (`tools.bench.userview`), with no warm-up of the
harness's own. Then, after `warm_s` of unrecorded traffic, the same client measures the warm
mesh at each rate. Every run reports the default share, client-side p50/p90/p99/max, the
share of answers later than SLA + 10 ms at the client, and CPU per request per process
(broker included); the first run also per `window_s` slice.

The broker must be this checkout's own and must start cold, so D runs before the other
systems, while no broker of the checkout is up (otherwise it says why it is not available).
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tools.bench.environment import REPO, _running_broker_pid, log
from tools.bench.userview import drive, mesh_pids

DEMO_MESH = REPO / "deploy" / "mesh" / "demo.yaml"
DEMO_ENDPOINT = "127.0.0.1:50051"
DEMO_SLA_MS = 50.0  # deploy/mesh/demo.yaml


@dataclass
class DemoPlan:
    """What D measures: the first run right after `up`, then the warm rates."""

    first_rate: float
    first_s: float
    window_s: float
    warm_s: float
    warm_rate: float
    rates: list[int]
    seconds: float


def _cli(state_dir: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "--state-dir", str(state_dir), *args],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


async def measure_demo(plan: DemoPlan, work_dir: Path) -> dict[str, Any]:
    """D's record, or {"unavailable": why}."""
    if _running_broker_pid() is not None:
        return {"unavailable": "a broker of this checkout is already up; D needs a cold one"}
    state_dir = work_dir / "demo"
    started = time.monotonic()
    up = _cli(state_dir, "up", "--mesh", str(DEMO_MESH), timeout=600)
    up_s = time.monotonic() - started
    try:
        if up.returncode != 0:
            return {"unavailable": f"rendezvous up failed: {up.stderr[-400:]}"}
        log(f"D: `rendezvous up` returned after {up_s:.1f} s; measuring at once")
        pids = mesh_pids(state_dir)
        first = await drive(
            DEMO_ENDPOINT,
            "demo",
            rate=plan.first_rate,
            seconds=plan.first_s,
            sla_ms=DEMO_SLA_MS,
            pids=pids,
        )
        record: dict[str, Any] = {
            "up_s": up_s,
            "warmup": _warmup_facts(state_dir),
            "first": {"rate": plan.first_rate, **first.record(plan.window_s)},
            "warm": [],
        }
        _log("D first", record["first"])
        if plan.warm_s > 0:
            log(f"D: {plan.warm_s:g} s of unrecorded traffic at {plan.warm_rate:g} req/s")
            await drive(
                DEMO_ENDPOINT, "demo", rate=plan.warm_rate, seconds=plan.warm_s, sla_ms=DEMO_SLA_MS
            )
        for rate in plan.rates:
            view = await drive(
                DEMO_ENDPOINT,
                "demo",
                rate=rate,
                seconds=plan.seconds,
                sla_ms=DEMO_SLA_MS,
                pids=pids,
            )
            run = {"rate": rate, **view.record(plan.window_s)}
            run.pop("windows")
            record["warm"].append(run)
            _log(f"D warm {rate} req/s", run)
        return record
    finally:
        _cli(state_dir, "down", timeout=120)


def _warmup_facts(state_dir: Path) -> dict[str, Any]:
    """The rendezvous' own account of its warm-up (from `rendezvous status --json`)."""
    import json

    status = _cli(state_dir, "status", "--json", timeout=30)
    try:
        state = json.loads(status.stdout)
    except ValueError:
        return {}
    for process in state.get("processes", []):
        if process.get("warmup"):
            facts: dict[str, Any] = process["warmup"]
            return facts
    return {}


def _log(what: str, run: dict[str, Any]) -> None:
    log(
        f"{what}: default {run['default_share']:.2%}, late {run['late_share']:.2%}, "
        f"p50 {run['p50_ms']:.1f} p99 {run['p99_ms']:.1f} max {run['max_ms']:.1f} ms, "
        f"CPU {run['cpu_ms_per_request']:.2f} ms/req"
    )


def smoke_problems(record: dict[str, Any]) -> list[str]:
    """What makes D's smoke figures incomplete or insane (never an absolute speed)."""
    if "unavailable" in record:
        return [f"D: not available ({record['unavailable']})"]
    problems = []
    for name, run in [
        ("first", record["first"]),
        *((f"warm {r['rate']}", r) for r in record["warm"]),
    ]:
        if not run["answered"]:
            problems.append(f"D {name}: nothing answered")
            continue
        if sum(run["errors"].values()) > 0.01 * run["requests"]:
            problems.append(f"D {name}: errors {run['errors']}")
        if not 0 < run["p50_ms"] <= run["p90_ms"] <= run["p99_ms"] <= run["max_ms"]:
            problems.append(f"D {name}: latency quantiles missing or out of order")
        if run["cpu_ms_per_request"] <= 0:
            problems.append(f"D {name}: no CPU time measured")
        if run["default_share"] is None or run["default_share"] >= 1.0:
            problems.append(f"D {name}: every answer was the default")
    return problems
