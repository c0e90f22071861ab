"""The fault matrix's ledger: every request sent and what became of it, and the figures of
one fault computed from it. Pure: no I/O, unit-tested with hand-made entries.

A request is *accepted* when the rendezvous answered it (status OK, from a model or the
default). For every accepted request an outcome must be on the results topic and (archive
fraction 1, consent not denied) an archive record on the archive topic, unless the broker
never took its task (answered DISPATCH_FAILED: no model saw it): the ledger counts the ones
missing. The rendezvous publishes an outcome when the mailbox closes, `late_grace`
after the answer: a rendezvous killed in that window takes the outcomes it held with it, by
design; those are counted apart ("held by the killed rendezvous"), never as silent losses.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

OK = "OK"
DISPATCH_FAILED = "DECISION_REASON_DISPATCH_FAILED"


@dataclass
class Sent:
    """One request: when it was sent (monotonic seconds from the run's start) and its fate."""

    request_id: str
    sent_s: float
    status: str = ""  # the gRPC status code name; "" while in flight
    answered_s: float = math.nan
    default: bool = False
    model: str = ""
    # The answer's DecisionReason name; DISPATCH_FAILED means the broker never took the task.
    reason: str = ""


@dataclass
class Fault:
    """When a fault was injected and cleared (run-relative seconds)."""

    name: str
    injected_s: float
    cleared_s: float


@dataclass
class FaultFigures:
    """What a fault did, as the matrix reports it."""

    name: str
    requests: int
    answered_pct: float
    default_pct: float
    errors: dict[str, int]
    recovery_s: float | None
    outcomes_lost: int
    archive_lost: int
    held_by_killed_rendezvous: int
    duplicate_outcomes: int
    duplicate_archive: int
    baseline_default_pct: float
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RecoveryRule:
    """Recovered: from the fault on, the first `window_s` window in which no call failed and
    the default share is at most max(`floor_pct`, `factor` x the pre-fault default share); the
    recovery time is from the injection to that window's start."""

    window_s: float = 2.0
    floor_pct: float = 2.0
    factor: float = 2.0


def _pct(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole else math.nan


def recovery_time(
    sent: Sequence[Sent], fault: Fault, baseline_default_pct: float, rule: RecoveryRule
) -> float | None:
    """Seconds from the injection until the answers look as before it; None if never."""
    after = sorted((s for s in sent if s.sent_s >= fault.injected_s), key=lambda s: s.sent_s)
    if not after:
        return None
    allowed = max(rule.floor_pct, rule.factor * baseline_default_pct)
    start = fault.injected_s
    end = after[-1].sent_s
    index = 0
    while start + rule.window_s <= end:
        while index < len(after) and after[index].sent_s < start:
            index += 1
        window = [s for s in after[index:] if s.sent_s < start + rule.window_s]
        if window:
            failed = sum(1 for s in window if s.status != OK)
            defaults = sum(1 for s in window if s.status == OK and s.default)
            if failed == 0 and _pct(defaults, len(window)) <= allowed:
                return start - fault.injected_s
        start += rule.window_s / 4
    return None


def figures(  # noqa: PLR0917 (one fault's whole record)
    name: str,
    sent: Sequence[Sent],
    fault: Fault,
    outcome_ids: Iterable[str],
    archive_ids: Iterable[str],
    late_grace_s: float,
    rendezvous_killed: bool,
    rule: RecoveryRule | None = None,
) -> FaultFigures:
    """The matrix's row for one fault, from its phase's ledger and what the topics hold."""
    rule = rule or RecoveryRule()
    outcomes = Counter(outcome_ids)
    archived = Counter(archive_ids)
    before = [s for s in sent if s.sent_s < fault.injected_s]
    baseline = _pct(sum(1 for s in before if s.status == OK and s.default), len(before))
    baseline = 0.0 if math.isnan(baseline) else baseline
    accepted = [s for s in sent if s.status == OK]
    held = 0
    outcomes_lost = 0
    for request in accepted:
        if outcomes[request.request_id]:
            continue
        # Answered within late_grace before the kill: its mailbox was still open.
        in_mailbox = fault.injected_s - late_grace_s <= request.answered_s <= fault.injected_s
        if rendezvous_killed and in_mailbox:
            held += 1
        else:
            outcomes_lost += 1
    # A task the broker never took (DISPATCH_FAILED) reached no model and no archive.
    dispatched = [s for s in accepted if s.reason != DISPATCH_FAILED]
    archive_lost = sum(1 for s in dispatched if not archived[s.request_id])
    errors = Counter(s.status or "NO_ANSWER" for s in sent if s.status != OK)
    return FaultFigures(
        name=name,
        requests=len(sent),
        answered_pct=_pct(len(accepted), len(sent)),
        default_pct=_pct(sum(1 for s in accepted if s.default), len(sent)),
        errors=dict(errors),
        recovery_s=recovery_time(sent, fault, baseline, rule),
        outcomes_lost=outcomes_lost,
        archive_lost=archive_lost,
        held_by_killed_rendezvous=held,
        duplicate_outcomes=sum(n - 1 for n in outcomes.values() if n > 1),
        duplicate_archive=sum(n - 1 for n in archived.values() if n > 1),
        baseline_default_pct=baseline,
    )
