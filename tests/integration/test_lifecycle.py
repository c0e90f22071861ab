"""Zero-downtime model lifecycle on the real broker: add a challenger, promote it, roll back.

The whole mesh runs under the supervisor (control plane first, every component following the
control topic); 100 requests per second go through the public endpoint the whole time while
three changes go through the ControlPlaneService (`services.demo_promote`, the same drill as
`make demo-promote`). Asserted from the client's side and from the topics: every call is
answered OK; no answer is decided by a mixture of versions; after each change requests are
decided by the new version within 1 s and the new incumbent answers within 1 s; every request
has its outcome on the results topic and its record in the archive.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from services.demo_promote import print_report, run_drill
from services.supervisor.plan import free_port
from tests.conftest import PulsarBroker
from tests.integration.supervised import RunningMesh, supervised_mesh

pytestmark = pytest.mark.integration

RATE = 100.0
HOLD_S = 6.0
SWITCH_LIMIT_S = 1.0
FEATURES = ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]


def mesh_document(objective: str, listen: str) -> dict[str, Any]:
    return {
        "rendezvous": {"listen": listen},
        "objectives": {
            objective: {
                "sla_ms": 100,
                "late_grace_ms": 1000,
                "features": [{"name": name} for name in FEATURES],
                "models": [
                    {
                        "name": "ridge-a",
                        "role": "incumbent",
                        "kind": "diabetes",
                        "args": {"algorithm": "ridge"},
                    },
                    {
                        "name": "canary-linear",
                        "role": "canary",
                        "kind": "diabetes",
                        "args": {"algorithm": "linear"},
                    },
                    {"name": "decoy", "role": "decoy"},
                ],
                "policy": [
                    {"until_ms": 60, "accept": ["ridge-a"]},
                    {"until_ms": 90, "accept": ["ridge-a", "canary-linear"]},
                ],
                "default": {"score": 152.13, "prefer_canary": True},
            }
        },
    }


@pytest.fixture(scope="module")
def live_mesh(
    pulsar: PulsarBroker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, RunningMesh]]:
    objective = f"life{uuid.uuid4().hex[:6]}"
    document = mesh_document(objective, f"127.0.0.1:{free_port()}")
    with supervised_mesh(pulsar, tmp_path_factory.mktemp("lifecycle"), document) as running:
        yield objective, running


def test_add_promote_rollback_under_load_loses_nothing(
    live_mesh: tuple[str, RunningMesh], pulsar: PulsarBroker
) -> None:
    objective, mesh = live_mesh
    report = asyncio.run(
        run_drill(
            target=mesh.endpoint,
            control_target=mesh.control_endpoint,
            objective=objective,
            pulsar=pulsar.settings(),
            rate=RATE,
            hold_s=HOLD_S,
            challenger="ridge-b",
        )
    )
    print_report(report)
    summary = report.summary()
    assert summary["requests"] >= RATE * HOLD_S * 3 * 0.9
    assert not report.failed_calls, summary
    # Every answer is explained by the one version it names.
    assert report.inconsistent == []
    actions = [change.action for change in report.changes]
    assert actions == ["add-model", "promote", "rollback"]
    for change in report.changes:
        assert change.switch_s is not None
        assert change.switch_s <= SWITCH_LIMIT_S, summary
    promote, rollback = report.changes[1], report.changes[2]
    # The promoted challenger answers first-choice after the promotion, the old incumbent
    # again after the rollback, each within the limit of the change.
    assert promote.first_new_answer_s is not None and promote.first_new_answer_s <= SWITCH_LIMIT_S
    assert rollback.first_new_answer_s is not None
    assert rollback.first_new_answer_s <= SWITCH_LIMIT_S
    by_version = summary["answers_by_version_and_model"]
    assert by_version.get(f"v{promote.version} ridge-b", 0) > RATE
    assert by_version.get(f"v{rollback.version} ridge-a", 0) > RATE
    # Nothing lost from the records.
    assert report.missing_outcomes == []
    assert report.missing_archive == []
