"""tools/k8s_schemas.py: standalone Kubernetes schemas and strict CRD schemas for kubeconform."""

from __future__ import annotations

import json
from typing import Any

from tools.k8s_schemas import standalone, strict_crd_schema

SHARED = "/api/_definitions.json#/$defs/"


def test_a_kind_carries_exactly_the_definitions_it_reaches_with_local_references() -> None:
    definitions: dict[str, Any] = {
        "Spec": {"properties": {"template": {"$ref": "#/$defs/Template"}}},
        "Template": {"properties": {"labels": {"$ref": "#/$defs/Labels"}}},
        "Labels": {"type": "object"},
        "Unrelated": {"type": "string"},
    }
    kind = {
        "$id": "https://kubernetes.io/api/thing/v1",
        "properties": {"spec": {"$ref": SHARED + "Spec"}},
        "additionalProperties": False,
    }
    schema = standalone(kind, definitions)
    assert sorted(schema["$defs"]) == ["Labels", "Spec", "Template"]
    assert schema["properties"]["spec"]["$ref"] == "#/$defs/Spec"
    assert "$id" not in schema  # else the local references would resolve against kubernetes.io
    assert SHARED not in json.dumps(schema)


def test_crd_objects_that_list_their_properties_admit_no_others() -> None:
    crd_schema = {
        "type": "object",
        "properties": {
            "spec": {"type": "object", "properties": {"name": {"type": "string"}}},
            "free": {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": True,
                "properties": {},
            },
            "metadata": {"type": "object"},
            "port": {"x-kubernetes-int-or-string": True},
        },
    }
    strict = strict_crd_schema(crd_schema)
    assert strict["additionalProperties"] is False
    assert strict["properties"]["spec"]["additionalProperties"] is False
    assert "additionalProperties" not in strict["properties"]["free"]
    assert "additionalProperties" not in strict["properties"]["metadata"]
    assert strict["properties"]["port"]["oneOf"] == [{"type": "string"}, {"type": "integer"}]
