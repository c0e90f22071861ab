"""Which processes a mesh gets depends on its objectives' enrichment."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rendezvous.v1 import objective_pb2

from services.core.mesh import Mesh
from services.runner.settings import RunnerSettings
from services.supervisor.plan import plan


def _mesh(**enrichment: str) -> Mesh:
    objectives: dict[str, Any] = {}
    for name, mode in enrichment.items():
        objectives[name] = {
            "sla_ms": 50,
            "models": [{"name": f"{name}-m", "role": "incumbent", "kind": "sum"}],
            "policy": [{"until_ms": 40, "accept": [f"{name}-m"]}],
            **({"enrichment": mode} if mode else {}),
        }
    return Mesh.model_validate({"objectives": objectives})


def _names(mesh: Mesh, tmp_path: Path) -> set[str]:
    specs = plan(mesh, tmp_path / "mesh.yaml", tmp_path, "pulsar://x", "http://x")
    return {spec.name for spec in specs}


def test_enrichment_defaults_to_subject_state() -> None:
    config = _mesh(a="").objective_configs()["a"]
    assert config.enrichment == objective_pb2.ENRICHMENT_SUBJECT_STATE


def test_objectives_without_enrichment_run_no_enricher(tmp_path: Path) -> None:
    mesh = _mesh(a="none", b="none")
    assert mesh.objective_configs()["a"].enrichment == objective_pb2.ENRICHMENT_NONE
    names = _names(mesh, tmp_path)
    assert "enricher" not in names
    assert {"rendezvous", "collector", "model-a-m", "runners-a-0"} <= names


def test_one_enriched_objective_brings_the_enricher(tmp_path: Path) -> None:
    assert "enricher" in _names(_mesh(a="none", b="subject_state"), tmp_path)


def test_runner_hosts_group_models_that_scale_together_and_host_the_decoy(
    tmp_path: Path,
) -> None:
    mesh = Mesh.model_validate(
        {
            "objectives": {
                "o": {
                    "sla_ms": 50,
                    "models": [
                        {"name": "inc", "role": "incumbent", "kind": "sum", "replicas": 2},
                        {"name": "chal", "role": "challenger", "kind": "sum"},
                        {"name": "decoy", "role": "decoy"},
                    ],
                    "policy": [{"until_ms": 40, "accept": ["inc", "chal"]}],
                }
            }
        }
    )
    specs = {s.name: s for s in plan(mesh, tmp_path / "m.yaml", tmp_path, "pulsar://x", "http://x")}
    hosts = sorted(name for name in specs if name.startswith("runners-"))
    # One host for the single-replica group (chal + the decoy), two for inc's group.
    assert hosts == ["runners-o-x1-0", "runners-o-x2-0", "runners-o-x2-1"]
    assert not any(name.startswith("decoy") for name in specs)

    def env(name: str) -> dict[str, str]:
        return specs[name].env

    single = json.loads(env("runners-o-x1-0")["RDV_RUNNER_DEPLOYMENTS"])
    assert [(d["model"], d["role"]) for d in single] == [("chal", "challenger")]
    assert env("runners-o-x1-0")["RDV_RUNNER_ARCHIVE"] == "true"
    for replica in ("runners-o-x2-0", "runners-o-x2-1"):
        deployments = json.loads(env(replica)["RDV_RUNNER_DEPLOYMENTS"])
        assert [d["model"] for d in deployments] == ["inc"]
        assert deployments[0]["endpoint"] == specs["model-inc"].endpoint
        assert env(replica)["RDV_RUNNER_ARCHIVE"] == "false"
    # Replicas of a group share its subscription; groups do not share one (each model must
    # see every task exactly once per group).
    subscriptions = {name: env(name)["RDV_RUNNER_SUBSCRIPTION"] for name in hosts}
    assert subscriptions["runners-o-x2-0"] == subscriptions["runners-o-x2-1"]
    assert subscriptions["runners-o-x1-0"] != subscriptions["runners-o-x2-0"]


def test_one_group_keeps_plain_host_names(tmp_path: Path) -> None:
    mesh = Mesh.model_validate(
        {
            "objectives": {
                "o": {
                    "sla_ms": 50,
                    "models": [
                        {"name": "inc", "role": "incumbent", "kind": "sum"},
                        {"name": "decoy", "role": "decoy"},
                    ],
                    "policy": [{"until_ms": 40, "accept": ["inc"]}],
                }
            }
        }
    )
    specs = {s.name: s for s in plan(mesh, tmp_path / "m.yaml", tmp_path, "pulsar://x", "http://x")}
    assert sorted(name for name in specs if name.startswith("runners-")) == ["runners-o-0"]
    settings = RunnerSettings(
        objective="o",
        deployments=json.loads(specs["runners-o-0"].env["RDV_RUNNER_DEPLOYMENTS"]),
        archive=True,
        subscription=specs["runners-o-0"].env["RDV_RUNNER_SUBSCRIPTION"],
    )
    assert [(s.model, s.role) for s in settings.hosted()] == [("inc", "incumbent")]
    assert settings.subscription == "runners"
