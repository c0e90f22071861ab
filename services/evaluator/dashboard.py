"""The evaluator's live dashboard: the report page, refreshed from a JSON API, on loopback.

    GET /                                   the first objective's dashboard
    GET /?objective=demo&window_s=600       that objective over the last 10 minutes
    GET /api/report?objective=demo&window_s=600   the report with charts, as JSON
    GET /healthz                            200 "ok"

Why a small HTTP/1.1 server on `asyncio.start_server` rather than aiohttp: four GET routes
on 127.0.0.1 for one operator need no framework, and it runs in the evaluator's own asyncio
loop (next to grpc.aio) with no new dependency. Every response closes its connection, so
there is no keep-alive state to manage; requests are bounded in size and time.

The page is `services.evaluator.html`'s, in live mode: the same script as the static report
fetches /api/report every `refresh_s` seconds. A failing report is logged and answered with
a generic 500; its text never reaches the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from rendezvous.v1 import evaluation_pb2

from services.evaluator.html import content_security_policy, dashboard_page, report_dict

log = logging.getLogger(__name__)

ReportFn = Callable[
    [evaluation_pb2.GetEvaluationReportRequest],
    Awaitable[evaluation_pb2.GetEvaluationReportResponse],
]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_REFRESH_S = 5.0
DEFAULT_WINDOW_S = 600.0
#: The longest window the dashboard asks for (30 days); longer is a 400.
MAX_WINDOW_S = 30 * 86400.0
#: Limits on one request: its line and each header line, the header count, the time to
#: send it all. Browsers send a few hundred bytes in one packet.
MAX_LINE_BYTES = 8192
MAX_HEADERS = 64
READ_TIMEOUT_S = 10.0
#: How long one report may take before the API gives up with a 504.
REPORT_TIMEOUT_S = 20.0
#: How long `close()` lets responses in flight finish before cancelling them.
CLOSE_GRACE_S = 2.0

PAGE_PATH = "/"
API_PATH = "/api/report"
HEALTH_PATH = "/healthz"
# Browsers ask for it on their own; "no content" keeps their console free of a 404.
FAVICON_PATH = "/favicon.ico"
#: The query parameters the page and the API take.
_PARAMS = frozenset({"objective", "window_s"})
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
_JSON_CSP = "default-src 'none'; frame-ancestors 'none'"
_INTERNAL_ERROR = "internal error: the report could not be built (see the evaluator's log)"


class _HTTPError(Exception):
    """A client-visible error: a status and a message written for the client."""

    def __init__(self, status: HTTPStatus, message: str, **details: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details


@dataclass
class _Response:
    status: HTTPStatus
    body: bytes
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)


def _json_response(status: HTTPStatus, value: Any) -> _Response:
    body = json.dumps(value, allow_nan=False, separators=(",", ":")).encode("utf-8")
    return _Response(
        status,
        body,
        "application/json",
        {"Cache-Control": "no-store", "Content-Security-Policy": _JSON_CSP},
    )


def _error_response(error: _HTTPError, *, api: bool) -> _Response:
    if api:
        return _json_response(error.status, {"error": error.message, **error.details})
    body = f"{error.status.value} {error.status.phrase}: {error.message}\n".encode()
    return _Response(
        error.status,
        body,
        "text/plain; charset=utf-8",
        {"Cache-Control": "no-store", "Content-Security-Policy": _JSON_CSP},
    )


def _single_params(query: str, allowed: frozenset[str]) -> dict[str, str]:
    try:
        parsed = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as error:
        raise _HTTPError(HTTPStatus.BAD_REQUEST, "malformed query string") from error
    unknown = sorted(set(parsed) - allowed)
    if unknown:
        raise _HTTPError(
            HTTPStatus.BAD_REQUEST,
            f"unknown query parameter(s): {', '.join(unknown)}",
            allowed=sorted(allowed),
        )
    repeated = sorted(name for name, values in parsed.items() if len(values) > 1)
    if repeated:
        raise _HTTPError(
            HTTPStatus.BAD_REQUEST, f"repeated query parameter(s): {', '.join(repeated)}"
        )
    return {name: values[0] for name, values in parsed.items()}


def _window(params: dict[str, str], default_s: float) -> float:
    raw = params.get("window_s")
    if raw is None:
        return default_s
    try:
        window_s = float(raw)
    except ValueError:
        window_s = math.nan
    if not (math.isfinite(window_s) and 0 < window_s <= MAX_WINDOW_S):
        raise _HTTPError(
            HTTPStatus.BAD_REQUEST,
            f"window_s must be a number of seconds in (0, {MAX_WINDOW_S:g}]",
            window_s=raw,
        )
    return window_s


class Dashboard:
    """The live dashboard's HTTP server, in the caller's asyncio loop.

    `report` builds a report (the evaluator's own GetEvaluationReport); `objectives` lists
    the objectives it knows, the first being the default. `port=0` picks a free port, read
    back from `port` after `start()`.
    """

    def __init__(
        self,
        report: ReportFn,
        objectives: Callable[[], list[str]],
        *,
        host: str = DEFAULT_HOST,
        port: int = 0,
        refresh_s: float = DEFAULT_REFRESH_S,
        default_window_s: float = DEFAULT_WINDOW_S,
    ) -> None:
        """A dashboard that does not listen yet (see `start`)."""
        if not (refresh_s > 0 and 0 < default_window_s <= MAX_WINDOW_S):
            raise ValueError(
                f"refresh_s must be positive, default_window_s in (0, {MAX_WINDOW_S:g}]"
            )
        self._report = report
        self._objectives = objectives
        self._host = host
        self._requested_port = port
        self.refresh_s = refresh_s
        self.default_window_s = default_window_s
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        """The port it listens on (the one picked when started with port 0)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the dashboard is not started")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        """The dashboard's base URL, e.g. http://127.0.0.1:8790/."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}{PAGE_PATH}"

    async def start(self) -> None:
        """Listen; returns once the socket is bound."""
        if self._server is not None:
            raise RuntimeError("the dashboard is already started")
        self._server = await asyncio.start_server(
            self._on_connection, self._host, self._requested_port, limit=MAX_LINE_BYTES
        )
        log.info("evaluation dashboard listening", extra={"url": self.url})

    async def close(self) -> None:
        """Stop listening, let responses in flight finish briefly, then cancel the rest."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        if self._connections:
            _, pending = await asyncio.wait(set(self._connections), timeout=CLOSE_GRACE_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await server.wait_closed()

    # -----------------------------------------------------------------------------------
    # HTTP
    # -----------------------------------------------------------------------------------

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            await self._serve_one(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away; nothing to answer
        finally:
            if task is not None:
                self._connections.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head_only = False
        api = False
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                method, target, headers = await _read_request(reader)
            head_only = method == "HEAD"
            url = urlsplit(target)
            api = url.path == API_PATH
            if method not in {"GET", "HEAD"}:
                raise _HTTPError(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} is not supported")
            self._check_host(headers.get("host", ""))
            response = await self._route(url.path, url.query)
        except _HTTPError as error:
            response = _error_response(error, api=api)
            if error.status == HTTPStatus.METHOD_NOT_ALLOWED:
                response.headers["Allow"] = "GET, HEAD"
        except TimeoutError:
            response = _error_response(
                _HTTPError(HTTPStatus.REQUEST_TIMEOUT, "request not received in time"), api=False
            )
        except (ConnectionError, asyncio.IncompleteReadError):
            raise
        except Exception:
            # A bug here must not leak its text either, nor drop the connection unanswered.
            log.exception("serving a dashboard request failed")
            response = _error_response(
                _HTTPError(HTTPStatus.INTERNAL_SERVER_ERROR, _INTERNAL_ERROR), api=api
            )
        await _write(writer, response, head_only=head_only)

    def _check_host(self, host_header: str) -> None:
        # On loopback, a Host that is not loopback is a DNS-rebinding page in a browser
        # trying to read the API from another origin: refuse it.
        if self._host not in _LOOPBACK_HOSTS:
            return
        host = urlsplit(f"//{host_header}").hostname or ""
        if host not in _LOOPBACK_HOSTS:
            raise _HTTPError(HTTPStatus.FORBIDDEN, "the dashboard answers loopback hosts only")

    async def _route(self, path: str, query: str) -> _Response:
        if path == HEALTH_PATH:
            return _Response(
                HTTPStatus.OK, b"ok\n", "text/plain; charset=utf-8", {"Cache-Control": "no-store"}
            )
        if path == FAVICON_PATH:
            return _Response(HTTPStatus.NO_CONTENT, b"", "image/x-icon")
        if path == API_PATH:
            return await self._api(_single_params(query, _PARAMS))
        if path == PAGE_PATH:
            return self._page(_single_params(query, _PARAMS))
        raise _HTTPError(HTTPStatus.NOT_FOUND, f"no such page: {path}")

    def _known_objectives(self) -> list[str]:
        try:
            return list(self._objectives())
        except Exception:
            log.exception("listing the objectives failed")
            raise _HTTPError(HTTPStatus.INTERNAL_SERVER_ERROR, _INTERNAL_ERROR) from None

    @staticmethod
    def _objective(params: dict[str, str], known: list[str]) -> str | None:
        """The objective asked for (None when not asked); an unknown one is a 404."""
        objective = params.get("objective") or None
        if objective is not None and objective not in known:
            raise _HTTPError(
                HTTPStatus.NOT_FOUND, f"unknown objective: {objective}", objectives=known
            )
        return objective

    def _page(self, params: dict[str, str]) -> _Response:
        window_s = _window(params, self.default_window_s)
        known = self._known_objectives()
        # Without one, the first objective the evaluator knows (None: it knows none yet).
        objective = self._objective(params, known) or (known[0] if known else None)
        page = dashboard_page(
            objective=objective,
            objectives=known,
            window_s=window_s,
            refresh_s=self.refresh_s,
            page_path=PAGE_PATH,
            api_path=API_PATH,
        )
        return _Response(
            HTTPStatus.OK,
            page.encode("utf-8"),
            "text/html; charset=utf-8",
            {
                "Cache-Control": "no-store",
                "Content-Security-Policy": content_security_policy(http_header=True),
            },
        )

    async def _api(self, params: dict[str, str]) -> _Response:
        window_s = _window(params, self.default_window_s)
        objective = self._objective(params, self._known_objectives())
        if objective is None:
            raise _HTTPError(HTTPStatus.BAD_REQUEST, "missing query parameter: objective")
        request = evaluation_pb2.GetEvaluationReportRequest(
            objective=objective, include_charts=True
        )
        request.start_time.FromDatetime(datetime.now(UTC) - timedelta(seconds=window_s))
        try:
            async with asyncio.timeout(REPORT_TIMEOUT_S):
                response = await self._report(request)
        except TimeoutError:
            log.warning(
                "the evaluation report took too long",
                extra={"objective": objective, "timeout_s": REPORT_TIMEOUT_S},
            )
            raise _HTTPError(HTTPStatus.GATEWAY_TIMEOUT, "the report took too long") from None
        except Exception:
            log.exception("building the evaluation report failed", extra={"objective": objective})
            raise _HTTPError(HTTPStatus.INTERNAL_SERVER_ERROR, _INTERNAL_ERROR) from None
        return _json_response(HTTPStatus.OK, report_dict(response))

    def api_url(self, objective: str, window_s: float | None = None) -> str:
        """The JSON API's URL for an objective (and a window), e.g. for tests and tools."""
        params = {"objective": objective}
        if window_s is not None:
            params["window_s"] = f"{window_s:g}"
        return f"{self.url.rstrip('/')}{API_PATH}?{urlencode(params)}"


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str]]:
    """The request line's method and target, and the headers (lower-case names)."""
    line = await _read_line(reader)
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _HTTPError(HTTPStatus.BAD_REQUEST, "malformed request line")
    method, target, _ = parts
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADERS):
        header = await _read_line(reader)
        if not header:
            return method, target, headers
        name, sep, value = header.partition(":")
        if not sep:
            raise _HTTPError(HTTPStatus.BAD_REQUEST, "malformed header line")
        headers[name.strip().lower()] = value.strip()
    raise _HTTPError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "too many headers")


async def _read_line(reader: asyncio.StreamReader) -> str:
    try:
        raw = await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError as error:
        raise _HTTPError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "line too long") from error
    # Latin-1 decodes any byte: a request line is ASCII, a stray byte is just not a route.
    return raw.decode("latin-1").rstrip("\r\n")


async def _write(writer: asyncio.StreamWriter, response: _Response, *, head_only: bool) -> None:
    headers = {"Content-Type": response.content_type}
    if response.status != HTTPStatus.NO_CONTENT:  # RFC 9110: a 204 has no Content-Length
        headers["Content-Length"] = str(len(response.body))
    headers |= {
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Connection": "close",
        **response.headers,
    }
    head = f"HTTP/1.1 {response.status.value} {response.status.phrase}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n"
    writer.write(head.encode("latin-1"))
    if not head_only:
        writer.write(response.body)
    await writer.drain()
