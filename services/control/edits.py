"""The changes an operator makes, as pure functions on `ObjectiveConfig`.

Each takes a configuration and returns a new one (the argument is never modified); the
caller stamps the change record and sends it through `UpdateObjectiveConfig`, where the
control plane validates it. Promote, split and rollback are compositions of Get, history
and Update, not RPCs of their own: one write path, one set of checks.

A step description that was generated from its accept list (the mesh file's default) is
regenerated when an edit changes the list; one an operator wrote is kept.

`render` and `diff` show configurations the way the mesh file writes them
(services/core/mesh.py `entry_from_config`), so what an operator reads is what `apply` takes.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import yaml
from rendezvous.v1 import common_pb2, objective_pb2

from services.core.mesh import describe_step, entry_from_config
from services.core.protos import duration_ms

ObjectiveConfig = objective_pb2.ObjectiveConfig

_ROLES = {
    "incumbent": common_pb2.MODEL_ROLE_INCUMBENT,
    "challenger": common_pb2.MODEL_ROLE_CHALLENGER,
    "canary": common_pb2.MODEL_ROLE_CANARY,
    "decoy": common_pb2.MODEL_ROLE_DECOY,
}


class EditError(ValueError):
    """An edit that makes no sense for this configuration (e.g. an unknown model)."""


def _copy(config: ObjectiveConfig) -> ObjectiveConfig:
    out = ObjectiveConfig()
    out.CopyFrom(config)
    return out


def _model(config: ObjectiveConfig, name: str) -> objective_pb2.ModelDeployment:
    for model in config.models:
        if model.name == name:
            return model
    known = ", ".join(model.name for model in config.models)
    raise EditError(f"{config.objective} has no model {name!r} (it has: {known})")


def _incumbent(config: ObjectiveConfig) -> objective_pb2.ModelDeployment | None:
    for model in config.models:
        if model.role == common_pb2.MODEL_ROLE_INCUMBENT:
            return model
    return None


def _edit_step(step: objective_pb2.PolicyStep, change: Callable[[list[str]], list[str]]) -> None:
    """Rewrite the step's accept list, keeping a generated description in step with it."""
    before = list(step.accept)
    after = change(list(before))
    until_ms = duration_ms(step.until)
    generated = not step.description or step.description == describe_step(until_ms, before)
    del step.accept[:]
    step.accept.extend(after)
    for name in list(step.shares):
        if name not in after:
            del step.shares[name]
    if generated and after:
        step.description = describe_step(until_ms, after)


def promote(config: ObjectiveConfig, model: str) -> ObjectiveConfig:
    """`model` becomes the incumbent and the old incumbent a challenger.

    In every step the two swap places (where only the old incumbent is accepted, the model
    takes its place), and the model's A/B shares are dropped. The first step, the
    incumbent's window, then accepts the model and what it accepted besides the two and
    without a share: a race is first-come, so the old incumbent left beside it would still
    answer whenever it is the faster (the demo's `diabetes-ridge` did, 73 % of answers).
    """
    out = _copy(config)
    chosen = _model(out, model)
    if chosen.role == common_pb2.MODEL_ROLE_DECOY:
        raise EditError(f"{model!r} is a decoy: it never answers, so it cannot be the incumbent")
    if chosen.role == common_pb2.MODEL_ROLE_INCUMBENT:
        raise EditError(f"{model!r} is already the incumbent")
    old = _incumbent(out)
    old_name = old.name if old is not None else None
    if old is not None:
        old.role = common_pb2.MODEL_ROLE_CHALLENGER
    chosen.role = common_pb2.MODEL_ROLE_INCUMBENT
    chosen.enabled = True

    def swap(accept: list[str]) -> list[str]:
        if old_name is None or old_name not in accept:
            return accept
        if model in accept:
            i, j = accept.index(old_name), accept.index(model)
            accept[i], accept[j] = accept[j], accept[i]
        else:
            accept[accept.index(old_name)] = model
        return accept

    for step in out.policy.steps:
        _edit_step(step, swap)
        if model in step.shares:
            del step.shares[model]
    if out.policy.steps:
        first = out.policy.steps[0]
        others = [
            name
            for name in first.accept
            if name not in (model, old_name) and first.shares.get(name, 0.0) <= 0.0
        ]
        _edit_step(first, lambda _: [model, *others])
    return out


def split(config: ObjectiveConfig, model: str, share: float) -> ObjectiveConfig:
    """Give `model` `share` of the first step's requests (an A/B split): in that step those
    requests are answered by the model alone, the others without it (PolicyStep.shares).

    A model the first step does not accept yet is added after the others; share 0 ends the
    split and takes the model out of the first step again (left in, it would race the
    incumbent for every request, first come first served).
    """
    out = _copy(config)
    chosen = _model(out, model)
    if chosen.role == common_pb2.MODEL_ROLE_DECOY:
        raise EditError(f"{model!r} is a decoy: it never answers, so it cannot take a share")
    if not out.policy.steps:
        raise EditError(f"{config.objective} has no policy step to split")
    first = out.policy.steps[0]
    if share == 0:
        if model in first.shares:
            del first.shares[model]
        if chosen.role != common_pb2.MODEL_ROLE_INCUMBENT and model in first.accept:
            _edit_step(first, lambda accept: [name for name in accept if name != model])
        return out
    if model not in first.accept:
        _edit_step(first, lambda accept: [*accept, model])
    first.shares[model] = share
    return out


def add_model(
    config: ObjectiveConfig,
    name: str,
    *,
    role: str = "challenger",
    kind: str = "",
    args: Mapping[str, Any] | None = None,
    version: str = "1",
    endpoint: str = "",
    replicas: int = 1,
    accept_in: Sequence[int] = (),
) -> ObjectiveConfig:
    """A new deployment (its runner starts once the change is live); `accept_in` names the
    policy steps (by index) that accept it, last in their order. Adding a challenger and
    letting the policy accept it are best two changes: the control plane lets a policy
    accept a model only once a runner host reports it ready."""
    if role not in _ROLES or role == "incumbent":
        raise EditError(f"role must be challenger, canary or decoy, not {role!r}")
    out = _copy(config)
    if any(model.name == name for model in out.models):
        raise EditError(f"{config.objective} already has a model {name!r}")
    deployment = out.models.add(
        name=name,
        role=_ROLES[role],
        version=version,
        kind=kind,
        endpoint=endpoint,
        replicas=replicas,
        enabled=True,
    )
    if args:
        deployment.args.update(dict(args))
    for index in accept_in:
        if not 0 <= index < len(out.policy.steps):
            raise EditError(f"there is no policy step {index}")
        _edit_step(out.policy.steps[index], lambda accept: [*accept, name])
    return out


def remove_model(config: ObjectiveConfig, name: str) -> ObjectiveConfig:
    """Drop a deployment (its runner drains and stops) and every mention of it in the policy."""
    out = _copy(config)
    chosen = _model(out, name)
    if chosen.role == common_pb2.MODEL_ROLE_INCUMBENT:
        raise EditError(f"{name!r} is the incumbent: promote another model first")
    for index, step in enumerate(out.policy.steps):
        if list(step.accept) == [name]:
            raise EditError(f"policy step {index} accepts only {name!r}; change the policy first")
        _edit_step(step, lambda accept: [other for other in accept if other != name])
    kept = [model for model in out.models if model.name != name]
    del out.models[:]
    out.models.extend(kept)
    return out


def rollback(
    history: Sequence[ObjectiveConfig], target_version: int | None = None
) -> ObjectiveConfig:
    """The configuration of `target_version` (default: the one the current version replaced),
    ready to be published again as a new version: versions only grow, the past is kept."""
    if not history:
        raise EditError("there is no history to roll back in")
    current = history[-1]
    if target_version is None:
        target_version = current.change.previous_version or current.version - 1
    if target_version == current.version:
        raise EditError(f"version {target_version} is the current version")
    for config in history:
        if config.version == target_version:
            out = _copy(config)
            out.ClearField("change")
            out.version = current.version
            return out
    known = ", ".join(str(config.version) for config in history)
    raise EditError(f"{current.objective} has no version {target_version} (it has: {known})")


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _sorted(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [_sorted(item) for item in value]
    return value


def render(config: ObjectiveConfig) -> str:
    """The configuration as a mesh file's objective entry (YAML), what `apply` reads."""
    entry = entry_from_config(config)
    # Struct-backed maps (model args, default outputs) come in no stable order; sorted, two
    # renderings of one configuration are the same text and a diff shows only changes.
    for model in entry["models"]:
        if "args" in model:
            model["args"] = _sorted(model["args"])
    if "outputs" in entry["default"]:
        entry["default"]["outputs"] = _sorted(entry["default"]["outputs"])
    return yaml.safe_dump(entry, sort_keys=False, allow_unicode=True)


def diff(old: ObjectiveConfig | None, new: ObjectiveConfig) -> str:
    """A unified diff of the two configurations in mesh form; empty when they serve alike."""
    before = render(old).splitlines(keepends=True) if old is not None else []
    after = render(new).splitlines(keepends=True)
    old_name = f"{old.objective} v{old.version}" if old is not None else "(none)"
    new_name = f"{new.objective} v{new.version}"
    return "".join(difflib.unified_diff(before, after, fromfile=old_name, tofile=new_name))


def same_serving(a: ObjectiveConfig, b: ObjectiveConfig) -> bool:
    """Whether the two serve alike: everything but the version and the change record."""
    left, right = _copy(a), _copy(b)
    for config in (left, right):
        config.version = 0
        config.ClearField("change")
    return left == right
