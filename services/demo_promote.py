"""`rendezvous demo-promote`: a challenger added, promoted and rolled back under live traffic.

The hot hand-off the rendezvous architecture exists for, shown and checked from the client's
side. Open-loop traffic runs at a fixed rate the whole time while three changes go through
the control plane, each a new version of the objective:

1. add a challenger (the supervisor starts its container, a runner host starts its runner);
2. promote it (retried while the control plane says no runner serves it yet): it becomes the
   incumbent, alone in the policy's first step;
3. roll back to the version before the promotion.

Every answer records the version that decided it. The drill then checks what a user and an
auditor would: every call answered OK; every answer consistent with the one version it names
(an accepting model is in that version's step and plays that version's role); how long after
each change requests were still decided by the older version (the switch time); and that
every request has its outcome on the results topic and its record in the archive.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from rendezvous.v1 import (
    common_pb2,
    control_pb2,
    control_pb2_grpc,
    objective_pb2,
    scoring_pb2,
    scoring_pb2_grpc,
    task_pb2,
)

from services.control.cli import author
from services.control.edits import promote
from services.core import client
from services.core.bus import PulsarBus
from services.core.protos import set_values
from services.core.settings import PulsarSettings, TlsSettings
from services.demo import diabetes_rows, quantile

# How many missing request ids the report lists (with their send times and versions).
MISSING_EXAMPLES = 10


@dataclass
class Answered:
    """One request as the client saw it; times in seconds since the drill started."""

    request_id: str
    sent_s: float
    received_s: float
    code: str
    model: str = ""
    version: int = 0
    role: str = ""
    rule_index: int = -1
    reason: str = ""


@dataclass
class Change:
    """One control-plane change: when it was sent, when the new version was stored."""

    action: str
    version: int
    sent_s: float
    returned_s: float
    attempts: int
    # Filled in by the analysis.
    switch_s: float | None = None
    first_new_answer_s: float | None = None


@dataclass
class DrillReport:
    """What the drill saw and what it checked."""

    objective: str
    rate: float
    answers: list[Answered] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)
    inconsistent: list[str] = field(default_factory=list)
    missing_outcomes: list[str] = field(default_factory=list)
    missing_archive: list[str] = field(default_factory=list)

    @property
    def failed_calls(self) -> Counter[str]:
        return Counter(a.code for a in self.answers if a.code != "OK")

    def summary(self) -> dict[str, Any]:
        latencies = [(a.received_s - a.sent_s) * 1000 for a in self.answers if a.code == "OK"]
        return {
            "objective": self.objective,
            "rate": self.rate,
            "requests": len(self.answers),
            "failed_calls": dict(self.failed_calls),
            "defaults": sum(1 for a in self.answers if a.code == "OK" and not a.model),
            "latency_ms": {
                "p50": quantile(latencies, 0.5),
                "p99": quantile(latencies, 0.99),
                "max": max(latencies, default=float("nan")),
            },
            "answers_by_version_and_model": {
                f"v{version} {model or '(default)'}": count
                for (version, model), count in sorted(
                    Counter((a.version, a.model) for a in self.answers if a.code == "OK").items()
                )
            },
            "changes": [asdict(change) for change in self.changes],
            "inconsistent": self.inconsistent,
            "missing_outcomes": len(self.missing_outcomes),
            "missing_archive": len(self.missing_archive),
            # The first few of each, with when they were sent and the version that decided them.
            "missing_examples": [
                {"request_id": a.request_id, "sent_s": a.sent_s, "version": a.version, "in": where}
                for where, ids in (
                    ("results", self.missing_outcomes),
                    ("archive", self.missing_archive),
                )
                for a in self.answers
                if a.request_id in set(ids[:MISSING_EXAMPLES])
            ],
        }


class _Traffic:
    """Open-loop Score calls at a fixed rate until stopped; every answer recorded."""

    def __init__(  # noqa: PLR0917 (the drill's coordinates)
        self,
        target: str,
        objective: str,
        rate: float,
        run_id: str,
        t0: float,
        tls: TlsSettings | None = None,
    ) -> None:
        self.target = target
        self.tls = tls
        self.objective = objective
        self.rate = rate
        self.run_id = run_id
        self.t0 = t0
        self.answers: list[Answered] = []
        self._stop = asyncio.Event()
        self._calls: set[asyncio.Task[None]] = set()

    async def run(self, timeout_s: float) -> None:
        rows = diabetes_rows()
        async with client.aio_channel(self.target, self.tls) as channel:
            stub: scoring_pb2_grpc.ScoringServiceAsyncStub = scoring_pb2_grpc.ScoringServiceStub(
                channel
            )
            started = time.monotonic()
            index = 0
            while not self._stop.is_set():
                request = scoring_pb2.ScoreRequest(
                    objective=self.objective,
                    request_id=f"{self.run_id}-{index}",
                    subject_id=f"user-{index % 50}",
                )
                set_values(request.features, rows[index % len(rows)])
                due = started + index / self.rate
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                call = asyncio.create_task(self._one(stub, request, timeout_s))
                self._calls.add(call)
                call.add_done_callback(self._calls.discard)
                index += 1
            if self._calls:
                await asyncio.wait(self._calls)

    async def _one(
        self,
        stub: scoring_pb2_grpc.ScoringServiceAsyncStub,
        request: scoring_pb2.ScoreRequest,
        timeout_s: float,
    ) -> None:
        sent = time.monotonic() - self.t0
        try:
            response = await stub.Score(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as err:
            self.answers.append(
                Answered(request.request_id, sent, time.monotonic() - self.t0, err.code().name)
            )
            return
        decision = response.decision
        self.answers.append(
            Answered(
                request_id=request.request_id,
                sent_s=sent,
                received_s=time.monotonic() - self.t0,
                code="OK",
                model=decision.model,
                version=response.objective_version,
                role=common_pb2.ModelRole.Name(decision.role),
                rule_index=decision.rule_index,
                reason=scoring_pb2.DecisionReason.Name(decision.reason),
            )
        )

    def stop(self) -> None:
        self._stop.set()


def _change(config: objective_pb2.ObjectiveConfig, action: str, reason: str) -> None:
    config.change.Clear()
    config.change.author = author()
    config.change.action = action
    config.change.reason = reason


def with_challenger(
    config: objective_pb2.ObjectiveConfig, name: str, kind: str, args: dict[str, Any]
) -> objective_pb2.ObjectiveConfig:
    """`config` with one more challenger, not yet accepted by the policy."""
    new = objective_pb2.ObjectiveConfig()
    new.CopyFrom(config)
    deployment = new.models.add(
        name=name, role=common_pb2.MODEL_ROLE_CHALLENGER, version="1", kind=kind, enabled=True
    )
    deployment.args.update(args)
    return new


async def _update(
    stub: control_pb2_grpc.ControlPlaneServiceAsyncStub,
    config: objective_pb2.ObjectiveConfig,
    expected: int,
    t0: float,
    *,
    retry_until_s: float = 0.0,
) -> Change:
    """One change; retried on FAILED_PRECONDITION (no ready runner yet) until the deadline."""
    attempts = 0
    while True:
        attempts += 1
        sent = time.monotonic() - t0
        try:
            response = await stub.UpdateObjectiveConfig(
                control_pb2.UpdateObjectiveConfigRequest(config=config, expected_version=expected),
                timeout=10.0,
            )
        except grpc.aio.AioRpcError as err:
            if (
                err.code() == grpc.StatusCode.FAILED_PRECONDITION
                and time.monotonic() - t0 < retry_until_s
            ):
                await asyncio.sleep(0.5)
                continue
            raise
        return Change(
            action=config.change.action,
            version=response.config.version,
            sent_s=sent,
            returned_s=time.monotonic() - t0,
            attempts=attempts,
        )


async def _read_request_ids(
    bus: PulsarBus, topic: str, message_type: Any, *, run_id: str, wanted: int, wait_s: float
) -> set[str]:
    """Request ids of this run found on `topic` (outcomes or archive records)."""
    found: set[str] = set()
    reader = await bus.reader(topic, message_type)
    deadline = time.monotonic() + wait_s
    try:
        while len(found) < wanted and time.monotonic() < deadline:
            try:
                envelope = await asyncio.wait_for(reader.read_next(), deadline - time.monotonic())
            except TimeoutError:
                break
            message = envelope.message
            request_id = (
                message.request_id
                if isinstance(message, task_pb2.Outcome)
                else message.task.task.request.request_id
            )
            if request_id.startswith(run_id):
                found.add(request_id)
    finally:
        await reader.close()
    return found


def check_consistency(
    answers: list[Answered], versions: dict[int, objective_pb2.ObjectiveConfig]
) -> list[str]:
    """Answers that a single version cannot explain: a mixture of versions."""
    problems = []
    for answered in answers:
        if answered.code != "OK":
            continue
        config = versions.get(answered.version)
        if config is None:
            problems.append(f"{answered.request_id}: unknown version {answered.version}")
            continue
        if not answered.model:
            continue
        roles = {m.name: common_pb2.ModelRole.Name(m.role) for m in config.models}
        if roles.get(answered.model) != answered.role:
            problems.append(
                f"{answered.request_id}: {answered.model} answered as {answered.role}, "
                f"v{answered.version} says {roles.get(answered.model)}"
            )
        if answered.reason == "DECISION_REASON_ACCEPTED":
            steps = config.policy.steps
            if not 0 <= answered.rule_index < len(steps) or answered.model not in (
                steps[answered.rule_index].accept
            ):
                problems.append(
                    f"{answered.request_id}: {answered.model} accepted by step "
                    f"{answered.rule_index}, which v{answered.version} does not let accept it"
                )
    return problems


def measure_switches(
    changes: list[Change], answers: list[Answered], promoted: str, incumbent: str
) -> None:
    """Per change: how long after it was sent requests were still decided by an older
    version, and when the first answer of the new version's incumbent came back."""
    ok = [a for a in answers if a.code == "OK"]
    for change in changes:
        older = [a.sent_s for a in ok if a.version < change.version]
        later_old = [s for s in older if s >= change.sent_s]
        change.switch_s = max(later_old) - change.sent_s if later_old else 0.0
        expected = {"promote": promoted, "rollback": incumbent}.get(change.action)
        if expected is None:
            continue
        # Decided by the new version, so it answers as that version's incumbent (the
        # consistency check holds each answer to its version's roles and steps).
        firsts = [a.received_s for a in ok if a.version >= change.version and a.model == expected]
        change.first_new_answer_s = min(firsts) - change.sent_s if firsts else None


async def run_drill(  # noqa: PLR0917 (the drill's knobs, all from the command line)
    target: str,
    control_target: str,
    objective: str,
    pulsar: PulsarSettings,
    rate: float,
    hold_s: float,
    challenger: str,
    ready_timeout_s: float = 120.0,
    outcome_wait_s: float = 30.0,
    tls: TlsSettings | None = None,
) -> DrillReport:
    """Traffic, then add / promote / roll back, then the checks. `pulsar`: how to read the
    mesh's outcomes (its broker, token and CA)."""
    run_id = f"promote-{uuid.uuid4().hex[:8]}"
    t0 = time.monotonic()
    report = DrillReport(objective=objective, rate=rate)
    async with client.aio_channel(control_target, tls) as channel:
        control: control_pb2_grpc.ControlPlaneServiceAsyncStub = (
            control_pb2_grpc.ControlPlaneServiceStub(channel)
        )
        current = (
            await control.GetObjectiveConfig(
                control_pb2.GetObjectiveConfigRequest(objective=objective), timeout=10.0
            )
        ).config
        incumbents = [m.name for m in current.models if m.role == common_pb2.MODEL_ROLE_INCUMBENT]
        incumbent = incumbents[0]
        traffic = _Traffic(target, objective, rate, run_id, t0, tls)
        sending = asyncio.create_task(traffic.run(timeout_s=5.0))
        try:
            await asyncio.sleep(hold_s)
            added = with_challenger(current, challenger, "diabetes", {"algorithm": "ridge"})
            _change(added, "add-model", f"drill {run_id}: add {challenger} as a challenger")
            report.changes.append(await _update(control, added, current.version, t0))
            before_promotion = report.changes[-1].version

            stored = (
                await control.GetObjectiveConfig(
                    control_pb2.GetObjectiveConfigRequest(objective=objective), timeout=10.0
                )
            ).config
            promoted = promote(stored, challenger)
            _change(promoted, "promote", f"drill {run_id}: promote {challenger}")
            report.changes.append(
                await _update(
                    control,
                    promoted,
                    stored.version,
                    t0,
                    retry_until_s=time.monotonic() - t0 + ready_timeout_s,
                )
            )
            await asyncio.sleep(hold_s)

            back = objective_pb2.ObjectiveConfig()
            back.CopyFrom(
                (
                    await control.GetObjectiveConfig(
                        control_pb2.GetObjectiveConfigRequest(
                            objective=objective, version=before_promotion
                        ),
                        timeout=10.0,
                    )
                ).config
            )
            _change(back, "rollback", f"drill {run_id}: roll back to v{before_promotion}")
            report.changes.append(await _update(control, back, report.changes[-1].version, t0))
            await asyncio.sleep(hold_s)
        finally:
            traffic.stop()
            await sending
        history = await control.ListObjectiveHistory(
            control_pb2.ListObjectiveHistoryRequest(objective=objective), timeout=10.0
        )
    report.answers = sorted(traffic.answers, key=lambda a: a.sent_s)
    versions = {config.version: config for config in history.versions}
    report.inconsistent = check_consistency(report.answers, versions)
    measure_switches(report.changes, report.answers, challenger, incumbent)

    answered = {a.request_id for a in report.answers if a.code == "OK"}
    bus = PulsarBus(pulsar, "demo-promote")
    try:
        found = [
            await _read_request_ids(
                bus,
                topic,
                message_type,
                run_id=run_id,
                wanted=len(answered),
                wait_s=outcome_wait_s,
            )
            for topic, message_type in (
                (bus.topics.results(objective), task_pb2.Outcome),
                (bus.topics.archive(objective), task_pb2.ArchiveRecord),
            )
        ]
    finally:
        await bus.close()
    report.missing_outcomes = sorted(answered - found[0])
    report.missing_archive = sorted(answered - found[1])
    return report


def print_report(report: DrillReport) -> None:
    summary = report.summary()
    print(
        f"\n{summary['requests']} requests at {report.rate:g}/s; failed calls: "
        f"{summary['failed_calls'] or 'none'}; defaults: {summary['defaults']}; "
        f"latency p50 {summary['latency_ms']['p50']:.1f} ms, "
        f"p99 {summary['latency_ms']['p99']:.1f} ms"
    )
    print(
        f"\n{'change':10} {'version':>7} {'sent at':>8} {'stored in':>10} {'attempts':>8} "
        f"{'old version until':>18} {'new incumbent after':>20}"
    )
    for change in report.changes:
        stored_ms = (change.returned_s - change.sent_s) * 1000
        first = (
            f"{change.first_new_answer_s * 1000:.0f} ms"
            if change.first_new_answer_s is not None
            else "-"
        )
        print(
            f"{change.action:10} {'v' + str(change.version):>7} {change.sent_s:>7.1f}s "
            f"{stored_ms:>8.0f}ms {change.attempts:>8} "
            f"{(change.switch_s or 0) * 1000:>15.0f} ms {first:>20}"
        )
    print("\nanswers by version and model:")
    for key, count in summary["answers_by_version_and_model"].items():
        print(f"  {key:40} {count:>6}")
    print(
        f"\ndecided by a mixture of versions: {len(report.inconsistent)}; outcomes missing from "
        f"the results topic: {len(report.missing_outcomes)}; missing from the archive: "
        f"{len(report.missing_archive)}"
    )


def write_report(report: DrillReport, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.summary(), indent=2) + "\n")
