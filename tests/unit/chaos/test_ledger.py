"""The fault matrix's ledger: what counts as answered, lost, held by a killed rendezvous, and
when the answers look as before the fault again."""

from __future__ import annotations

import math

from tools.chaos.ledger import DISPATCH_FAILED, Fault, RecoveryRule, Sent, figures

FAULT = Fault("rendezvous", injected_s=10.0, cleared_s=10.0)


def ledger() -> list[Sent]:
    """One request per 0.1 s for 20 s: answered by a model, except 10.0-13.0 s where the
    calls fail (UNAVAILABLE) and 13.0-14.0 s where they get the default."""
    out = []
    for i in range(200):
        at = i / 10
        entry = Sent(f"r{i}", at)
        if 10.0 <= at < 13.0:
            entry.status = "UNAVAILABLE"
        else:
            entry.status = "OK"
            entry.answered_s = at + 0.02
            entry.default = 13.0 <= at < 14.0
            entry.model = "" if entry.default else "m"
        out.append(entry)
    return out


def test_answered_defaults_errors_and_recovery() -> None:
    sent = ledger()
    ids = [s.request_id for s in sent if s.status == "OK"]
    row = figures("rendezvous", sent, FAULT, ids, ids, 0.5, rendezvous_killed=True)
    assert row.requests == 200
    assert math.isclose(row.answered_pct, 85.0)
    assert math.isclose(row.default_pct, 5.0)
    assert row.errors == {"UNAVAILABLE": 30}
    assert row.baseline_default_pct == 0.0
    # The first 2 s window with no failure and no default starts at 14.0 s.
    assert row.recovery_s is not None and math.isclose(row.recovery_s, 4.0)
    assert (row.outcomes_lost, row.archive_lost, row.held_by_killed_rendezvous) == (0, 0, 0)


def test_missing_outcomes_are_held_by_the_killed_rendezvous_only_within_late_grace() -> None:
    sent = ledger()
    missing = {"r96", "r99", "r50"}  # answered at 9.62 and 9.92 s (within 0.5 s), and 5.02 s
    ids = [s.request_id for s in sent if s.status == "OK" and s.request_id not in missing]
    everything = [s.request_id for s in sent if s.status == "OK"]
    killed = figures("rendezvous", sent, FAULT, ids, everything, 0.5, rendezvous_killed=True)
    assert (killed.held_by_killed_rendezvous, killed.outcomes_lost) == (2, 1)
    other = figures("collector", sent, FAULT, ids, everything, 0.5, rendezvous_killed=False)
    assert (other.held_by_killed_rendezvous, other.outcomes_lost) == (0, 3)


def test_duplicates_are_counted_and_a_task_the_broker_never_took_needs_no_archive() -> None:
    sent = ledger()
    sent[5].reason = DISPATCH_FAILED
    ids = [s.request_id for s in sent if s.status == "OK"]
    archived = [i for i in ids if i != "r5"] + ["r7", "r7"]
    row = figures("broker-kill", sent, FAULT, [*ids, "r1"], archived, 0.5, False)
    assert (row.archive_lost, row.duplicate_archive, row.duplicate_outcomes) == (0, 2, 1)


def test_no_recovery_is_none_and_the_rule_tolerates_the_usual_defaults() -> None:
    sent = ledger()
    for entry in sent[100:]:
        entry.status = "UNAVAILABLE"
    ids = [s.request_id for s in sent if s.status == "OK"]
    assert figures("x", sent, FAULT, ids, ids, 0.5, False).recovery_s is None
    noisy = ledger()
    for entry in noisy[::25]:  # 4 % defaults everywhere, the baseline included
        if entry.status == "OK":
            entry.default = True
    rule = RecoveryRule(window_s=2.0, floor_pct=2.0, factor=2.0)
    row = figures("x", noisy, FAULT, ids, ids, 0.5, False, rule)
    assert row.recovery_s is not None and row.recovery_s <= 4.5
