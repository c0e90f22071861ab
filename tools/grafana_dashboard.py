"""Writes the Grafana dashboard of a Rendezvous mesh: deploy/grafana/rendezvous.json.

The dashboard is built here, panel by panel, from the metrics the code exports
(docs/observability.md lists them); the JSON is what Grafana imports (Dashboards > New >
Import), with the Prometheus data source as a variable (`datasource`) and the objectives as
another (`objective`). `tests/unit/test_dashboard.py` checks the committed JSON is what this
script writes; `tests/integration/test_metrics.py` checks every metric it reads is exported
by a running mesh. Edit here, then:

    .venv/bin/python tools/grafana_dashboard.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "deploy" / "grafana" / "rendezvous.json"

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "[$__rate_interval]"
OBJ = 'objective=~"$objective"'
# Panels per row, and their size in Grafana's 24-column grid.
WIDTH, HEIGHT = 8, 8


def target(expr: str, legend: str) -> dict[str, Any]:
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend}


def quantiles(
    metric: str, by: str, selector: str = "", qs: tuple[float, ...] = (0.5, 0.99)
) -> list[dict[str, Any]]:
    """histogram_quantile of `metric`'s buckets per `by`, one target per quantile."""
    legend = " ".join(f"{{{{{label.strip()}}}}}" for label in by.split(","))
    matchers = f"{{{selector}}}" if selector else ""
    return [
        target(
            f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{matchers}{RATE})))",
            f"p{round(q * 100)} {legend}",
        )
        for q in qs
    ]


def panel(
    title: str,
    description: str,
    targets: list[dict[str, Any]],
    unit: str,
    *,
    stack: bool = False,
    threshold: float | None = None,
    dashed: str | None = None,
) -> dict[str, Any]:
    """A time series panel. `threshold` draws a red line (what docs/observability.md says to
    alert on); `dashed` draws the series whose legend starts with it dashed (the SLA)."""
    defaults: dict[str, Any] = {
        "unit": unit,
        "min": 0,
        "custom": {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 20 if stack else 0,
            "showPoints": "never",
            "spanNulls": True,
            "stacking": {"mode": "normal" if stack else "none", "group": "A"},
        },
    }
    if threshold is not None:
        defaults["thresholds"] = {
            "mode": "absolute",
            "steps": [{"color": "green", "value": None}, {"color": "red", "value": threshold}],
        }
        defaults["custom"]["thresholdsStyle"] = {"mode": "line"}
    overrides: list[dict[str, Any]] = []
    if dashed is not None:
        overrides.append(
            {
                "matcher": {"id": "byRegexp", "options": f"^{dashed}.*"},
                "properties": [
                    {
                        "id": "custom.lineStyle",
                        "value": {"fill": "dash", "dash": [10, 10]},
                    },
                    {"id": "color", "value": {"mode": "fixed", "fixedColor": "red"}},
                ],
            }
        )
    for ref, one in zip("ABCDEFGH", targets, strict=False):
        one["refId"] = ref
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "fieldConfig": {"defaults": defaults, "overrides": overrides},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": targets,
    }


def rows() -> list[tuple[str, list[dict[str, Any]]]]:
    answers = f"rdv_answers_total{{{OBJ}}}"
    return [
        (
            "Answers",
            [
                panel(
                    "Answer rate by objective",
                    "Score answers per second (rdv_answers_total): models and the default.",
                    [target(f"sum by (objective) (rate({answers}{RATE}))", "{{objective}}")],
                    "reqps",
                ),
                panel(
                    "Default share by objective",
                    "The share of answers that were the objective's default (no acceptable "
                    "model in time, dispatch failed, or the client's deadline). Alert when it "
                    "stays above its usual level.",
                    [
                        target(
                            "sum by (objective) (rate(rdv_answers_total"
                            f'{{{OBJ}, source="ANSWER_SOURCE_DEFAULT"}}{RATE}))'
                            f" / sum by (objective) (rate({answers}{RATE}))",
                            "{{objective}}",
                        )
                    ],
                    "percentunit",
                    threshold=0.05,
                ),
                panel(
                    "Answers by model and role",
                    "Who answered: each model with its role in the deciding version, and "
                    "the default (model default).",
                    [
                        target(
                            f"sum by (objective, model, role) (rate({answers}{RATE}))",
                            "{{objective}} {{model}} {{role}}",
                        )
                    ],
                    "reqps",
                    stack=True,
                ),
            ],
        ),
        (
            "Latency against the SLA",
            [
                panel(
                    "Score latency p50 / p99 against the SLA",
                    "Time to answer as the rendezvous measured it, from the request's "
                    "arrival (rdv_answer_latency_seconds), against each objective's SLA "
                    "(rdv_objective_sla_seconds, dashed). A p99 above the SLA means answers "
                    "left late: the event loop or the CPU, not the models.",
                    [
                        *quantiles("rdv_answer_latency_seconds", "objective", OBJ),
                        target(
                            f"max by (objective) (rdv_objective_sla_seconds{{{OBJ}}})",
                            "SLA {{objective}}",
                        ),
                    ],
                    "s",
                    dashed="SLA",
                ),
                panel(
                    "Score calls as the gRPC server saw them",
                    "rdv_grpc_server_handling_seconds of ScoringService/Score: the handler's "
                    "whole time, validation and shed calls included.",
                    quantiles(
                        "rdv_grpc_server_handling_seconds",
                        "grpc_method",
                        'grpc_service="rendezvous.v1.ScoringService", grpc_method="Score"',
                    ),
                    "s",
                ),
                panel(
                    "Arrival latency per model (p50 / p99)",
                    "When each model's prediction reached its mailbox, from the request's "
                    "arrival (rdv_arrival_latency_seconds), late ones included: the path "
                    "(two broker hops) plus the model.",
                    [
                        *quantiles("rdv_arrival_latency_seconds", "objective, model", OBJ),
                        target(f"max(rdv_objective_sla_seconds{{{OBJ}}})", "SLA"),
                    ],
                    "s",
                    dashed="SLA",
                ),
                panel(
                    "Late predictions per model",
                    "Predictions that reached their mailbox after the answer "
                    "(rdv_late_predictions_total): recorded in the outcome, never answered.",
                    [
                        target(
                            "sum by (objective, model) "
                            f"(rate(rdv_late_predictions_total{{{OBJ}}}{RATE}))",
                            "{{objective}} {{model}}",
                        )
                    ],
                    "reqps",
                    stack=True,
                ),
                panel(
                    "Deliveries by status",
                    "Predictions the collector delivered (rdv_deliveries_total): accepted, "
                    "late, duplicate (at-least-once), unknown mailbox (closed, or from "
                    "before a restart).",
                    [target(f"sum by (status) (rate(rdv_deliveries_total{RATE}))", "{{status}}")],
                    "reqps",
                    stack=True,
                ),
                panel(
                    "Shed calls and failed dispatches",
                    "RESOURCE_EXHAUSTED by reason (in_flight: max_in_flight reached; behind: "
                    "the loop left too little of the SLA) and tasks the broker did not take "
                    "in time (answered by the default).",
                    [
                        target(
                            f"sum by (objective, why) (rate(rdv_shed_total{{{OBJ}}}{RATE}))",
                            "shed {{objective}} {{why}}",
                        ),
                        target(
                            "sum by (objective) "
                            f"(rate(rdv_dispatch_failures_total{{{OBJ}}}{RATE}))",
                            "dispatch failed {{objective}}",
                        ),
                    ],
                    "reqps",
                ),
            ],
        ),
        (
            "Mailboxes and outcomes",
            [
                panel(
                    "Open mailboxes",
                    "Awaiting their answer, and answered but open for late predictions "
                    "(the late grace): rdv_mailboxes.",
                    [target("sum by (state) (rdv_mailboxes)", "{{state}}")],
                    "short",
                ),
                panel(
                    "Outcome backlog",
                    "Outcomes waiting for the broker's receipt (rdv_outcome_backlog), held "
                    "across an outage. Growing: the results topic is not taking them.",
                    [target("sum(rdv_outcome_backlog)", "backlog")],
                    "short",
                    threshold=100,
                ),
                panel(
                    "Outcomes published and taken by the evaluator",
                    "rdv_outcomes_total (published, failed) against rdv_evaluator_outcomes_"
                    "total: the evaluator keeping up with the results topics.",
                    [
                        target(f"sum by (result) (rate(rdv_outcomes_total{RATE}))", "{{result}}"),
                        target(
                            "sum by (objective) "
                            f"(rate(rdv_evaluator_outcomes_total{{{OBJ}}}{RATE}))",
                            "evaluator {{objective}}",
                        ),
                    ],
                    "reqps",
                ),
            ],
        ),
        (
            "gRPC servers (every process)",
            [
                panel(
                    "Calls by method",
                    "rdv_grpc_server_handled_total of every server of the mesh, by method.",
                    [
                        target(
                            "sum by (grpc_service, grpc_method) "
                            f"(rate(rdv_grpc_server_handled_total{RATE}))",
                            "{{grpc_service}}/{{grpc_method}}",
                        )
                    ],
                    "reqps",
                ),
                panel(
                    "Errors by code per method",
                    "Every status but OK, by method and code. INVALID_ARGUMENT and NOT_FOUND "
                    "are the callers'; INTERNAL, UNAVAILABLE and RESOURCE_EXHAUSTED are ours.",
                    [
                        target(
                            "sum by (grpc_method, grpc_code) "
                            f'(rate(rdv_grpc_server_handled_total{{grpc_code!="OK"}}{RATE}))',
                            "{{grpc_method}} {{grpc_code}}",
                        )
                    ],
                    "reqps",
                    stack=True,
                ),
                panel(
                    "Unary call latency p99 by method",
                    "rdv_grpc_server_handling_seconds of unary calls (a stream's time is how "
                    "long it stayed open).",
                    quantiles(
                        "rdv_grpc_server_handling_seconds",
                        "grpc_service, grpc_method",
                        'grpc_type="unary"',
                        qs=(0.99,),
                    ),
                    "s",
                ),
                panel(
                    "Calls in flight by method",
                    "rdv_grpc_server_in_flight: open streams included (the collector's "
                    "Deliver stream is 1 while it is connected).",
                    [
                        target(
                            "sum by (grpc_service, grpc_method) (rdv_grpc_server_in_flight)",
                            "{{grpc_service}}/{{grpc_method}}",
                        )
                    ],
                    "short",
                ),
            ],
        ),
        (
            "Runners and models",
            [
                panel(
                    "Runner backlog",
                    "Tasks waiting in the runner hosts' subscriptions (the broker's "
                    "pulsar_subscription_back_log: the autoscaling signal) and tasks queued "
                    "in a runner for a free model-call slot (rdv_runner_queued).",
                    [
                        target(
                            "sum by (topic, subscription) "
                            '(pulsar_subscription_back_log{subscription=~"runners.*"})',
                            "{{topic}} {{subscription}}",
                        ),
                        target("sum by (model) (rdv_runner_queued)", "queued {{model}}"),
                    ],
                    "short",
                ),
                panel(
                    "Runner skips by reason",
                    "Tasks a runner did not score (rdv_runner_skipped_total): expired, not a "
                    "scorer of the request (sampling, consent), ...",
                    [
                        target(
                            f"sum by (model, reason) (rate(rdv_runner_skipped_total{RATE}))",
                            "{{model}} {{reason}}",
                        )
                    ],
                    "reqps",
                    stack=True,
                ),
                panel(
                    "Model call latency p99 (the runner's view)",
                    "rdv_runner_model_latency_seconds: Predict / PredictBatch as the runner "
                    "timed it, by model.",
                    quantiles("rdv_runner_model_latency_seconds", "model", qs=(0.99,)),
                    "s",
                ),
                panel(
                    "Model errors by code",
                    "Predict calls that ended in an error (rdv_runner_model_errors_total): "
                    "recorded, never accepted.",
                    [
                        target(
                            f"sum by (model, code) (rate(rdv_runner_model_errors_total{RATE}))",
                            "{{model}} {{code}}",
                        )
                    ],
                    "reqps",
                    stack=True,
                ),
            ],
        ),
        (
            "Archive and evaluation",
            [
                panel(
                    "Archive rate",
                    "Tasks the decoy archived (rdv_decoy_archived_total) and acknowledged "
                    "without archiving (rdv_decoy_not_archived_total, by reason).",
                    [
                        target(
                            f"sum by (objective) (rate(rdv_decoy_archived_total{{{OBJ}}}{RATE}))",
                            "archived {{objective}}",
                        ),
                        target(
                            "sum by (objective, reason) "
                            f"(rate(rdv_decoy_not_archived_total{{{OBJ}}}{RATE}))",
                            "not archived {{objective}} {{reason}}",
                        ),
                    ],
                    "reqps",
                ),
                panel(
                    "Canary drift (PSI)",
                    "The canary's population stability index against its reference "
                    "(rdv_evaluator_canary_psi); the alarm is raised above the threshold.",
                    [
                        target(
                            f"max by (objective, model) (rdv_evaluator_canary_psi{{{OBJ}}})",
                            "{{objective}} {{model}}",
                        )
                    ],
                    "short",
                ),
                panel(
                    "Dead letters and failed publishes",
                    "Messages sent to a dead-letter topic (rdv_dead_letters_total) and "
                    "publishes that failed or timed out (rdv_publish_failures_total).",
                    [
                        target(
                            f"sum by (topic, reason) (rate(rdv_dead_letters_total{RATE}))",
                            "dead letter {{topic}} {{reason}}",
                        ),
                        target(
                            f"sum by (topic) (rate(rdv_publish_failures_total{RATE}))",
                            "publish failed {{topic}}",
                        ),
                    ],
                    "reqps",
                ),
            ],
        ),
        (
            "Processes",
            [
                panel(
                    "Event-loop lag p99 by process",
                    "How late each process's event loop ran a timer that was due "
                    "(rdv_event_loop_lag_seconds). The rendezvous sheds a request the loop "
                    "left less than min_race_budget_ms (5 ms) of its SLA.",
                    quantiles("rdv_event_loop_lag_seconds", "component, process", qs=(0.99,)),
                    "s",
                    threshold=0.005,
                ),
                panel(
                    "CPU by process",
                    "process_cpu_seconds_total: 100 % is one core.",
                    [
                        target(
                            f"sum by (component) (rate(process_cpu_seconds_total{RATE}))",
                            "{{component}}",
                        )
                    ],
                    "percentunit",
                ),
                panel(
                    "Resident memory by process",
                    "process_resident_memory_bytes.",
                    [
                        target(
                            "sum by (component) (process_resident_memory_bytes)",
                            "{{component}}",
                        )
                    ],
                    "bytes",
                ),
            ],
        ),
    ]


def layout(sections: list[tuple[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Rows and their panels, placed left to right, WIDTH by HEIGHT, with ids."""
    panels: list[dict[str, Any]] = []
    y = 0
    for title, row_panels in sections:
        panels.append(
            {
                "type": "row",
                "title": title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        y += 1
        per_row = 24 // WIDTH
        for index, one in enumerate(row_panels):
            one["gridPos"] = {
                "h": HEIGHT,
                "w": WIDTH,
                "x": (index % per_row) * WIDTH,
                "y": y + (index // per_row) * HEIGHT,
            }
            panels.append(one)
        y += -(-len(row_panels) // per_row) * HEIGHT
    for number, one in enumerate(panels, start=1):
        one["id"] = number
    return panels


def dashboard() -> dict[str, Any]:
    return {
        "title": "Rendezvous",
        "uid": "rendezvous-mesh",
        "description": "A Rendezvous mesh: answers, latency against the SLA, the race, the "
        "gRPC servers, runners and models, the archive, and every process. "
        "docs/observability.md says what each panel shows and what to alert on.",
        "tags": ["rendezvous"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "schemaVersion": 39,
        "time": {"from": "now-30m", "to": "now"},
        "timezone": "browser",
        "annotations": {"list": []},
        "links": [],
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                    "regex": "",
                },
                {
                    "name": "objective",
                    "label": "Objective",
                    "type": "query",
                    "datasource": DATASOURCE,
                    "definition": "label_values(rdv_answers_total, objective)",
                    "query": {
                        "query": "label_values(rdv_answers_total, objective)",
                        "refId": "objective",
                    },
                    "current": {},
                    "includeAll": True,
                    "allValue": ".*",
                    "multi": True,
                    "refresh": 2,
                    "sort": 1,
                    "hide": 0,
                    "regex": "",
                },
            ]
        },
        "panels": layout(rows()),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main() -> int:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(render())
    print(f"wrote {OUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
