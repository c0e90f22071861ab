"""The report page's Python side: JSON embedding and escaping, NaN, CSP, terminal summary."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re

from rendezvous.v1 import common_pb2, evaluation_pb2

from services.evaluator.html import (
    content_security_policy,
    dashboard_page,
    embed_json,
    render_report,
    report_dict,
    summary_text,
)
from tools.report_sample import empty_report, sample_report

HOSTILE = "</script><script>alert(1)</script><!--"


def _script_block(page: str, element_id: str) -> str:
    match = re.search(rf'<script type="application/json" id="{element_id}">(.*?)</script>', page)
    assert match, f"no #{element_id} block"
    return match.group(1)


def _inline(page: str, tag: str) -> str:
    match = re.search(rf"<{tag}>(.*?)</{tag}>", page, re.S)
    assert match, f"no inline <{tag}>"
    return match.group(1)


def _sha256(text: str) -> str:
    return base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


def test_the_page_embeds_the_report_as_json_that_parses_back() -> None:
    page = render_report(sample_report())
    embedded = json.loads(_script_block(page, "rdv-report"))
    assert embedded == json.loads(json.dumps(report_dict(sample_report())))
    assert embedded["objective"] == "demo"
    assert len(embedded["timeline"]) == 30
    assert embedded["models"][0]["role"] == "MODEL_ROLE_INCUMBENT"
    assert json.loads(_script_block(page, "rdv-config"))["mode"] == "static"


def test_hostile_names_cannot_close_the_script_element() -> None:
    response = sample_report()
    response.objective = HOSTILE
    response.models[0].model = HOSTILE
    page = render_report(response)
    block = _script_block(page, "rdv-report")
    assert "<" not in block and ">" not in block
    embedded = json.loads(block)
    assert embedded["objective"] == HOSTILE
    assert embedded["models"][0]["model"] == HOSTILE
    # The title is escaped HTML, not markup.
    assert "<title>Evaluation report · &lt;/script&gt;" in page
    assert page.count("<script>") == 1


def test_embed_json_escapes_what_html_would_parse() -> None:
    text = embed_json({"a": "</b> & <!-- x -->"})
    assert "</" not in text and "<!--" not in text and "&" not in text
    assert json.loads(text) == {"a": "</b> & <!-- x -->"}


def test_nan_and_infinities_are_strings_in_the_json() -> None:
    response = evaluation_pb2.GetEvaluationReportResponse(objective="o", default_share=math.nan)
    response.models.add(
        model="m",
        agreement_with_incumbent=math.nan,
        rank_correlation_with_incumbent=math.inf,
        win_share=-math.inf,
    )
    bucket = response.timeline.add(requests=3)
    bucket.models.add(model="m", labelled=0, mean_error=math.nan)
    embedded = json.loads(_script_block(render_report(response), "rdv-report"))
    assert embedded["default_share"] == "NaN"
    model = embedded["models"][0]
    assert model["agreement_with_incumbent"] == "NaN"
    assert model["rank_correlation_with_incumbent"] == "Infinity"
    assert model["win_share"] == "-Infinity"
    assert embedded["timeline"][0]["models"][0]["mean_error"] == "NaN"


def test_zero_figures_and_empty_lists_are_present_for_the_script() -> None:
    embedded = report_dict(empty_report())
    assert embedded["requests"] == 0
    assert embedded["models"] == [] and embedded["timeline"] == []
    assert embedded["score_bin_edges"] == [] and embedded["drift_timeline"] == []
    assert "canary_drift" not in embedded


def test_the_csp_allows_exactly_the_inline_script_and_style() -> None:
    page = render_report(sample_report())
    policy = content_security_policy()
    assert f"'sha256-{_sha256(_inline(page, 'script'))}'" in policy
    assert f"'sha256-{_sha256(_inline(page, 'style'))}'" in policy
    assert "default-src 'none'" in policy
    assert "http" not in policy
    # frame-ancestors is only valid in a header (browsers complain about it in <meta>).
    assert "frame-ancestors" not in policy
    assert "frame-ancestors 'none'" in content_security_policy(http_header=True)


def test_the_page_loads_nothing_from_elsewhere() -> None:
    page = render_report(sample_report())
    assert not re.search(r"(src|href)\s*=", page)
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in page


def test_render_report_takes_a_title() -> None:
    page = render_report(sample_report(), title="Nightly <review>")
    assert "<title>Nightly &lt;review&gt;</title>" in page


def test_the_dashboard_page_is_the_same_page_in_live_mode() -> None:
    page = dashboard_page(
        objective="demo",
        objectives=["demo", "other"],
        window_s=600.0,
        refresh_s=2.0,
        page_path="/",
        api_path="/api/report",
    )
    config = json.loads(_script_block(page, "rdv-config"))
    assert config["mode"] == "live"
    assert config["objective"] == "demo" and config["objectives"] == ["demo", "other"]
    assert config["refresh_s"] == 2.0 and config["api_path"] == "/api/report"
    assert json.loads(_script_block(page, "rdv-report")) is None
    assert _inline(page, "script") == _inline(render_report(sample_report()), "script")


# ---------------------------------------------------------------------------------------
# summary_text
# ---------------------------------------------------------------------------------------


def test_summary_has_the_header_one_aligned_row_per_model_and_the_drift_line() -> None:
    text = summary_text(sample_report())
    lines = text.splitlines()
    assert lines[0] == "Evaluation report: demo"
    assert lines[1] == "Window: 2025-06-02 14:20:00 .. 14:30:00 UTC (10m00s)"
    assert "Requests: 1200" in lines[2] and "labelled: 675" in lines[2]
    assert "Target: regression" in lines[3] and "MAE 43.100" in lines[3]
    header = next(i for i, line in enumerate(lines) if line.startswith("model "))
    rows = lines[header + 1 : header + 6]
    # Incumbent first, then canary, challengers, decoy.
    assert [row.split()[1] for row in rows] == [
        "incumbent",
        "canary",
        "challenger",
        "challenger",
        "decoy",
    ]
    # Aligned: every row's role column starts where the header's does.
    role_at = lines[header].index("role")
    assert all(row[role_at - 2 : role_at] == "  " and row[role_at] != " " for row in rows)
    assert "baseline" in rows[0]
    assert "better" in rows[2] and "worse" in rows[3]
    assert lines[-1].startswith("Canary drift (diabetes-canary): psi 0.538 > threshold 0.250")
    assert lines[-1].count("ALARM") == 1


def test_summary_shows_undefined_figures_as_a_dash() -> None:
    text = summary_text(sample_report())
    decoy = next(line for line in text.splitlines() if "archive-decoy" in line)
    assert "nan" not in decoy.lower()
    assert " - " in decoy


def test_summary_of_an_empty_report() -> None:
    text = summary_text(empty_report())
    assert "No model scored a request in this window." in text
    assert "default answers: 0 (-)" in text
    assert text.rstrip().endswith("Canary drift: no canary")


def test_summary_of_a_classification_objective() -> None:
    response = evaluation_pb2.GetEvaluationReportResponse(
        objective="churn", target_kind=evaluation_pb2.TARGET_KIND_CLASSIFICATION
    )
    response.answered_error.classification.accuracy = 0.875
    response.answered_error.classification.log_loss = 0.31
    model = response.models.add(model="m", role=common_pb2.MODEL_ROLE_INCUMBENT)
    model.error.classification.accuracy = 0.9
    model.error.classification.log_loss = 0.25
    text = summary_text(response)
    assert "Target: classification  answered error: acc 87.5% logloss 0.310" in text
    assert "acc 90.0% logloss 0.250" in text


def test_summary_says_when_the_canary_has_too_few_scores_for_a_drift_figure() -> None:
    response = evaluation_pb2.GetEvaluationReportResponse(objective="demo")
    response.canary_drift.model = "canary"
    response.canary_drift.statistic = math.nan
    response.canary_drift.recent_count = 12
    line = summary_text(response).rstrip().splitlines()[-1]
    assert line == (
        "Canary drift (canary): too few scores to compare yet (reference 0 scores, recent 12)"
    )
