"""The broker on TLS (`rendezvous up --pulsar-tls`): how the command starts it, what the
supervisor is given and passes on, what the state file records for the command-line tools,
and the client options a `pulsar+ssl://` URL makes."""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from services import cli
from services.core.bus.pulsar import _security_options
from services.core.settings import PulsarSettings

CA = Path("/run/pulsar/tls/ca.pem")
TOKEN = Path("/run/pulsar/auth/client.token")


def _up_args(tmp_path: Path, *argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(["--state-dir", str(tmp_path), "up", *argv])


def test_pulsar_tls_starts_the_broker_on_tls_only_and_takes_what_it_prints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, dict[str, str]]] = []

    def run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        calls.append((command[-1], kwargs["env"]))
        printed = (
            "PULSAR_SERVICE_URL=pulsar+ssl://127.0.0.1:6651\n"
            "PULSAR_ADMIN_URL=https://127.0.0.1:8443\n"
            f"PULSAR_TOKEN_FILE={TOKEN}\nPULSAR_TLS_TRUST_CERTS_FILE={CA}\n"
        )
        return subprocess.CompletedProcess(
            command, 0, stdout=printed if command[-1] == "env" else ""
        )

    monkeypatch.setattr(subprocess, "run", run)
    args = _up_args(tmp_path, "--pulsar-tls", "--pulsar-auth")
    cli.start_broker(args)
    # `up` and `env` see the same choice: env finds the broker that up started.
    assert [(name, env["PULSAR_TLS"], env["PULSAR_AUTH"]) for name, env in calls] == [
        ("up", "only", "token"),
        ("env", "only", "token"),
    ]
    assert (args.pulsar_url, args.pulsar_admin_url) == (
        "pulsar+ssl://127.0.0.1:6651",
        "https://127.0.0.1:8443",
    )
    env = cli.supervisor_env(args)
    assert env["RDV_SUPERVISOR_PULSAR__TLS_TRUST_CERTS_FILE"] == str(CA)
    assert env["RDV_SUPERVISOR_PULSAR__TOKEN_FILE"] == str(TOKEN)


def test_without_pulsar_tls_the_broker_is_plaintext(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    envs: list[dict[str, str]] = []

    def run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        envs.append(kwargs["env"])
        printed = "PULSAR_SERVICE_URL=pulsar://h:1\nPULSAR_ADMIN_URL=http://h:2\n"
        return subprocess.CompletedProcess(command, 0, stdout=printed)

    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.delenv("RDV_SUPERVISOR_PULSAR__TLS_TRUST_CERTS_FILE", raising=False)
    args = _up_args(tmp_path)
    cli.start_broker(args)
    assert {env["PULSAR_TLS"] for env in envs} == {"none"}
    assert "RDV_SUPERVISOR_PULSAR__TLS_TRUST_CERTS_FILE" not in cli.supervisor_env(args)


def test_a_given_brokers_ca_goes_to_the_supervisor(tmp_path: Path) -> None:
    args = _up_args(
        tmp_path,
        "--pulsar-url",
        "pulsar+ssl://broker:6651",
        "--pulsar-tls-trust-certs-file",
        str(CA),
    )
    assert cli.supervisor_env(args)["RDV_SUPERVISOR_PULSAR__TLS_TRUST_CERTS_FILE"] == str(CA)


def test_the_state_records_files_never_secrets_and_the_tools_read_them_back() -> None:
    broker = PulsarSettings(
        service_url="pulsar+ssl://127.0.0.1:6651",
        admin_url="https://127.0.0.1:8443",
        token=SecretStr("a-secret"),
        token_file=TOKEN,
        tls_trust_certs_file=CA,
    )
    facts = broker.state_facts()
    assert facts == {
        "pulsar_url": "pulsar+ssl://127.0.0.1:6651",
        "pulsar_admin_url": "https://127.0.0.1:8443",
        "pulsar_token_file": str(TOKEN),
        "pulsar_tls_trust_certs_file": str(CA),
    }
    read = PulsarSettings().for_mesh(facts)
    assert (read.service_url, read.admin_url) == (broker.service_url, broker.admin_url)
    assert (read.token_file, read.tls_trust_certs_file) == (TOKEN, CA)
    # A tool's own CA wins over the state's; a broker of its own ignores the state.
    mine = Path("/mine/ca.pem")
    assert PulsarSettings(tls_trust_certs_file=mine).for_mesh(facts).tls_trust_certs_file == mine
    own = PulsarSettings(service_url="pulsar://other:6650").for_mesh(facts)
    assert own.service_url == "pulsar://other:6650" and own.tls_trust_certs_file is None


def test_a_pulsar_ssl_url_makes_a_tls_client_that_checks_the_ca_and_the_host() -> None:
    options = _security_options(
        PulsarSettings(service_url="pulsar+ssl://127.0.0.1:6651", tls_trust_certs_file=CA)
    )
    assert options == {
        "use_tls": True,
        "tls_allow_insecure_connection": False,
        "tls_validate_hostname": True,
        "tls_trust_certs_file_path": str(CA),
    }
    assert _security_options(PulsarSettings(tls_trust_certs_file=CA)) == {}
