"""What a bus operation raises when the broker fails it: `BusError`, and nothing else.

Callers catch these two and no client library's exceptions: the Pulsar adapter turns every
error its client raises into a `BusError` (chained with `from`, so the client's own error
stays in the traceback).
"""

from __future__ import annotations


class BusError(Exception):
    """The broker refused or failed an operation."""


class PublishTimeout(BusError):
    """A publish did not complete within its budget."""
