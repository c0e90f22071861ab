"""The broker's token and TLS settings: read from the environment like any setting, never
shown, sent on admin calls, and passed by the supervisor to every process it plans."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from services.core.mesh import Mesh
from services.core.settings import PulsarSettings
from services.supervisor.app import SupervisorSettings
from services.supervisor.plan import Ports, plan, plan_control

SECRET = "header.payload.signature"


def _mesh() -> Mesh:
    return Mesh.model_validate(
        {
            "objectives": {
                "auth": {
                    "sla_ms": 50,
                    "models": [{"name": "m", "role": "incumbent", "kind": "diabetes"}],
                    "policy": [{"until_ms": 40, "accept": ["m"]}],
                }
            }
        }
    )


def test_the_supervisor_reads_the_token_file_from_its_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    token_file = tmp_path / "client.token"
    token_file.write_text(SECRET + "\n")
    monkeypatch.setenv("RDV_SUPERVISOR_PULSAR__TOKEN_FILE", str(token_file))
    pulsar = SupervisorSettings().pulsar
    assert pulsar.auth_token() == SECRET
    assert pulsar.admin_headers() == {"Authorization": f"Bearer {SECRET}"}
    assert pulsar.security_env() == {"PULSAR__TOKEN_FILE": str(token_file)}


def test_a_literal_token_wins_and_is_never_shown() -> None:
    pulsar = PulsarSettings(token=SecretStr(SECRET), token_file=Path("/nonexistent"))
    assert pulsar.auth_token() == SECRET
    assert SECRET not in repr(pulsar) and SECRET not in str(pulsar)
    assert PulsarSettings().admin_headers() == {}
    assert PulsarSettings().security_env() == {}


def test_tls_settings_travel_as_settings() -> None:
    pulsar = PulsarSettings(
        tls_trust_certs_file=Path("/ca.pem"), tls_allow_insecure=True, tls_validate_hostname=False
    )
    assert pulsar.security_env() == {
        "PULSAR__TLS_TRUST_CERTS_FILE": "/ca.pem",
        "PULSAR__TLS_ALLOW_INSECURE": "true",
        "PULSAR__TLS_VALIDATE_HOSTNAME": "false",
    }
    assert pulsar.admin_ssl_context() is None  # http: urllib's default
    # Insecure on purpose here: no CA file to load.
    https = pulsar.model_copy(
        update={"admin_url": "https://127.0.0.1:8443", "tls_trust_certs_file": None}
    )
    context = https.admin_ssl_context()
    assert context is not None and not context.check_hostname


def test_every_planned_process_gets_the_token_file_under_its_own_prefix(tmp_path: Path) -> None:
    env = {"PULSAR__TOKEN_FILE": "/run/client.token"}
    ports = Ports()
    specs = plan(_mesh().objective_configs(), tmp_path, "p", "h", "l:1", ports, pulsar_env=env)
    specs.append(plan_control(tmp_path / "m.yaml", tmp_path, "p", "h", "l:2", ports, env))
    assert {s.name for s in specs} >= {"control", "model-m", "rendezvous", "collector"}
    for spec in specs:
        prefix = next(k for k in spec.env if k.endswith("PULSAR__SERVICE_URL")).removesuffix(
            "PULSAR__SERVICE_URL"
        )
        assert spec.env[f"{prefix}PULSAR__TOKEN_FILE"] == "/run/client.token", spec.name
    # Without authentication nothing is added.
    bare = plan(_mesh().objective_configs(), tmp_path, "p", "h", "l:1")
    assert not any("TOKEN" in key for spec in bare for key in spec.env)
