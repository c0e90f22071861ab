"""A deployment with a `command` runs that program, in any language, under the RDV_MODEL_*
environment; the mesh file carries the command both ways."""

from __future__ import annotations

import json
from pathlib import Path

from services.core.mesh import Mesh, entry_from_config
from services.supervisor.plan import plan


def _mesh() -> Mesh:
    return Mesh.model_validate(
        {
            "objectives": {
                "poly": {
                    "sla_ms": 50,
                    "enrichment": "none",
                    "models": [
                        {"name": "py", "role": "incumbent", "kind": "diabetes"},
                        {
                            "name": "go",
                            "role": "challenger",
                            "kind": "diabetes",
                            "command": ["tools/bin/rendezvous-model-go", "--verbose"],
                            "args": {"algorithm": "linear"},
                            "version": "7",
                        },
                        {
                            "name": "remote",
                            "role": "challenger",
                            "endpoint": "127.0.0.1:7000",
                        },
                    ],
                    "policy": [{"until_ms": 40, "accept": ["py", "go"]}],
                }
            }
        }
    )


def test_a_command_deployment_runs_its_program_with_the_model_environment(
    tmp_path: Path,
) -> None:
    specs = {s.name: s for s in plan(_mesh().objective_configs(), tmp_path, "p", "h", "l:1")}
    go = specs["model-go"]
    assert go.command == ["tools/bin/rendezvous-model-go", "--verbose"]
    assert go.env["RDV_MODEL_NAME"] == "go"
    assert go.env["RDV_MODEL_VERSION"] == "7"
    assert json.loads(go.env["RDV_MODEL_ARGS"]) == {"algorithm": "linear"}
    assert go.env["RDV_MODEL_LISTEN"] == go.endpoint
    assert go.env["RDV_MODEL_READY_FILE"] == str(go.ready_file)
    # The Python container of a kind runs as a module; an endpoint is nobody's to start.
    assert specs["model-py"].command == []
    assert specs["model-py"].module == "services.models"
    assert "model-remote" not in specs


def test_the_command_survives_the_round_trip_through_the_control_topic() -> None:
    config = _mesh().objective_configs()["poly"]
    assert list(config.models[1].command) == ["tools/bin/rendezvous-model-go", "--verbose"]
    entry = entry_from_config(config)
    assert entry["models"][1]["command"] == ["tools/bin/rendezvous-model-go", "--verbose"]
    assert "command" not in entry["models"][0]
