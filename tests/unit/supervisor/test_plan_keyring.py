"""The keyring in the plan: it starts with the control component on its files under the
state dir, and exactly the processes that write, read or forget records about a subject
(rendezvous, runner hosts, enricher, evaluator) learn where it is and the pseudonym key;
model containers and the collector do not."""

from __future__ import annotations

from pathlib import Path

from services.core.mesh import Mesh
from services.supervisor.plan import (
    KEYRING as KEYRING_NAME,
)
from services.supervisor.plan import (
    STAGE_CONTROL,
    EvaluatorAddress,
    Ports,
    PrivacyFiles,
    plan,
    plan_keyring,
    privacy_env,
)

PREFIXES = {
    "services.runner": "RDV_RUNNER_",
    "services.rendezvous": "RDV_RENDEZVOUS_",
    "services.enricher": "RDV_ENRICHER_",
    "services.evaluator": "RDV_EVALUATOR_",
}


def _mesh() -> Mesh:
    return Mesh.model_validate(
        {
            "objectives": {
                "private": {
                    "sla_ms": 50,
                    "models": [
                        {"name": "py", "role": "incumbent", "kind": "diabetes"},
                        {"name": "decoy", "role": "decoy"},
                    ],
                    "policy": [{"until_ms": 40, "accept": ["py"]}],
                }
            }
        }
    )


def test_the_keyring_starts_first_on_the_state_dirs_files(tmp_path: Path) -> None:
    files = PrivacyFiles.under(tmp_path)
    spec = plan_keyring(files, tmp_path, "p", "h", "127.0.0.1:5", Ports())
    assert (spec.name, spec.module, spec.stage) == (KEYRING_NAME, "services.keyring", STAGE_CONTROL)
    assert spec.endpoint == "127.0.0.1:5"
    assert spec.env["RDV_KEYRING_DATABASE"] == str(tmp_path / "privacy" / "keyring.db")
    assert spec.env["RDV_KEYRING_MASTER_KEY_FILE"] == str(files.master_key)
    assert spec.env["RDV_KEYRING_PRIVACY__PSEUDONYM_KEY_FILE"] == str(files.pseudonym_key)


def test_only_the_processes_that_handle_subject_records_get_the_keyring(tmp_path: Path) -> None:
    files = PrivacyFiles.under(tmp_path)
    token = tmp_path / "keyring.token"
    specs = plan(
        _mesh().objective_configs(),
        tmp_path,
        "p",
        "h",
        "l:1",
        evaluator=EvaluatorAddress("127.0.0.1:6", ""),
        privacy=privacy_env("127.0.0.1:5", files, token),
    )
    told = set()
    for spec in specs:
        prefix = PREFIXES.get(spec.module)
        if prefix is None:
            assert not any("PRIVACY__" in key for key in spec.env), spec.name
            continue
        told.add(spec.module)
        assert spec.env[f"{prefix}PRIVACY__KEYRING"] == "127.0.0.1:5"
        assert spec.env[f"{prefix}PRIVACY__PSEUDONYM_KEY_FILE"] == str(files.pseudonym_key)
        assert spec.env[f"{prefix}PRIVACY__TOKEN_FILE"] == str(token)
    assert told == set(PREFIXES)
