"""The evaluation report as a page and as text.

`render_report` writes a self-contained HTML page (stylesheet, script and the report's JSON
inline) that opens from a file, offline; `dashboard_page` is the same page in live mode,
fetching the JSON from the evaluator's dashboard (`services.evaluator.dashboard`). One
script (`page/report.js`) renders both. `summary_text` is the report for a terminal.

The page's Content-Security-Policy allows exactly the inline stylesheet and script by their
SHA-256 (no other script, style, font, image or frame may load) and, for the dashboard,
requests to its own origin only.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from string import Template
from typing import Any

from google.protobuf import json_format
from google.protobuf.duration_pb2 import Duration
from rendezvous.v1 import common_pb2, evaluation_pb2

#: Where the page's assets live, inside this package (shipped as package data).
PAGE_DIRECTORY = "page"
TEMPLATE_FILE = "report.html"
SCRIPT_FILE = "report.js"
STYLE_FILE = "report.css"

#: Shown for an undefined figure (NaN) in the terminal summary.
MISSING = "-"
#: Columns between table cells in the terminal summary.
COLUMN_GAP = "  "
#: Windows the dashboard offers, in seconds (5 min, 15 min, 1 h, 6 h, 24 h).
WINDOW_CHOICES_S: tuple[int, ...] = (300, 900, 3600, 21600, 86400)

_ROLE_ORDER = {
    common_pb2.MODEL_ROLE_INCUMBENT: 0,
    common_pb2.MODEL_ROLE_CANARY: 1,
    common_pb2.MODEL_ROLE_CHALLENGER: 2,
    common_pb2.MODEL_ROLE_DECOY: 3,
}
_VERDICTS = {
    evaluation_pb2.COMPARISON_VERDICT_BETTER: "better",
    evaluation_pb2.COMPARISON_VERDICT_WORSE: "worse",
    evaluation_pb2.COMPARISON_VERDICT_INCONCLUSIVE: "inconclusive",
    evaluation_pb2.COMPARISON_VERDICT_UNSPECIFIED: "too few pairs",
}
# Characters that could end or confuse an inline <script> block; JSON may spell them as
# \u escapes, so the embedded JSON parses to the same value.
_SCRIPT_UNSAFE = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"}


# ---------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Assets:
    template: Template
    script: str
    style: str


@cache
def _assets() -> _Assets:
    """The page's template, script and stylesheet, read once from the package data."""
    page = resources.files(__package__).joinpath(PAGE_DIRECTORY)
    return _Assets(
        template=Template(page.joinpath(TEMPLATE_FILE).read_text(encoding="utf-8")),
        script=page.joinpath(SCRIPT_FILE).read_text(encoding="utf-8"),
        style=page.joinpath(STYLE_FILE).read_text(encoding="utf-8"),
    )


def _source_hash(text: str) -> str:
    """A CSP source expression allowing exactly this inline script or stylesheet."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return f"'sha256-{base64.b64encode(digest).decode('ascii')}'"


def content_security_policy(*, http_header: bool = False) -> str:
    """The page's policy: its own inline script and stylesheet, fetches to its own origin.

    `frame-ancestors` only counts in an HTTP header (a browser reports it as an error in a
    <meta> element), so it is added for the header only.
    """
    assets = _assets()
    directives = [
        "default-src 'none'",
        f"script-src {_source_hash(assets.script)}",
        f"style-src {_source_hash(assets.style)}",
        "connect-src 'self'",
        "img-src 'self' data:",
        "base-uri 'none'",
        "form-action 'self'",
    ]
    if http_header:
        directives.append("frame-ancestors 'none'")
    return "; ".join(directives)


def report_dict(response: evaluation_pb2.GetEvaluationReportResponse) -> dict[str, Any]:
    """The response as JSON-ready data: proto field names, every field (zeros included).

    Undefined figures (NaN) and infinities come out as the strings "NaN", "Infinity" and
    "-Infinity" (JSON has no such numbers); the page's script reads them back.
    """
    return json_format.MessageToDict(
        response,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        unquote_int64_if_possible=True,
    )


def embed_json(value: Any) -> str:
    """`value` as JSON that is safe inside an HTML <script> element (no `</`, no `<!--`)."""
    text = json.dumps(value, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    for char, escaped in _SCRIPT_UNSAFE.items():
        text = text.replace(char, escaped)
    return text


def _page(*, title: str, config: dict[str, Any], report: dict[str, Any] | None) -> str:
    assets = _assets()
    return assets.template.substitute(
        title=html.escape(title),
        csp=html.escape(content_security_policy()),
        style=assets.style,
        script=assets.script,
        config=embed_json(config),
        report=embed_json(report),
    )


def _default_title(objective: str) -> str:
    return f"Evaluation report · {objective}" if objective else "Evaluation report"


def render_report(
    response: evaluation_pb2.GetEvaluationReportResponse, *, title: str | None = None
) -> str:
    """A self-contained HTML page of the report: opens from a file, offline, loads nothing."""
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return _page(
        title=title or _default_title(response.objective),
        config={"mode": "static", "generated": generated},
        report=report_dict(response),
    )


def dashboard_page(
    *,
    objective: str | None,
    objectives: Sequence[str],
    window_s: float,
    refresh_s: float,
    page_path: str,
    api_path: str,
) -> str:
    """The live dashboard: the same page, fetching the report from `api_path` every
    `refresh_s` seconds; `objective` is None when the evaluator knows no objective yet."""
    return _page(
        title=_default_title(objective or ""),
        config={
            "mode": "live",
            "objective": objective,
            "objectives": list(objectives),
            "window_s": window_s,
            "window_choices": list(WINDOW_CHOICES_S),
            "refresh_s": refresh_s,
            "page_path": page_path,
            "api_path": api_path,
        },
        report=None,
    )


# ---------------------------------------------------------------------------------------
# The terminal summary
# ---------------------------------------------------------------------------------------


def _number(value: float, digits: int = 3) -> str:
    return MISSING if not math.isfinite(value) else f"{value:.{digits}f}"


def _share(value: float) -> str:
    return MISSING if not math.isfinite(value) else f"{100 * value:.1f}%"


def _latency(duration: Duration, present: bool) -> str:
    if not present:
        return MISSING
    seconds = duration.ToNanoseconds() / 1e9
    if seconds < 1:
        return f"{seconds * 1e3:.1f}ms"
    return f"{seconds:.2f}s"


def _error(error: evaluation_pb2.ErrorMetrics) -> str:
    kind = error.WhichOneof("metrics")
    if kind == "regression":
        return f"MAE {_number(error.regression.mae)} RMSE {_number(error.regression.rmse)}"
    if kind == "classification":
        return (
            f"acc {_share(error.classification.accuracy)} "
            f"logloss {_number(error.classification.log_loss)}"
        )
    return MISSING


def _versus(model: evaluation_pb2.ModelEvaluation) -> str:
    if not model.HasField("versus_incumbent"):
        return "baseline" if model.role == common_pb2.MODEL_ROLE_INCUMBENT else MISSING
    cmp = model.versus_incumbent
    return (
        f"{_number(cmp.mean_difference)} [{_number(cmp.ci_low)}, {_number(cmp.ci_high)}] "
        f"{_VERDICTS.get(cmp.verdict, MISSING)}"
    )


def _role(role: common_pb2.ModelRole.ValueType) -> str:
    return common_pb2.ModelRole.Name(role).removeprefix("MODEL_ROLE_").lower()


def _span(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _window(response: evaluation_pb2.GetEvaluationReportResponse) -> str:
    if not (response.HasField("start_time") and response.HasField("end_time")):
        return MISSING
    start = response.start_time.ToDatetime(UTC)
    end = response.end_time.ToDatetime(UTC)
    return (
        f"{start:%Y-%m-%d %H:%M:%S} .. {end:%H:%M:%S} UTC ({_span((end - start).total_seconds())})"
    )


def _drift(response: evaluation_pb2.GetEvaluationReportResponse) -> str:
    if not response.HasField("canary_drift"):
        return "Canary drift: no canary"
    drift = response.canary_drift
    counts = f"(reference {drift.reference_count} scores, recent {drift.recent_count})"
    if math.isnan(drift.statistic):
        # Below the evaluator's minimum a PSI is mostly sampling noise: none is computed.
        return f"Canary drift ({drift.model}): too few scores to compare yet {counts}"
    state = "ALARM" if drift.alarm else "ok"
    relation = ">" if drift.alarm else "<="
    return (
        f"Canary drift ({drift.model}): {drift.statistic_name} {_number(drift.statistic)} "
        f"{relation} threshold {_number(drift.threshold)}: {state} {counts}"
    )


_TABLE_HEADER = (
    "model",
    "role",
    "preds",
    "win",
    "errors",
    "late",
    "p50",
    "p90",
    "p99",
    "p99.9",
    "|d| inc",
    "spearman",
    "pairs",
    "labelled",
    "error",
    "vs incumbent (mean diff [CI])",
)
# Left-aligned columns (text); the others are numbers, right-aligned.
_TEXT_COLUMNS = frozenset({0, 1, 14, 15})


def _row(model: evaluation_pb2.ModelEvaluation) -> tuple[str, ...]:
    name = f"{model.model}@{model.model_version}" if model.model_version else model.model
    return (
        name,
        _role(model.role),
        str(model.predictions),
        _share(model.win_share),
        _share(model.error_share),
        _share(model.late_share),
        _latency(model.latency_p50, model.HasField("latency_p50")),
        _latency(model.latency_p90, model.HasField("latency_p90")),
        _latency(model.latency_p99, model.HasField("latency_p99")),
        _latency(model.latency_p999, model.HasField("latency_p999")),
        _number(model.agreement_with_incumbent),
        _number(model.rank_correlation_with_incumbent),
        str(model.incumbent_pairs),
        str(model.error.labelled),
        _error(model.error),
        _versus(model),
    )


def _table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.ljust(width) if i in _TEXT_COLUMNS else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append(COLUMN_GAP.join(cells).rstrip())
    return lines


def summary_text(response: evaluation_pb2.GetEvaluationReportResponse) -> str:
    """The report for a terminal: header lines, one aligned row per model, the drift line."""
    target = evaluation_pb2.TargetKind.Name(response.target_kind).removeprefix("TARGET_KIND_")
    lines = [
        f"Evaluation report: {response.objective}",
        f"Window: {_window(response)}",
        (
            f"Requests: {response.requests}  default answers: {response.default_answers} "
            f"({_share(response.default_share)})  labelled: {response.labelled_requests}  "
            f"pending feedback: {response.pending_feedback}"
        ),
        f"Target: {target.lower()}  answered error: {_error(response.answered_error)}",
        "",
    ]
    models = sorted(
        response.models, key=lambda m: (_ROLE_ORDER.get(m.role, len(_ROLE_ORDER)), m.model)
    )
    if models:
        lines += _table([_TABLE_HEADER, *(_row(model) for model in models)])
    else:
        lines.append("No model scored a request in this window.")
    lines += ["", _drift(response)]
    return "\n".join(lines) + "\n"
