"""The systems, each able to take one open-loop run at a rate and describe what it cost."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tools.bench.environment import Broker, Mesh, OriginalSystem, original_starter
from tools.bench.load import LoadResult, ghz, http_open_loop
from tools.bench.probes import CpuMeter, answers_by_source
from tools.bench.rayserve.cluster import RayServeCluster

FEATURES = {
    "age": 0.0380759, "sex": 0.0506801, "bmi": 0.0616962, "bp": 0.0218724,
    "s1": -0.0442235, "s2": -0.0348208, "s3": -0.0434008, "s4": -0.0025923,
    "s5": 0.0199075, "s6": -0.0176461,
}  # fmt: skip
ONE, RACE = "bench-one", "bench-race"
SCORE = "rendezvous.v1.ScoringService/Score"
# Serve's gRPC proxy answers reflection without our files' descriptors: ghz reads the .proto.
PROTOS = Path(__file__).resolve().parents[2] / "protos"
SCORING_PROTO = (PROTOS / "rendezvous" / "v1" / "scoring.proto", PROTOS)
# Work a run causes after its last answer (outcomes after the late grace, archive writes)
# still belongs to it: the CPU sample waits this long.
SETTLE_S = 1.0

DESCRIPTIONS = {
    "D": "the demo mesh as `make up` runs it (enricher, flaky challenger), from the first request",
    "S0": "direct ModelService/Predict to the incumbent's container (the floor)",
    "S1": "rendezvous with one model (objective bench-one)",
    "S2": "rendezvous, three models racing + canary + decoy (objective bench-race)",
    "S3": "the original design re-implemented (Flask, per-request loop and unix socket)",
    "S4": "Ray Serve, the same race: S2's four models as deployments, a router deployment "
    "racing them under bench-race's policy and SLA, Serve's gRPC ingress",
}


@dataclass
class Run:
    """One system at one rate, one rep."""

    system: str
    rate: int
    rep: int
    load: LoadResult
    cpu_ms_by_process: dict[str, float]
    default_share: float | None

    @property
    def cpu_ms(self) -> float:
        return sum(self.cpu_ms_by_process.values())

    def record(self) -> dict[str, Any]:
        answered = max(1, self.load.count - self.load.errors)
        return {
            "system": self.system,
            "rate": self.rate,
            "rep": self.rep,
            "count": self.load.count,
            "errors": self.load.errors,
            "error_share": self.load.errors / max(1, self.load.count),
            "error_kinds": self.load.error_kinds,
            "error_messages": self.load.error_messages,
            "achieved_rps": self.load.achieved_rps,
            "seconds": self.load.seconds,
            "p50_ms": self.load.p50_ms,
            "p90_ms": self.load.p90_ms,
            "p99_ms": self.load.p99_ms,
            "default_share": self.default_share,
            "cpu_ms": self.cpu_ms,
            "cpu_ms_per_request": self.cpu_ms / answered,
            "cpu_ms_per_request_by_process": {
                name: spent / answered for name, spent in sorted(self.cpu_ms_by_process.items())
            },
        }


class System:
    """Base: a name, the pids whose CPU counts, and a load generator."""

    name = ""

    def pids(self) -> dict[str, int]:
        """The processes whose CPU counts, by name."""
        raise NotImplementedError

    async def load(self, rate: int, seconds: float) -> LoadResult:
        raise NotImplementedError

    def default_counter(self) -> dict[str, float] | None:
        """Answers by source so far, when the system counts them (None: from responses)."""
        return None

    async def run(self, rate: int, rep: int, seconds: float) -> Run:
        meter = CpuMeter(self.pids())
        before = self.default_counter()
        meter.start()
        result = await self.load(rate, seconds)
        await asyncio.sleep(SETTLE_S)
        cpu_ms = meter.stop()
        after = self.default_counter()
        share: float | None = None
        if before is not None and after is not None:
            delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
            total = sum(delta.values())
            share = delta.get("DEFAULT", 0.0) / total if total else None
        elif result.default_answers is not None:
            answered = result.count - result.errors
            share = result.default_answers / answered if answered else None
        return Run(self.name, rate, rep, result, cpu_ms, share)


class Direct(System):
    """S0: ghz straight at the incumbent's model container; the broker plays no part."""

    name = "S0"

    def __init__(self, broker: Broker, mesh: Mesh) -> None:
        self.broker = broker
        self.mesh = mesh

    def pids(self) -> dict[str, int]:
        return {"model-solo-ridge": int(self.mesh.process("model-solo-ridge")["pid"])}

    async def load(self, rate: int, seconds: float) -> LoadResult:
        target = str(self.mesh.process("model-solo-ridge")["endpoint"])
        body = {"objective": ONE, "features": FEATURES}
        return await ghz(target, "rendezvous.v1.ModelService/Predict", body, rate, seconds)


class Rendezvous(System):
    """S1 and S2: ghz at `ScoringService/Score` on one objective of the bench mesh."""

    def __init__(self, broker: Broker, mesh: Mesh, name: str, objective: str) -> None:
        self.broker = broker
        self.mesh = mesh
        self.name = name
        self.objective = objective

    def pids(self) -> dict[str, int]:
        return {**self.mesh.pids(self.objective), "broker": self.broker.pid}

    def default_counter(self) -> dict[str, float] | None:
        return answers_by_source(self.mesh.metrics_address(), self.objective)

    async def load(self, rate: int, seconds: float) -> LoadResult:
        body = {"objective": self.objective, "features": FEATURES}
        return await ghz(self.mesh.endpoint, SCORE, body, rate, seconds)


class Original(System):
    """S3: the original design over HTTP, on S2's model containers and the same broker."""

    name = "S3"

    def __init__(self, broker: Broker, mesh: Mesh, system: OriginalSystem) -> None:
        self.broker = broker
        self.mesh = mesh
        self.system = system

    @classmethod
    async def start(cls, broker: Broker, mesh: Mesh, state_dir: Path) -> Original | str:
        """The running S3, or why it is not available."""
        starter, why = original_starter()
        if starter is None:
            return why
        system = await starter(broker.service_url, cls.model_endpoints(mesh), state_dir)
        return cls(broker, mesh, system)

    @staticmethod
    def model_endpoints(mesh: Mesh) -> dict[str, str]:
        names = [n for n in mesh.model_names(RACE) if n != "decoy"]
        return {n: str(mesh.process(f"model-{n}")["endpoint"]) for n in names}

    def pids(self) -> dict[str, int]:
        models = {
            f"model-{n}": int(self.mesh.process(f"model-{n}")["pid"])
            for n in self.model_endpoints(self.mesh)
        }
        return {**self.system.named_pids, **models, "broker": self.broker.pid}

    async def load(self, rate: int, seconds: float) -> LoadResult:
        objective = str(getattr(self.system, "objective", RACE))
        body = {"objective": objective, "features": FEATURES}
        return await http_open_loop(self.system.endpoint, body, rate, seconds)

    async def stop(self) -> None:
        await self.system.stop()


class RayServe(System):
    """S4: ghz at the same `ScoringService/Score`, served by Ray Serve's gRPC ingress."""

    name = "S4"

    def __init__(self, cluster: RayServeCluster) -> None:
        self.cluster = cluster

    def pids(self) -> dict[str, int]:
        # Every Ray process; S4 has no broker on its path.
        return self.cluster.named_pids()

    def default_counter(self) -> dict[str, float] | None:
        return self.cluster.answers()

    async def load(self, rate: int, seconds: float) -> LoadResult:
        body = {"objective": self.cluster.objective, "features": FEATURES}
        return await ghz(
            self.cluster.grpc_endpoint, SCORE, body, rate, seconds, proto=SCORING_PROTO
        )
