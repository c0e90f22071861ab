"""The policy race as a pure function of time and arrivals.

A policy is a schedule over the time since the request arrived:

    sla 50ms
    until 20ms: accept incumbent only
    until 45ms: accept the first of incumbent, challenger-a, canary
    at the SLA: the default (static, or the canary's score if it came)

`decide` says, at one instant, whether the race is over and who won; the
mailbox calls it at every arrival and at every step boundary (`next_wakeup`).
Nothing here reads a clock or touches I/O, so the race is property-tested.

A step may give models of its `accept` list a share of its requests (a live A/B split).
The race is first-come among the accepted models, so an order of preference alone would not
split anything: the faster model would win either way. A share is an arm instead. Each
request draws one number u in [0, 1) (`services.core.sampling`, by objective and request id,
the same u in every step, so a retried request lands in the same arm); the shares, in
`accept` order, cover [0, sum of shares). A request whose u lies in a model's range races
that step with that model alone (its arm); every other request races it with the models that
have no share (the control arm). A request whose subject denied experimentation races the
control arm. `Policy.for_request(u)` is the policy one request races under: the few distinct
variants are compiled once, in `from_config`, so a request only looks one up (and a policy
without shares is itself).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import IntEnum

from rendezvous.v1 import common_pb2, objective_pb2, scoring_pb2

from services.core.protos import duration_ms


class Reason(IntEnum):
    """Why the race ended: rendezvous.v1.DecisionReason itself, by shorter names."""

    ACCEPTED = scoring_pb2.DECISION_REASON_ACCEPTED
    SLA_DEFAULT = scoring_pb2.DECISION_REASON_SLA_DEFAULT
    SLA_CANARY = scoring_pb2.DECISION_REASON_SLA_CANARY
    CLIENT_DEADLINE = scoring_pb2.DECISION_REASON_CLIENT_DEADLINE
    # The broker did not take the task in time: no prediction can come.
    DISPATCH_FAILED = scoring_pb2.DECISION_REASON_DISPATCH_FAILED


@dataclass(frozen=True, slots=True)
class Step:
    """Accept the first of `accept` (most preferred first) until `until_ms`."""

    until_ms: float
    accept: tuple[str, ...]
    description: str
    # The A/B arms: (model, low, high), the model first for u in [low, high), in `accept`
    # order; empty for a step without shares.
    arms: tuple[tuple[str, float, float], ...] = ()

    @classmethod
    def with_shares(
        cls, until_ms: float, accept: tuple[str, ...], description: str, shares: Mapping[str, float]
    ) -> Step:
        """A step whose `shares` (model -> share) become ranges of u in `accept` order.

        A share of a model the step does not accept is ignored (the control plane rejects
        such a config), as is an empty share."""
        arms = []
        low = 0.0
        for model in accept:
            share = shares.get(model, 0.0)
            if share > 0.0:
                arms.append((model, low, low + share))
                low += share
        return cls(until_ms, accept, description, tuple(arms))

    def for_draw(self, u: float) -> Step:
        """This step as one request with draw `u` sees it: its arm's model alone, or, outside
        every arm (u >= 1: the control arm), the models without a share."""
        if not self.arms:
            return self
        for model, low, high in self.arms:
            if low <= u < high:
                return Step(self.until_ms, (model,), f"{self.description} ({model}'s arm)")
        armed = {model for model, _, _ in self.arms}
        control = tuple(name for name in self.accept if name not in armed)
        return Step(self.until_ms, control, f"{self.description} (control arm)")


@dataclass(frozen=True, slots=True)
class Policy:
    """A compiled objective policy: steps in time order, the SLA, the default's rules."""

    steps: tuple[Step, ...]
    sla_ms: float
    canary: str | None
    prefer_canary: bool
    # With shares: the ends of the arms' ranges, sorted, and the policy for each cell of
    # [0, 1) they cut (variants[i] holds for u in [cuts[i-1], cuts[i])). Empty without.
    cuts: tuple[float, ...] = ()
    variants: tuple[Policy, ...] = ()
    # With shares: the control arm of every step (a request outside the experiment).
    control: Policy | None = None
    # In a variant: the models racing alone in one of its steps (they must score the task).
    armed: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, config: objective_pb2.ObjectiveConfig) -> Policy:
        canaries = [
            m.name for m in config.models if m.role == common_pb2.MODEL_ROLE_CANARY and m.enabled
        ]
        policy = cls(
            steps=tuple(
                Step.with_shares(
                    duration_ms(step.until), tuple(step.accept), step.description, step.shares
                )
                for step in config.policy.steps
            ),
            sla_ms=duration_ms(config.sla),
            canary=canaries[0] if canaries else None,
            prefer_canary=config.default_answer.prefer_canary,
        )
        return policy.compiled()

    @property
    def has_shares(self) -> bool:
        """Whether requests race under variants of this policy (draw u only then)."""
        return bool(self.variants)

    def compiled(self) -> Policy:
        """This policy with its request-specific variants precomputed (see `for_request`)."""
        bounds = {
            bound for step in self.steps for _, low, high in step.arms for bound in (low, high)
        }
        cuts = tuple(sorted(bound for bound in bounds if 0.0 < bound < 1.0))
        if not any(step.arms for step in self.steps):
            return self
        # Each cell [cuts[i-1], cuts[i]) lies inside one arm (or none) of every step: its
        # lower end stands for all of it.
        variants = tuple(self._variant(low) for low in (0.0, *cuts))
        return replace(self, cuts=cuts, variants=variants, control=self._variant(1.0))

    def _variant(self, u: float) -> Policy:
        steps = tuple(step.for_draw(u) for step in self.steps)
        armed = tuple(
            dict.fromkeys(
                model for step in self.steps for model, low, high in step.arms if low <= u < high
            )
        )
        return replace(self, steps=steps, cuts=(), armed=armed)

    def for_request(self, u: float) -> Policy:
        """The policy a request with draw `u` races under: no allocation, a lookup."""
        if not self.variants:
            return self
        return self.variants[bisect.bisect_right(self.cuts, u)]


@dataclass(frozen=True, slots=True)
class Verdict:
    """The end of a race: the winning model (None for the static default) and why."""

    model: str | None
    reason: Reason
    rule_index: int
    rule: str


def active_step(policy: Policy, now_ms: float) -> int | None:
    """The index of the step in force at `now_ms`, or None past the last step."""
    for index, step in enumerate(policy.steps):
        if now_ms < step.until_ms:
            return index
    return None


def decide(
    policy: Policy,
    arrived: Mapping[str, float],
    now_ms: float,
    sla_ms: float | None = None,
    *,
    client_deadline: bool = False,
) -> Verdict | None:
    """The verdict at `now_ms`, or None while the race goes on.

    `arrived` maps each model whose successful prediction has come to its arrival
    time (ms since the request arrived); errors never count as arrivals. `sla_ms`
    is the effective SLA (the objective's, tightened by the client's deadline, in
    which case `client_deadline` is true).
    """
    sla = policy.sla_ms if sla_ms is None else min(sla_ms, policy.sla_ms)
    if now_ms < sla:
        index = active_step(policy, now_ms)
        if index is None:
            return None
        step = policy.steps[index]
        for model in step.accept:
            if model in arrived and arrived[model] <= now_ms:
                return Verdict(model, Reason.ACCEPTED, index, step.description)
        return None
    canary = policy.canary
    if policy.prefer_canary and canary is not None and arrived.get(canary, math.inf) <= now_ms:
        return Verdict(
            policy.canary, Reason.SLA_CANARY, -1, f"at the SLA ({sla:g}ms): canary's score"
        )
    if client_deadline:
        return Verdict(None, Reason.CLIENT_DEADLINE, -1, f"client deadline ({sla:g}ms): default")
    return Verdict(None, Reason.SLA_DEFAULT, -1, f"at the SLA ({sla:g}ms): default")


def next_wakeup(policy: Policy, now_ms: float, sla_ms: float | None = None) -> float:
    """The next instant after `now_ms` at which the verdict can change without an arrival."""
    sla = policy.sla_ms if sla_ms is None else min(sla_ms, policy.sla_ms)
    for step in policy.steps:
        if now_ms < step.until_ms < sla:
            return step.until_ms
    return sla
