"""The per-request draw and the policy's A/B shares.

`draw` is a pure function of (objective, request id, purpose), in [0, 1), uniform over
request ids and independent between purposes. In a step with shares, a request whose draw
lies in a model's range (ranges in `accept` order cover [0, sum)) races that step with the
model alone (its arm); any other request races it with the models that have no share (the
control arm). A step without shares is as written. The same draw holds in every step.
"""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from rendezvous.v1 import objective_pb2

from services.core.mesh import ObjectiveEntry, to_config
from services.core.sampling import ARCHIVE, CHALLENGERS, SHARES, draw
from services.rendezvous.policy import Policy, Reason, decide

MODELS = ("incumbent", "challenger-a", "challenger-b", "canary")


def config(steps: list[dict[str, Any]], sla_ms: float = 100.0) -> objective_pb2.ObjectiveConfig:
    entry = ObjectiveEntry.model_validate(
        {
            "sla_ms": sla_ms,
            "models": [
                {"name": "incumbent", "role": "incumbent"},
                {"name": "challenger-a", "role": "challenger"},
                {"name": "challenger-b", "role": "challenger"},
                {"name": "canary", "role": "canary"},
            ],
            "policy": steps,
        }
    )
    return to_config("demo", entry)


SPLIT = Policy.from_config(
    config(
        [
            {
                "until_ms": 30,
                "accept": ["incumbent", "challenger-a", "challenger-b"],
                "shares": {"challenger-a": 0.3, "challenger-b": 0.2},
            },
            {"until_ms": 60, "accept": ["incumbent", "canary"]},
            {
                "until_ms": 90,
                "accept": ["incumbent", "challenger-a", "canary"],
                "shares": {"challenger-a": 0.3},
            },
        ]
    )
)


# ------------------------------------------------------------------------------ the draw


def test_draw_is_a_pure_function_in_the_unit_interval() -> None:
    first = [draw("demo", f"r{n}", SHARES) for n in range(1000)]
    again = [draw("demo", f"r{n}", SHARES) for n in range(1000)]
    assert first == again
    assert all(0.0 <= u < 1.0 for u in first)
    # The objective and the purpose are part of the hash: independent draws.
    assert first != [draw("other", f"r{n}", SHARES) for n in range(1000)]
    assert first != [draw("demo", f"r{n}", CHALLENGERS) for n in range(1000)]
    # No concatenation ambiguity between the parts.
    assert draw("ab", "c", ARCHIVE) != draw("a", "bc", ARCHIVE)


def test_draw_is_uniform_over_request_ids() -> None:
    draws = [draw("demo", f"request-{n}", SHARES) for n in range(20_000)]
    deciles = Counter(int(u * 10) for u in draws)
    # 2 000 expected per decile; the standard deviation is 42.
    assert all(1_800 <= deciles[d] <= 2_200 for d in range(10)), deciles


# ------------------------------------------------------------------------------ the arms


def accepts(policy: Policy) -> list[tuple[str, ...]]:
    return [step.accept for step in policy.steps]


def test_a_policy_without_shares_is_its_own_variant() -> None:
    plain = Policy.from_config(config([{"until_ms": 50, "accept": ["incumbent", "canary"]}]))
    assert not plain.has_shares
    for u in (0.0, 0.3, 0.999):
        assert plain.for_request(u) is plain


def test_a_request_in_a_models_range_races_that_model_alone() -> None:
    assert SPLIT.has_shares
    # [0, 0.3): challenger-a; [0.3, 0.5): challenger-b; [0.5, 1): the control arm.
    assert accepts(SPLIT.for_request(0.0))[0] == ("challenger-a",)
    assert accepts(SPLIT.for_request(0.299))[0] == ("challenger-a",)
    assert accepts(SPLIT.for_request(0.3))[0] == ("challenger-b",)
    assert accepts(SPLIT.for_request(0.5))[0] == ("incumbent",)
    assert accepts(SPLIT.for_request(0.99))[0] == ("incumbent",)


def test_one_draw_holds_in_every_step_and_a_step_without_shares_is_unchanged() -> None:
    low, middle, high = (SPLIT.for_request(u) for u in (0.1, 0.4, 0.7))
    assert accepts(low) == [("challenger-a",), ("incumbent", "canary"), ("challenger-a",)]
    assert accepts(middle) == [
        ("challenger-b",),
        ("incumbent", "canary"),
        # Step 2 gives only challenger-a a share, [0, 0.3): 0.4 is in its control arm.
        ("incumbent", "canary"),
    ]
    assert accepts(high) == [("incumbent",), ("incumbent", "canary"), ("incumbent", "canary")]
    # The rule echoed in answers names the arm.
    assert low.steps[0].description.endswith("(challenger-a's arm)")
    assert high.steps[0].description.endswith("(control arm)")
    assert low.steps[1] is SPLIT.steps[1]
    # The models racing alone somewhere must score the task.
    assert (low.armed, middle.armed, high.armed) == (("challenger-a",), ("challenger-b",), ())


def test_the_control_arm_is_every_steps_models_without_a_share() -> None:
    assert SPLIT.control is not None
    assert accepts(SPLIT.control) == [
        ("incumbent",),
        ("incumbent", "canary"),
        ("incumbent", "canary"),
    ]
    assert SPLIT.control.armed == ()


def test_variants_are_compiled_once_and_looked_up() -> None:
    # Cuts at 0.3 and 0.5: three cells, three variants, each returned as is.
    assert SPLIT.cuts == (0.3, 0.5)
    assert len(SPLIT.variants) == 3
    assert all(SPLIT.for_request(u) in SPLIT.variants for u in (0.0, 0.31, 0.77))
    assert SPLIT.for_request(0.1) is SPLIT.for_request(0.2)


def test_each_arm_is_answered_by_its_own_model_whoever_is_faster() -> None:
    # challenger-b is the fastest, the incumbent the slowest: in a first-come step the
    # order of preference alone would give every request to challenger-b.
    arrived = {"incumbent": 5.0, "challenger-a": 4.0, "challenger-b": 3.0}
    winners = {}
    for u in (0.1, 0.4, 0.8):
        verdict = decide(SPLIT.for_request(u), arrived, 5.0)
        assert verdict is not None and verdict.reason is Reason.ACCEPTED
        winners[u] = verdict.model
    assert winners == {0.1: "challenger-a", 0.4: "challenger-b", 0.8: "incumbent"}
    # Before its own model arrives, an arm does not take another's prediction.
    assert decide(SPLIT.for_request(0.1), {"challenger-b": 3.0, "incumbent": 3.5}, 3.9) is None


def test_observed_shares_over_many_request_ids() -> None:
    firsts = Counter(
        SPLIT.for_request(draw("demo", f"req-{n}", SHARES)).steps[0].accept[0]
        for n in range(20_000)
    )
    # Standard deviations: 32 (0.3), 28 (0.2), 35 (0.5).
    assert abs(firsts["challenger-a"] / 20_000 - 0.3) < 0.01
    assert abs(firsts["challenger-b"] / 20_000 - 0.2) < 0.01
    assert abs(firsts["incumbent"] / 20_000 - 0.5) < 0.01


def test_a_request_id_always_gets_the_same_arm() -> None:
    for n in range(200):
        request_id = f"retry-{n}"
        arms = {SPLIT.for_request(draw("demo", request_id, SHARES)) for _ in range(3)}
        assert len(arms) == 1


# -------------------------------------------------------------- the rule, restated (property)


def expected_order(accept: tuple[str, ...], shares: dict[str, float], u: float) -> tuple[str, ...]:
    """PolicyStep.shares in words: ranges in `accept` order from 0; the model whose range
    holds u alone; outside every range, `accept` without the models that have a share; a
    step without a positive share, `accept` as it is."""
    low = 0.0
    for model in accept:
        share = shares.get(model, 0.0)
        if low <= u < low + share:
            return (model,)
        low += share
    return tuple(m for m in accept if shares.get(m, 0.0) <= 0.0)


@st.composite
def split_steps(draw_: st.DrawFn) -> list[dict[str, Any]]:
    count = draw_(st.integers(min_value=1, max_value=3))
    steps: list[dict[str, Any]] = []
    for index in range(count):
        accept = draw_(st.permutations(MODELS))[: draw_(st.integers(1, len(MODELS)))]
        shared = [m for m in accept if draw_(st.booleans())]
        # Shares on a 1/20 grid summing to at most 1, so range ends often coincide.
        twentieths = draw_(
            st.lists(st.integers(0, 20), min_size=len(shared), max_size=len(shared)).filter(
                lambda parts: sum(parts) <= 20
            )
        )
        steps.append(
            {
                "until_ms": 10.0 * (index + 1),
                "accept": list(accept),
                "shares": {m: t / 20 for m, t in zip(shared, twentieths, strict=True)},
            }
        )
    return steps


@given(split_steps(), st.one_of(st.integers(0, 19).map(lambda t: t / 20), st.floats(0, 0.9999)))
def test_for_request_is_the_rule(steps: list[dict[str, Any]], u: float) -> None:
    compiled = Policy.from_config(config(steps))
    variant = compiled.for_request(u)
    for step, written in zip(variant.steps, steps, strict=True):
        assert step.accept == expected_order(tuple(written["accept"]), written["shares"], u)
    # A policy whose steps have no positive share is served as itself.
    if not any(share > 0 for written in steps for share in written["shares"].values()):
        assert variant is compiled


def test_every_cell_of_the_unit_interval_has_its_variant() -> None:
    # Each cut starts a new cell: just below and at each cut lie in different variants.
    for low, high in itertools.pairwise((0.0, *SPLIT.cuts, 1.0)):
        assert SPLIT.for_request(low) is SPLIT.for_request(high - 1e-9)
