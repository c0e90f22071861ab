"""`rendezvous report`: the evaluation report of an objective, as a self-contained HTML page
and a terminal summary.

    rendezvous report --objective demo [--since T] [--until T] [--out FILE.html]
                      [--json FILE] [--bucket-width S] [--evaluator HOST:PORT]

It asks the running evaluator (`EvaluationService.GetEvaluationReport`, charts included),
prints `summary_text` and writes `render_report`'s page: the same renderer as the live
dashboard, with the figures inlined, so the file opens anywhere without a network. Times
are ISO-8601 or how long ago (`15m`, `2h`), as for `rendezvous replay`.

Exit status: 0 written; 1 no evaluator answered; 2 a refused request (bad time, unknown
objective), with the evaluator's reason.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from services.core import client
from services.core.channels import mesh_client_tls
from services.core.settings import TlsSettings
from services.evaluator.replay import UsageError, mesh_state, parse_time

DEFAULT_EVALUATOR = "127.0.0.1:50053"
# The report may bootstrap over many pairs: generous, but a hung evaluator still ends it.
REPORT_TIMEOUT_S = 60.0


def _evaluator(args: argparse.Namespace) -> str:
    if args.evaluator:
        return str(args.evaluator)
    state = mesh_state(Path(args.state_dir))
    return str(state.get("evaluator_endpoint") or DEFAULT_EVALUATOR)


def _request(args: argparse.Namespace) -> Any:
    from google.protobuf import timestamp_pb2
    from rendezvous.v1 import evaluation_pb2

    request = evaluation_pb2.GetEvaluationReportRequest(
        objective=args.objective, include_charts=True
    )
    now = datetime.now(UTC)
    for name, text in (("start_time", args.since), ("end_time", args.until)):
        if text:
            stamp = timestamp_pb2.Timestamp()
            stamp.FromDatetime(parse_time(text, now))
            getattr(request, name).CopyFrom(stamp)
    if args.bucket_width is not None:
        if args.bucket_width <= 0:
            raise UsageError("--bucket-width must be a positive number of seconds")
        request.bucket_width.FromNanoseconds(int(args.bucket_width * 1e9))
    return request


async def _fetch(endpoint: str, request: Any, tls: TlsSettings) -> Any:
    from rendezvous.v1 import evaluation_pb2_grpc

    async with client.aio_channel(endpoint, tls) as channel:
        stub = evaluation_pb2_grpc.EvaluationServiceStub(channel)
        return await stub.GetEvaluationReport(request, timeout=REPORT_TIMEOUT_S)


def cmd_report(args: argparse.Namespace) -> int:
    """Fetch, print, write."""
    import grpc
    from google.protobuf import json_format

    from services.evaluator.html import render_report, summary_text

    try:
        request = _request(args)
    except UsageError as error:
        print(f"rendezvous report: {error}", file=sys.stderr)
        return 2
    endpoint = _evaluator(args)
    try:
        response = asyncio.run(_fetch(endpoint, request, mesh_client_tls(Path(args.state_dir))))
    except grpc.aio.AioRpcError as error:
        if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            print(
                f"rendezvous report: no evaluator answered at {endpoint} ({error.code().name}); "
                "is the mesh up (`rendezvous up`)?",
                file=sys.stderr,
            )
            return 1
        print(f"rendezvous report: {error.code().name}: {error.details()}", file=sys.stderr)
        return 2
    print(summary_text(response))
    out = Path(args.out or f"rendezvous-report-{args.objective}.html")
    out.write_text(render_report(response), encoding="utf-8")
    print(f"\nreport written to {out.resolve()}")
    if args.json_file:
        args.json_file.write_text(
            json_format.MessageToJson(response, preserving_proto_field_name=True) + "\n",
            encoding="utf-8",
        )
        print(f"figures written to {args.json_file.resolve()}")
    state = mesh_state(Path(args.state_dir))
    if state.get("dashboard_url"):
        print(f"live dashboard: {state['dashboard_url']}?objective={args.objective}")
    return 0


def add_parser(sub: Any) -> None:
    """Register `report` on the `rendezvous` command's subparsers."""
    parser = sub.add_parser(
        "report",
        help="the evaluation report: a terminal summary and a self-contained HTML page",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--objective", default="demo")
    parser.add_argument("--since", help="ISO-8601 or how long ago (15m); default: the oldest kept")
    parser.add_argument("--until", help="ISO-8601 or relative; default: now")
    parser.add_argument("--out", help="the HTML file (default rendezvous-report-OBJECTIVE.html)")
    parser.add_argument("--json", type=Path, dest="json_file", help="write the figures here")
    parser.add_argument("--bucket-width", type=float, help="timeline resolution, seconds")
    parser.add_argument("--evaluator", help="HOST:PORT (default: the running mesh's)")
    client.add_token_option(parser)
    parser.set_defaults(handler=cmd_report)
