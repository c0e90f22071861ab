"""The mesh file: objectives, their models and roles, and their policies.

A mesh file (YAML) is what an operator writes; `ObjectiveConfig` protos are what
services act on. `load_mesh` validates the file (unknown keys, unknown models in
a policy, steps out of order are errors with the offending path) and converts
it. Endpoints of model containers are filled in by whoever starts them (the
supervisor) or given in the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from rendezvous.v1 import common_pb2, model_pb2, objective_pb2

from services.core.oip import OIP_KIND, oip_problems
from services.core.protos import duration_from_seconds, duration_ms, set_values, values_dict

_ROLES = {
    "incumbent": common_pb2.MODEL_ROLE_INCUMBENT,
    "challenger": common_pb2.MODEL_ROLE_CHALLENGER,
    "canary": common_pb2.MODEL_ROLE_CANARY,
    "decoy": common_pb2.MODEL_ROLE_DECOY,
}
_FEATURE_TYPES = {
    "any": model_pb2.FEATURE_TYPE_UNSPECIFIED,
    "number": model_pb2.FEATURE_TYPE_NUMBER,
    "string": model_pb2.FEATURE_TYPE_STRING,
    "bool": model_pb2.FEATURE_TYPE_BOOL,
    "list": model_pb2.FEATURE_TYPE_LIST,
}
_ENRICHMENT = {
    "subject_state": objective_pb2.ENRICHMENT_SUBJECT_STATE,
    "none": objective_pb2.ENRICHMENT_NONE,
}
_CONSENT = {
    "granted": common_pb2.CONSENT_DECISION_GRANTED,
    "denied": common_pb2.CONSENT_DECISION_DENIED,
}

Role = Literal["incumbent", "challenger", "canary", "decoy"]

# Rendezvous instances one mesh runs side by side (each with a collector) on one machine.
MAX_RENDEZVOUS_REPLICAS = 16
MAX_PORT = 65535


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FeatureEntry(_Strict):
    """One input feature of an objective."""

    name: str
    type: Literal["any", "number", "string", "bool", "list"] = "number"
    required: bool = True
    description: str = ""


class ModelEntry(_Strict):
    """One model deployment: what runs (`kind` + `args`) and the role it plays."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    role: Role
    version: str = "1"
    # Which example container to run (sum, diabetes, flaky, ...); absent when the
    # container is external and `endpoint` says where it listens. `oip`: an Open Inference
    # Protocol (KServe V2) server at `endpoint`, `args` as services/core/oip.py says.
    kind: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)
    endpoint: str | None = None
    # The program serving it in any language (argv; ModelDeployment.command); `kind` then
    # only labels what it is.
    command: list[str] = Field(default_factory=list)
    replicas: int = Field(default=1, ge=1, le=16)
    enabled: bool = True

    @model_validator(mode="after")
    def _oip_deployment(self) -> ModelEntry:
        if self.kind == OIP_KIND:
            problems = oip_problems(self.endpoint or "", self.command, self.args)
            if problems:
                listed = "; ".join(f"{path}: {problem}" for path, problem in problems)
                raise ValueError(f"oip model {self.name!r}: {listed}")
        return self


class PolicyStepEntry(_Strict):
    """Accept the first of `accept` (in that order of preference) until `until_ms`.

    `shares` split the step's requests into arms (an A/B split, deterministic by request id:
    a model's share of the requests is answered in this step by it alone; see
    PolicyStep.shares in objective.proto)."""

    until_ms: float = Field(gt=0)
    accept: list[str] = Field(min_length=1)
    description: str = ""
    shares: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _shares_of_accepted_models(self) -> PolicyStepEntry:
        for model, share in self.shares.items():
            if model not in self.accept:
                raise ValueError(f"shares names {model!r}, which the step does not accept")
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"share of {model!r} must be in [0, 1], not {share}")
        if sum(self.shares.values()) > 1.0 + 1e-9:
            raise ValueError("shares must sum to at most 1")
        return self


class DefaultEntry(_Strict):
    """The designed answer when nothing acceptable came in time."""

    score: float = 0.0
    outputs: dict[str, Any] = Field(default_factory=dict)
    prefer_canary: bool = False


class SamplingEntry(_Strict):
    """Shares of traffic the optional roles see."""

    challenger_fraction: float = Field(default=1.0, ge=0.0, le=1.0)
    archive_fraction: float = Field(default=1.0, ge=0.0, le=1.0)


class ConsentEntry(_Strict):
    """What an unspecified consent decision means for this objective."""

    experimentation: Literal["granted", "denied"] = "granted"
    archiving: Literal["granted", "denied"] = "granted"


class ObjectiveEntry(_Strict):
    """One business objective as the mesh file describes it."""

    sla_ms: float = Field(gt=0, le=60_000)
    late_grace_ms: float = Field(default=2_000, ge=0)
    features: list[FeatureEntry] = Field(default_factory=list)
    models: list[ModelEntry] = Field(min_length=1)
    policy: list[PolicyStepEntry] = Field(min_length=1)
    default: DefaultEntry = Field(default_factory=DefaultEntry)
    sampling: SamplingEntry = Field(default_factory=SamplingEntry)
    default_consent: ConsentEntry = Field(default_factory=ConsentEntry)
    # "none": the models need only the request, so tasks skip the enricher's hop.
    enrichment: Literal["subject_state", "none"] = "subject_state"

    @property
    def enriched(self) -> bool:
        return self.enrichment == "subject_state"

    @model_validator(mode="after")
    def _policy_names_models(self) -> ObjectiveEntry:
        names = [model.name for model in self.models]
        if len(names) != len(set(names)):
            raise ValueError("model names must be unique within an objective")
        answering = {m.name for m in self.models if m.role != "decoy"}
        previous = 0.0
        for index, step in enumerate(self.policy):
            unknown = [name for name in step.accept if name not in answering]
            if unknown:
                raise ValueError(f"policy[{index}].accept names unknown or decoy models: {unknown}")
            if step.until_ms <= previous:
                raise ValueError(f"policy[{index}].until_ms must grow step by step")
            previous = step.until_ms
        if previous > self.sla_ms:
            raise ValueError("the last policy step ends after the SLA")
        return self


class RendezvousEntry(_Strict):
    """Where the public scoring endpoint listens, and how many rendezvous instances serve it.

    Each replica is a rendezvous with its own collector and return address; replica i
    listens on `listen`'s port + i * `port_step` (50051, 50061, ...: a step of 10 keeps
    clear of the control plane and the evaluator next door, 50052 and 50053), and clients
    round-robin over them all (`services.core.channels.replicated_target`)."""

    listen: str = "127.0.0.1:50051"
    replicas: int = Field(default=1, ge=1, le=MAX_RENDEZVOUS_REPLICAS)
    port_step: int = Field(default=10, ge=1)

    def replica_listens(self, replicas: int | None = None) -> list[str]:
        """Where each replica listens (`replicas` instead of the file's, when given)."""
        count = self.replicas if replicas is None else replicas
        if not 1 <= count <= MAX_RENDEZVOUS_REPLICAS:
            raise ValueError(
                f"rendezvous replicas must be 1-{MAX_RENDEZVOUS_REPLICAS}, not {count}"
            )
        if count == 1:
            return [self.listen]
        host, _, port = self.listen.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"rendezvous.listen {self.listen!r} must be host:port")
        last = int(port) + (count - 1) * self.port_step
        if last > MAX_PORT:
            raise ValueError(
                f"{count} replicas {self.port_step} ports apart run past port {MAX_PORT}"
            )
        return [f"{host}:{int(port) + i * self.port_step}" for i in range(count)]


class Mesh(_Strict):
    """A whole mesh: every objective, and where the public endpoint listens."""

    objectives: dict[str, ObjectiveEntry] = Field(min_length=1)
    rendezvous: RendezvousEntry = Field(default_factory=RendezvousEntry)

    @field_validator("objectives")
    @classmethod
    def _objective_names(cls, value: dict[str, ObjectiveEntry]) -> dict[str, ObjectiveEntry]:
        for name in value:
            if not name.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"objective name {name!r} must be alphanumeric, '-' or '_'")
        return value

    def objective_configs(self, version: int = 1) -> dict[str, objective_pb2.ObjectiveConfig]:
        return {name: to_config(name, entry, version) for name, entry in self.objectives.items()}


def load_mesh(path: Path) -> Mesh:
    with path.open(encoding="utf-8") as handle:
        data = yaml.safe_load(handle)
    return Mesh.model_validate(data)


def to_config(name: str, entry: ObjectiveEntry, version: int = 1) -> objective_pb2.ObjectiveConfig:
    config = objective_pb2.ObjectiveConfig(
        objective=name,
        version=version,
        sla=duration_from_seconds(entry.sla_ms / 1000),
        late_grace=duration_from_seconds(entry.late_grace_ms / 1000),
        enrichment=_ENRICHMENT[entry.enrichment],
        sampling=objective_pb2.Sampling(
            challenger_fraction=entry.sampling.challenger_fraction,
            archive_fraction=entry.sampling.archive_fraction,
        ),
        default_consent=common_pb2.Consent(
            experimentation=_CONSENT[entry.default_consent.experimentation],
            archiving=_CONSENT[entry.default_consent.archiving],
        ),
    )
    for feature in entry.features:
        config.features.add(
            name=feature.name,
            type=_FEATURE_TYPES[feature.type],
            required=feature.required,
            description=feature.description,
        )
    for model in entry.models:
        deployment = config.models.add(
            name=model.name,
            role=_ROLES[model.role],
            version=model.version,
            endpoint=model.endpoint or "",
            enabled=model.enabled,
            kind=model.kind or "",
            replicas=model.replicas,
            command=model.command,
        )
        deployment.args.update(model.args)
    for step in entry.policy:
        added = config.policy.steps.add(
            until=duration_from_seconds(step.until_ms / 1000),
            accept=step.accept,
            description=step.description or _describe(step),
        )
        for accepted, share in step.shares.items():
            added.shares[accepted] = share
    config.default_answer.score = entry.default.score
    config.default_answer.prefer_canary = entry.default.prefer_canary
    set_values(config.default_answer.outputs, entry.default.outputs)
    return config


def _describe(step: PolicyStepEntry) -> str:
    return describe_step(step.until_ms, step.accept)


def describe_step(until_ms: float, accept: Sequence[str]) -> str:
    """The description a step gets when its entry gives none (edits keep it in step)."""
    if len(accept) == 1:
        return f"until {until_ms:g}ms: {accept[0]} only"
    return f"until {until_ms:g}ms: first of {', '.join(accept)}"


_ROLE_NAMES = {value: key for key, value in _ROLES.items()}
_FEATURE_TYPE_NAMES = {value: key for key, value in _FEATURE_TYPES.items()}
_ENRICHMENT_NAMES = {value: key for key, value in _ENRICHMENT.items()}
_CONSENT_NAMES = {value: key for key, value in _CONSENT.items()}


def entry_from_config(config: objective_pb2.ObjectiveConfig) -> dict[str, Any]:
    """An objective configuration in the mesh file's form (what `to_config` reads back):
    how `rendezvous objective show` prints it, and what `apply` takes after an edit."""

    def model(deployment: objective_pb2.ModelDeployment) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": deployment.name,
            "role": _ROLE_NAMES.get(deployment.role, "challenger"),
            "version": deployment.version,
        }
        if deployment.kind:
            out["kind"] = deployment.kind
        args = values_dict(deployment.args.fields) if deployment.HasField("args") else {}
        if args:
            out["args"] = args
        if deployment.endpoint:
            out["endpoint"] = deployment.endpoint
        if deployment.command:
            out["command"] = list(deployment.command)
        if deployment.replicas > 1:
            out["replicas"] = deployment.replicas
        if not deployment.enabled:
            out["enabled"] = False
        return out

    def step(policy_step: objective_pb2.PolicyStep) -> dict[str, Any]:
        until_ms = duration_ms(policy_step.until)
        out: dict[str, Any] = {"until_ms": until_ms, "accept": list(policy_step.accept)}
        generated = describe_step(until_ms, list(policy_step.accept))
        if policy_step.description and policy_step.description != generated:
            out["description"] = policy_step.description
        if policy_step.shares:
            out["shares"] = {
                name: policy_step.shares[name]
                for name in policy_step.accept
                if name in policy_step.shares
            }
        return out

    default: dict[str, Any] = {"score": config.default_answer.score}
    outputs = values_dict(config.default_answer.outputs)
    if outputs:
        default["outputs"] = outputs
    if config.default_answer.prefer_canary:
        default["prefer_canary"] = True
    return {
        "sla_ms": duration_ms(config.sla),
        "late_grace_ms": duration_ms(config.late_grace),
        "enrichment": _ENRICHMENT_NAMES.get(config.enrichment, "subject_state"),
        "features": [
            {
                "name": feature.name,
                "type": _FEATURE_TYPE_NAMES.get(feature.type, "any"),
                "required": feature.required,
                **({"description": feature.description} if feature.description else {}),
            }
            for feature in config.features
        ],
        "models": [model(deployment) for deployment in config.models],
        "policy": [step(policy_step) for policy_step in config.policy.steps],
        "default": default,
        "sampling": {
            "challenger_fraction": config.sampling.challenger_fraction,
            "archive_fraction": config.sampling.archive_fraction,
        },
        "default_consent": {
            "experimentation": _CONSENT_NAMES.get(
                config.default_consent.experimentation, "granted"
            ),
            "archiving": _CONSENT_NAMES.get(config.default_consent.archiving, "granted"),
        },
    }
