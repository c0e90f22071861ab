"""The dead-letter policy: where a message goes that will never be handled, and the counts.

A subscription's dead letters go to `<topic>-DLQ` (`Topics.dead_letter`): the bytes, key
and properties as they came, plus `rdv-dead-letter-reason` and `rdv-original-topic`. Two
roads lead there:
- a message that cannot be decoded (bytes that do not parse, or another type than the
  topic's) will never succeed: it goes at once and is acknowledged on its own topic;
- a message whose handler keeps failing is negatively acknowledged and redelivered; after
  `max_redeliveries` redeliveries it goes too. Pulsar counts redeliveries (and applies its
  own dead-letter policy) only on Shared and Key_Shared subscriptions; on Exclusive and
  Failover it reports a redelivery count of 0 every time, so there `NackCounter` counts.
The dead letters are kept by a durable `<subscription>-dlq` subscription on the
dead-letter topic until someone reads them.

A reader owns no subscription to dead-letter from: it skips an undecodable message and
counts it here.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from services.core.telemetry import counter

if TYPE_CHECKING:  # the contract imports this module: types only, no import cycle
    from services.core.bus.contract import Publisher, RawMessage

log = logging.getLogger(__name__)

DEAD_LETTER_REASON = "rdv-dead-letter-reason"
ORIGINAL_TOPIC = "rdv-original-topic"

DEAD_LETTERS = counter(
    "rdv_dead_letters", "Messages sent to a dead-letter topic", ("topic", "reason")
)

# The `reason` label of DEAD_LETTERS.
UNDECODABLE = "undecodable"
UNDECODABLE_READ = "undecodable-read"  # skipped by a reader, not sent anywhere
MAX_REDELIVERIES = "max-redeliveries"


def subscription_name(subscription: str) -> str:
    """The durable subscription on the dead-letter topic that keeps `subscription`'s dead
    letters (without one, a namespace with no retention keeps nothing)."""
    return f"{subscription}-dlq"


def properties(raw: RawMessage, reason: str) -> dict[str, str]:
    """The dead letter's properties: the message's own, plus why and from where."""
    dead = dict(raw.properties)
    dead[DEAD_LETTER_REASON] = reason
    dead[ORIGINAL_TOPIC] = raw.topic
    return dead


async def publish(publisher: Publisher[Any], raw: RawMessage, reason: str) -> None:
    """Store `raw` on the dead-letter topic `publisher` publishes to, unchanged but for
    the two properties that say why."""
    await publisher.publish_bytes(raw.data, properties(raw, reason), raw.key)


def count(topic: str, reason_label: str) -> None:
    DEAD_LETTERS.labels(topic, reason_label).inc()


def sent(topic: str, dead_letter_topic: str, raw: RawMessage, reason: str) -> None:
    """Count and log a dead letter a subscription of `topic` sent (and acknowledged)."""
    count(topic, UNDECODABLE)
    log.warning(
        "message sent to dead-letter topic",
        extra={"topic": raw.topic, "dead_letter_topic": dead_letter_topic, "reason": reason},
    )


class NackCounter:
    """A consumer's own redelivery count, for subscriptions the broker counts none on.

    Keyed by the serialized message id. Kept by one consumer: a message another consumer
    takes over (after this one closes) starts from 0 there.
    """

    def __init__(self, max_redeliveries: int) -> None:
        self._max_redeliveries = max_redeliveries
        self._nacks: dict[bytes, int] = {}

    def redelivery_count(self, message_id: bytes) -> int:
        """How many times this consumer has nacked the message so far."""
        return self._nacks.get(message_id, 0)

    def acked(self, message_id: bytes) -> None:
        self._nacks.pop(message_id, None)

    def nacked(self, message_id: bytes) -> str | None:
        """Count one more failed delivery. When that is one too many: the dead-letter
        reason (and the message is forgotten here); otherwise None, to redeliver it."""
        attempts = self._nacks.get(message_id, 0) + 1
        if attempts > self._max_redeliveries:
            self._nacks.pop(message_id, None)
            return f"failed {attempts} deliveries"
        self._nacks[message_id] = attempts
        return None
