"""Results: medians over reps, the machine they were taken on, JSON, markdown and a chart."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

FIGURES = ("p50_ms", "p90_ms", "p99_ms", "achieved_rps", "error_share", "default_share",
           "cpu_ms_per_request")  # fmt: skip
MAX_ERROR_SHARE = 0.01
# A system answering more than this share by default is not keeping up, whatever its latency.
MAX_DEFAULT_SHARE = 0.01
MIN_RATE_SHARE = 0.9
# The status a rendezvous sheds with (a request it cannot answer within the SLA, its loop
# stalled): in a smoke on a busy machine a few are speed, which the smoke never judges; most
# calls shed at the smoke's low rate are not.
SHED_KIND = "ResourceExhausted"
SMOKE_MAX_SHED_SHARE = 0.1
# The comparisons that stand on any machine (issue 15): numerator / denominator system.
RATIOS = (("S2", "S0"), ("S3", "S2"), ("S4", "S2"))
RATIO_FIGURES = ("p50_ms", "p99_ms", "cpu_ms_per_request")
# S3 / S2 p99 must be at least this from this rate up.
S3_P99_RATIO = 3.0
S3_FROM_RATE = 250
# What S2 does on each request that S4 (Ray Serve, as the bench runs it) does not.
S4_DOES_NOT = (
    "archive: S2's decoy puts every task, PII redacted, on the objective's archive topic "
    "(durable, replayable); S4 keeps no record of the requests",
    "publish outcomes: S2 sends every model's prediction and the decision of each request "
    "to Pulsar, where the collector delivers them (the evaluator's input); S4's router only "
    "counts predictions and answers in its memory (lost with the replica)",
    "go through a broker: S2's tasks and predictions are Pulsar messages (a model that fails "
    "mid-task gets it redelivered); S4's are calls between Ray replicas (actor calls, or "
    "gRPC in Serve's high-throughput mode), lost with a failed replica",
    "shed load: S2 answers RESOURCE_EXHAUSTED when it cannot run the race within the SLA; "
    "S4 queues (Serve's max_ongoing_requests), and a late request is late",
    "validate requests against the objective's declared features, honour a client deadline "
    "shorter than the SLA, subject consent, live configuration changes, A/B shares, TLS and "
    "tokens; none of these is exercised by the bench's requests",
)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine(pulsar_version: str, ghz_version: str) -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem_kib / 2**20, 1),
        "cpu_model": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpcio": _version("grpcio"),
        "pulsar_client": _version("pulsar-client"),
        "pulsar": pulsar_version,
        "ghz": ghz_version,
    }


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median of the reps per system and rate."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["system"], run["rate"]), []).append(run)
    rows = []
    for (system, rate), reps in sorted(groups.items()):
        row: dict[str, Any] = {"system": system, "rate": rate, "reps": len(reps)}
        for key in FIGURES:
            values = [r[key] for r in reps if r[key] is not None]
            row[key] = statistics.median(values) if values else None
        row["errors"] = sum(r["errors"] for r in reps)
        kinds: dict[str, int] = {}
        for rep in reps:
            for kind, count in (rep.get("error_kinds") or {}).items():
                kinds[kind] = kinds.get(kind, 0) + count
        row["error_kinds"] = kinds
        rows.append(row)
    return rows


def failed_level(row: dict[str, Any], rate: int, sla_ms: float) -> str | None:
    """Why a system's median at this rate fails the level, or None (it sustains the rate)."""
    if row["error_share"] is not None and row["error_share"] > MAX_ERROR_SHARE:
        return f"errors {row['error_share']:.1%} at {rate} req/s"
    if row["default_share"] is not None and row["default_share"] > MAX_DEFAULT_SHARE:
        return f"default answers {row['default_share']:.1%} at {rate} req/s"
    if row["p99_ms"] is not None and row["p99_ms"] > 2 * sla_ms:
        return f"p99 {row['p99_ms']:.1f} ms > {2 * sla_ms:g} ms at {rate} req/s"
    if (row["achieved_rps"] or 0.0) < MIN_RATE_SHARE * rate:
        return f"achieved {row['achieved_rps']:.1f} req/s of {rate}"
    return None


def ratios(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per rate, S2/S0, S3/S2 and S4/S2 of p50, p99 and CPU per request (None where one of
    the two has no figure at that rate)."""
    out = []
    for rate in sorted({r["rate"] for r in summary}):
        entry: dict[str, Any] = {"rate": rate}
        for top, bottom in RATIOS:
            a, b = _row(summary, top, rate), _row(summary, bottom, rate)
            entry[f"{top}/{bottom}"] = (
                None
                if a is None or b is None
                else {
                    key: a[key] / b[key] if a[key] is not None and b[key] else None
                    for key in RATIO_FIGURES
                }
            )
        out.append(entry)
    return out


def peer_targets(result: dict[str, Any], sla_ms: float) -> list[dict[str, Any]]:
    """Issue 15's two targets, rate by rate: S3/S2 p99 >= 3 at 250 req/s and above; S2 no
    worse than S4 (p50, p99 and CPU per request each <= S4's, and S2 sustains the rate) at
    every rate S4 sustains. Each entry: target, rate, met (True, False, None: not
    measured) and why."""
    summary, stopped = result["summary"], result["stopped"]

    def sustained(row: dict[str, Any] | None, rate: int) -> bool:
        return row is not None and failed_level(row, rate, sla_ms) is None

    out: list[dict[str, Any]] = []
    for rate in result["config"]["rates"]:
        if rate < S3_FROM_RATE:
            continue
        s2, s3 = _row(summary, "S2", rate), _row(summary, "S3", rate)
        entry: dict[str, Any] = {"target": "S3/S2 p99 >= 3", "rate": rate}
        if s2 is not None and s3 is not None:
            ratio = s3["p99_ms"] / s2["p99_ms"] if s2["p99_ms"] else None
            entry["met"] = ratio is not None and ratio >= S3_P99_RATIO
            entry["why"] = f"S3/S2 p99 = {_fmt(ratio, '.2f')}"
        elif s3 is None and "S3" in stopped and sustained(s2, rate):
            entry["met"] = True
            entry["why"] = f"S3 stopped climbing ({stopped['S3']}); S2 sustains {rate} req/s"
        else:
            entry["met"] = None
            entry["why"] = "not measured: " + (
                f"S2 stopped climbing ({stopped['S2']})" if "S2" in stopped else "no figures"
            )
        out.append(entry)
    for rate in result["config"]["rates"]:
        s2, s4 = _row(summary, "S2", rate), _row(summary, "S4", rate)
        if not sustained(s4, rate):
            continue
        entry = {"target": "S2 no worse than S4", "rate": rate}
        if not sustained(s2, rate):
            entry["met"] = False
            entry["why"] = f"S4 sustains {rate} req/s, S2 does not"
        else:
            assert s2 is not None and s4 is not None
            worse = [
                f"{key.removesuffix('_ms')} x{s4[key] / s2[key]:.2f}"
                for key in RATIO_FIGURES
                if s2[key] and s4[key] is not None and s4[key] / s2[key] < 1.0
            ]
            entry["met"] = not worse
            entry["why"] = "S4/S2 " + (
                "< 1 for " + ", ".join(worse) if worse else ">= 1 for p50, p99 and CPU per request"
            )
        out.append(entry)
    ran_s4 = any(r["system"] == "S4" for r in summary)
    if ran_s4 and not any(t["target"] == "S2 no worse than S4" for t in out):
        why = "S4 sustains none of the rates"
        out.append({"target": "S2 no worse than S4", "rate": None, "met": None, "why": why})
    return out


def _verdict(met: bool | None) -> str:
    return {True: "**met**", False: "**missed**", None: "not measured"}[met]


def ratio_section(result: dict[str, Any]) -> list[str]:
    """The ratios table and the issue-15 targets, each met or missed."""
    header = " | ".join(f"{top}/{bottom} {label}" for top, bottom in RATIOS
                        for label in ("p50", "p99", "CPU"))  # fmt: skip
    lines = [
        "## Ratios (issue 15)",
        "",
        "Medians divided, rate by rate; CPU is CPU ms per answered request. Above 1: the first "
        "system is slower or costs more. `-`: one of the two has no figure at that rate.",
        "",
        f"| req/s | {header} |",
        "|---:|" + "---:|" * (3 * len(RATIOS)),
    ]
    for entry in result.get("ratios") or []:
        cells = []
        for top, bottom in RATIOS:
            pair = entry[f"{top}/{bottom}"] or {}
            cells += [_fmt(pair.get(key), ".2f") for key in RATIO_FIGURES]
        lines.append(f"| {entry['rate']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Targets: S3/S2 p99 >= {S3_P99_RATIO:g} at {S3_FROM_RATE} req/s and above; S2 no worse "
        "than S4 (S4/S2 >= 1 for p50, p99 and CPU per request, and S2 sustains the rate) at "
        "every rate S4 sustains (a rate is sustained when errors and default answers are "
        "<= 1 %, p99 <= 2x SLA and >= 90 % of the rate is achieved).",
        "",
    ]
    for target in result.get("peer_targets") or []:
        at = f" at {target['rate']} req/s" if target["rate"] is not None else ""
        lines.append(f"- {target['target']}{at}: {_verdict(target['met'])} ({target['why']})")
    return lines


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# Benchmark results",
        "",
        f"Taken {m['date']} on {m['cores']} cores ({m['cpu_model']}), {m['memory_gib']} GiB, "
        f"Linux {m['kernel']}; Python {m['python']}, grpcio {m['grpcio']}, "
        f"pulsar-client {m['pulsar_client']}, Apache Pulsar {m['pulsar']}, ghz {m['ghz']}"
        f"{', Ray ' + m['ray'] if m.get('ray') not in (None, 'not run') else ''}.",
        "",
        f"Open loop, {result['config']['duration_s']:g} s per run after "
        f"{result['config'].get('warmup_s', 0):g} s of unrecorded warm-up per system at "
        f"{result['config'].get('warmup_rate', 0)} req/s, "
        f"{result['config']['reps']} "
        f"rep(s) per rate, systems interleaved rep by rep; every figure is the median of the reps. "
        f"A system stops climbing after a level with errors > 1 %, default answers > 1 %, p99 > "
        f"{2 * result['config']['sla_ms']:g} ms (2x SLA) or an achieved rate < 90 % of the target. "
        "CPU is utime+stime from /proc of every process on the system's path (its models, "
        "runners, decoy, enricher, rendezvous, collector, the broker; S0: the model container "
        "only; S4: every Ray process, i.e. GCS, raylet and its agents, the Serve controller, "
        "proxy and replicas, idle workers), the load generator excluded, divided by the "
        "answered requests.",
        "",
    ]
    for name, text in result["systems"].items():
        lines.append(f"- **{name}**: {text}")
    for name, why in result["unavailable"].items():
        lines.append(f"- **{name}: not available** ({why}); no figures.")
    lines += [
        "",
        "| system | target req/s | achieved req/s | p50 ms | p90 ms | p99 ms | errors | "
        "default answers | CPU ms/request |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["summary"]:
        lines.append(
            f"| {row['system']} | {row['rate']} | {_fmt(row['achieved_rps'], '.1f')} | "
            f"{_fmt(row['p50_ms'], '.2f')} | {_fmt(row['p90_ms'], '.2f')} | "
            f"{_fmt(row['p99_ms'], '.2f')} | {row['errors']} | "
            f"{_fmt(row['default_share'], '.2f', 100)} % | "
            f"{_fmt(row['cpu_ms_per_request'], '.2f')} |"
        )
    if result.get("demo") and "unavailable" not in result["demo"]:
        lines += ["", *demo_section(result["demo"])]
    if result["stopped"]:
        lines += ["", "Stopped climbing:"]
        lines += [f"- {name}: {why}" for name, why in result["stopped"].items()]
    lines += ["", "Targets (issue 4):", *[f"- {line}" for line in targets(result["summary"])]]
    if result.get("ratios"):
        lines += ["", *ratio_section(result)]
    if "S4" in result["systems"]:
        lines += ["", *s4_section(result)]
    lines += ["", *cpu_breakdown(result["runs"])]
    lines += ["", "![latency against achieved rate](latest.png)", ""]
    return "\n".join(lines)


def s4_section(result: dict[str, Any]) -> list[str]:
    """How S4 runs, and what it does not do that S2 does (the comparison's asymmetry)."""
    ray = result["machine"].get("ray", "unknown")
    config = result["config"].get("s4") or {}
    mode = (
        "Serve's high-throughput mode (RAY_SERVE_THROUGHPUT_OPTIMIZED=1: gRPC between "
        "deployments, user code on the replica's loop, direct ingress, so the router's "
        "replica serves the gRPC port itself; Serve's proxy still runs, idle, and counts)"
        if config.get("throughput_optimized")
        else "Serve's default mode (Ray actor calls between deployments, the proxy in front)"
    )
    return [
        "## S4: Ray Serve",
        "",
        f"Ray {ray}, its own head per run (`ray start --head --num-cpus 2`, loopback, no "
        "dashboard). Each of bench-race's four models is a Serve deployment running the "
        "model class its S2 container runs; the router deployment sends each request to all "
        "four through DeploymentHandles and races them with `asyncio.wait` under the "
        "objective's own policy (the same steps, accept lists, SLA and default: "
        "`services.rendezvous.policy`). Serve's gRPC ingress serves our ScoringService, so "
        "ghz sends S4 the very requests it sends S2. Every model scores every request, as in "
        "S2; predictions after the answer are awaited up to the late grace and counted.",
        "",
        f"Run in {mode}; {config.get('replica_num_cpus', '?')} CPU reserved per replica, "
        f"max_ongoing_requests {config.get('router_max_ongoing_requests', '?')} (router) and "
        f"{config.get('model_max_ongoing_requests', '?')} (models), access log "
        f"{'on' if config.get('access_log') else 'off'}.",
        "",
        "What S2 does on every request that S4 does not (so S4 does less work per request):",
        "",
        *[f"- {item}" for item in S4_DOES_NOT],
    ]


def demo_section(demo: dict[str, Any]) -> list[str]:
    """D: the first run after `rendezvous up` (and its slices), the warm runs, the targets."""
    warmup = demo.get("warmup") or {}
    lines = [
        "## D: the demo mesh as `make up` runs it",
        "",
        f"`rendezvous up` returned after {demo['up_s']:.1f} s (broker start, every process, the "
        f"rendezvous' warm-up: {warmup.get('state', '?')}, {warmup.get('sent', '?')} requests in "
        f"{warmup.get('seconds', 0):.1f} s); the first request left the moment it returned. "
        "Client-side figures from an independent open-loop client; late = answered later than "
        "SLA + 10 ms at the client.",
        "",
        "| run | req/s | requests | default answers | late | p50 ms | p90 ms | p99 ms | max ms | "
        "CPU ms/request |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    runs = [("first after up", demo["first"]), *(("warm", r) for r in demo["warm"])]
    for name, run in runs:
        lines.append(
            f"| {name} | {run['rate']:g} | {run['requests']} | "
            f"{100 * (run['default_share'] or 0):.2f} % | {100 * (run['late_share'] or 0):.2f} % | "
            f"{run['p50_ms']:.1f} | {run['p90_ms']:.1f} | {run['p99_ms']:.1f} | "
            f"{run['max_ms']:.1f} | {run['cpu_ms_per_request']:.2f} |"
        )
    windows = demo["first"].get("windows") or []
    if windows:
        slices = ", ".join(
            f"{w['from_s']:g} s: {100 * (w['default_share'] or 0):.1f} % / p99 {w['p99_ms']:.0f}"
            for w in windows
        )
        lines += ["", f"First run by slice (default share / p99 ms): {slices}."]
    first = demo["first"]
    lines += [
        "",
        "Targets (the SLA issue):",
        f"- from the first request after `make up`, {first['rate']:g} req/s: "
        f"{100 * (first['default_share'] or 0):.2f} % defaults (<= 0.1 %: "
        f"**{'met' if (first['default_share'] or 0) <= 0.001 else 'missed'}**)",
    ]
    for run in demo["warm"]:
        if run["rate"] != 100:
            continue
        ok = (
            (run["default_share"] or 0) <= 0.001
            and run["p99_ms"] <= 50.0
            and (run["late_share"] or 0) <= 0.001
        )
        lines.append(
            f"- warm, 100 req/s: {100 * (run['default_share'] or 0):.2f} % defaults, p99 "
            f"{run['p99_ms']:.1f} ms, {100 * (run['late_share'] or 0):.2f} % late (<= 0.1 %, "
            f"<= 50 ms, <= 0.1 %: **{'met' if ok else 'missed'}**)"
        )
    by_process = demo["first"].get("cpu_ms_per_request_by_process") or {}
    parts = [f"{n} {v:.2f}" for n, v in sorted(by_process.items(), key=lambda kv: -kv[1])]
    lines += ["", "Where the CPU goes in the first run (ms per request): " + ", ".join(parts)]
    return lines


def _row(summary: list[dict[str, Any]], system: str, rate: int) -> dict[str, Any] | None:
    return next((r for r in summary if r["system"] == system and r["rate"] == rate), None)


def targets(summary: list[dict[str, Any]]) -> list[str]:
    """Each target of the issue against the medians: the figure, the bound, met or missed."""
    out = []
    floor = _row(summary, "S0", 100)
    for system in ("S1", "S2"):
        row = _row(summary, system, 100)
        if floor is None or row is None:
            continue
        p50 = row["p50_ms"] - floor["p50_ms"]
        p99 = row["p99_ms"] - floor["p99_ms"]
        out.append(
            f"{system} overhead over S0 at 100 req/s: p50 {p50:.2f} ms (<= 3: "
            f"**{'met' if p50 <= 3.0 else 'missed'}**), p99 {p99:.2f} ms (<= 10: "
            f"**{'met' if p99 <= 10.0 else 'missed'}**)"
            + ("" if system == "S1" else " (the target is S1's; S2 for reference)")
        )
    race = _row(summary, "S2", 833)
    if race is None:
        passed = [
            r["rate"]
            for r in summary
            if r["system"] == "S2" and (r["default_share"] or 0.0) < 0.001 and r["p99_ms"] < 50.0
        ]
        best = f"; highest level inside the target's bounds: {max(passed)} req/s" if passed else ""
        out.append(f"S2 at 833 req/s: not reached (**missed**){best}")
    else:
        share = race["default_share"] or 0.0
        ok = race["p99_ms"] < 50.0 and share < 0.001 and race["achieved_rps"] >= 0.9 * 833
        out.append(
            f"S2 at 833 req/s: achieved {race['achieved_rps']:.0f} req/s, p99 "
            f"{race['p99_ms']:.1f} ms (< 50), default answers {100 * share:.2f} % (< 0.1): "
            f"**{'met' if ok else 'missed'}**"
        )
    return out


def cpu_breakdown(runs: list[dict[str, Any]]) -> list[str]:
    """Per system, at the highest rate it ran: CPU ms per request of each process (median
    of the reps), the largest first."""
    lines = ["Where the CPU goes (ms per request, at each system's highest rate):", ""]
    for system in sorted({r["system"] for r in runs}):
        top = max(r["rate"] for r in runs if r["system"] == system)
        reps = [
            r["cpu_ms_per_request_by_process"]
            for r in runs
            if r["system"] == system and r["rate"] == top and "cpu_ms_per_request_by_process" in r
        ]
        if not reps:
            continue
        names = sorted({n for rep in reps for n in rep})
        medians = {n: statistics.median(rep.get(n, 0.0) for rep in reps) for n in names}
        parts = [f"{n} {v:.2f}" for n, v in sorted(medians.items(), key=lambda kv: -kv[1])]
        lines.append(f"- {system} at {top} req/s: " + ", ".join(parts))
    return lines


def chart(result: dict[str, Any], path: Path) -> None:
    """p50 (solid) and p99 (dashed) against the achieved rate, one colour per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5), dpi=110)
    for index, system in enumerate(sorted({r["system"] for r in result["summary"]})):
        rows = [r for r in result["summary"] if r["system"] == system and r["p50_ms"] is not None]
        x = [r["achieved_rps"] for r in rows]
        colour = f"C{index}"
        axes.plot(x, [r["p50_ms"] for r in rows], "o-", color=colour, label=f"{system} p50")
        axes.plot(x, [r["p99_ms"] for r in rows], "s--", color=colour, label=f"{system} p99")
    axes.axhline(result["config"]["sla_ms"], color="grey", linewidth=0.8, linestyle=":")
    axes.set_yscale("log")
    axes.set_xlabel("achieved requests per second")
    axes.set_ylabel("latency (ms, log scale)")
    m = result["machine"]
    axes.set_title(f"Latency against rate ({m['cores']} cores, {m['date'][:10]})")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small", ncol=2)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def smoke_problems(result: dict[str, Any], systems: list[str]) -> list[str]:
    """What makes a smoke run incomplete or insane (never an absolute speed)."""
    problems = [f"{name}: not available ({why})" for name, why in result["unavailable"].items()]
    for name in systems:
        if name in result["unavailable"]:
            continue
        rows = [r for r in result["summary"] if r["system"] == name]
        if not rows:
            problems.append(f"{name}: no figures")
            continue
        for row in rows:
            where = f"{name} at {row['rate']} req/s"
            # A stray call failing on a busy machine is noise; more than 1 % is not. Shed
            # calls are counted apart (SHED_KIND).
            errors = row["errors"] or 0
            shed = (row.get("error_kinds") or {}).get(SHED_KIND, 0)
            share = row["error_share"] or 0.0
            failed_share = share * (errors - shed) / errors if errors else 0.0
            shed_share = share * shed / errors if errors else 0.0
            if failed_share > MAX_ERROR_SHARE:
                problems.append(f"{where}: {errors - shed} errors ({failed_share:.1%})")
            if shed_share > SMOKE_MAX_SHED_SHARE:
                problems.append(f"{where}: {shed} calls shed ({shed_share:.1%})")
            if not row["p50_ms"] or not (row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]):
                problems.append(f"{where}: latency quantiles missing or out of order")
            if not row["achieved_rps"]:
                problems.append(f"{where}: nothing answered")
            if not row["cpu_ms_per_request"] or row["cpu_ms_per_request"] <= 0:
                problems.append(f"{where}: no CPU time measured")
            if name != "S0":
                share = row["default_share"]
                if share is None:
                    problems.append(f"{where}: default share unknown")
                elif share >= 1.0:
                    problems.append(f"{where}: every answer was the default")
    return problems
