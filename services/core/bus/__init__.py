"""The message bus: typed asyncio publishers, subscriptions and readers over Apache Pulsar.

One job per module:
- `contract`: what services program against (`Bus`, `Publisher`, `Subscription`,
  `Reader`, `Envelope`, `RawMessage`, decoding, the `rdv-type` property);
- `errors`: `BusError` and `PublishTimeout`, the only exceptions a bus operation raises;
- `dead_letter`: the dead-letter policy (`<topic>-DLQ`, its properties, the counts, and
  the nack counting where Pulsar reports no redelivery count);
- `pulsar`: `PulsarBus`, the adapter over `pulsar.asyncio`, and `connect`.

The in-memory twin for unit tests is tests/fakes/memory_bus.py; tests/contract holds both
to one suite. Import from here: `from services.core.bus import Bus, Envelope, connect`.
"""

from services.core.bus.contract import (
    PUBLISH_FAILURES,
    TYPE_PROPERTY,
    Bus,
    DeadLetterPublisher,
    Envelope,
    M,
    Publisher,
    RawMessage,
    Reader,
    Start,
    Subscription,
    SubscriptionMode,
    decode,
    message_properties,
)
from services.core.bus.dead_letter import DEAD_LETTER_REASON, DEAD_LETTERS, ORIGINAL_TOPIC
from services.core.bus.errors import BusError, PublishTimeout
from services.core.bus.pulsar import PulsarBus, connect

__all__ = [
    "DEAD_LETTERS",
    "DEAD_LETTER_REASON",
    "ORIGINAL_TOPIC",
    "PUBLISH_FAILURES",
    "TYPE_PROPERTY",
    "Bus",
    "BusError",
    "DeadLetterPublisher",
    "Envelope",
    "M",
    "PublishTimeout",
    "Publisher",
    "PulsarBus",
    "RawMessage",
    "Reader",
    "Start",
    "Subscription",
    "SubscriptionMode",
    "connect",
    "decode",
    "message_properties",
]
