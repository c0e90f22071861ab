"""What makes an objective configuration acceptable: one problem, one field violation.

`validate` returns every problem it finds, not only the first, each as (field path, what is
wrong), with paths as a client wrote them (`config.policy.steps[1].until`), so an operator
fixes a configuration in one round. An empty list means the configuration may be published.
The rules are the mesh file's (services/core/mesh.py) plus what only a change can get wrong:
a change record naming its author and reason.
"""

from __future__ import annotations

import math
import re

from rendezvous.v1 import common_pb2, objective_pb2

from services.core.oip import OIP_KIND, oip_problems
from services.core.protos import duration_ms, values_dict

Violation = tuple[str, str]

# As the mesh file spells them (services/core/mesh.py): names that are safe in topic
# names, subscription names and metric labels.
MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
OBJECTIVE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Shares that sum to 1 in decimal can sum to a hair above 1 in binary.
SHARE_SUM_TOLERANCE = 1e-9

INCUMBENT = common_pb2.MODEL_ROLE_INCUMBENT
DECOY = common_pb2.MODEL_ROLE_DECOY


def _fraction(value: float) -> bool:
    return math.isfinite(value) and 0.0 <= value <= 1.0


def validate(
    config: objective_pb2.ObjectiveConfig, *, prefix: str = "config", require_change: bool = True
) -> list[Violation]:
    """Every problem of `config`, as (field path, description); empty when it is valid."""
    out: list[Violation] = []
    p = prefix
    if not OBJECTIVE_NAME.match(config.objective):
        out.append((f"{p}.objective", "must be 1-64 letters, digits, '-' or '_'"))
    if not config.HasField("sla") or duration_ms(config.sla) <= 0:
        out.append((f"{p}.sla", "must be greater than zero"))
    if duration_ms(config.late_grace) < 0:
        out.append((f"{p}.late_grace", "must not be negative"))
    out.extend(_models(config, p))
    out.extend(_policy(config, p))
    for name in ("challenger_fraction", "archive_fraction"):
        value = getattr(config.sampling, name)
        if not _fraction(value):
            out.append((f"{p}.sampling.{name}", f"must be in [0, 1], not {value}"))
    if not math.isfinite(config.default_answer.score):
        out.append((f"{p}.default_answer.score", "must be a finite number"))
    seen_features: set[str] = set()
    for index, feature in enumerate(config.features):
        if not feature.name:
            out.append((f"{p}.features[{index}].name", "is required"))
        elif feature.name in seen_features:
            out.append((f"{p}.features[{index}].name", f"{feature.name!r} is listed twice"))
        seen_features.add(feature.name)
    if require_change:
        if not config.change.author.strip():
            out.append((f"{p}.change.author", "who makes the change is required"))
        if not config.change.reason.strip():
            out.append((f"{p}.change.reason", "why the change is made is required"))
    return out


def _models(config: objective_pb2.ObjectiveConfig, p: str) -> list[Violation]:
    out: list[Violation] = []
    if not config.models:
        out.append((f"{p}.models", "at least one model is required"))
        return out
    seen: set[str] = set()
    incumbents: list[int] = []
    for index, model in enumerate(config.models):
        where = f"{p}.models[{index}]"
        if not MODEL_NAME.match(model.name):
            out.append(
                (f"{where}.name", f"{model.name!r}: lowercase letters, digits and '-', 1-63")
            )
        elif model.name in seen:
            out.append((f"{where}.name", f"{model.name!r} is listed twice"))
        seen.add(model.name)
        if model.role == common_pb2.MODEL_ROLE_UNSPECIFIED:
            out.append((f"{where}.role", "is required"))
        if model.replicas < 0:
            out.append((f"{where}.replicas", "must not be negative"))
        if model.command and model.endpoint:
            out.append(
                (
                    f"{where}.command",
                    "a command runs the container here, an endpoint says it runs elsewhere: "
                    "give one of them",
                )
            )
        if model.command and not model.command[0].strip():
            out.append((f"{where}.command", "the program (the first word) is required"))
        if model.kind == OIP_KIND:
            args = values_dict(model.args.fields) if model.HasField("args") else {}
            out.extend(
                (f"{where}.{path}", problem)
                for path, problem in oip_problems(model.endpoint, model.command, args)
            )
        if model.role == INCUMBENT:
            incumbents.append(index)
            if not model.enabled:
                out.append((f"{where}.enabled", "the incumbent must be enabled"))
    if not incumbents:
        out.append((f"{p}.models", "exactly one model must be the incumbent; none is"))
    for index in incumbents[1:]:
        out.append(
            (
                f"{p}.models[{index}].role",
                f"exactly one model must be the incumbent; "
                f"{config.models[incumbents[0]].name!r} already is",
            )
        )
    return out


def _policy(config: objective_pb2.ObjectiveConfig, p: str) -> list[Violation]:
    out: list[Violation] = []
    roles = {model.name: model.role for model in config.models}
    if not config.policy.steps:
        out.append((f"{p}.policy.steps", "at least one step is required"))
        return out
    sla_ms = duration_ms(config.sla)
    previous_ms = 0.0
    for index, step in enumerate(config.policy.steps):
        where = f"{p}.policy.steps[{index}]"
        until_ms = duration_ms(step.until)
        if until_ms <= previous_ms:
            out.append(
                (
                    f"{where}.until",
                    f"{until_ms:g} ms must be later than the step before ({previous_ms:g} ms)"
                    if index
                    else "must be greater than zero",
                )
            )
        if sla_ms > 0 and until_ms > sla_ms:
            out.append((f"{where}.until", f"{until_ms:g} ms is past the SLA ({sla_ms:g} ms)"))
        previous_ms = max(previous_ms, until_ms)
        if not step.accept:
            out.append((f"{where}.accept", "at least one model is required"))
        accepted: set[str] = set()
        for position, name in enumerate(step.accept):
            at = f"{where}.accept[{position}]"
            if name not in roles:
                out.append((at, f"{name!r} is not a model here"))
            elif roles[name] == DECOY:
                out.append((at, f"{name!r} is a decoy: it never answers"))
            elif name in accepted:
                out.append((at, f"{name!r} is listed twice"))
            accepted.add(name)
        total = 0.0
        for name, share in sorted(step.shares.items()):
            if name not in accepted:
                out.append((f"{where}.shares[{name}]", f"{name!r} is not accepted by this step"))
            if _fraction(share):
                total += share
            else:
                out.append((f"{where}.shares[{name}]", f"must be in [0, 1], not {share}"))
        if total > 1.0 + SHARE_SUM_TOLERANCE:
            out.append((f"{where}.shares", f"sum to {total:g}; they must sum to at most 1"))
    return out


def accepted_models(config: objective_pb2.ObjectiveConfig | None) -> set[str]:
    """Every model some step of the policy accepts."""
    if config is None:
        return set()
    return {name for step in config.policy.steps for name in step.accept}
