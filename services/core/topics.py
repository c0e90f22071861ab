"""Topic names, in one place, so every component agrees on where things flow.

rdv.<objective>.requests     scoring tasks published by the rendezvous
rdv.<objective>.tasks        enriched tasks: the modelling objective's topic
rdv.<objective>.results      outcomes: the answer and every candidate
rdv.<objective>.archive      the decoy's redacted copy of every task
rdv.<objective>.events       subject events the enricher keeps state from
rdv.<objective>.feedback     ground truth: the observed value of past requests (FeedbackService)
rdv.predictions.<instance>   a rendezvous instance's return address
rdv.control.objectives       objective configurations (compacted, keyed by objective; the
                             retained history is the audit trail of every version)
rdv.control.runners          runner hosts' RunnerStatus (compacted, keyed objective/model/host)
rdv.privacy.erasures         erasures of subjects, by pseudonym (the keyring writes, enrichers
                             and evaluators follow; infinite retention)
<topic>-DLQ                  messages that could not be decoded or processed
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "rdv"


@dataclass(frozen=True)
class Topics:
    """Fully qualified topic names in one Pulsar tenant/namespace."""

    namespace: str = "public/default"

    def _full(self, name: str) -> str:
        return f"persistent://{self.namespace}/{name}"

    def requests(self, objective: str) -> str:
        return self._full(f"{PREFIX}.{objective}.requests")

    def tasks(self, objective: str) -> str:
        return self._full(f"{PREFIX}.{objective}.tasks")

    def results(self, objective: str) -> str:
        return self._full(f"{PREFIX}.{objective}.results")

    def archive(self, objective: str) -> str:
        return self._full(f"{PREFIX}.{objective}.archive")

    def events(self, objective: str) -> str:
        return self._full(f"{PREFIX}.{objective}.events")

    def feedback(self, objective: str) -> str:
        return self._full(f"{PREFIX}.{objective}.feedback")

    def predictions(self, instance: str) -> str:
        return self._full(f"{PREFIX}.predictions.{instance}")

    def is_return_address(self, topic: str) -> bool:
        """Whether `topic` is a rendezvous instance's prediction topic in this namespace."""
        prefix = self.predictions("")
        return topic.startswith(prefix) and len(topic) > len(prefix)

    def control(self) -> str:
        return self._full(f"{PREFIX}.control.objectives")

    def runner_status(self) -> str:
        return self._full(f"{PREFIX}.control.runners")

    def erasures(self) -> str:
        return self._full(f"{PREFIX}.privacy.erasures")

    @staticmethod
    def dead_letter(topic: str) -> str:
        return f"{topic}-DLQ"
