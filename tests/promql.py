"""What the dashboard and the alerting rules read, and what a /metrics page exports.

The dashboard's and the rules' PromQL is parsed (promql-parser, Prometheus' grammar) and the
metric names it selects are collected, so the tests can hold both to the code: every name
must be one the mesh exports.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import promql_parser
import yaml

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "rendezvous.json"
ALERTS = REPO / "deploy" / "prometheus" / "rendezvous-alerts.yml"

# Grafana's variables, as Grafana substitutes them before the query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$objective": ".*"}
# Samples a metric family of each type exposes, by suffix.
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "gauge": ("",),
    "untyped": ("",),
}
_TYPE = re.compile(r"^# TYPE (\S+) (\S+)")
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]")
_LABEL_VALUES = re.compile(r"^label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)")


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(document: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    out: list[dict[str, Any]] = []
    for one in document["panels"]:
        out.append(one)
        out.extend(one.get("panels", []))
    return out


def dashboard_queries(document: dict[str, Any]) -> dict[str, str]:
    """Each panel target's PromQL, Grafana's variables substituted, by "panel / refId"."""
    out = {}
    for one in panels(document):
        for target in one.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            out[f"{one['title']} / {target['refId']}"] = expr
    return out


def variable_metrics(document: dict[str, Any]) -> set[str]:
    """The metrics the dashboard's query variables read (`label_values(metric, label)`)."""
    names = set()
    for variable in document["templating"]["list"]:
        if variable["type"] == "query":
            match = _LABEL_VALUES.match(variable["query"]["query"])
            assert match, f"variable {variable['name']}: not a label_values query"
            names.add(match[1])
    return names


def alert_rules() -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = []
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        rules.extend(group["rules"])
    return rules


def metric_names(expr: str) -> set[str]:
    """The metric names `expr` selects; a ValueError if it does not parse."""
    names: set[str] = set()

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            for matcher in node.matchers.matchers:
                if matcher.name == "__name__" and matcher.op == promql_parser.MatchOp.Equal:
                    names.add(matcher.value)
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def declared(text: str) -> set[str]:
    """Every sample name a /metrics page's families can expose (from its TYPE lines)."""
    names: set[str] = set()
    for line in text.splitlines():
        match = _TYPE.match(line)
        if match:
            family, kind = match[1], match[2]
            base = family.removesuffix("_total") if kind == "counter" else family
            names.update(base + suffix for suffix in SUFFIXES.get(kind, ("",)))
    return names


def sampled(text: str) -> set[str]:
    """The sample names a /metrics page holds a value for."""
    return {
        match[1]
        for line in text.splitlines()
        if not line.startswith("#") and (match := _SAMPLE.match(line))
    }
