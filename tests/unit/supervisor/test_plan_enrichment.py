"""Which processes a mesh gets depends on its objectives' enrichment."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rendezvous.v1 import objective_pb2

from services.core.mesh import Mesh
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
    assert {"rendezvous", "collector", "model-a-m", "runner-a-m-0"} <= names


def test_one_enriched_objective_brings_the_enricher(tmp_path: Path) -> None:
    assert "enricher" in _names(_mesh(a="none", b="subject_state"), tmp_path)
