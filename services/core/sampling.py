"""Deterministic per-request draws: the book's "random number", reproducible by request id.

Every per-request sampling decision (the A/B arm a policy step gives the request, whether
challengers score it, whether the decoy archives it) is a number in [0, 1) drawn from a hash
of the objective, the request id and the decision's purpose. The same request (a client's
retry, a replayed task) always draws the same number, in any process; different purposes
draw independently of each other. The rendezvous makes the decisions and writes them into
the task; other components may import `draw` to check or reproduce one.

The draw is the first 8 bytes of blake2b("<objective>\\x1f<request_id>\\x1f<purpose>"), read
big-endian, divided by 2**64, truncated to a double's 53 bits (so it is never rounded up to 1).
"""

from __future__ import annotations

import hashlib

# What each decision is drawn for (the `purpose` argument).
SHARES = "shares"
CHALLENGERS = "challengers"
ARCHIVE = "archive"

# The unit separator: no objective, request id or purpose made of printable text contains it,
# so ("a", "bc") and ("ab", "c") hash differently.
_SEPARATOR = b"\x1f"
# The top 53 bits, scaled: exact in a double, and at most 1 - 2**-53.
_DROP_BITS = 64 - 53
_SCALE = 2.0**-53


def draw(objective: str, request_id: str, purpose: str) -> float:
    """A number in [0, 1), a pure function of the three arguments, uniform over request ids."""
    digest = hashlib.blake2b(
        _SEPARATOR.join((objective.encode(), request_id.encode(), purpose.encode()))
    ).digest()
    return (int.from_bytes(digest[:8], "big") >> _DROP_BITS) * _SCALE
