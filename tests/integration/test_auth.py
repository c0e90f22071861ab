"""Auth on a whole supervised mesh on the real broker, as `rendezvous up --auth` runs it.

The public endpoints need a bearer token minted from the mesh's key: Score without one is
UNAUTHENTICATED; with another objective's scope it is PERMISSION_DENIED, in the same words for
an objective that exists and one that does not; with the objective's scope it is answered. A
control-plane Update without `control:write` is refused and publishes nothing; with it, the
change's author is the token's subject, not what the client wrote. Health stays open.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rendezvous.v1 import (
    control_pb2,
    control_pb2_grpc,
    keyring_pb2,
    keyring_pb2_grpc,
    scoring_pb2,
    scoring_pb2_grpc,
    task_pb2,
)

from services.core.auth import mint_token, token_metadata
from services.core.protos import set_values
from services.core.settings import AuthSettings
from services.supervisor.plan import free_port
from services.token_command import mesh_auth_env, mesh_secret
from tests.conftest import PulsarBroker
from tests.integration.supervised import RunningMesh, supervised_mesh
from tests.integration.test_lifecycle import FEATURES as LIFECYCLE_FEATURES
from tests.integration.test_lifecycle import mesh_document
from tests.integration.test_scoring_path import find

pytestmark = pytest.mark.integration

CALL_TIMEOUT_S = 10.0
# A diabetes row (the objective's features).
FEATURES = dict(
    zip(
        LIFECYCLE_FEATURES,
        (0.038, 0.05, 0.062, 0.022, -0.044, -0.035, -0.043, -0.003, 0.02, -0.018),
        strict=True,
    )
)


@pytest.fixture(scope="module")
def secured(
    pulsar: PulsarBroker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, RunningMesh]]:
    objective = f"auth{uuid.uuid4().hex[:6]}"
    root = tmp_path_factory.mktemp("auth")
    env = mesh_auth_env(root / "state")
    document = mesh_document(objective, f"127.0.0.1:{free_port()}")
    with supervised_mesh(pulsar, root, document, env=env) as running:
        yield objective, running


def _token(mesh: RunningMesh, *scopes: str) -> str:
    settings = AuthSettings(secret_file=mesh_secret(mesh.state_dir.resolve()))
    return mint_token(settings, "alice", scopes, ttl_s=300)


def _score(mesh: RunningMesh, objective: str, token: str | None) -> scoring_pb2.ScoreResponse:
    request = scoring_pb2.ScoreRequest(objective=objective)
    set_values(request.features, FEATURES)
    with grpc.insecure_channel(mesh.endpoint) as channel:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        reply: scoring_pb2.ScoreResponse = stub.Score(
            request, timeout=CALL_TIMEOUT_S, metadata=token_metadata(token)
        )
        return reply


def _refused(mesh: RunningMesh, objective: str, token: str | None) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        _score(mesh, objective, token)
    return caught.value


def test_score_needs_a_token_with_the_objectives_scope(
    secured: tuple[str, RunningMesh],
) -> None:
    objective, mesh = secured
    assert _refused(mesh, objective, None).code() == grpc.StatusCode.UNAUTHENTICATED

    other = _token(mesh, "score:other")
    existing = _refused(mesh, objective, other)
    unknown = _refused(mesh, "no-such-objective", other)
    assert existing.code() == unknown.code() == grpc.StatusCode.PERMISSION_DENIED
    assert existing.details() == unknown.details()
    assert objective not in (existing.details() or "")

    reply = _score(mesh, objective, _token(mesh, f"score:{objective}"))
    assert reply.objective_version >= 1

    with grpc.insecure_channel(mesh.endpoint) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S
        )
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_control_updates_need_write_and_record_the_tokens_subject(
    secured: tuple[str, RunningMesh],
) -> None:
    objective, mesh = secured
    reader = token_metadata(_token(mesh, "control:read"))
    with grpc.insecure_channel(mesh.control_endpoint) as channel:
        stub = control_pb2_grpc.ControlPlaneServiceStub(channel)
        current = stub.GetObjectiveConfig(
            control_pb2.GetObjectiveConfigRequest(objective=objective),
            timeout=CALL_TIMEOUT_S,
            metadata=reader,
        ).config
        change = control_pb2.UpdateObjectiveConfigRequest(expected_version=current.version)
        change.config.CopyFrom(current)
        change.config.change.author = "mallory"
        change.config.change.reason = "auth test"
        change.config.default_answer.score = 150.0

        with pytest.raises(grpc.RpcError) as caught:
            stub.UpdateObjectiveConfig(change, timeout=CALL_TIMEOUT_S, metadata=reader)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        history = stub.ListObjectiveHistory(
            control_pb2.ListObjectiveHistoryRequest(objective=objective),
            timeout=CALL_TIMEOUT_S,
            metadata=reader,
        ).versions
        assert [v.version for v in history] == [current.version]

        writer = token_metadata(_token(mesh, f"control:write:{objective}"))
        stored = stub.UpdateObjectiveConfig(change, timeout=CALL_TIMEOUT_S, metadata=writer).config
    assert stored.version == current.version + 1
    assert stored.change.author == "alice"


async def test_the_keyring_erases_only_with_the_scope_and_serves_the_mesh_with_its_token(
    secured: tuple[str, RunningMesh],
) -> None:
    objective, mesh = secured
    # A subject's outcome is sealed: the rendezvous reached the keyring with the token
    # `mesh_auth_env` minted for the mesh (scope privacy:keys), not withheld.
    request = scoring_pb2.ScoreRequest(objective=objective, subject_id="auth-subject")
    set_values(request.features, FEATURES)
    with grpc.insecure_channel(mesh.endpoint) as channel:
        reply = scoring_pb2_grpc.ScoringServiceStub(channel).Score(
            request,
            timeout=CALL_TIMEOUT_S,
            metadata=token_metadata(_token(mesh, f"score:{objective}")),
        )
    outcome = await find(
        mesh.broker,
        f"persistent://public/default/rdv.{objective}.results",
        task_pb2.Outcome,
        lambda o: o.request_id == reply.request_id,
        timeout=30,
    )
    assert outcome.sealed.key_id and not outcome.sealed.withheld

    erase = keyring_pb2.EraseRequest(subject_id="auth-subject")
    with grpc.insecure_channel(mesh.keyring_endpoint) as channel:
        stub = keyring_pb2_grpc.KeyringServiceStub(channel)
        for token, code in (
            (None, grpc.StatusCode.UNAUTHENTICATED),
            (_token(mesh, "privacy:keys", f"score:{objective}"), grpc.StatusCode.PERMISSION_DENIED),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                stub.Erase(erase, timeout=CALL_TIMEOUT_S, metadata=token_metadata(token))
            assert caught.value.code() == code
        # Key material is for the mesh's own token (privacy:keys), not for an eraser's.
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetKeys(
                keyring_pb2.GetKeysRequest(key_ids=[outcome.sealed.key_id]),
                timeout=CALL_TIMEOUT_S,
                metadata=token_metadata(_token(mesh, "privacy:erase")),
            )
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        done = stub.Erase(
            erase,
            timeout=CALL_TIMEOUT_S,
            metadata=token_metadata(_token(mesh, "privacy:erase")),
        )
    assert done.keys_deleted == 1
    # The audit line names who asked (the token's subject).
    lines = (mesh.state_dir / "logs" / "keyring.log").read_text().splitlines()
    audit = [json.loads(line) for line in lines if '"subject erased"' in line]
    assert [entry["requested_by"] for entry in audit] == ["alice"]
