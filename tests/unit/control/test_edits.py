"""Edits are pure: promote, split, add/remove, rollback, and the readable diff."""

from __future__ import annotations

import pytest
import yaml
from rendezvous.v1 import common_pb2

from services.control.edits import (
    EditError,
    add_model,
    diff,
    promote,
    remove_model,
    render,
    rollback,
    same_serving,
    split,
)
from services.control.validation import validate
from services.core.mesh import ObjectiveEntry, to_config
from tests.unit.control.configs import config


def roles(built: object) -> dict[str, int]:
    return {model.name: model.role for model in built.models}  # type: ignore[attr-defined]


def accepts(built: object) -> list[list[str]]:
    return [list(step.accept) for step in built.policy.steps]  # type: ignore[attr-defined]


def test_promote_swaps_roles_and_the_policy_and_leaves_the_input_alone() -> None:
    before = config()
    after = promote(before, "sum")
    assert roles(after)["sum"] == common_pb2.MODEL_ROLE_INCUMBENT
    assert roles(after)["ridge"] == common_pb2.MODEL_ROLE_CHALLENGER
    # Step 0 accepted only the old incumbent: the model takes its place. Step 1: swapped.
    assert accepts(after) == [["sum"], ["sum", "ridge", "canary"]]
    assert after.policy.steps[0].description == "until 20ms: sum only"
    assert roles(before)["ridge"] == common_pb2.MODEL_ROLE_INCUMBENT
    assert accepts(before) == [["ridge"], ["ridge", "sum", "canary"]]
    assert validate(after) == []


def test_promote_after_a_split_gives_the_model_the_first_step_alone() -> None:
    shared = split(config(), "flaky", 0.3)
    assert accepts(shared)[0] == ["ridge", "flaky"]
    after = promote(shared, "flaky")
    # First come, first served: the old incumbent left in the first step would go on
    # answering whenever it is the faster; the incumbent's window is the model's alone.
    assert accepts(after) == [["flaky"], ["flaky", "sum", "canary"]]
    assert dict(after.policy.steps[0].shares) == {}
    assert validate(after) == []


def test_promote_keeps_a_description_an_operator_wrote() -> None:
    before = config()
    before.policy.steps[0].description = "fast path"
    assert promote(before, "sum").policy.steps[0].description == "fast path"


@pytest.mark.parametrize("model", ["ridge", "decoy", "ghost"])
def test_promote_refuses_what_cannot_be_promoted(model: str) -> None:
    with pytest.raises(EditError):
        promote(config(), model)


def test_split_sets_adds_and_ends_a_share() -> None:
    half = split(config(), "sum", 0.5)
    assert accepts(half)[0] == ["ridge", "sum"]
    assert dict(half.policy.steps[0].shares) == {"sum": 0.5}
    assert half.policy.steps[0].description == "until 20ms: first of ridge, sum"
    assert validate(half) == []
    ended = split(half, "sum", 0)
    assert dict(ended.policy.steps[0].shares) == {}
    # Out of the first step again: left in, it would race the incumbent for every request.
    assert accepts(ended)[0] == ["ridge"]
    with pytest.raises(EditError):
        split(config(), "decoy", 0.1)


def test_add_and_remove_model() -> None:
    added = add_model(config(), "newbie", kind="sum", args={"scale": 2})
    assert [model.name for model in added.models][-1] == "newbie"
    assert accepts(added) == accepts(config())
    accepted = add_model(config(), "newbie", accept_in=[1])
    assert accepts(accepted)[1] == ["ridge", "sum", "canary", "newbie"]
    removed = remove_model(split(config(), "sum", 0.2), "sum")
    assert "sum" not in roles(removed)
    assert accepts(removed) == [["ridge"], ["ridge", "canary"]]
    assert dict(removed.policy.steps[0].shares) == {}
    assert validate(removed) == []
    with pytest.raises(EditError):
        remove_model(config(), "ridge")
    with pytest.raises(EditError):
        add_model(config(), "sum")


def _history() -> list[object]:
    v1 = config(version=1)
    v2 = promote(v1, "sum")
    v2.version = 2
    v2.change.previous_version = 1
    v3 = split(v2, "flaky", 0.1)
    v3.version = 3
    v3.change.previous_version = 2
    return [v1, v2, v3]


def test_rollback_defaults_to_the_version_the_current_one_replaced() -> None:
    history = _history()
    back = rollback(history)  # type: ignore[arg-type]
    assert same_serving(back, history[1])  # type: ignore[arg-type]
    assert not back.HasField("change")
    to_first = rollback(history, 1)  # type: ignore[arg-type]
    assert same_serving(to_first, history[0])  # type: ignore[arg-type]
    with pytest.raises(EditError):
        rollback(history, 3)  # type: ignore[arg-type]
    with pytest.raises(EditError):
        rollback(history, 9)  # type: ignore[arg-type]


def test_diff_shows_the_change_in_mesh_form() -> None:
    before = config()
    after = promote(before, "sum")
    after.version = 2
    text = diff(before, after)
    assert text.startswith("--- demo v1\n+++ demo v2\n")
    assert "-  role: incumbent" in text and "+  role: incumbent" in text
    assert diff(before, before) == ""


def test_render_is_a_mesh_entry_that_round_trips() -> None:
    original = config()
    entry = yaml.safe_load(render(original))
    rebuilt = to_config("demo", ObjectiveEntry.model_validate(entry), original.version)
    assert same_serving(rebuilt, original)
    # Struct-backed args render in one order, so equal configurations render equal text.
    assert render(original) == render(config())
