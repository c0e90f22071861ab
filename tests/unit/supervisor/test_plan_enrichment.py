"""Which processes a mesh gets depends on its objectives' enrichment and replica groups."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rendezvous.v1 import objective_pb2

from services.core.mesh import Mesh
from services.runner.settings import RunnerSettings
from services.supervisor.plan import ProcessSpec, model_directory, plan


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


def _plan(mesh: Mesh, tmp_path: Path) -> list[ProcessSpec]:
    return plan(mesh.objective_configs(), tmp_path, "pulsar://x", "http://x", "127.0.0.1:50051")


def _names(mesh: Mesh, tmp_path: Path) -> set[str]:
    return {spec.name for spec in _plan(mesh, tmp_path)}


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
    specs = {s.name: s for s in _plan(mesh, tmp_path)}
    hosts = sorted(name for name in specs if name.startswith("runners-"))
    # One host for the single-replica group (chal + the decoy), two for inc's group.
    assert hosts == ["runners-o-0", "runners-o-x2-0", "runners-o-x2-1"]
    assert not any(name.startswith("decoy") for name in specs)

    def env(name: str) -> dict[str, str]:
        return specs[name].env

    # Hosts follow the objective live and serve their group; nothing names the models.
    for name in hosts:
        settings = RunnerSettings.model_validate(
            {
                key.removeprefix("RDV_RUNNER_").lower(): value
                for key, value in env(name).items()
                if not key.startswith("RDV_RUNNER_PULSAR__")
            }
        )
        assert settings.follow and settings.objective == "o"
        assert settings.instance == name
        assert settings.model_directory == model_directory(tmp_path)
        assert "RDV_RUNNER_DEPLOYMENTS" not in env(name)
    assert env("runners-o-0")["RDV_RUNNER_REPLICAS"] == "1"
    assert specs["runners-o-0"].role == "runner+decoy"
    assert env("runners-o-x2-1")["RDV_RUNNER_REPLICAS"] == "2"
    assert specs["runners-o-x2-1"].role == "runner"
    # Replicas of a group share its subscription; groups do not share one (each model must
    # see every task exactly once per group).
    subscriptions = {name: env(name)["RDV_RUNNER_SUBSCRIPTION"] for name in hosts}
    assert subscriptions["runners-o-x2-0"] == subscriptions["runners-o-x2-1"]
    assert subscriptions["runners-o-0"] != subscriptions["runners-o-x2-0"]


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
    specs = {s.name: s for s in _plan(mesh, tmp_path)}
    assert sorted(name for name in specs if name.startswith("runners-")) == ["runners-o-0"]
    assert specs["runners-o-0"].env["RDV_RUNNER_SUBSCRIPTION"] == "runners"
    model = specs["model-inc"].env
    assert (model["RDV_MODEL_KIND"], model["RDV_MODEL_NAME"]) == ("sum", "inc")
