"""S3's scoring front end: the original design's Flask route, one event loop per request.

Per request (as the original describes it): a fresh asyncio event loop; a unix-socket
server on a path named after a new mailbox id (the per-request policy instance); the
request published to Pulsar, stamped with the return address (S3's prediction topic) and
the mailbox id; then wait for the first score to come through the socket, with a timeout,
and answer the default when none came; close the socket.

The model runners of our system consume `rendezvous.v1.EnrichedTask` from
`rdv.<objective>.tasks`, so S3 publishes an `EnrichedTask` directly onto its own
objective's tasks topic: the original had no enrichment hop on the request path, and
this keeps the models, runners and broker identical to S1/S2.

Served by gunicorn (`tools.bench.original.app:create_app()`, gthread workers): the Pulsar
client and producer are made once per worker process, after the fork.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from flask import Flask, Response, jsonify, request
from rendezvous.v1 import scoring_pb2, task_pb2

from services.core.bus import TYPE_PROPERTY
from services.core.protos import set_values, timestamp_from_ns
from services.core.topics import Topics
from tools.bench.original.settings import OriginalSettings

log = logging.getLogger(__name__)

DEFAULT = "default"


class Dispatcher:
    """One Pulsar client + producer per worker process, shared by its threads."""

    def __init__(self, settings: OriginalSettings) -> None:
        import pulsar

        self.settings = settings
        topics = Topics(settings.tenant_namespace)
        self.tasks_topic = topics.tasks(settings.objective)
        self.return_address = topics.predictions(settings.instance)
        self._lock = threading.Lock()
        self._client = pulsar.Client(
            settings.pulsar_url, logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Warn)
        )
        # The client's defaults as the original would have used them: no batching.
        self._producer = self._client.create_producer(
            self.tasks_topic,
            batching_enabled=False,
            send_timeout_millis=settings.send_timeout_ms,
        )

    def publish(self, task: task_pb2.EnrichedTask) -> None:
        """Publish and wait for the broker's receipt (the client's blocking send)."""
        self._producer.send(
            task.SerializeToString(),
            properties={TYPE_PROPERTY: task.DESCRIPTOR.full_name},
            partition_key=task.task.request.request_id,
        )

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.close()


def _task(dispatcher: Dispatcher, body: dict[str, Any], mailbox_id: str) -> task_pb2.EnrichedTask:
    now_ns = time.time_ns()
    score_request = scoring_pb2.ScoreRequest(
        objective=str(body.get("objective") or dispatcher.settings.objective),
        request_id=uuid.uuid4().hex,
    )
    set_values(score_request.features, body["features"])
    task = task_pb2.ScoringTask(
        request=score_request,
        return_address=dispatcher.return_address,
        mailbox_id=mailbox_id,
        received_time=timestamp_from_ns(now_ns),
        # Lets our runners skip work nobody waits for any more.
        deadline=timestamp_from_ns(now_ns + int(dispatcher.settings.timeout_s * 1e9)),
    )
    return task_pb2.EnrichedTask(task=task)


async def _rendezvous(dispatcher: Dispatcher, body: dict[str, Any]) -> dict[str, Any]:
    """The per-request policy instance: a unix socket, a publish, the first score or default."""
    loop = asyncio.get_running_loop()
    settings = dispatcher.settings
    mailbox_id = uuid.uuid4().hex
    path = Path(settings.socket_dir) / f"{mailbox_id}.sock"
    first_score: asyncio.Future[bytes] = loop.create_future()

    async def on_delivery(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()
        if not first_score.done():
            first_score.set_result(data)
        writer.close()

    server = await asyncio.start_unix_server(on_delivery, path=str(path))
    task = _task(dispatcher, body, mailbox_id)
    try:
        try:
            dispatcher.publish(task)
        except Exception:
            log.warning("publish failed; answering the default", exc_info=True)
            return _default(task, settings, "publish_failed")
        try:
            data = await asyncio.wait_for(first_score, settings.timeout_s)
        except TimeoutError:
            return _default(task, settings, "timeout")
        event = task_pb2.PredictionEvent.FromString(data)
        if event.WhichOneof("result") != "prediction":
            return _default(task, settings, "model_error")
        return {
            "request_id": task.task.request.request_id,
            "score": event.prediction.score,
            "model": event.model,
            "source": "model",
        }
    finally:
        server.close()
        await server.wait_closed()
        path.unlink(missing_ok=True)


def _default(
    task: task_pb2.EnrichedTask, settings: OriginalSettings, reason: str
) -> dict[str, Any]:
    return {
        "request_id": task.task.request.request_id,
        "score": settings.default_score,
        "model": DEFAULT,
        "source": DEFAULT,
        "reason": reason,
    }


def _invalid(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "the body must be a JSON object"
    features = body.get("features")
    if not isinstance(features, dict) or not features:
        return "features must be a non-empty JSON object"
    if "objective" in body and not isinstance(body["objective"], str):
        return "objective must be a string"
    return None


def create_app(settings: OriginalSettings | None = None) -> Flask:
    """The Flask app; gunicorn calls this in each worker (no preload), after the fork."""
    settings = settings or OriginalSettings()
    logging.basicConfig(level=settings.log_level)
    Path(settings.socket_dir).mkdir(parents=True, exist_ok=True)
    dispatcher = Dispatcher(settings)
    app = Flask(__name__)

    def score() -> tuple[Response, int]:
        body = request.get_json(silent=True)
        problem = _invalid(body)
        if problem is not None or not isinstance(body, dict):
            return jsonify({"error": problem}), 400
        # The original's shape: a new event loop per request, closed when it is answered.
        loop = asyncio.new_event_loop()
        try:
            answer = loop.run_until_complete(_rendezvous(dispatcher, body))
        finally:
            loop.close()
        return jsonify(answer), 200

    def healthz() -> tuple[Response, int]:
        return jsonify({"status": "ok", "topic": dispatcher.tasks_topic}), 200

    # add_url_rule, not decorators: they stay typed where flask is not installed (mypy).
    app.add_url_rule("/score", "score", score, methods=["POST"])
    app.add_url_rule("/healthz", "healthz", healthz, methods=["GET"])
    return app
