"""`rendezvous replay`: archived tasks sent to a model outside the live mesh, and how it did.

    rendezvous replay --objective demo --model NAME (--kind K [--args JSON] [--version V]
                      | --endpoint HOST:PORT) [--since T] [--until T] [--rate R]
                      [--in-flight N] [--timeout S] [--json FILE] [--pulsar-url URL]

The decoy's archive (`rdv.<objective>.archive`) holds every task as the models saw it, PII
redacted. Replay reads it from the earliest retained record to the end, keeps the tasks whose
`received_time` falls in [--since, --until) (ISO-8601, naive meaning UTC, or relative to now:
`15m`, `2h`, `30s`, `1d` ago, or `now`), and sends each to the replayed model with the same
`PredictRequest` a runner builds (`services.runner.model_client.predict_request`), at most
`--rate` calls per second and `--in-flight` at once, each with a deadline of its own (the
archived deadline passed long ago). Tasks whose subject denied archiving (`features_dropped`)
cannot be replayed: they are counted as skipped. A model error is counted, never fatal.

The replayed model is a container of `--kind` started here (`python -m services.models` on a
free loopback port, as the supervisor starts one; stopped when the replay ends, on errors and
on Ctrl-C too), or a running Model server at `--endpoint`.

It never touches live traffic: every topic is read with a non-durable reader (no
subscription that could take messages from a live consumer), nothing is published, and the
only server called is the replayed model. A NAME that is a deployment of the objective's
current configuration, and an endpoint of a live deployment or of a process of the running
mesh, are refused (exit 2). The configuration is read from the control topic on the broker
(the control plane's own source of truth), so the control plane process need not be up; an
objective without a configuration there is refused; a broker that cannot be reached ends the
command (exit 1): the archive lives on it too.

The report compares the replayed scores with the outcomes on `rdv.<objective>.results` (each
live model's score on the same requests, and what the client got) and with the ground truth
on `rdv.<objective>.feedback` (the latest feedback per request wins): agreement (mean
absolute difference, Spearman), error (MAE/RMSE or accuracy/log loss) on the same labelled
requests, and the paired bootstrap against the incumbent (`services.evaluator.stats` and
`join`). A terminal table, and with `--json FILE` every figure.

Exit status: 0 done, 1 the broker or the model could not be used, 2 a refused command line,
130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, ClassVar, Literal, cast, get_args

from pydantic import Field
from pydantic_settings import SettingsConfigDict
from rendezvous.v1 import common_pb2, feedback_pb2, objective_pb2, task_pb2

from services.core.settings import REPO_ROOT, PulsarSettings, ServiceSettings, TlsSettings
from services.models.settings import ModelKind

if TYPE_CHECKING:
    # Imported where used: `services.cli` registers this command on every start, and the
    # broker client, gRPC, numpy and the telemetry SDK would cost every other command ~0.3 s.
    from services.core.bus import Bus, Envelope, M
    from services.evaluator import stats
    from services.evaluator.join import Comparison, JoinedRequest

log = logging.getLogger(__name__)

REPO = REPO_ROOT
# Exit statuses (see the module docstring).
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
NS_PER_S = 1_000_000_000
NS_PER_MS = 1_000_000
# The report's name for what the client got (Outcome.response), beside the models' names.
ANSWERED = "(answered)"
REPLAY_ROLE = "replay"
# How many lines of a model container's log to show when it fails to start.
LOG_TAIL_LINES = 20


class ReplaySettings(ServiceSettings):
    """Tunables of `rendezvous replay` (env prefix RDV_REPLAY_, YAML section "replay").

    The broker defaults to the running mesh's (`rendezvous up` state), unless
    RDV_REPLAY_PULSAR__SERVICE_URL or `--pulsar-url` says otherwise.
    """

    model_config = SettingsConfigDict(env_prefix="RDV_REPLAY_")
    config_section: ClassVar[str] = "replay"

    # A command prints its report on stdout; only warnings and worse go to stderr.
    log_level: str = "WARNING"
    # Calls per second (a bound, never exceeded, not caught up after a stall): modest, so
    # a replay beside the live mesh does not take its CPU.
    rate: float = Field(default=50.0, gt=0)
    # Calls awaiting their answer at once.
    max_in_flight: int = Field(default=8, ge=1)
    # Each call's deadline.
    call_timeout_s: float = Field(default=2.0, gt=0)
    # A started model container must answer its health check within this.
    model_start_timeout_s: float = Field(default=60.0, gt=0)
    model_health_poll_s: float = Field(default=0.2, gt=0)
    # After SIGTERM, the container is killed if it has not exited within this.
    model_stop_grace_s: float = Field(default=5.0, gt=0)
    # Reading the control topic up to its end (a broker that does not answer fails here).
    control_timeout_s: float = Field(default=20.0, gt=0)
    # One read from a topic; a broker silent for longer ends the command.
    read_timeout_s: float = Field(default=30.0, gt=0)
    # A topic is read up to what was published when the read began, plus this much for the
    # broker's clock running ahead of ours; later messages are live traffic, not history.
    read_tail_margin_s: float = Field(default=1.0, ge=0)
    # The paired bootstrap (services.evaluator.stats.paired_bootstrap); resamples None: its
    # default.
    confidence: float = Field(default=0.95, gt=0, lt=1)
    resamples: int | None = Field(default=None, ge=1)
    seed: int = 0


class ReplayError(Exception):
    """The replay could not be done (the broker, the model); exit status 1."""


class UsageError(ReplayError):
    """A command line the tool refuses; exit status 2."""


# ---------------------------------------------------------------------------------------
# Times and the window
# ---------------------------------------------------------------------------------------

# "15m" and "-15m" both mean 15 minutes ago ("--since 15m" needs no "=": argparse takes a
# leading "-" for an option).
_RELATIVE = re.compile(r"^-?(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_time(text: str, now: datetime) -> datetime:
    """An absolute time from ISO-8601 (naive means UTC), `now`, or relative: `15m`,
    `2h`, `30s`, `1.5d` before `now` (a leading `-` is allowed). UsageError otherwise."""
    value = text.strip()
    if value == "now":
        return now
    relative = _RELATIVE.match(value)
    if relative:
        return now - timedelta(seconds=float(relative[1]) * _UNIT_S[relative[2]])
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(
            f"cannot read the time {text!r}: give ISO-8601 (2025-01-31T12:00:00Z) "
            "or a time before now (30s, 15m, 2h, 1d)"
        ) from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _epoch_ns(moment: datetime) -> int:
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86400 + delta.seconds) * NS_PER_S + delta.microseconds * 1000


@dataclass(frozen=True)
class Window:
    """Tasks received in [since, until); an open end takes everything on that side."""

    since_ns: int | None = None
    until_ns: int | None = None

    @classmethod
    def parse(cls, since: str | None, until: str | None, now: datetime) -> Window:
        """The window of the command line's --since and --until."""
        window = cls(
            _epoch_ns(parse_time(since, now)) if since else None,
            _epoch_ns(parse_time(until, now)) if until else None,
        )
        if (
            window.since_ns is not None
            and window.until_ns is not None
            and window.since_ns >= window.until_ns
        ):
            raise UsageError(f"--since {since} is not before --until {until}")
        return window

    def contains(self, received_ns: int) -> bool:
        """Whether a task received at `received_ns` (epoch) is in the window."""
        if self.since_ns is not None and received_ns < self.since_ns:
            return False
        return self.until_ns is None or received_ns < self.until_ns

    def describe(self) -> dict[str, str | None]:
        """Both ends as ISO-8601 (None: open)."""
        return {"since": _iso(self.since_ns), "until": _iso(self.until_ns)}


def _iso(epoch_ns: int | None) -> str | None:
    if epoch_ns is None:
        return None
    return datetime.fromtimestamp(epoch_ns / NS_PER_S, tz=UTC).isoformat()


Disposition = Literal["replay", "outside_window", "features_dropped", "warmup"]


def classify(record: task_pb2.ArchiveRecord, window: Window) -> Disposition:
    """What the replay does with one archive record."""
    task = record.task.task
    if task.warmup:
        # Never archived (the decoy drops them); should one appear, it is not traffic.
        return "warmup"
    if not window.contains(task.received_time.ToNanoseconds()):
        return "outside_window"
    if record.features_dropped:
        return "features_dropped"
    return "replay"


# ---------------------------------------------------------------------------------------
# The live configuration: what the replay must not be
# ---------------------------------------------------------------------------------------


def _host_port(endpoint: str) -> tuple[str, str]:
    host, _, port = endpoint.strip().rpartition(":")
    host = host.strip("[]").lower()
    # The mesh listens on loopback; "localhost" and 127.0.0.1 are one place.
    return ("127.0.0.1" if host in {"localhost", "", "0.0.0.0"} else host), port


def refusal(
    config: objective_pb2.ObjectiveConfig,
    model: str,
    endpoint: str | None,
    mesh_endpoints: Iterable[str],
) -> str | None:
    """Why the command must not run against the live mesh, or None.

    `model` must not name a deployment of the current configuration (its scores and its
    name in every report would be confused with the live one's); `endpoint` must not be a
    live deployment's nor a running mesh process's (the replay's load would reach them)."""
    names = {deployment.name for deployment in config.models}
    if model in names:
        return (
            f"{model!r} is a deployment of {config.objective!r} (version {config.version}): "
            "replay a model that is not in the live mesh, under a name of its own"
        )
    if endpoint is None:
        return None
    target = _host_port(endpoint)
    live = [d.endpoint for d in config.models if d.endpoint] + list(mesh_endpoints)
    if any(_host_port(other) == target for other in live):
        return f"{endpoint} is an endpoint of the live mesh: the replay talks only to its own model"
    return None


async def live_config(
    bus: Bus, objective: str, timeout_s: float
) -> objective_pb2.ObjectiveConfig | None:
    """The objective's current configuration, read from the control topic to its end."""
    from services.core.bus import BusError
    from services.core.control_topic import ControlFollower

    follower = ControlFollower(bus, objectives=[objective])
    try:
        await asyncio.wait_for(follower.open(), timeout_s)
        reading = asyncio.create_task(follower.run(), name="replay:control")
        try:
            await asyncio.wait_for(follower.caught_up.wait(), timeout_s)
        finally:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading
    except (TimeoutError, BusError) as exc:
        raise ReplayError(
            f"cannot read the control topic at {bus.settings.service_url} within {timeout_s:g}s "
            f"({type(exc).__name__}): is the broker up?"
        ) from exc
    finally:
        await follower.close()
    return follower.configs.get(objective)


# ---------------------------------------------------------------------------------------
# The replayed model
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """Where the replayed model runs: a container of `kind` started here, or `endpoint`."""

    name: str
    kind: str | None = None
    args: Mapping[str, Any] = field(default_factory=dict)
    version: str = "1"
    endpoint: str | None = None

    def describe(self) -> str:
        """One line for the report."""
        if self.endpoint is not None:
            return f"endpoint {self.endpoint}"
        return f"kind {self.kind} {json.dumps(dict(self.args), sort_keys=True)} v{self.version}"


def check_model_args(source: ModelSource) -> None:
    """Build the model here first, so bad `--args` are a usage error, not a dead child."""
    if source.kind is None:
        return
    from services.models.app import build_model
    from services.models.settings import ModelSettings

    try:
        build_model(
            ModelSettings(
                kind=source.kind,  # type: ignore[arg-type]  # checked by argparse choices
                name=source.name,
                version=source.version,
                args=dict(source.args),
            )
        )
    except (ValueError, TypeError, OSError) as exc:
        raise UsageError(f"--args do not fit kind {source.kind}: {exc}") from None


@contextlib.asynccontextmanager
async def model_endpoint(source: ModelSource, settings: ReplaySettings) -> AsyncIterator[str]:
    """The endpoint to call: `source.endpoint`, or a container started for the block
    (SERVING first; stopped however the block ends)."""
    if source.endpoint is not None:
        yield source.endpoint
        return
    from services.supervisor.app import check_health
    from services.supervisor.plan import free_port

    endpoint = f"127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "RDV_MODEL_KIND": str(source.kind),
        "RDV_MODEL_NAME": source.name,
        "RDV_MODEL_VERSION": source.version,
        "RDV_MODEL_ARGS": json.dumps(dict(source.args), sort_keys=True),
        "RDV_MODEL_LISTEN": endpoint,
        "PYTHONUNBUFFERED": "1",
    }
    log_file, log_handle = _open_log(source.name)
    with log_handle:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.models",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_handle,
            stderr=log_handle,
            env=env,
            # The model code of this checkout, whatever the caller's directory.
            cwd=REPO,
        )
    log.info(
        "model container started",
        extra={"model": source.name, "endpoint": endpoint, "pid": process.pid},
    )
    try:
        deadline = time.monotonic() + settings.model_start_timeout_s
        while not await check_health(endpoint):
            if process.returncode is not None:
                raise ReplayError(
                    f"the {source.kind} container exited ({process.returncode}) before serving; "
                    f"{log_file}:\n{_tail(log_file)}"
                )
            if time.monotonic() > deadline:
                raise ReplayError(
                    f"the {source.kind} container did not serve within "
                    f"{settings.model_start_timeout_s:g}s; {log_file}:\n{_tail(log_file)}"
                )
            await asyncio.sleep(settings.model_health_poll_s)
        yield endpoint
    finally:
        await _stop(process, settings.model_stop_grace_s)
        log.info("model container stopped", extra={"model": source.name, "pid": process.pid})
        _remove(log_file)


def _open_log(name: str) -> tuple[Path, IO[bytes]]:
    """A fresh file for the container's output (shown when it fails to start)."""
    descriptor, path = tempfile.mkstemp(prefix=f"replay-{name}-", suffix=".log")
    return Path(path), os.fdopen(descriptor, "ab")


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


async def _stop(process: asyncio.subprocess.Process, grace_s: float) -> None:
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    try:
        await asyncio.wait_for(process.wait(), grace_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


def _tail(path: Path) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])
    except OSError:
        return "(no log)"


@dataclass(frozen=True)
class CallResult:
    """One replayed request: the score or the error's status name, and how long it took."""

    request_id: str
    score: float | None
    error: str | None
    latency_s: float


class ModelCaller:
    """Predict calls to the replayed model, each with its own deadline."""

    def __init__(
        self,
        endpoint: str,
        objective: str,
        timeout_s: float,
        max_bytes: int,
        tls: TlsSettings | None = None,
    ) -> None:
        from rendezvous.v1 import model_pb2_grpc

        from services.core.channels import aio_channel

        self._objective = objective
        self._timeout_s = timeout_s
        self._channel = aio_channel(
            endpoint,
            tls,
            options=[
                ("grpc.max_receive_message_length", max_bytes),
                ("grpc.max_send_message_length", max_bytes),
            ],
        )
        self._stub = model_pb2_grpc.ModelServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __call__(self, enriched: task_pb2.EnrichedTask) -> CallResult:
        import grpc

        from services.core.protos import timestamp_from_ns
        from services.runner.model_client import predict_request

        request = predict_request(enriched, self._objective)
        # The archived deadline passed long ago: a model would refuse the request as expired.
        request.deadline.CopyFrom(
            timestamp_from_ns(time.time_ns() + int(self._timeout_s * NS_PER_S))
        )
        started = time.perf_counter()
        try:
            response = await self._stub.Predict(request, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as err:
            return CallResult(request.request_id, None, err.code().name, _since(started))
        elapsed = _since(started)
        if not math.isfinite(response.score):
            return CallResult(request.request_id, None, "NON_FINITE_SCORE", elapsed)
        return CallResult(request.request_id, response.score, None, elapsed)


def _since(started: float) -> float:
    return time.perf_counter() - started


# ---------------------------------------------------------------------------------------
# Reading topics, sending at a bounded rate
# ---------------------------------------------------------------------------------------


async def read_to_end(
    bus: Bus, topic: str, message_type: type[M], settings: ReplaySettings
) -> AsyncGenerator[Envelope[M], None]:
    """Every message of `topic` from the earliest retained one to its end, with a
    non-durable reader (no subscription: nothing is taken from a live consumer).

    The end is what was published when the read began (plus the clock margin): under live
    traffic the topic never runs dry, and a replay is of history."""
    from services.core.bus import BusError

    timeout = settings.read_timeout_s
    cutoff_ms = (time.time_ns() // NS_PER_MS) + int(settings.read_tail_margin_s * 1000)
    try:
        reader = await asyncio.wait_for(bus.reader(topic, message_type, start="earliest"), timeout)
    except (TimeoutError, BusError) as exc:
        raise ReplayError(f"cannot read {topic} ({type(exc).__name__}: {exc})") from exc
    try:
        while True:
            try:
                if not await asyncio.wait_for(reader.has_message_available(), timeout):
                    return
                envelope = await asyncio.wait_for(reader.read_next(), timeout)
            except (TimeoutError, BusError) as exc:
                raise ReplayError(f"reading {topic} failed ({type(exc).__name__})") from exc
            if envelope.publish_time_ms > cutoff_ms:
                return
            yield envelope
    finally:
        await reader.close()


class Pacer:
    """Spaces calls at least 1/rate apart: a bound, so after a stall (every slot taken by
    slow calls) the schedule restarts from now instead of catching up in a burst."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        self._interval = 1.0 / rate
        self._clock = clock
        self._next: float | None = None

    def reserve(self) -> float:
        """Take the next slot; how many seconds to wait for it."""
        now = self._clock()
        slot = now if self._next is None else max(self._next, now)
        self._next = slot + self._interval
        return slot - now


@dataclass
class Counts:
    """What became of the archive's records."""

    archived: int = 0
    outside_window: int = 0
    skipped_features_dropped: int = 0
    warmup: int = 0
    duplicates: int = 0
    replayed: int = 0
    succeeded: int = 0
    errors: Counter[str] = field(default_factory=Counter)


async def replayable(
    records: AsyncIterator[Envelope[task_pb2.ArchiveRecord]], window: Window, counts: Counts
) -> AsyncIterator[task_pb2.EnrichedTask]:
    """The archived tasks to replay, once per request id; the rest counted."""
    seen: set[str] = set()
    async for envelope in records:
        record = envelope.message
        counts.archived += 1
        disposition = classify(record, window)
        if disposition == "outside_window":
            counts.outside_window += 1
        elif disposition == "warmup":
            counts.warmup += 1
        elif disposition == "features_dropped":
            counts.skipped_features_dropped += 1
        elif record.task.task.request.request_id in seen:
            # The decoy archives at least once: a redelivered task comes twice.
            counts.duplicates += 1
        else:
            seen.add(record.task.task.request.request_id)
            yield record.task


async def send_paced(
    tasks: AsyncIterator[task_pb2.EnrichedTask],
    call: Callable[[task_pb2.EnrichedTask], Awaitable[CallResult]],
    pacer: Pacer,
    max_in_flight: int,
    on_result: Callable[[CallResult], None],
) -> None:
    """Call `call` for every task, spaced by `pacer`, at most `max_in_flight` at once."""
    slots = asyncio.Semaphore(max_in_flight)
    running: set[asyncio.Task[None]] = set()

    async def one(task: task_pb2.EnrichedTask) -> None:
        try:
            on_result(await call(task))
        finally:
            slots.release()

    try:
        async for task in tasks:
            await slots.acquire()
            await asyncio.sleep(pacer.reserve())
            job = asyncio.create_task(one(task))
            running.add(job)
            job.add_done_callback(running.discard)
        if running:
            await asyncio.gather(*running)
    finally:
        for job in running:
            job.cancel()


# ---------------------------------------------------------------------------------------
# The comparison (pure)
# ---------------------------------------------------------------------------------------


def role_name(role: int) -> str:
    """`incumbent`, `challenger`, ... for a ModelRole value."""
    if role == common_pb2.MODEL_ROLE_UNSPECIFIED:
        return "-"
    return common_pb2.ModelRole.Name(role).removeprefix("MODEL_ROLE_").lower()  # type: ignore[arg-type]


@dataclass(frozen=True)
class Agreement:
    """The replayed model's scores next to one live model's (or the answer's) on the same
    requests."""

    model: str
    role: str
    pairs: int
    mean_absolute_difference: float
    spearman: float


def agreement(
    replayed: Mapping[str, float], outcomes: Iterable[task_pb2.Outcome]
) -> list[Agreement]:
    """Per live model that scored replayed requests, and for the answer the client got."""
    from services.evaluator import stats
    from services.evaluator.join import scored_candidates

    pairs: dict[str, tuple[list[float], list[float]]] = {}
    roles: dict[str, str] = {ANSWERED: "-"}
    for outcome in outcomes:
        mine = replayed.get(outcome.request_id)
        if mine is None:
            continue
        scores, model_roles = scored_candidates(outcome)
        for model, score in [*scores.items(), (ANSWERED, outcome.response.score)]:
            ours, theirs = pairs.setdefault(model, ([], []))
            ours.append(mine)
            theirs.append(score)
            if model in model_roles:
                roles[model] = role_name(model_roles[model])
    rows = [
        Agreement(
            model,
            roles.get(model, "-"),
            len(ours),
            stats.mean_absolute_difference(ours, theirs),
            stats.rank_correlation(ours, theirs),
        )
        for model, (ours, theirs) in pairs.items()
    ]
    # Live models by name, the answer last.
    return sorted(rows, key=lambda row: (row.model == ANSWERED, row.model))


@dataclass(frozen=True)
class ErrorRow:
    """One model's (or the answer's) error on the labelled requests the replay scored."""

    model: str
    role: str
    figures: stats.RegressionError | stats.ClassificationError


@dataclass(frozen=True)
class GroundTruth:
    """Errors and the paired comparison on the labelled requests of one target kind."""

    kind: stats.TargetKind
    labelled: int
    errors: list[ErrorRow]
    # Every model against the incumbent of each request; the replayed model's is `replay`.
    comparisons: dict[str, Comparison]
    replay: Comparison | None


def labelled_requests(
    model: str,
    replayed: Mapping[str, float],
    outcomes: Iterable[task_pb2.Outcome],
    feedback: Iterable[feedback_pb2.Feedback],
) -> tuple[list[JoinedRequest], int]:
    """The replayed requests with an outcome and feedback, the replayed score added as
    `model`'s; and how many outcomes already had a candidate of that name (a past
    deployment's, left out in favour of the replay)."""
    from services.evaluator.join import joined_request

    # The latest observation of each replayed request wins (a correction replaces).
    latest: dict[str, feedback_pb2.Feedback] = {}
    for item in feedback:
        if item.request_id in replayed and item.WhichOneof("observed") is not None:
            latest[item.request_id] = item
    joined: list[JoinedRequest] = []
    shadowed = 0
    done: set[str] = set()
    for outcome in outcomes:
        score = replayed.get(outcome.request_id)
        observed = latest.get(outcome.request_id)
        # An outcome delivered twice is joined once.
        if score is None or observed is None or outcome.request_id in done:
            continue
        request = joined_request(outcome, observed)
        if request is None:
            continue
        done.add(outcome.request_id)
        if model in request.scores:
            shadowed += 1
        joined.append(
            dataclasses.replace(
                request,
                scores={**request.scores, model: score},
                roles={**request.roles, model: common_pb2.MODEL_ROLE_UNSPECIFIED},
            )
        )
    return joined, shadowed


def ground_truth(
    model: str,
    joined: list[JoinedRequest],
    settings: ReplaySettings,
) -> list[GroundTruth]:
    """Per target kind: every model's error and the answer's on the same labelled requests,
    and each model's paired comparison with the incumbent."""
    from services.evaluator import stats
    from services.evaluator.join import (
        answered_error_figures,
        compare_with_incumbent,
        model_error_figures,
        paired_samples,
    )

    out: list[GroundTruth] = []
    for kind in sorted({request.kind for request in joined}):
        subset = [request for request in joined if request.kind == kind]
        roles: dict[str, str] = {model: REPLAY_ROLE}
        for request in subset:
            for name, role in request.roles.items():
                roles.setdefault(name, role_name(role))
        figures = model_error_figures(subset, kind)
        rows = [ErrorRow(model, REPLAY_ROLE, figures.pop(model))]
        rows += [ErrorRow(name, roles[name], figures[name]) for name in sorted(figures)]
        rows.append(ErrorRow(ANSWERED, "-", answered_error_figures(subset, kind)))
        comparisons = compare_with_incumbent(
            paired_samples(subset),
            confidence=settings.confidence,
            resamples=settings.resamples or stats.BOOTSTRAP_RESAMPLES,
            seed=settings.seed,
        )
        out.append(GroundTruth(kind, len(subset), rows, comparisons, comparisons.get(model)))
    return out


# ---------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------


def _latency_sketch() -> stats.LatencySketch:
    from services.evaluator import stats

    return stats.LatencySketch()


@dataclass
class ReplayReport:
    """Everything a replay found; `to_dict` is the --json file."""

    objective: str
    objective_version: int
    model: str
    source: str
    window: Window
    rate: float
    max_in_flight: int
    call_timeout_s: float
    counts: Counts = field(default_factory=Counts)
    started: str = ""
    duration_s: float = 0.0
    latency: stats.LatencySketch = field(default_factory=_latency_sketch)
    outcomes: int = 0
    agreement: list[Agreement] = field(default_factory=list)
    ground_truth: list[GroundTruth] = field(default_factory=list)
    shadowed_candidates: int = 0

    @property
    def achieved_rate(self) -> float:
        """Calls per second over the replay (NaN when nothing was sent)."""
        if self.counts.replayed < 2 or self.duration_s <= 0:
            return math.nan
        return self.counts.replayed / self.duration_s

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures: NaN and missing values are null, times in seconds."""
        counts = dataclasses.asdict(self.counts)
        counts["errors"] = dict(self.counts.errors)
        counts["without_outcome"] = self.counts.succeeded - self.outcomes
        return cast(
            dict[str, Any],
            _clean(
                {
                    "objective": self.objective,
                    "objective_version": self.objective_version,
                    "model": self.model,
                    "source": self.source,
                    "window": self.window.describe(),
                    "rate_bound": self.rate,
                    "max_in_flight": self.max_in_flight,
                    "call_timeout_s": self.call_timeout_s,
                    "started": self.started,
                    "duration_s": self.duration_s,
                    "achieved_rate": self.achieved_rate,
                    "counts": counts,
                    "latency_s": {
                        f"p{q * 100:g}": value for q, value in self.latency.quantiles().items()
                    },
                    "outcomes": self.outcomes,
                    "shadowed_candidates": self.shadowed_candidates,
                    "agreement": [dataclasses.asdict(row) for row in self.agreement],
                    "ground_truth": [_truth_dict(truth) for truth in self.ground_truth],
                }
            ),
        )


def _comparison_dict(comparison: Comparison) -> dict[str, Any]:
    return {
        "model": comparison.model,
        "baseline": comparison.baseline,
        "pairs": comparison.pairs,
        "mean_diff": comparison.interval.mean,
        "ci_low": comparison.interval.low,
        "ci_high": comparison.interval.high,
        "confidence": comparison.confidence,
        "verdict": comparison.verdict,
    }


def _truth_dict(truth: GroundTruth) -> dict[str, Any]:
    return {
        "kind": truth.kind,
        "labelled": truth.labelled,
        "errors": [
            {"model": row.model, "role": row.role, **dataclasses.asdict(row.figures)}
            for row in truth.errors
        ],
        "replay_vs_incumbent": _comparison_dict(truth.replay) if truth.replay else None,
        "comparisons": [_comparison_dict(c) for _, c in sorted(truth.comparisons.items())],
    }


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _clean(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(item) for item in value]
    return value


def _num(value: float | None, digits: int = 4) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.{digits}f}"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.2f} ms"


def format_report(report: ReplayReport) -> str:
    """The terminal table."""
    counts = report.counts
    window = report.window.describe()
    lines = [
        f"Replay of {report.objective} (version {report.objective_version}) to {report.model} "
        f"({report.source})",
        f"window: {window['since'] or 'earliest'} .. {window['until'] or 'latest'}; bound "
        f"{report.rate:g}/s, {report.max_in_flight} in flight, {report.call_timeout_s:g}s a call",
        f"archive: {counts.archived} read; replayed {counts.replayed} in "
        f"{report.duration_s:.2f}s ({_num(report.achieved_rate, 1)}/s), {counts.succeeded} "
        f"scored, {sum(counts.errors.values())} errors"
        + (f" {dict(counts.errors)}" if counts.errors else ""),
        f"skipped: {counts.skipped_features_dropped} features dropped (archiving denied), "
        f"{counts.outside_window} outside the window, {counts.duplicates} duplicates",
        "latency: "
        + "  ".join(f"p{q * 100:g} {_ms(v)}" for q, v in report.latency.quantiles().items()),
        "",
        f"agreement with the live models ({report.outcomes} outcomes of replayed requests)",
        f"{'model':24} {'role':11} {'pairs':>6} {'mean |diff|':>12} {'spearman':>9}",
    ]
    lines += [
        f"{row.model:24} {row.role:11} {row.pairs:>6} "
        f"{_num(row.mean_absolute_difference):>12} {_num(row.spearman):>9}"
        for row in report.agreement
    ]
    if report.shadowed_candidates:
        lines.append(
            f"({report.shadowed_candidates} outcomes had a past deployment named "
            f"{report.model}; the replay's scores take its place)"
        )
    for truth in report.ground_truth:
        lines += ["", *_truth_lines(truth)]
    if not report.ground_truth:
        lines += ["", "no feedback for the replayed requests: no error against the truth"]
    return "\n".join(lines)


def _truth_lines(truth: GroundTruth) -> list[str]:
    regression = truth.kind == "regression"
    first, second = ("mae", "rmse") if regression else ("accuracy", "log_loss")
    lines = [
        f"error against the ground truth ({truth.kind}; {truth.labelled} labelled requests "
        "the replay scored)",
        f"{'model':24} {'role':11} {'n':>6} {first:>10} {second:>10}",
    ]
    for row in truth.errors:
        values = dataclasses.asdict(row.figures)
        lines.append(
            f"{row.model:24} {row.role:11} {row.figures.n:>6} "
            f"{_num(values[first]):>10} {_num(values[second]):>10}"
        )
    comparisons = sorted(truth.comparisons.values(), key=lambda c: (c is not truth.replay, c.model))
    if not comparisons:
        return [*lines, "no request scored by the incumbent: no paired comparison"]
    confidence = comparisons[0].confidence
    lines += [
        "",
        f"paired comparison with the incumbent (error minus the incumbent's, "
        f"{confidence:.0%} bootstrap CI)",
        f"{'model':24} {'baseline':20} {'pairs':>6} {'mean':>10} {'low':>10} {'high':>10}  verdict",
    ]
    for comparison in comparisons:
        mean, low, high = comparison.interval
        lines.append(
            f"{comparison.model:24} {comparison.baseline:20} {comparison.pairs:>6} "
            f"{_num(mean):>10} {_num(low):>10} {_num(high):>10}  {comparison.verdict}"
        )
    return lines


# ---------------------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplayOptions:
    """One replay, as the command line asked for it."""

    objective: str
    source: ModelSource
    window: Window
    rate: float
    max_in_flight: int
    call_timeout_s: float
    # Endpoints of the running mesh's processes: never called.
    mesh_endpoints: frozenset[str] = frozenset()


async def run_replay(options: ReplayOptions, settings: ReplaySettings) -> ReplayReport:
    """Replay the archive to the model, then compare with the outcomes and the feedback."""
    from services.core.bus import connect

    bus = connect(settings.pulsar, f"replay-{uuid.uuid4().hex[:8]}")
    try:
        config = await live_config(bus, options.objective, settings.control_timeout_s)
        if config is None:
            raise UsageError(
                f"objective {options.objective!r} has no configuration on the control topic"
            )
        why = refusal(config, options.source.name, options.source.endpoint, options.mesh_endpoints)
        if why is not None:
            raise UsageError(why)
        report = ReplayReport(
            objective=options.objective,
            objective_version=config.version,
            model=options.source.name,
            source=options.source.describe(),
            window=options.window,
            rate=options.rate,
            max_in_flight=options.max_in_flight,
            call_timeout_s=options.call_timeout_s,
        )
        scores = await _replay(bus, options, settings, report)
        outcomes = [
            envelope.message
            async for envelope in read_to_end(
                bus, bus.topics.results(options.objective), task_pb2.Outcome, settings
            )
            if envelope.message.request_id in scores
        ]
        report.outcomes = len({outcome.request_id for outcome in outcomes})
        feedback = [
            envelope.message
            async for envelope in read_to_end(
                bus, bus.topics.feedback(options.objective), feedback_pb2.Feedback, settings
            )
            if envelope.message.request_id in scores
        ]
        report.agreement = agreement(scores, _first_per_request(outcomes))
        joined, report.shadowed_candidates = labelled_requests(
            options.source.name, scores, outcomes, feedback
        )
        report.ground_truth = ground_truth(options.source.name, joined, settings)
        log.info(
            "replay done",
            extra={
                "objective": options.objective,
                "model": options.source.name,
                "replayed": report.counts.replayed,
                "errors": sum(report.counts.errors.values()),
                "labelled": len(joined),
            },
        )
        return report
    finally:
        await bus.close()


def _first_per_request(outcomes: Iterable[task_pb2.Outcome]) -> list[task_pb2.Outcome]:
    # Outcomes are published at least once; a redelivered one must not count twice.
    first: dict[str, task_pb2.Outcome] = {}
    for outcome in outcomes:
        first.setdefault(outcome.request_id, outcome)
    return list(first.values())


async def _replay(
    bus: Bus, options: ReplayOptions, settings: ReplaySettings, report: ReplayReport
) -> dict[str, float]:
    """Send the window's archived tasks to the model; the scores by request id."""
    scores: dict[str, float] = {}

    def take(result: CallResult) -> None:
        report.counts.replayed += 1
        if result.score is None:
            report.counts.errors[result.error or "UNKNOWN"] += 1
            return
        report.counts.succeeded += 1
        report.latency.add(result.latency_s)
        scores[result.request_id] = result.score

    async with model_endpoint(options.source, settings) as endpoint:
        # A container started here serves plaintext; one at --endpoint per RDV_REPLAY_TLS__*.
        caller = ModelCaller(
            endpoint,
            options.objective,
            options.call_timeout_s,
            settings.max_message_bytes,
            settings.tls if options.source.endpoint is not None else None,
        )
        report.started = datetime.now(UTC).isoformat()
        started = time.monotonic()
        records = read_to_end(
            bus, bus.topics.archive(options.objective), task_pb2.ArchiveRecord, settings
        )
        try:
            async with contextlib.aclosing(records):
                await send_paced(
                    replayable(records, options.window, report.counts),
                    caller,
                    Pacer(options.rate),
                    options.max_in_flight,
                    take,
                )
        finally:
            report.duration_s = time.monotonic() - started
            await caller.close()
    return scores


# ---------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------


def mesh_state(state_dir: Path) -> dict[str, Any]:
    """The running mesh's state file (`rendezvous up`), or {} when there is none."""
    try:
        data: dict[str, Any] = json.loads((state_dir / "state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return data


def pulsar_settings(
    settings: ReplaySettings, explicit_url: str | None, state: Mapping[str, Any]
) -> PulsarSettings:
    """--pulsar-url, else the settings' when set (env, YAML), else the running mesh's."""
    if explicit_url:
        return settings.pulsar.model_copy(update={"service_url": explicit_url})
    # The mesh's broker, with its token and CA files.
    return settings.pulsar.for_mesh(state)


def options_from_args(
    args: argparse.Namespace, settings: ReplaySettings, now: datetime
) -> ReplayOptions:
    """The replay the command line asks for; UsageError for what cannot be run."""
    if args.endpoint is not None and args.args is not None:
        raise UsageError("--args configure a container started with --kind, not an --endpoint")
    model_args: dict[str, Any] = {}
    if args.args is not None:
        try:
            model_args = json.loads(args.args)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--args is not JSON: {exc}") from None
        if not isinstance(model_args, dict):
            raise UsageError("--args must be a JSON object")
    source = ModelSource(
        name=args.model,
        kind=args.kind,
        args=model_args,
        version=args.model_version,
        endpoint=args.endpoint,
    )
    check_model_args(source)
    rate = settings.rate if args.rate is None else args.rate
    in_flight = settings.max_in_flight if args.in_flight is None else args.in_flight
    timeout = settings.call_timeout_s if args.timeout is None else args.timeout
    if rate <= 0 or in_flight < 1 or timeout <= 0:
        raise UsageError("--rate and --timeout must be positive, --in-flight at least 1")
    state = mesh_state(Path(args.state_dir))
    endpoints = frozenset(
        str(process["endpoint"])
        for process in state.get("processes", [])
        if process.get("endpoint")
    )
    return ReplayOptions(
        objective=args.objective,
        source=source,
        window=Window.parse(args.since, args.until, now),
        rate=rate,
        max_in_flight=in_flight,
        call_timeout_s=timeout,
        mesh_endpoints=endpoints,
    )


def cmd_replay(args: argparse.Namespace) -> int:
    """`rendezvous replay`: run it, print the table, write --json."""
    try:
        settings = ReplaySettings()
        options = options_from_args(args, settings, datetime.now(UTC))
        pulsar = pulsar_settings(settings, args.pulsar_url, mesh_state(Path(args.state_dir)))
        settings = settings.model_copy(update={"pulsar": pulsar})
    except (UsageError, ValueError) as exc:
        # A pydantic ValidationError (bad RDV_REPLAY_* values) is a ValueError too.
        print(f"replay: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from services.core.telemetry import configure_logging

    configure_logging("replay", settings.log_level, settings.log_format)
    try:
        report = asyncio.run(run_replay(options, settings))
    except UsageError as exc:
        print(f"replay: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ReplayError as exc:
        print(f"replay: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("replay: interrupted (the model container, if started, is stopped)", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(format_report(report))
    if args.json_file is not None:
        args.json_file.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        print(f"\nwritten to {args.json_file}")
    return 0


def add_parser(sub: Any) -> None:
    """Register `replay` on the `rendezvous` command's subparsers."""
    parser = sub.add_parser(
        "replay",
        help="replay archived tasks to a model outside the live mesh and compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--objective", default="demo")
    parser.add_argument("--model", required=True, help="the replayed model's name (not live)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--kind", choices=get_args(ModelKind), help="start a container of it")
    source.add_argument("--endpoint", help="HOST:PORT of a running Model server")
    parser.add_argument("--args", help="the container's arguments, a JSON object")
    parser.add_argument("--version", dest="model_version", default="1", help="its version")
    parser.add_argument("--since", help="ISO-8601 or how long ago (15m); default: the earliest")
    parser.add_argument("--until", help="ISO-8601 or relative; default: now")
    parser.add_argument("--rate", type=float, help="calls per second at most (default 50)")
    parser.add_argument("--in-flight", type=int, help="calls at once at most (default 8)")
    parser.add_argument("--timeout", type=float, help="each call's deadline, s (default 2)")
    parser.add_argument("--json", type=Path, dest="json_file", help="write every figure here")
    parser.add_argument("--pulsar-url", help="the broker (default: the running mesh's)")
    parser.set_defaults(handler=cmd_replay)
