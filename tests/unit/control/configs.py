"""A small objective for control-plane tests, built the way the mesh file builds one."""

from __future__ import annotations

from typing import Any

from rendezvous.v1 import objective_pb2

from services.core.mesh import ObjectiveEntry, to_config


def entry(**overrides: Any) -> dict[str, Any]:
    """The mesh form of a small objective: an incumbent, two challengers, a canary, a decoy."""
    out: dict[str, Any] = {
        "sla_ms": 50,
        "models": [
            {"name": "ridge", "role": "incumbent", "kind": "diabetes"},
            {"name": "sum", "role": "challenger", "kind": "sum"},
            {"name": "flaky", "role": "challenger", "kind": "flaky", "args": {"error_rate": 0.1}},
            {"name": "canary", "role": "canary", "kind": "diabetes"},
            {"name": "decoy", "role": "decoy"},
        ],
        "policy": [
            {"until_ms": 20, "accept": ["ridge"]},
            {"until_ms": 45, "accept": ["ridge", "sum", "canary"]},
        ],
        "default": {"score": 1.5},
    }
    out.update(overrides)
    return out


def config(name: str = "demo", version: int = 1, **overrides: Any) -> objective_pb2.ObjectiveConfig:
    built = to_config(name, ObjectiveEntry.model_validate(entry(**overrides)), version)
    built.change.author = "tester"
    built.change.reason = "a test"
    return built
