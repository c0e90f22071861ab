"""Hypothesis strategies for policy races, shared by the policy and mailbox tests.

Times sit on a 0.5 ms grid so that arrivals, step boundaries and the SLA often coincide.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from hypothesis import strategies as st

from services.rendezvous.policy import Policy, Step, Verdict, decide, next_wakeup

POOL = ("incumbent", "challenger-a", "challenger-b", "canary")
CANARY = "canary"
# A 0.5 ms grid up to 120 ms: coincidences (arrival at a boundary, at the SLA) are common.
GRID_END_MS = 120.0


def on_the_grid(first_ms: float = 0.0, last_ms: float = GRID_END_MS) -> st.SearchStrategy[float]:
    halves = st.integers(min_value=round(first_ms * 2), max_value=round(last_ms * 2))
    return halves.map(lambda half: half / 2)


instants = on_the_grid()


@dataclass(frozen=True)
class Race:
    """A policy and the SLA arguments one request gives `decide`."""

    policy: Policy
    sla_arg: float | None
    client_deadline: bool

    @property
    def sla(self) -> float:
        """The SLA in force: the objective's, only ever tightened by the client."""
        if self.sla_arg is None:
            return self.policy.sla_ms
        return min(self.sla_arg, self.policy.sla_ms)

    def decide(self, arrived: Mapping[str, float], now: float) -> Verdict | None:
        return decide(self.policy, arrived, now, self.sla_arg, client_deadline=self.client_deadline)

    def next_wakeup(self, now: float) -> float:
        return next_wakeup(self.policy, now, self.sla_arg)

    def boundaries(self) -> list[float]:
        """Every instant at which the rule may change its mind without an arrival."""
        return sorted({step.until_ms for step in self.policy.steps if step.until_ms < self.sla})


@st.composite
def races(draw: st.DrawFn, max_accepted: int = len(POOL)) -> Race:
    """A policy of 1-4 steps, each accepting 1-`max_accepted` models of POOL, and its SLAs."""
    count = draw(st.integers(min_value=1, max_value=4))
    after_zero = on_the_grid(0.5)
    untils = sorted(draw(st.sets(after_zero, min_size=count, max_size=count)))
    steps = tuple(
        Step(
            until,
            tuple(
                draw(
                    st.lists(st.sampled_from(POOL), min_size=1, max_size=max_accepted, unique=True)
                )
            ),
            f"step {index}",
        )
        for index, until in enumerate(untils)
    )
    policy = Policy(
        steps=steps,
        sla_ms=draw(after_zero),
        canary=draw(st.sampled_from((None, CANARY))),
        prefer_canary=draw(st.booleans()),
    )
    # The rendezvous passes the objective's SLA, or the client's tighter deadline (>= 0)
    # with client_deadline set; None and a looser value are the function's own defaults.
    sla_arg = draw(st.one_of(st.none(), instants))
    client_deadline = sla_arg is not None and draw(st.booleans())
    return Race(policy, sla_arg, client_deadline)


def come_by(arrived: Mapping[str, float], now: float) -> dict[str, float]:
    """The arrivals that have come by `now`."""
    return {model: at for model, at in arrived.items() if at <= now}
