"""Property and example tests of the pure policy race."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from services.rendezvous.policy import Policy, Reason, Step, decide, next_wakeup

MODELS = ("incumbent", "challenger", "canary")

POLICY = Policy(
    steps=(
        Step(20.0, ("incumbent",), "until 20ms: incumbent only"),
        Step(45.0, ("incumbent", "challenger", "canary"), "until 45ms: first of all"),
    ),
    sla_ms=50.0,
    canary="canary",
    prefer_canary=True,
)


def test_preferred_model_in_time_wins() -> None:
    verdict = decide(POLICY, {"incumbent": 5.0, "challenger": 1.0}, 5.0)
    assert verdict is not None
    assert (verdict.model, verdict.reason, verdict.rule_index) == ("incumbent", Reason.ACCEPTED, 0)


def test_challenger_waits_for_the_first_step_to_end() -> None:
    assert decide(POLICY, {"challenger": 3.0}, 19.9) is None
    verdict = decide(POLICY, {"challenger": 3.0}, 20.0)
    assert verdict is not None and verdict.model == "challenger" and verdict.rule_index == 1


def test_preference_order_decides_at_a_boundary() -> None:
    verdict = decide(POLICY, {"canary": 2.0, "challenger": 3.0}, 20.0)
    assert verdict is not None and verdict.model == "challenger"


def test_nothing_in_time_gives_the_canary_then_the_default() -> None:
    assert decide(POLICY, {}, 47.0) is None
    verdict = decide(POLICY, {}, 50.0)
    assert verdict is not None and (verdict.model, verdict.reason) == (None, Reason.SLA_DEFAULT)
    no_canary = Policy(POLICY.steps, 50.0, None, False)
    assert decide(no_canary, {}, 50.0) == verdict


def test_client_deadline_tightens_the_sla() -> None:
    verdict = decide(POLICY, {}, 10.0, 10.0, client_deadline=True)
    assert verdict is not None and verdict.reason is Reason.CLIENT_DEADLINE
    # ... and never loosens it
    assert decide(POLICY, {}, 50.0, 500.0) is not None


arrivals = st.dictionaries(
    st.sampled_from(MODELS), st.floats(min_value=0.0, max_value=60.0, allow_nan=False)
)
instants = st.floats(min_value=0.0, max_value=80.0, allow_nan=False)


@settings(max_examples=500)
@given(arrivals, instants)
def test_race_always_ends_by_the_sla(arrived: dict[str, float], now: float) -> None:
    seen = {m: t for m, t in arrived.items() if t <= now}
    verdict = decide(POLICY, seen, max(now, POLICY.sla_ms))
    assert verdict is not None


@settings(max_examples=500)
@given(arrivals, instants)
def test_a_winner_is_acceptable_when_chosen(arrived: dict[str, float], now: float) -> None:
    seen = {m: t for m, t in arrived.items() if t <= now}
    verdict = decide(POLICY, seen, now)
    if verdict is None:
        return
    if verdict.reason is Reason.ACCEPTED:
        step = POLICY.steps[verdict.rule_index]
        assert verdict.model in step.accept and verdict.model in seen
        # no more preferred model of that step had arrived
        better = step.accept[: step.accept.index(verdict.model)]
        assert not any(m in seen for m in better)
        assert now < step.until_ms
    else:
        assert now >= POLICY.sla_ms
        assert (verdict.model == "canary") == ("canary" in seen)


@settings(max_examples=500)
@given(arrivals, instants)
def test_verdict_cannot_change_between_wakeups(arrived: dict[str, float], now: float) -> None:
    """With no new arrival, the verdict at `now` holds until the next wakeup."""
    now = min(now, POLICY.sla_ms - 0.001)
    seen = {m: t for m, t in arrived.items() if t <= now}
    wake = next_wakeup(POLICY, now)
    assert now < wake <= POLICY.sla_ms
    just_before = now + (wake - now) * 0.999
    assert (decide(POLICY, seen, now) is None) == (decide(POLICY, seen, just_before) is None)
