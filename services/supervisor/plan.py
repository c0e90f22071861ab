"""Turns objective configurations into the processes that serve them, in start order.

The control component comes first (`plan_control`): it seeds the control topic from the mesh
file; the keyring starts beside it (`plan_keyring`), before anything that writes records
about a subject. Everything else is planned from the configurations on that topic (`plan`): a model
container per deployment the supervisor runs locally (a `kind`, no `endpoint`), the runner
hosts of each objective's replica groups (live: each follows its objective and serves its
group), the enricher when some objective is enriched, the rendezvous and its collector —
one pair per rendezvous replica, each with its own instance name (its return address,
`rdv.predictions.rdv-<i>`), delivery socket and port.
Planned again for every new version, the plan is compared with what runs (`diff`): what to
start, what to stop, what to restart because its settings changed.

Every process gets a fixed loopback port chosen once and kept by name in `Ports` (so a
restarted model container comes back where its runner looks for it, and planning again
gives a running process the same settings), a ready file, and its settings as
`RDV_<SERVICE>_*` environment variables: the same settings objects the services read in
production, nothing supervisor-specific. With TLS (`rendezvous up --tls`) every process gets
the same `RDV_<SERVICE>_TLS__*` settings: its server on mTLS, its clients presenting the
client certificate; a polyglot model container (a `command`) reads the same
`RDV_MODEL_TLS__*` server settings as the Python one. With a keyring, the processes that
write, read or forget records about a subject (the rendezvous, runner hosts, the enricher,
the evaluator) get its address and the mesh's pseudonym key as `RDV_<SERVICE>_PRIVACY__*`
(`privacy_env`). The endpoints of the local model containers are written to the model
directory (`model_directory`), where live runner hosts look them up.
"""

from __future__ import annotations

import json
import random
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rendezvous.v1 import common_pb2, objective_pb2

from services.core.protos import values_dict
from services.core.settings import REPO_ROOT, TlsSettings
from services.runner.live import replica_group
from services.runner.settings import group_subscription

# Start order: a stage starts once every process of the stage before is ready. The control
# component seeds the topic everything else is planned from. The rendezvous and its
# collector start together: the rendezvous serves only once a collector stream is open and
# its warm-up through the whole path is done. Rendezvous replicas start one after the
# other (replica i in stage STAGE_RENDEZVOUS + i): each warms up alone, so one's warm-up
# traffic does not slow another's races and hold its warm-up back.
# The trace store first (`rendezvous up --traces`): every process exports to it from its start.
STAGE_TRACES = -1
STAGE_CONTROL = 0
STAGE_MODELS = 1
STAGE_CONSUMERS = 2
STAGE_RENDEZVOUS = 3

JAEGER = "jaeger"
RENDEZVOUS = "rendezvous"
COLLECTOR = "collector"
CONTROL = "control"
KEYRING = "keyring"
# Planned once, before the control topic is read, and never planned from it: a new version
# neither stops nor restarts them.
STARTED_FIRST = frozenset({JAEGER, CONTROL, KEYRING})
ENRICHER = "enricher"
EVALUATOR = "evaluator"
# ProcessSpec.labels: which model a container serves.
MODEL_LABEL = "model"
# Jaeger, built by `make setup`, and its configuration for the local mesh.
JAEGER_BINARY = "tools/bin/jaeger"
JAEGER_CONFIG = "deploy/jaeger/local.yaml"


@dataclass
class ProcessSpec:
    """One supervised process."""

    name: str
    module: str
    stage: int
    env: dict[str, str]
    endpoint: str
    ready_file: Path
    log_file: Path
    # Health is checked on this service name ("" = the whole server).
    health_service: str = ""
    role: str = ""
    # On the answer path: scheduled ahead of the models and the broker (see SupervisorSettings).
    latency_critical: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    # A program to run instead of `python -m module` (a polyglot model container), from the
    # repository root.
    command: list[str] = field(default_factory=list)
    # How to reach the process's server (its health check): plaintext when None.
    client_tls: TlsSettings | None = None
    # Whether the process writes `ready_file` (ours do; Jaeger answers health only).
    writes_ready_file: bool = True
    # Whether the process exports spans to the mesh's trace store, when it has one.
    traced: bool = True
    # One of several replicas serving side by side (rendezvous replicas and their
    # collectors): restarted, it gets its latency-critical priority only once ready, so its
    # start-up does not take the CPU the others' answers wait for.
    replicated: bool = False
    # Settings a restart runs with, over `env` (a rendezvous replica rejoining: a gentler
    # warm-up, RendezvousSettings.rejoining).
    restart_env: dict[str, str] = field(default_factory=dict)


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


# Below the kernel's ephemeral range: a port chosen now and bound by a child a moment later
# cannot meanwhile be taken as the source port of some outgoing connection.
PORT_RANGE = (20000, 32000)
_handed_out: set[int] = set()


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A loopback TCP port that is free now and not in the ephemeral range."""
    low, high = PORT_RANGE
    ephemeral_low, ephemeral_high = _ephemeral_range()
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(low, high)
        if port in _handed_out or ephemeral_low <= port <= ephemeral_high:
            continue
        if not _bindable(port):
            continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {low}-{high}")


def free_port_series(count: int, step: int) -> int:
    """A port p such that p, p + step, ..., p + (count - 1) * step are all free now and
    handed out (the addresses of `count` rendezvous replicas `step` ports apart)."""
    for _ in range(1000):
        first = free_port()
        rest = [first + i * step for i in range(1, count)]
        if all(port not in _handed_out and _bindable(port) for port in rest):
            _handed_out.update(rest)
            return first
    raise RuntimeError(f"no {count} free ports {step} apart")


def reserve_ports(addresses: Iterable[str]) -> None:
    """Keep the ports of fixed addresses (host:port) out of what `free_port` hands out: a
    rendezvous replica that starts in a later stage must still find its port free."""
    for address in addresses:
        _, _, port = address.rpartition(":")
        if port.isdigit():
            _handed_out.add(int(port))


@dataclass
class Ports:
    """The ports handed out, by process name: planning again keeps a process's addresses."""

    listen: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, int] = field(default_factory=dict)

    def endpoint(self, name: str, fixed: str | None = None) -> str:
        if name not in self.listen:
            self.listen[name] = fixed or f"127.0.0.1:{free_port()}"
        return self.listen[name]

    def metrics_port(self, name: str) -> int:
        if name not in self.metrics:
            self.metrics[name] = free_port()
        return self.metrics[name]


@dataclass(frozen=True)
class EvaluatorAddress:
    """Where the evaluator serves gRPC (EvaluationService, FeedbackService) and its
    dashboard (HTTP; "" for none)."""

    listen: str
    dashboard_listen: str


def rendezvous_instance(replica: int) -> str:
    """The instance name of rendezvous replica `replica`: its return address's suffix."""
    return f"rdv-{replica}"


def replica_process(base: str, replica: int, replicas: int) -> str:
    """The process name of replica `replica` of `replicas` ("rendezvous" when alone, else
    "rendezvous-0", "rendezvous-1", ...)."""
    return base if replicas == 1 else f"{base}-{replica}"


def model_directory(state_dir: Path) -> Path:
    """Where the local model containers' endpoints are written for live runner hosts."""
    return state_dir / "models.json"


class _Planner:
    """Builds ProcessSpecs with stable ports, ready files and logs under one state dir."""

    def __init__(
        self,
        state_dir: Path,
        pulsar_url: str,
        pulsar_admin_url: str,
        ports: Ports,
        pulsar_env: Mapping[str, str] | None,
        *,
        tls: TlsSettings | None = None,
    ):
        self.state_dir = state_dir
        self.tls = tls
        self.pulsar_url = pulsar_url
        self.pulsar_admin_url = pulsar_admin_url
        self.pulsar_env = dict(pulsar_env or {})
        self.ports = ports
        self.specs: list[ProcessSpec] = []

    def add(  # noqa: PLR0917 (a local builder; keywords would only add noise)
        self,
        name: str,
        module: str,
        prefix: str,
        stage: int,
        settings: dict[str, str],
        listen: str | None = None,
        role: str = "",
        latency_critical: bool = False,
        labels: dict[str, str] | None = None,
    ) -> ProcessSpec:
        endpoint = self.ports.endpoint(name, listen)
        ready_file = self.state_dir / "ready" / f"{name}.json"
        metrics_port = self.ports.metrics_port(name)
        env = {
            f"{prefix}LISTEN": endpoint,
            f"{prefix}READY_FILE": str(ready_file),
            f"{prefix}PULSAR__SERVICE_URL": self.pulsar_url,
            f"{prefix}PULSAR__ADMIN_URL": self.pulsar_admin_url,
            **{f"{prefix}{key}": value for key, value in self.pulsar_env.items()},
            f"{prefix}METRICS_PORT": str(metrics_port),
            **{f"{prefix}{key}": value for key, value in (self.tls or TlsSettings()).env().items()},
            **{f"{prefix}{key}": value for key, value in settings.items()},
        }
        spec = ProcessSpec(
            name=name,
            module=module,
            stage=stage,
            env=env,
            endpoint=endpoint,
            ready_file=ready_file,
            log_file=self.state_dir / "logs" / f"{name}.log",
            role=role,
            latency_critical=latency_critical,
            labels={"metrics": f"127.0.0.1:{metrics_port}", **(labels or {})},
            client_tls=self.tls,
        )
        self.specs.append(spec)
        return spec


_ROLE_NAMES = {
    common_pb2.MODEL_ROLE_INCUMBENT: "incumbent",
    common_pb2.MODEL_ROLE_CHALLENGER: "challenger",
    common_pb2.MODEL_ROLE_CANARY: "canary",
    common_pb2.MODEL_ROLE_DECOY: "decoy",
}


def plan_control(  # noqa: PLR0917 (mirrors plan's arguments)
    mesh_file: Path,
    state_dir: Path,
    pulsar_url: str,
    pulsar_admin_url: str,
    listen: str,
    ports: Ports,
    pulsar_env: Mapping[str, str] | None = None,
    tls: TlsSettings | None = None,
) -> ProcessSpec:
    """The control component: the one writer of the control topic, seeded from `mesh_file`.
    `pulsar_env`: the broker's authentication and TLS settings, as in `plan`; `tls` puts it on
    mTLS."""
    planner = _Planner(state_dir, pulsar_url, pulsar_admin_url, ports, pulsar_env, tls=tls)
    return planner.add(
        CONTROL,
        "services.control",
        "RDV_CONTROL_",
        STAGE_CONTROL,
        {"MESH_FILE": str(mesh_file)},
        listen=listen,
        role="control",
    )


@dataclass(frozen=True)
class PrivacyFiles:
    """Where a mesh keeps what crypto-shredding needs (`rendezvous up`: under its state
    dir, `privacy/`, 0700): the pseudonym key every process shares, the keyring's master
    key and database. Lose them and every sealed record is unreadable; back them up
    honouring erasures (docs/privacy.md)."""

    pseudonym_key: Path
    master_key: Path
    database: Path

    @classmethod
    def under(cls, state_dir: Path) -> PrivacyFiles:
        root = state_dir / "privacy"
        return cls(root / "pseudonym.key", root / "keyring-master.key", root / "keyring.db")


def plan_keyring(  # noqa: PLR0917 (mirrors plan_control's arguments)
    files: PrivacyFiles,
    state_dir: Path,
    pulsar_url: str,
    pulsar_admin_url: str,
    listen: str,
    ports: Ports,
    pulsar_env: Mapping[str, str] | None = None,
    tls: TlsSettings | None = None,
) -> ProcessSpec:
    """The keyring: subject keys and erasures, started with the control component."""
    planner = _Planner(state_dir, pulsar_url, pulsar_admin_url, ports, pulsar_env, tls=tls)
    return planner.add(
        KEYRING,
        "services.keyring",
        "RDV_KEYRING_",
        STAGE_CONTROL,
        {
            "DATABASE": str(files.database),
            "MASTER_KEY_FILE": str(files.master_key),
            "PRIVACY__PSEUDONYM_KEY_FILE": str(files.pseudonym_key),
        },
        listen=listen,
        role="keyring",
    )


def privacy_env(
    keyring: str, files: PrivacyFiles, token_file: Path | None = None
) -> dict[str, str]:
    """The privacy settings (without a service's prefix) of a process that writes, reads or
    forgets records about a subject."""
    env = {
        "PRIVACY__KEYRING": keyring,
        "PRIVACY__PSEUDONYM_KEY_FILE": str(files.pseudonym_key),
    }
    if token_file is not None:
        env["PRIVACY__TOKEN_FILE"] = str(token_file)
    return env


@dataclass(frozen=True)
class TraceStore:
    """Where the mesh's Jaeger takes spans (OTLP over gRPC) and answers queries (HTTP), and
    what every process is told (`env`): export there, keep `sample_ratio` of new traces,
    send a batch every `export_delay_ms`."""

    otlp_listen: str
    query_listen: str
    max_traces: int
    sample_ratio: float
    export_delay_ms: int

    @property
    def query_url(self) -> str:
        return f"http://{self.query_listen}"

    @property
    def otlp_endpoint(self) -> str:
        return f"http://{self.otlp_listen}"

    def env(self, service: str) -> dict[str, str]:
        """The standard OTEL_* variables of one process, `service` its service.name."""
        return {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.otlp_endpoint,
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": f"{self.sample_ratio:g}",
            "OTEL_BSP_SCHEDULE_DELAY": str(self.export_delay_ms),
            "OTEL_SERVICE_NAME": service,
        }

    def facts(self) -> dict[str, str]:
        """What state.json records (`rendezvous trace` reads the query URL there)."""
        return {"query_url": self.query_url, "otlp_endpoint": self.otlp_endpoint}


def plan_jaeger(state_dir: Path, store: TraceStore, ports: Ports) -> ProcessSpec:
    """Jaeger on loopback with in-memory storage (deploy/jaeger/local.yaml): OTLP in, the
    query API out, gRPC health for the supervisor. Its binary is built by `make setup`."""
    binary = REPO_ROOT / JAEGER_BINARY
    if not binary.exists():
        raise FileNotFoundError(f"{binary} is missing: `make setup` builds it")
    health = ports.endpoint(JAEGER)
    return ProcessSpec(
        name=JAEGER,
        module="",
        stage=STAGE_TRACES,
        env={
            "RDV_JAEGER_OTLP_GRPC": store.otlp_listen,
            "RDV_JAEGER_QUERY_HTTP": store.query_listen,
            "RDV_JAEGER_QUERY_GRPC": ports.endpoint(f"{JAEGER}-query-grpc"),
            "RDV_JAEGER_HEALTH": health,
            "RDV_JAEGER_MAX_TRACES": str(store.max_traces),
        },
        endpoint=health,
        ready_file=state_dir / "ready" / f"{JAEGER}.json",
        log_file=state_dir / "logs" / f"{JAEGER}.log",
        role="traces",
        labels={"query": store.query_url, "otlp": store.otlp_endpoint},
        command=[str(binary), "--config", str(REPO_ROOT / JAEGER_CONFIG)],
        writes_ready_file=False,
        traced=False,
    )


def local_model(deployment: objective_pb2.ModelDeployment) -> bool:
    """Whether the supervisor runs the deployment's container (a kind or a command, and no
    endpoint)."""
    return (
        deployment.role != common_pb2.MODEL_ROLE_DECOY
        and bool(deployment.kind or deployment.command)
        and not deployment.endpoint
    )


def plan(  # noqa: PLR0917 (the mesh's coordinates, each needed)
    configs: Mapping[str, objective_pb2.ObjectiveConfig],
    state_dir: Path,
    pulsar_url: str,
    pulsar_admin_url: str,
    rendezvous_listen: str | Sequence[str],
    ports: Ports | None = None,
    evaluator: EvaluatorAddress | None = None,
    pulsar_env: Mapping[str, str] | None = None,
    tls: TlsSettings | None = None,
    privacy: Mapping[str, str] | None = None,
) -> list[ProcessSpec]:
    """Every process serving `configs` (the control component and the keyring aside),
    models first, the collectors last. `rendezvous_listen`: where the rendezvous listens,
    or each replica's address (a rendezvous and a collector per replica). `ports` keeps
    addresses across plans (a fresh one when not given). `evaluator` adds the evaluator
    (off the answer path; it reads the results topics). `pulsar_env`
    (`PulsarSettings.security_env()`: token, TLS) goes to every process under its own
    prefix; `tls` puts every process on mTLS; `privacy` (`privacy_env`) to the rendezvous
    replicas, runner hosts, the enricher and the evaluator."""
    keys = dict(privacy or {})
    planner = _Planner(
        state_dir, pulsar_url, pulsar_admin_url, ports or Ports(), pulsar_env, tls=tls
    )
    add = planner.add
    directory = model_directory(state_dir)
    containers: set[str] = set()
    for objective, config in sorted(configs.items()):
        for deployment in config.models:
            if not local_model(deployment):
                if deployment.role != common_pb2.MODEL_ROLE_DECOY and not deployment.endpoint:
                    raise ValueError(
                        f"model {deployment.name!r} of {objective!r} needs a kind or an endpoint"
                    )
                continue
            # A container per model name (names are what predictions and the directory carry).
            if deployment.name in containers:
                continue
            containers.add(deployment.name)
            spec = add(
                f"model-{deployment.name}",
                "services.models",
                "RDV_MODEL_",
                STAGE_MODELS,
                {
                    "KIND": deployment.kind,
                    "NAME": deployment.name,
                    "VERSION": deployment.version,
                    "ARGS": json.dumps(values_dict(deployment.args.fields), sort_keys=True),
                },
                role=_ROLE_NAMES.get(deployment.role, ""),
                labels={MODEL_LABEL: deployment.name, "objective": objective},
            )
            # Any language: run with the RDV_MODEL_* environment above (TLS included), in the
            # repository root (the control topic holds no mesh file location to resolve
            # relative paths by).
            spec.command = list(deployment.command)
        # Deployments that scale together (the same replica count) share runner hosts: host r
        # of a group receives each task once for all of the group's models, and the decoy
        # joins the group of its replica count as the host's archive. Each host follows the
        # objective and serves its group, whatever models come and go in it.
        groups: dict[int, bool] = {}
        for deployment in config.models:
            if not deployment.enabled:
                continue
            decoy = deployment.role == common_pb2.MODEL_ROLE_DECOY
            group = replica_group(deployment)
            groups[group] = groups.get(group, False) or decoy
        for replicas, archive in sorted(groups.items()):
            # Named by the group alone, so a group's hosts keep their names as others come.
            group_name = "" if replicas == 1 else f"x{replicas}-"
            for replica in range(replicas):
                name = f"runners-{objective}-{group_name}{replica}"
                add(
                    name,
                    "services.runner",
                    "RDV_RUNNER_",
                    STAGE_CONSUMERS,
                    {
                        "OBJECTIVE": objective,
                        "FOLLOW": "true",
                        "REPLICAS": str(replicas),
                        "SUBSCRIPTION": group_subscription(replicas),
                        "MODEL_DIRECTORY": str(directory),
                        # Stable: a restarted host overwrites its own RunnerStatus keys.
                        "INSTANCE": name,
                        **keys,
                    },
                    role="runner+decoy" if archive else "runner",
                    labels={"objective": objective, "replicas": str(replicas)},
                )
    if any(c.enrichment != objective_pb2.ENRICHMENT_NONE for c in configs.values()):
        add(
            ENRICHER,
            "services.enricher",
            "RDV_ENRICHER_",
            STAGE_CONSUMERS,
            {"FOLLOW": "true", "SERVE_ONLY": json.dumps(sorted(configs)), **keys},
        )
    listens = [rendezvous_listen] if isinstance(rendezvous_listen, str) else rendezvous_listen
    for replica, listen in enumerate(listens):
        _plan_rendezvous(planner, replica, len(listens), listen, configs, keys=keys)
    if evaluator is not None:
        # With the rendezvous: it only reads what the answer path writes, so nothing waits
        # for it, and a long retained history to read does not hold the mesh back.
        add(
            EVALUATOR,
            "services.evaluator",
            "RDV_EVALUATOR_",
            STAGE_RENDEZVOUS,
            {
                "SERVE_ONLY": json.dumps(sorted(configs)),
                "DASHBOARD_LISTEN": evaluator.dashboard_listen,
                **keys,
            },
            listen=evaluator.listen,
            role="evaluator",
        )
    return planner.specs


def _plan_rendezvous(
    planner: _Planner,
    replica: int,
    replicas: int,
    listen: str,
    configs: Mapping[str, objective_pb2.ObjectiveConfig],
    *,
    keys: Mapping[str, str],
) -> None:
    """Rendezvous replica `replica` and its collector: its own instance (so its own return
    address), delivery socket and port, in a stage of its own; `keys`: its privacy settings."""
    instance = rendezvous_instance(replica)
    socket_path = planner.state_dir / instance / "delivery.sock"
    stage = STAGE_RENDEZVOUS + replica
    labels = {"instance": instance}
    rendezvous = planner.add(
        replica_process(RENDEZVOUS, replica, replicas),
        "services.rendezvous",
        "RDV_RENDEZVOUS_",
        stage,
        {
            "INSTANCE": instance,
            "DELIVERY_SOCKET": str(socket_path),
            "SERVE_ONLY": json.dumps(sorted(configs)),
            **keys,
        },
        listen=listen,
        latency_critical=True,
        labels=labels,
    )
    collector = planner.add(
        replica_process(COLLECTOR, replica, replicas),
        "services.collector",
        "RDV_COLLECTOR_",
        stage,
        {"INSTANCE": instance, "DELIVERY_SOCKET": str(socket_path)},
        latency_critical=True,
        labels=labels,
    )
    rendezvous.replicated = collector.replicated = replicas > 1
    if replicas > 1:
        rendezvous.restart_env = {"RDV_RENDEZVOUS_REJOINING": "true"}


def model_endpoints(specs: Sequence[ProcessSpec]) -> dict[str, str]:
    """Model name -> endpoint of every local model container planned."""
    return {spec.labels[MODEL_LABEL]: spec.endpoint for spec in specs if MODEL_LABEL in spec.labels}


@dataclass
class PlanDiff:
    """What a new plan changes: processes to start, to stop, to restart with new settings."""

    start: list[ProcessSpec] = field(default_factory=list)
    stop: list[ProcessSpec] = field(default_factory=list)
    restart: list[ProcessSpec] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.start or self.stop or self.restart)


def diff(running: Sequence[ProcessSpec], planned: Sequence[ProcessSpec]) -> PlanDiff:
    """Compare by name: new names start, gone names stop, changed settings restart (in
    the new plan's terms, start order kept)."""
    before = {spec.name: spec for spec in running}
    after = {spec.name: spec for spec in planned}
    out = PlanDiff()
    for spec in sorted(planned, key=lambda s: s.stage):
        old = before.get(spec.name)
        if old is None:
            out.start.append(spec)
        elif (old.module, old.command, old.env) != (spec.module, spec.command, spec.env):
            out.restart.append(spec)
    out.stop = [spec for spec in running if spec.name not in after]
    return out
