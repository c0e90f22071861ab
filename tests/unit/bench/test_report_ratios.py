"""The bench report's ratios and issue-15 targets, and S4's process names, on made-up rows."""

from __future__ import annotations

from typing import Any

from tools.bench import report
from tools.bench.rayserve.cluster import ray_process_name

SLA_MS = 50.0


def row(system: str, rate: int, p50: float, p99: float, cpu: float, **extra: Any) -> dict[str, Any]:
    return {
        "system": system,
        "rate": rate,
        "p50_ms": p50,
        "p90_ms": p99,
        "p99_ms": p99,
        "cpu_ms_per_request": cpu,
        "achieved_rps": float(rate),
        "error_share": 0.0,
        "default_share": 0.0,
        **extra,
    }


def result(summary: list[dict[str, Any]], stopped: dict[str, str]) -> dict[str, Any]:
    out = {
        "config": {"rates": sorted({r["rate"] for r in summary}), "sla_ms": SLA_MS},
        "summary": summary,
        "stopped": stopped,
    }
    out["ratios"] = report.ratios(summary)
    out["peer_targets"] = report.peer_targets(out, SLA_MS)
    return out


def targets(res: dict[str, Any], name: str) -> dict[int | None, bool | None]:
    return {t["rate"]: t["met"] for t in res["peer_targets"] if t["target"] == name}


def test_ratios_divide_the_medians_rate_by_rate() -> None:
    summary = [
        row("S0", 100, 1.0, 2.0, 1.0),
        row("S2", 100, 4.0, 10.0, 8.0),
        row("S3", 100, 8.0, 40.0, 12.0),
        row("S4", 100, 6.0, 20.0, 16.0),
    ]
    (entry,) = report.ratios(summary)
    assert entry["S2/S0"] == {"p50_ms": 4.0, "p99_ms": 5.0, "cpu_ms_per_request": 8.0}
    assert entry["S3/S2"] == {"p50_ms": 2.0, "p99_ms": 4.0, "cpu_ms_per_request": 1.5}
    assert entry["S4/S2"] == {"p50_ms": 1.5, "p99_ms": 2.0, "cpu_ms_per_request": 2.0}


def test_a_ratio_is_missing_where_one_system_has_no_figure() -> None:
    (entry,) = report.ratios([row("S2", 250, 4.0, 10.0, 8.0)])
    assert entry["S2/S0"] is None and entry["S4/S2"] is None


def test_s3_target_from_250_up_met_missed_or_won_by_s3_stopping() -> None:
    summary = [
        row("S2", 100, 4.0, 10.0, 8.0),
        row("S3", 100, 8.0, 20.0, 12.0),  # below 250: no target
        row("S2", 250, 5.0, 10.0, 8.0),
        row("S3", 250, 9.0, 31.0, 12.0),  # 3.1x: met
        row("S2", 500, 5.0, 20.0, 8.0),
        row("S3", 500, 9.0, 50.0, 12.0),  # 2.5x: missed
        row("S2", 833, 5.0, 20.0, 8.0),  # S3 stopped before: S2 sustains it, met
    ]
    res = result(summary, {"S3": "default answers 5% at 500 req/s"})
    assert targets(res, "S3/S2 p99 >= 3") == {250: True, 500: False, 833: True}


def test_s3_target_not_measured_when_s2_did_not_sustain_the_rate() -> None:
    summary = [row("S2", 250, 5.0, 10.0, 8.0, default_share=0.5)]
    res = result(summary, {"S2": "default answers 50% at 250 req/s", "S3": "errors"})
    assert targets(res, "S3/S2 p99 >= 3") == {250: None}


def test_s2_must_be_no_worse_than_s4_at_every_rate_s4_sustains() -> None:
    summary = [
        row("S2", 50, 4.0, 10.0, 8.0),
        row("S4", 50, 5.0, 12.0, 9.0),  # S4 worse on all three: met
        row("S2", 100, 4.0, 10.0, 8.0),
        row("S4", 100, 3.0, 12.0, 9.0),  # S4's p50 better: missed
        row("S2", 250, 60.0, 90.0, 8.0, default_share=0.4),
        row("S4", 250, 70.0, 95.0, 9.0),  # S4 sustains, S2 does not: missed
        row("S4", 500, 90.0, 300.0, 9.0),  # S4 does not sustain: no target
    ]
    res = result(summary, {"S2": "default answers 40% at 250 req/s"})
    assert targets(res, "S2 no worse than S4") == {50: True, 100: False, 250: False}
    markdown = "\n".join(report.ratio_section(res))
    assert "S2 no worse than S4 at 100 req/s: **missed** (S4/S2 < 1 for p50 x0.75)" in markdown
    assert "| 50 | - | - | - | - | - | - | 1.25 | 1.20 | 1.12 |" in markdown


def test_s4_target_not_measured_when_s4_sustains_nothing() -> None:
    summary = [row("S2", 50, 4.0, 10.0, 8.0), row("S4", 50, 5.0, 400.0, 9.0)]
    assert targets(result(summary, {}), "S2 no worse than S4") == {None: None}


def test_ray_processes_are_named_stably_whatever_method_they_run() -> None:
    assert ray_process_name(["ray::ServeReplica:s4:router.handle_request"]) == "serve-router"
    assert ray_process_name(["ray::ServeReplica:s4:race-sum"]) == "serve-race-sum"
    assert ray_process_name(["ray::ServeController.listen_for_change"]) == "serve-controller"
    assert ray_process_name(["ray::ProxyActor"]) == "serve-proxy"
    assert ray_process_name(["ray::IDLE"]) == "ray-idle-worker"
    assert ray_process_name(["/x/ray/core/src/ray/raylet/raylet", "--a"]) == "raylet"
    assert ray_process_name(["/x/gcs_server", "--log_dir=/tmp"]) == "gcs_server"
    assert ray_process_name(["python3", "-m", "ray.util.client.server"]) == "ray-client-server"
    assert ray_process_name(["python3", "/v/bin/ray", "start", "--head"]) == "ray-start"
    assert ray_process_name(["python3", "something.py"]) == "ray-other"


def test_the_smoke_tells_shed_calls_from_failed_ones() -> None:
    def smoke(errors: int, kinds: dict[str, int]) -> list[str]:
        rows = [row("S2", 20, 10.0, 30.0, 20.0, errors=errors, error_kinds=kinds)]
        rows[0]["error_share"] = errors / 100
        return report.smoke_problems({"unavailable": {}, "summary": rows}, ["S2"])

    # Two of 100 calls shed while the loop stalled: speed, not sanity.
    assert smoke(2, {"ResourceExhausted": 2}) == []
    # Two of 100 failed otherwise: more than 1 %.
    assert smoke(2, {"Unavailable": 2}) == ["S2 at 20 req/s: 2 errors (2.0%)"]
    # Most calls shed at the smoke's rate: something is wrong.
    assert smoke(30, {"ResourceExhausted": 30}) == ["S2 at 20 req/s: 30 calls shed (30.0%)"]
