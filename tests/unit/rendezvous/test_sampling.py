"""Sampling decided per request and written into the task, over real sockets.

Who scores a task (`scorers`) is every enabled deployment but the decoy; challengers only
for a request whose challenger draw is within `challenger_fraction`; challengers and
canaries only with consent to experimentation. `skip_archive` is set for a request whose
archive draw is outside `archive_fraction`. Both by request id, so a retry gets the same.
A model sampled out never arrives; the race goes on as the policy says.
"""

from __future__ import annotations

from pathlib import Path

from rendezvous.v1 import common_pb2, objective_pb2, scoring_pb2, task_pb2

from services.core.mesh import ObjectiveEntry, to_config
from services.core.sampling import ARCHIVE, CHALLENGERS, SHARES, draw
from tests.helpers import published
from tests.unit.rendezvous.conftest import Mesh, running_mesh

EVERYONE = ["incumbent", "challenger", "challenger-b", "canary"]


def sampled_config(**overrides: object) -> objective_pb2.ObjectiveConfig:
    document: dict[str, object] = {
        "sla_ms": 40,
        "late_grace_ms": 50,
        "features": [{"name": "x"}],
        "models": [
            {"name": "incumbent", "role": "incumbent"},
            {"name": "challenger", "role": "challenger"},
            {"name": "challenger-b", "role": "challenger"},
            {"name": "canary", "role": "canary"},
            {"name": "retired", "role": "challenger", "enabled": False},
            {"name": "decoy", "role": "decoy"},
        ],
        "policy": [
            {"until_ms": 10, "accept": ["incumbent"]},
            {"until_ms": 35, "accept": ["incumbent", "challenger", "challenger-b", "canary"]},
        ],
        "sampling": {"challenger_fraction": 0.3, "archive_fraction": 0.5},
    }
    document.update(overrides)
    return to_config("demo", ObjectiveEntry.model_validate(document))


def request(request_id: str, experimentation: int = 0) -> scoring_pb2.ScoreRequest:
    out = scoring_pb2.ScoreRequest(objective="demo", request_id=request_id)
    out.features["x"].number_value = 1.0
    out.consent.experimentation = common_pb2.ConsentDecision.ValueType(experimentation)
    return out


def tasks(mesh: Mesh) -> dict[str, task_pb2.ScoringTask]:
    topic = mesh.bus.topics.requests("demo")
    return {t.request.request_id: t for t in published(mesh.bus, topic, task_pb2.ScoringTask)}


async def test_scorers_and_archive_follow_the_fractions_by_request_id(tmp_path: Path) -> None:
    async with running_mesh(tmp_path, {"demo": sampled_config()}) as mesh:
        ids = [f"req-{n}" for n in range(60)]
        for request_id in ids:
            await mesh.stub.Score(request(request_id))
        published_tasks = tasks(mesh)
    challengers_in = archived = 0
    for request_id in ids:
        task = published_tasks[request_id]
        if draw("demo", request_id, CHALLENGERS) < 0.3:
            assert list(task.scorers) == EVERYONE
            challengers_in += 1
        else:
            assert list(task.scorers) == ["incumbent", "canary"]
        assert task.skip_archive == (draw("demo", request_id, ARCHIVE) >= 0.5)
        archived += not task.skip_archive
    # Both branches were seen (the draws of these 60 ids: 10 challengers in, 32 archived).
    assert 0 < challengers_in < 60 and 0 < archived < 60


async def test_denied_experimentation_leaves_the_incumbent_alone(tmp_path: Path) -> None:
    denied = common_pb2.CONSENT_DECISION_DENIED
    by_default = sampled_config(
        sampling={"challenger_fraction": 1.0, "archive_fraction": 1.0},
        default_consent={"experimentation": "denied"},
    )
    async with running_mesh(tmp_path, {"demo": by_default}) as mesh:
        # Denied by the subject, and denied by the objective's default (consent unspecified).
        await mesh.stub.Score(request("asked", denied))
        await mesh.stub.Score(request("defaulted"))
        granted = request("granted", common_pb2.CONSENT_DECISION_GRANTED)
        await mesh.stub.Score(granted)
        published_tasks = tasks(mesh)
    assert list(published_tasks["asked"].scorers) == ["incumbent"]
    assert list(published_tasks["defaulted"].scorers) == ["incumbent"]
    assert list(published_tasks["granted"].scorers) == EVERYONE
    assert not any(task.skip_archive for task in published_tasks.values())


async def test_a_sampled_out_challenger_never_answers(tmp_path: Path) -> None:
    never = sampled_config(sampling={"challenger_fraction": 0.0, "archive_fraction": 1.0})
    async with running_mesh(tmp_path, {"demo": never}) as mesh:
        # The incumbent is too late; the challengers would come first but are sampled out.
        mesh.script.plan = {"incumbent": (80, 1.0), "challenger": (1, 2.0), "canary": (15, 3.0)}
        response = await mesh.stub.Score(request("r-1"))
        assert response.decision.model == "canary"
        task = tasks(mesh)["r-1"]
        assert list(task.scorers) == ["incumbent", "canary"]


async def test_a_config_without_sampling_samples_nothing_out(tmp_path: Path) -> None:
    config = sampled_config()
    config.ClearField("sampling")
    async with running_mesh(tmp_path, {"demo": config}) as mesh:
        for n in range(20):
            await mesh.stub.Score(request(f"r-{n}"))
        published_tasks = tasks(mesh)
    assert all(list(t.scorers) == EVERYONE for t in published_tasks.values())
    assert not any(t.skip_archive for t in published_tasks.values())


async def test_a_retried_request_is_sampled_and_armed_the_same(tmp_path: Path) -> None:
    split = sampled_config(
        policy=[
            # Both models have come by the 10 ms boundary: the arm's first choice answers.
            {"until_ms": 10, "accept": ["canary"]},
            {
                "until_ms": 35,
                "accept": ["incumbent", "challenger"],
                "shares": {"challenger": 0.5},
            },
        ],
        sampling={"challenger_fraction": 1.0, "archive_fraction": 0.5},
    )
    async with running_mesh(tmp_path, {"demo": split}) as mesh:
        mesh.script.plan = {"incumbent": (3, 1.0), "challenger": (3, 2.0)}
        answered: dict[str, set[str]] = {}
        for n in range(12):
            for _ in range(2):
                response = await mesh.stub.Score(request(f"split-{n}"))
                answered.setdefault(f"split-{n}", set()).add(response.decision.model)
        archive_flags: dict[str, set[bool]] = {}
        for task in published(mesh.bus, mesh.bus.topics.requests("demo"), task_pb2.ScoringTask):
            archive_flags.setdefault(task.request.request_id, set()).add(task.skip_archive)
    for request_id, models in answered.items():
        # The request's arm says who answers, every time.
        expected = "challenger" if draw("demo", request_id, SHARES) < 0.5 else "incumbent"
        assert models == {expected}
        assert len(archive_flags[request_id]) == 1
    assert {m for models in answered.values() for m in models} == {"incumbent", "challenger"}


async def test_an_arm_scores_whatever_the_sampling_and_denied_consent_races_the_control(
    tmp_path: Path,
) -> None:
    # The challenger takes half the first step's requests, but challengers are sampled out
    # of every request: its arm still needs its prediction.
    split = sampled_config(
        policy=[
            {"until_ms": 20, "accept": ["incumbent", "challenger"], "shares": {"challenger": 0.5}},
            {"until_ms": 35, "accept": ["incumbent", "canary"]},
        ],
        sampling={"challenger_fraction": 0.0, "archive_fraction": 1.0},
    )
    denied = common_pb2.CONSENT_DECISION_DENIED
    async with running_mesh(tmp_path, {"demo": split}) as mesh:
        # The challenger is the faster: only its arm explains who answers.
        mesh.script.plan = {"incumbent": (4, 1.0), "challenger": (1, 2.0)}
        answered = {}
        for n in range(16):
            response = await mesh.stub.Score(request(f"arm-{n}"))
            answered[f"arm-{n}"] = response.decision
        refused = [(await mesh.stub.Score(request(f"no-{n}", denied))) for n in range(6)]
        published_tasks = tasks(mesh)
    for request_id, decision in answered.items():
        in_arm = draw("demo", request_id, SHARES) < 0.5
        scorers = list(published_tasks[request_id].scorers)
        assert ("challenger" in scorers) == in_arm
        if decision.rule_index != 0:
            # A busy machine delayed the arm's prediction past the first step (shared loop):
            # the second step, which has no arms, decided.
            assert decision.rule_index == 1 and decision.model in ("incumbent", "canary")
            continue
        assert decision.model == ("challenger" if in_arm else "incumbent")
        assert decision.rule.endswith("(challenger's arm)" if in_arm else "(control arm)")
    first_step = [d.model for d in answered.values() if d.rule_index == 0]
    assert set(first_step) == {"incumbent", "challenger"}, answered
    # A subject who denied experimentation is in no arm: the incumbent, by the control arm.
    for response in refused:
        assert response.decision.model == "incumbent"
        if response.decision.rule_index == 0:
            assert response.decision.rule.endswith("(control arm)")
    for n in range(6):
        assert "challenger" not in published_tasks[f"no-{n}"].scorers
