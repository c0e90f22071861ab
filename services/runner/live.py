"""What a live runner host serves of an objective's configuration: pure functions.

A host serves one replica group of one objective: every enabled, non-decoy deployment whose
replica count (0 reads as 1) is the host's, and the objective's archive when its enabled decoy
has that count. A deployment's model listens at its `endpoint`, or, for a container the local
supervisor runs, at the address the supervisor wrote into the model directory (a JSON file
{model name: endpoint}, replaced atomically, so a reader never sees half of it).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rendezvous.v1 import common_pb2, objective_pb2

from services.core.oip import OIP_KIND
from services.core.protos import values_dict
from services.runner.settings import RunnerRole

if TYPE_CHECKING:
    from services.runner.runner import ModelRunner

log = logging.getLogger(__name__)

_ROLES: dict[common_pb2.ModelRole.ValueType, RunnerRole] = {
    common_pb2.MODEL_ROLE_INCUMBENT: "incumbent",
    common_pb2.MODEL_ROLE_CHALLENGER: "challenger",
    common_pb2.MODEL_ROLE_CANARY: "canary",
}


def replica_group(deployment: objective_pb2.ModelDeployment) -> int:
    """The deployment's replica count (0 reads as 1): the runner hosts it shares."""
    return max(deployment.replicas, 1)


def runner_role(deployment: objective_pb2.ModelDeployment) -> RunnerRole:
    """The role a runner plays; an unknown role is treated as experimental (the safe side
    for a subject's consent)."""
    return _ROLES.get(deployment.role, "challenger")


def deployment_args(deployment: objective_pb2.ModelDeployment) -> dict[str, Any]:
    """The deployment's args as plain values ({} when it has none)."""
    return values_dict(deployment.args.fields) if deployment.HasField("args") else {}


def serves_differently(runner: ModelRunner, deployment: objective_pb2.ModelDeployment) -> bool:
    """Whether `runner` speaks another protocol than `deployment` now asks for, or, for an
    oip model, maps features to tensors differently (its args changed): a new runner then."""
    settings = runner.settings
    if settings.kind != deployment.kind and OIP_KIND in (settings.kind, deployment.kind):
        return True
    return deployment.kind == OIP_KIND and settings.args != deployment_args(deployment)


def hosted_models(
    config: objective_pb2.ObjectiveConfig, replicas: int
) -> dict[str, objective_pb2.ModelDeployment]:
    """The deployments a host of replica group `replicas` runs, by name."""
    return {
        deployment.name: deployment
        for deployment in config.models
        if deployment.enabled
        and deployment.role != common_pb2.MODEL_ROLE_DECOY
        and replica_group(deployment) == replicas
    }


def archive_hosted(config: objective_pb2.ObjectiveConfig, replicas: int) -> bool:
    """Whether a host of replica group `replicas` archives the objective's tasks."""
    return any(
        deployment.enabled
        and deployment.role == common_pb2.MODEL_ROLE_DECOY
        and replica_group(deployment) == replicas
        for deployment in config.models
    )


def archiving_denied_by_default(config: objective_pb2.ObjectiveConfig) -> bool:
    return config.default_consent.archiving == common_pb2.CONSENT_DECISION_DENIED


def read_model_directory(path: Path | None) -> dict[str, str]:
    """The model directory's entries; empty when there is none (yet) or it does not parse."""
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        log.warning("the model directory cannot be read", extra={"path": str(path)})
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(name): str(endpoint) for name, endpoint in data.items()}


def write_model_directory(path: Path, endpoints: dict[str, str]) -> None:
    """Replace the model directory atomically (a reader sees the old file or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(dict(sorted(endpoints.items())), indent=2), encoding="utf-8")
    tmp.replace(path)
