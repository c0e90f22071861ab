"""A TLS plan (`rendezvous up --tls`): every process gets the same RDV_<SERVICE>_TLS__*
settings and the supervisor's health check speaks TLS to it, a polyglot container (a
`command`) included."""

from __future__ import annotations

from pathlib import Path

from services.core.mesh import Mesh
from services.supervisor.certs import mesh_tls
from services.supervisor.plan import plan

PREFIXES = {
    "services.models": "RDV_MODEL_",
    "services.runner": "RDV_RUNNER_",
    "services.rendezvous": "RDV_RENDEZVOUS_",
    "services.collector": "RDV_COLLECTOR_",
}


def _mesh(command: list[str] | None = None) -> Mesh:
    challenger = {"name": "other", "role": "challenger", "kind": "diabetes"}
    if command:
        challenger["command"] = command  # type: ignore[assignment]
    return Mesh.model_validate(
        {
            "objectives": {
                "secure": {
                    "sla_ms": 50,
                    "enrichment": "none",
                    "models": [
                        {"name": "py", "role": "incumbent", "kind": "diabetes"},
                        challenger,
                    ],
                    "policy": [{"until_ms": 40, "accept": ["py", "other"]}],
                }
            }
        }
    )


def test_every_process_gets_the_tls_settings(tmp_path: Path) -> None:
    tls = mesh_tls(tmp_path / "certs")
    specs = plan(_mesh().objective_configs(), tmp_path, "p", "h", "l:1", tls=tls)
    assert {spec.module for spec in specs} == set(PREFIXES)
    for spec in specs:
        prefix = PREFIXES[spec.module]
        assert spec.env[f"{prefix}TLS__CERT_FILE"] == str(tls.cert_file)
        assert spec.env[f"{prefix}TLS__CLIENT_CA_FILE"] == str(tls.client_ca_file)
        assert spec.env[f"{prefix}TLS__CLIENT_CERT_FILE"] == str(tls.client_cert_file)
        assert spec.client_tls == tls


def test_plaintext_is_the_default_plan(tmp_path: Path) -> None:
    specs = plan(_mesh().objective_configs(), tmp_path, "p", "h", "l:1")
    assert not any("TLS__" in key for spec in specs for key in spec.env)
    assert all(spec.client_tls is None for spec in specs)


def test_a_polyglot_container_gets_the_same_tls_settings(tmp_path: Path) -> None:
    tls = mesh_tls(tmp_path / "certs")
    configs = _mesh(["tools/bin/rendezvous-model-go"]).objective_configs()
    specs = {spec.name: spec for spec in plan(configs, tmp_path, "p", "h", "l:1", tls=tls)}
    polyglot, python = specs["model-other"], specs["model-py"]
    assert polyglot.command == ["tools/bin/rendezvous-model-go"]
    # What the Go and Node containers read (their server side), as the Python one does.
    for key in ("TLS__CERT_FILE", "TLS__KEY_FILE", "TLS__CLIENT_CA_FILE"):
        assert polyglot.env[f"RDV_MODEL_{key}"] == python.env[f"RDV_MODEL_{key}"]
    assert polyglot.env["RDV_MODEL_TLS__CLIENT_CA_FILE"] == str(tls.client_ca_file)
    # The supervisor checks its health over mTLS.
    assert polyglot.client_tls == tls
