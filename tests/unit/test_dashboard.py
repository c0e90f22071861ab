"""The Grafana dashboard and the alerting rules, held to the code without a mesh.

The committed JSON is what tools/grafana_dashboard.py writes; it is importable (the data
source a variable, every panel on it); every query parses as PromQL; and every metric it
reads is one a component of this code base registers (imported here: each registers its
metrics at import) or the broker's. tests/integration/test_metrics.py checks the same
names against a running mesh's /metrics pages.
"""

from __future__ import annotations

import importlib
import re

import pytest
from prometheus_client import REGISTRY
from prometheus_client.exposition import generate_latest

from tests.promql import (
    REPO,
    alert_rules,
    dashboard,
    dashboard_queries,
    declared,
    metric_names,
    panels,
    variable_metrics,
)
from tools import grafana_dashboard

# Every module that registers metrics, so the in-process registry holds them all.
COMPONENTS = (
    "services.rendezvous.app",
    "services.collector.app",
    "services.runner.host",
    "services.decoy.app",
    "services.enricher.app",
    "services.evaluator.app",
    "services.control.app",
    "services.models.app",
    "services.core.rpc_metrics",
)
OBSERVABILITY = REPO / "docs" / "observability.md"
# The broker exports these (its own /metrics/); the integration test scrapes it.
BROKER_PREFIX = "pulsar_"


def registered() -> set[str]:
    for module in COMPONENTS:
        importlib.import_module(module)
    return declared(generate_latest(REGISTRY).decode())


def test_the_committed_dashboard_is_what_the_generator_writes() -> None:
    assert grafana_dashboard.OUT.read_text() == grafana_dashboard.render(), (
        "deploy/grafana/rendezvous.json is stale: run .venv/bin/python tools/grafana_dashboard.py"
    )


def test_the_dashboard_imports_with_its_data_source_as_a_variable() -> None:
    document = dashboard()
    variables = {v["name"]: v for v in document["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    graphs = [p for p in panels(document) if p["type"] != "row"]
    assert graphs
    for graph in graphs:
        assert graph["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, graph["title"]
        refs = [t["refId"] for t in graph["targets"]]
        assert refs and len(set(refs)) == len(refs), graph["title"]
    ids = [p["id"] for p in panels(document)]
    assert len(set(ids)) == len(ids)


def test_every_dashboard_query_parses_and_reads_a_metric_the_code_exports() -> None:
    exported = registered()
    document = dashboard()
    unknown = {}
    for where, expr in dashboard_queries(document).items():
        names = metric_names(expr)
        assert names, f"{where}: reads no metric"
        missing = {n for n in names if n not in exported and not n.startswith(BROKER_PREFIX)}
        if missing:
            unknown[where] = missing
    missing_variables = {n for n in variable_metrics(document) if n not in exported}
    assert not unknown and not missing_variables, (unknown, missing_variables)


def test_every_alert_parses_and_reads_a_metric_the_code_exports() -> None:
    exported = registered()
    rules = alert_rules()
    assert rules
    for rule in rules:
        assert rule["alert"].startswith("Rendezvous"), rule
        assert rule["labels"]["severity"] in ("page", "warning"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        missing = {
            n
            for n in metric_names(rule["expr"])
            if n not in exported and not n.startswith(BROKER_PREFIX)
        }
        assert not missing, (rule["alert"], missing)


@pytest.mark.parametrize(
    "expr", ["rate(rdv_answers_total[1m]", "sum by (objective) rdv_answers_total"]
)
def test_a_query_that_does_not_parse_is_an_error(expr: str) -> None:
    with pytest.raises(ValueError):
        metric_names(expr)


def test_metric_names_come_from_selectors_and_name_matchers() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(a_bucket{x="1"}[1m])))'
        ' > on () max({__name__="b"}) + vector(1)'
    )
    assert metric_names(expr) == {"a_bucket", "b"}


def test_every_metric_the_code_registers_is_documented() -> None:
    registered()
    documented = set(re.findall(r"`(rdv_[a-z0-9_]+)`", OBSERVABILITY.read_text()))
    undocumented = {
        family.name
        for family in REGISTRY.collect()
        if family.name.startswith("rdv_")
        and family.name not in documented
        and f"{family.name}_total" not in documented
        and not family.name.startswith("rdv_test")
    }
    assert not undocumented, f"not in docs/observability.md: {sorted(undocumented)}"
