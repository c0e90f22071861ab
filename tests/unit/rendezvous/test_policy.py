"""Property and example tests of the pure policy race.

The properties draw whole policies (1-4 steps over a pool of models, steps that may
end past the SLA, a canary or none, prefer_canary on or off), an SLA tightened or not
by the client's deadline, arrival maps and instants on a 0.5 ms grid (so arrivals,
boundaries and the SLA often coincide), and check `decide` against `rule`, the policy
restated on its own terms in this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from random import Random

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from services.rendezvous.policy import Policy, Reason, Step, Verdict, decide
from tests.unit.rendezvous.policies import POOL, Race, come_by, instants, on_the_grid, races

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


def test_a_canary_that_has_not_come_yet_does_not_answer_at_the_sla() -> None:
    verdict = decide(POLICY, {"canary": 60.0}, 50.0)
    assert verdict is not None and (verdict.model, verdict.reason) == (None, Reason.SLA_DEFAULT)


# ------------------------------------------------------------------------- the rule, restated

arrival_maps = st.dictionaries(st.sampled_from(POOL), instants)


def rule(race: Race, arrived: Mapping[str, float], now: float) -> tuple[object, ...] | None:
    """The policy in words: (model, reason, rule_index[, step]) or None (race goes on).

    Before the SLA, the step whose window [previous until, until) holds `now` is in
    force; its most preferred model that has come by `now` wins. Past the last step
    nothing wins before the SLA. At the SLA the canary answers if the policy prefers it
    and it has come; otherwise the default, flagged as the client's deadline if that is
    what set the SLA.
    """
    come = set(come_by(arrived, now))
    policy = race.policy
    if now < race.sla:
        starts = (0.0, *(step.until_ms for step in policy.steps))
        for index, step in enumerate(policy.steps):
            if starts[index] <= now < step.until_ms:
                in_time = [model for model in step.accept if model in come]
                if not in_time:
                    return None
                return (in_time[0], Reason.ACCEPTED, index, step.description)
        return None
    if policy.prefer_canary and policy.canary is not None and policy.canary in come:
        return (policy.canary, Reason.SLA_CANARY, -1)
    return (None, Reason.CLIENT_DEADLINE if race.client_deadline else Reason.SLA_DEFAULT, -1)


def shape(race: Race, verdict: Verdict | None) -> tuple[object, ...] | None:
    """A verdict in the rule's terms; the SLA's rule text must name the SLA in force."""
    if verdict is None:
        return None
    if verdict.reason is Reason.ACCEPTED:
        return (verdict.model, verdict.reason, verdict.rule_index, verdict.rule)
    assert f"({race.sla:g}ms)" in verdict.rule
    return (verdict.model, verdict.reason, verdict.rule_index)


def moment(
    data: st.DataObject, race: Race, arrived: Mapping[str, float], before: float | None = None
) -> float:
    """An instant (before `before`, itself on the grid): any on the grid or, as often, one
    where something happens (an arrival, a step boundary, the SLA): where rules go wrong."""
    assume(before is None or before > 0)
    anywhere = instants if before is None else on_the_grid(last_ms=before - 0.5)
    events = [
        at
        for at in sorted(
            {race.sla, *(step.until_ms for step in race.policy.steps), *arrived.values()}
        )
        if before is None or at < before
    ]
    return data.draw(st.one_of(anywhere, st.sampled_from(events)) if events else anywhere)


@settings(max_examples=300)
@given(races(), arrival_maps, st.data())
def test_decide_follows_the_rule(
    race: Race, arrived: dict[str, float], data: st.DataObject
) -> None:
    now = moment(data, race, arrived)
    assert shape(race, race.decide(come_by(arrived, now), now)) == rule(race, arrived, now)


@settings(max_examples=100)
@given(races(), arrival_maps, st.data(), st.randoms(use_true_random=False))
def test_the_verdict_does_not_depend_on_arrival_order(
    race: Race, arrived: dict[str, float], data: st.DataObject, random: Random
) -> None:
    now = moment(data, race, arrived)
    come = list(come_by(arrived, now).items())
    shuffled = list(come)
    random.shuffle(shuffled)
    first = race.decide(dict(come), now)
    assert race.decide(dict(shuffled), now) == first
    assert race.decide(dict(come), now) == first


@settings(max_examples=150)
@given(races(), st.data())
def test_next_wakeup_is_the_next_boundary_or_the_sla(race: Race, data: st.DataObject) -> None:
    # The mailbox asks only while the race goes on, so only before the SLA.
    now = moment(data, race, {}, before=race.sla)
    wake = race.next_wakeup(now)
    later = [boundary for boundary in race.boundaries() if boundary > now]
    assert wake == (later[0] if later else race.sla)
    assert now < wake <= race.sla


@settings(max_examples=200)
@given(races(), arrival_maps, st.data(), st.floats(min_value=0.0, max_value=1.0))
def test_without_arrivals_the_verdict_holds_until_the_next_wakeup(
    race: Race, arrived: dict[str, float], data: st.DataObject, fraction: float
) -> None:
    now = moment(data, race, arrived, before=race.sla)
    come = come_by(arrived, now)
    wake = race.next_wakeup(now)
    between = now + (wake - now) * fraction
    assume(now <= between < wake)
    assert race.decide(come, between) == race.decide(come, now)


@settings(max_examples=250)
@given(races(), arrival_maps)
def test_waking_at_arrivals_and_wakeups_ends_the_race_when_the_rule_does(
    race: Race, arrived: dict[str, float]
) -> None:
    """The mailbox's loop (evaluate at each arrival and at next_wakeup) misses no change.

    The rule can only change its mind at an arrival, a step boundary or the SLA, so the
    first of those instants at which it gives a verdict is when the race must end.
    """
    instants_of_change = sorted({0.0, *arrived.values(), *race.boundaries(), race.sla})
    ends_at = next(t for t in instants_of_change if rule(race, arrived, t) is not None)

    now, verdict = 0.0, race.decide(come_by(arrived, 0.0), 0.0)
    while verdict is None:
        assert now < race.sla, f"no verdict at {now}ms, at or past the SLA"
        upcoming = [at for at in arrived.values() if at > now]
        later = min([race.next_wakeup(now), *upcoming])
        assert later > now, f"the race stands still at {now}ms"
        now = later
        verdict = race.decide(come_by(arrived, now), now)
    assert now == ends_at
    assert shape(race, verdict) == rule(race, arrived, now)
