"""The fault matrix: one mesh under open-loop load, one fault after another, every request
in a ledger, then the topics read back to see what was lost.

    python -m tools.chaos [--rate 100] [--seconds 60] [--faults rendezvous,collector,...]
                          [--soak 600] [--out docs/results/reliability.md]

The mesh is `deploy/mesh/chaos.yaml` under the real supervisor (`tools/bench/environment`).
Each fault is a phase at `--rate` for `--seconds`: `--lead` seconds of steady load (the
baseline), the fault, the rest of the phase, then a pause until every process is ready again.
Faults: `kill -9` of the rendezvous, the collector, the models' runner host, a model container,
the enricher, a decoy host, the broker (restarted with tools/pulsar.sh), and SIGSTOP of the
broker for 5 s. After the phases every request's outcome and archive record is looked up on
the results and archive topics (`tools/chaos/ledger.py` says what counts as lost). The soak
runs `--soak` seconds at `--rate` and samples every process's resident memory.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from rendezvous.v1 import scoring_pb2, scoring_pb2_grpc, task_pb2

from services.core.bus import M, PulsarBus
from services.core.protos import set_values
from services.core.settings import PulsarSettings
from services.demo import diabetes_rows
from tools.bench.environment import PULSAR_SH, Broker, Mesh, log
from tools.chaos.ledger import Fault, FaultFigures, Sent, figures

REPO = Path(__file__).resolve().parents[2]
CHAOS_MESH = REPO / "deploy" / "mesh" / "chaos.yaml"
OBJECTIVE = "chaos"
LATE_GRACE_S = 0.5  # deploy/mesh/chaos.yaml late_grace_ms
CALL_TIMEOUT_S = 2.0
READY_TIMEOUT_S = 120.0
STOP_BROKER_S = 5.0
RSS_SAMPLE_S = 10.0

# Fault name -> the supervised process to kill (None: the broker).
KILLS: dict[str, str | None] = {
    "rendezvous": "rendezvous",
    "collector": "collector",
    "runner-host": f"runners-{OBJECTIVE}-0",
    "model-container": "model-chaos-ridge",
    "enricher": "enricher",
    "decoy": f"runners-{OBJECTIVE}-x2-0",
    "broker-kill": None,
}
ALL_FAULTS = [*KILLS, "broker-stop"]


@dataclass
class Phase:
    """One fault's ledger."""

    fault: Fault
    sent: list[Sent] = field(default_factory=list)


class Load:
    """Open-loop Score calls at a fixed rate, each one a ledger entry."""

    def __init__(self, endpoint: str, rate: float, started: float) -> None:
        self.endpoint = endpoint
        self.rate = rate
        self.started = started
        self.rows = diabetes_rows()

    def now(self) -> float:
        return time.monotonic() - self.started

    async def run(self, seconds: float, prefix: str, into: list[Sent]) -> None:
        async with grpc.aio.insecure_channel(self.endpoint) as channel:
            stub = scoring_pb2_grpc.ScoringServiceStub(channel)
            begin = time.monotonic()
            calls: list[asyncio.Task[None]] = []
            index = 0
            while time.monotonic() - begin < seconds:
                await asyncio.sleep(max(0.0, begin + index / self.rate - time.monotonic()))
                entry = Sent(f"{prefix}-{index}", self.now())
                into.append(entry)
                calls.append(asyncio.create_task(self._one(stub, entry, index)))
                index += 1
            await asyncio.gather(*calls)

    async def _one(self, stub: Any, entry: Sent, index: int) -> None:
        request = scoring_pb2.ScoreRequest(
            objective=OBJECTIVE, request_id=entry.request_id, subject_id=f"s-{index % 100}"
        )
        set_values(request.features, self.rows[index % len(self.rows)])
        try:
            response = await stub.Score(request, timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            entry.status = error.code().name
            return
        entry.status = "OK"
        entry.answered_s = self.now()
        entry.default = response.decision.source == scoring_pb2.ANSWER_SOURCE_DEFAULT
        entry.model = response.decision.model
        entry.reason = scoring_pb2.DecisionReason.Name(response.decision.reason)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        log(f"pid {pid} already gone")


def _broker_pid() -> int:
    return int((REPO / ".run" / "pulsar" / "pulsar.pid").read_text().strip())


async def inject(name: str, mesh: Mesh, broker: Broker) -> None:
    """Inject fault `name` (returns once it is injected; the broker stop also resumes it)."""
    if name == "broker-stop":
        pid = _broker_pid()
        _signal(pid, signal.SIGSTOP)
        await asyncio.sleep(STOP_BROKER_S)
        _signal(pid, signal.SIGCONT)
        return
    target = KILLS[name]
    if target is None:
        _signal(_broker_pid(), signal.SIGKILL)
        # The broker is nobody's child here: bring it back as an operator would, on its own
        # data (`restart` keeps topics and cursors; `up` would start from nothing).
        await asyncio.to_thread(
            subprocess.run,
            [str(PULSAR_SH), "restart"],
            env=broker.env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        return
    _signal(int(mesh.process(target)["pid"]), signal.SIGKILL)


async def wait_ready(mesh: Mesh) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        statuses = {p["name"]: p["status"] for p in mesh.state()["processes"]}
        if all(status == "ready" for status in statuses.values()):
            return
        await asyncio.sleep(0.5)
    raise RuntimeError(f"the mesh did not recover in {READY_TIMEOUT_S:g}s: {statuses}")


async def run_phase(  # noqa: PLR0917 (a phase's coordinates)
    name: str, mesh: Mesh, broker: Broker, load: Load, seconds: float, lead_s: float
) -> Phase:
    log(f"fault {name}: {seconds:g}s at {load.rate:g} req/s, injected after {lead_s:g}s")
    phase = Phase(Fault(name, 0.0, 0.0))
    running = asyncio.create_task(load.run(seconds, f"{name}-{uuid.uuid4().hex[:6]}", phase.sent))
    await asyncio.sleep(lead_s)
    phase.fault.injected_s = load.now()
    await inject(name, mesh, broker)
    phase.fault.cleared_s = load.now()
    await running
    await wait_ready(mesh)
    return phase


async def read_ids(broker: Broker, topic_of: Callable[[PulsarBus], str], kind: str) -> list[str]:
    """Every request id on a topic, repeats included (read from the earliest to the end)."""
    bus = PulsarBus(PulsarSettings(service_url=broker.service_url), f"chaos-{kind}")
    try:
        if kind == "outcome":
            return [o.request_id for o in await _read_all(bus, topic_of(bus), task_pb2.Outcome)]
        records = await _read_all(bus, topic_of(bus), task_pb2.ArchiveRecord)
        return [r.task.task.request.request_id for r in records]
    finally:
        await bus.close()


async def _read_all(bus: PulsarBus, topic: str, message_type: type[M]) -> list[M]:
    reader = await bus.reader(topic, message_type)
    messages: list[M] = []
    while await reader.has_message_available():
        messages.append((await reader.read_next()).message)
    await reader.close()
    return messages


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


async def soak(mesh: Mesh, load: Load, seconds: float) -> dict[str, Any]:
    """`seconds` at the load's rate; resident memory of every process every RSS_SAMPLE_S."""
    log(f"soak: {seconds:g}s at {load.rate:g} req/s")
    sent: list[Sent] = []
    samples: dict[str, list[tuple[float, int]]] = {}
    running = asyncio.create_task(load.run(seconds, f"soak-{uuid.uuid4().hex[:6]}", sent))
    begin = load.now()
    while not running.done():
        for process in mesh.state()["processes"]:
            rss = rss_kib(int(process["pid"]))
            if rss is not None:
                samples.setdefault(process["name"], []).append((load.now() - begin, rss))
        await asyncio.wait({running}, timeout=RSS_SAMPLE_S)
    await running
    growth: dict[str, float] = {}
    for name, points in samples.items():
        after_first_minute = [rss for at, rss in points if at >= 60.0]
        if len(after_first_minute) >= 2:
            growth[name] = 100.0 * (after_first_minute[-1] / after_first_minute[0] - 1.0)
    return {"sent": sent, "rss_growth_pct": growth, "rss_samples": samples}


async def account(broker: Broker, phase: Phase) -> FaultFigures:
    """The phase's row: its ledger against what the results and archive topics hold."""
    # The last outcomes leave late_grace after their answers.
    await asyncio.sleep(LATE_GRACE_S + 2)
    outcome_ids = await read_ids(broker, lambda b: b.topics.results(OBJECTIVE), "outcome")
    archive_ids = await read_ids(broker, lambda b: b.topics.archive(OBJECTIVE), "archive")
    ids = {s.request_id for s in phase.sent}
    return figures(
        phase.fault.name,
        phase.sent,
        phase.fault,
        (i for i in outcome_ids if i in ids),
        (i for i in archive_ids if i in ids),
        LATE_GRACE_S,
        rendezvous_killed=phase.fault.name == "rendezvous",
    )


async def matrix(  # noqa: PLR0917 (the run's knobs)
    broker: Broker,
    work_dir: Path,
    faults: list[str],
    rate: float,
    seconds: float,
    lead_s: float,
    soak_s: float,
) -> dict[str, Any]:
    """Start the chaos mesh, run every fault and the soak, read the topics back."""
    mesh = Mesh(broker, work_dir, CHAOS_MESH)
    mesh.start()
    rows: list[FaultFigures] = []
    soaked: dict[str, Any] | None = None
    try:
        load = Load(mesh.endpoint, rate, time.monotonic())
        for name in faults:
            phase = await run_phase(name, mesh, broker, load, seconds, lead_s)
            # Looked up after each phase, so a later fault cannot blur an earlier one's figures.
            rows.append(await account(broker, phase))
        if soak_s > 0:
            soaked = await soak(mesh, load, soak_s)
            await asyncio.sleep(LATE_GRACE_S + 2)
            outcome_ids = await read_ids(broker, lambda b: b.topics.results(OBJECTIVE), "outcome")
            archive_ids = await read_ids(broker, lambda b: b.topics.archive(OBJECTIVE), "archive")
    finally:
        mesh.stop()
    result: dict[str, Any] = {"rate": rate, "seconds": seconds, "faults": [asdict(r) for r in rows]}
    if soaked is not None:
        sent = soaked["sent"]
        ids = {s.request_id for s in sent}
        answered = [s for s in sent if s.status == "OK"]
        outcomes = [i for i in outcome_ids if i in ids]
        archived = [i for i in archive_ids if i in ids]
        result["soak"] = {
            "seconds": soak_s,
            "requests": len(sent),
            "answered": len(answered),
            "answered_once": len(answered) == len({s.request_id for s in answered}),
            "outcomes": len(outcomes),
            "outcomes_unique": len(set(outcomes)),
            "archive": len(archived),
            "archive_unique": len(set(archived)),
            "rss_growth_pct": soaked["rss_growth_pct"],
        }
    return result


def markdown(result: dict[str, Any]) -> str:
    """The matrix as docs/results/reliability.md shows it."""
    lines = [
        f"# Reliability: the fault matrix ({result['rate']:g} req/s, "
        f"{result['seconds']:g} s a fault)",
        "",
        "Made by `make chaos` (`tools/chaos`); what counts as lost: `tools/chaos/ledger.py`.",
        "",
        "| fault | requests | answered | by default | errors | recovery | outcomes lost | "
        "held by killed rendezvous | archive lost | dup. outcomes | dup. archive |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result["faults"]:
        errors = ", ".join(f"{k} {v}" for k, v in sorted(row["errors"].items())) or "-"
        recovery = "-" if row["recovery_s"] is None else f"{row['recovery_s']:.1f} s"
        lines.append(
            f"| {row['name']} | {row['requests']} | {row['answered_pct']:.2f} % | "
            f"{row['default_pct']:.2f} % (base {row['baseline_default_pct']:.1f} %) | {errors} | "
            f"{recovery} | {row['outcomes_lost']} | {row['held_by_killed_rendezvous']} | "
            f"{row['archive_lost']} | {row['duplicate_outcomes']} | {row['duplicate_archive']} |"
        )
    soaked = result.get("soak")
    if soaked:
        lines += [
            "",
            f"Soak: {soaked['seconds']:g} s, {soaked['requests']} requests, "
            f"{soaked['answered']} answered (each once: {soaked['answered_once']}), "
            f"{soaked['outcomes_unique']} outcomes, {soaked['archive_unique']} archive records.",
            "",
            "| process | RSS growth after the first minute |",
            "| --- | ---: |",
        ]
        for name, growth in sorted(soaked["rss_growth_pct"].items()):
            lines.append(f"| {name} | {growth:+.1f} % |")
    return "\n".join(lines) + "\n"


def write(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(result))
    out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
