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


def test_one_runner_host_per_objective_and_replica_serves_every_model(tmp_path: Path) -> None:
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
    assert hosts == ["runners-o-0", "runners-o-1"]
    first = json.loads(specs["runners-o-0"].env["RDV_RUNNER_DEPLOYMENTS"])
    second = json.loads(specs["runners-o-1"].env["RDV_RUNNER_DEPLOYMENTS"])
    assert [(d["model"], d["role"]) for d in first] == [
        ("inc", "incumbent"),
        ("chal", "challenger"),
    ]
    assert [d["model"] for d in second] == ["inc"]
    assert first[0]["endpoint"] == specs["model-inc"].endpoint
    # Each deployment becomes its own runner settings, subscription named after the model.
    settings = RunnerSettings(deployments=first)
    assert [(s.model, s.subscription, s.role) for s in settings.hosted()] == [
        ("inc", "inc", "incumbent"),
        ("chal", "chal", "challenger"),
    ]
