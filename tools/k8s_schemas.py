"""Offline JSON schemas for kubeconform: Kubernetes' own kinds and KEDA's CRDs.

kubeconform fetches schemas from the network by default; here they are made once by
`make setup` from two registry packages, and `make helm-check` points kubeconform at them:

- Kubernetes: the `kubernetes-validate` PyPI package ships each release's schemas (strict
  variant: no unknown fields), but as *local* schemas whose `$ref`s point into a shared
  `_definitions.json` by absolute path, which kubeconform would try to fetch. Each kind is
  written here as a standalone schema: its own `$defs`, holding exactly the definitions it
  reaches, with the references rewritten to `#/$defs/...`. File names follow kubeconform's
  default layout (`v1.31.0-standalone-strict/deployment-apps-v1.json`).
- KEDA: the Go module `github.com/kedacore/keda/v2` carries its CRDs
  (`config/crd/bases/*.yaml`). Each served version's `openAPIV3Schema` becomes a JSON schema
  (`crds/keda.sh/scaledobject_v1alpha1.json`, kubeconform's CRD layout), strict as well:
  an object that lists its properties admits no others, unless the CRD says it preserves
  unknown fields.

    python -m tools.k8s_schemas --out .cache/k8s-schemas --kubernetes-version 1.31.0 \
        --keda-version v2.21.0
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

# Where kubernetes-validate's references into the shared definitions point.
_SHARED_REF = "/api/_definitions.json#/$defs/"
_LOCAL_REF = "#/$defs/"
KEDA_MODULE = "github.com/kedacore/keda/v2"


def _package_schemas() -> Path:
    import kubernetes_validate

    return Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"


def _refs(node: Any) -> Iterator[str]:
    """Every `$ref` under `node`."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def _rewrite(node: Any) -> Any:
    """`node` with every shared-definitions reference made document-local."""
    if isinstance(node, dict):
        return {
            key: (
                value.replace(_SHARED_REF, _LOCAL_REF)
                if key == "$ref" and isinstance(value, str)
                else _rewrite(value)
            )
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_rewrite(item) for item in node]
    return node


def _definition_name(ref: str) -> str | None:
    for prefix in (_SHARED_REF, _LOCAL_REF):
        if ref.startswith(prefix):
            return ref[len(prefix) :]
    return None


def standalone(schema: dict[str, Any], definitions: dict[str, Any]) -> dict[str, Any]:
    """`schema` with the definitions it reaches (transitively) inlined as its `$defs`."""
    needed: dict[str, Any] = {}
    pending = [name for ref in _refs(schema) if (name := _definition_name(ref))]
    while pending:
        name = pending.pop()
        if name in needed:
            continue
        if name not in definitions:
            raise KeyError(f"schema refers to an unknown definition {name!r}")
        needed[name] = definitions[name]
        pending.extend(n for ref in _refs(definitions[name]) if (n := _definition_name(ref)))
    result: dict[str, Any] = _rewrite({k: v for k, v in schema.items() if k != "$id"})
    result["$defs"] = {name: _rewrite(needed[name]) for name in sorted(needed)}
    return result


def write_kubernetes(out: Path, version: str) -> int:
    """The standalone strict schema of every kind of Kubernetes `version` (x.y.z)."""
    source = _package_schemas() / f"v{version}-local-strict"
    if not source.is_dir():
        shipped = sorted(p.name for p in _package_schemas().glob("v*-local-strict"))
        raise SystemExit(f"kubernetes-validate has no schemas for {version}; it ships {shipped}")
    definitions = json.loads((source / "_definitions.json").read_text())["$defs"]
    target = out / f"v{version}-standalone-strict"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    count = 0
    for path in sorted(source.glob("*.json")):
        if path.name.startswith("_"):
            continue
        schema = json.loads(path.read_text())
        # Only the kinds a manifest can be (they carry their group/version/kind).
        if "x-kubernetes-group-version-kind" not in schema:
            continue
        (target / path.name).write_text(json.dumps(standalone(schema, definitions)))
        count += 1
    return count


def strict_crd_schema(node: Any) -> Any:
    """An openAPIV3Schema as a JSON schema that admits no unknown fields."""
    if isinstance(node, list):
        return [strict_crd_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    result = {key: strict_crd_schema(value) for key, value in node.items()}
    if (
        "properties" in result
        and "additionalProperties" not in result
        and not result.get("x-kubernetes-preserve-unknown-fields")
    ):
        result["additionalProperties"] = False
    if result.get("x-kubernetes-int-or-string") and "type" not in result:
        result["oneOf"] = [{"type": "string"}, {"type": "integer"}]
    return result


def write_crds(out: Path, crd_files: list[Path]) -> int:
    """One schema per served version of each CRD, in kubeconform's CRD layout."""
    count = 0
    for path in crd_files:
        crd = yaml.safe_load(path.read_text())
        if not isinstance(crd, dict) or crd.get("kind") != "CustomResourceDefinition":
            continue
        group = crd["spec"]["group"]
        kind = crd["spec"]["names"]["kind"].lower()
        for version in crd["spec"]["versions"]:
            if not version.get("served", True):
                continue
            schema = strict_crd_schema(version["schema"]["openAPIV3Schema"])
            target = out / "crds" / group / f"{kind}_{version['name']}.json"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(schema))
            count += 1
    return count


def keda_crds(version: str) -> list[Path]:
    """KEDA's CRD files, from its Go module (`go mod download`: the module proxy, cached)."""
    if not re.fullmatch(r"v\d+\.\d+\.\d+", version):
        raise SystemExit(f"--keda-version {version!r}: expected vX.Y.Z")
    result = subprocess.run(
        ["go", "mod", "download", "-json", f"{KEDA_MODULE}@{version}"],
        check=True,
        capture_output=True,
        text=True,
    )
    directory = Path(json.loads(result.stdout)["Dir"]) / "config" / "crd" / "bases"
    return sorted(directory.glob("*.yaml"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--kubernetes-version", action="append", required=True)
    parser.add_argument("--keda-version", required=True)
    args = parser.parse_args(argv)
    for version in args.kubernetes_version:
        count = write_kubernetes(args.out, version)
        print(f"k8s-schemas: Kubernetes {version}: {count} kinds", file=sys.stderr)
    if (args.out / "crds").exists():
        shutil.rmtree(args.out / "crds")
    count = write_crds(args.out, keda_crds(args.keda_version))
    print(f"k8s-schemas: KEDA {args.keda_version}: {count} CRD versions", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
