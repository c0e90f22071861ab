"""What crypto-shredding costs per record: prints the figures and writes them as JSON.

    .venv/bin/python -m tools.seal_cost [--records N] [--out docs/results/seal-cost.json]

Per record (CPU time of this process, the mean over N): the pseudonym (HMAC-SHA256 of a
subject id), sealing an outcome like the demo's (three candidates, the answer) and an
archive record like the demo's (ten features, the subject state), with the subject's key
already cached as writers hold it, and opening each; plus the keyring's own work on a real
SQLite file: a new key (committed and synced alone, and in batches of 50 as the keyring
commits the asks that arrive together), an existing key, a read of keys by id. The
added CPU per request is one pseudonym and one seal of each record (the rendezvous seals the
outcome, the decoy the archive record; each computes its own pseudonym). Nothing here is on
the answer path: the rendezvous seals after the answer (docs/privacy.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from rendezvous.v1 import common_pb2, scoring_pb2, task_pb2

from services.core.privacy import KEY_BYTES, Pseudonyms, open_with, seal_with
from services.core.protos import now_timestamp, redact_pii, set_values
from services.keyring.store import KeyStore

DEFAULT_OUT = Path("docs/results/seal-cost.json")
FEATURES = ("age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6")


def demo_outcome(index: int) -> task_pb2.Outcome:
    outcome = task_pb2.Outcome(request_id=f"req-{index:08d}", objective="demo")
    outcome.received_time.CopyFrom(now_timestamp())
    outcome.response.request_id = outcome.request_id
    outcome.response.score = 151.2 + index % 7
    outcome.response.decision.model = "diabetes-ridge"
    outcome.response.decision.source = scoring_pb2.ANSWER_SOURCE_MODEL
    outcome.response.decision.rule = "until 20ms: diabetes-ridge"
    outcome.sla.FromMilliseconds(50)
    for rank, model in enumerate(("diabetes-ridge", "feature-sum", "canary-linear")):
        candidate = outcome.candidates.add(
            status=task_pb2.CANDIDATE_STATUS_ANSWERED
            if rank == 0
            else task_pb2.CANDIDATE_STATUS_IN_TIME
        )
        event = candidate.prediction
        event.request_id, event.objective, event.model = outcome.request_id, "demo", model
        event.mailbox_id, event.model_version, event.runner = "f" * 32, "1", "runners-demo-0"
        event.role = (
            common_pb2.MODEL_ROLE_INCUMBENT if rank == 0 else common_pb2.MODEL_ROLE_CHALLENGER
        )
        event.prediction.score = 150.0 + rank
        event.task_received_time.CopyFrom(now_timestamp())
        event.predicted_time.CopyFrom(now_timestamp())
        event.model_latency.FromMicroseconds(850)
        candidate.arrival.FromMicroseconds(3000 + rank * 400)
    return outcome


def demo_archive_record(index: int) -> task_pb2.ArchiveRecord:
    request = scoring_pb2.ScoreRequest(
        objective="demo", request_id=f"req-{index:08d}", subject_id=f"user-{index % 50}"
    )
    set_values(request.features, {name: 0.01 * (i + 1) for i, name in enumerate(FEATURES)})
    task = task_pb2.ScoringTask(
        request=request,
        return_address="persistent://public/default/rdv.predictions.rdv-0",
        mailbox_id="f" * 32,
        scorers=["diabetes-ridge", "feature-sum", "canary-linear"],
        objective_version=3,
    )
    task.received_time.CopyFrom(now_timestamp())
    task.deadline.CopyFrom(now_timestamp())
    task.trace_context["traceparent"] = "00-" + "a" * 32 + "-" + "b" * 16 + "-00"
    enriched = task_pb2.EnrichedTask(task=task)
    set_values(
        enriched.subject_state,
        {
            "event_count": 12,
            "last_event_kind": "view",
            "last_event_age_s": 3.5,
            "recent_kinds": ["view", "purchase", "view"],
            "counts_by_kind": {"view": 9, "purchase": 3},
        },
    )
    record = task_pb2.ArchiveRecord(task=enriched)
    record.redacted_fields.extend(redact_pii(record))
    record.archived_time.CopyFrom(now_timestamp())
    return record


def cpu_us(action: Callable[[int], Any], n: int) -> float:
    """Mean CPU time of `action(i)` in microseconds over n calls."""
    started = time.process_time()
    for index in range(n):
        action(index)
    return (time.process_time() - started) / n * 1e6


def wall_us(action: Callable[[int], Any], n: int) -> float:
    started = time.perf_counter()
    for index in range(n):
        action(index)
    return (time.perf_counter() - started) / n * 1e6


def measure(n: int) -> dict[str, Any]:
    aead = AESGCM(os.urandom(KEY_BYTES))
    pseudonyms = Pseudonyms(os.urandom(KEY_BYTES))
    outcomes = [demo_outcome(i) for i in range(n)]
    records = [demo_archive_record(i) for i in range(n)]
    sealed_outcomes = [seal_with(o, "k" * 32, aead) for o in outcomes]
    sealed_records = [seal_with(r, "k" * 32, aead) for r in records]
    figures: dict[str, Any] = {
        "records": n,
        "outcome_bytes": outcomes[0].ByteSize(),
        "sealed_outcome_bytes": sealed_outcomes[0].ByteSize(),
        "archive_record_bytes": records[0].ByteSize(),
        "sealed_archive_record_bytes": sealed_records[0].ByteSize(),
        "pseudonym_us": cpu_us(lambda i: pseudonyms.of(f"user-{i}"), n),
        "seal_outcome_us": cpu_us(lambda i: seal_with(outcomes[i], "k" * 32, aead), n),
        "seal_archive_record_us": cpu_us(lambda i: seal_with(records[i], "k" * 32, aead), n),
        "open_outcome_us": cpu_us(lambda i: open_with(sealed_outcomes[i], aead), n),
        "open_archive_record_us": cpu_us(lambda i: open_with(sealed_records[i], aead), n),
        # What writers pay besides: serializing the record to publish it (paid before too).
        "serialize_outcome_us": cpu_us(lambda i: outcomes[i].SerializeToString(), n),
    }
    figures["added_cpu_per_request_us"] = (
        2 * figures["pseudonym_us"] + figures["seal_outcome_us"] + figures["seal_archive_record_us"]
    )
    with tempfile.TemporaryDirectory() as root:
        store = KeyStore(Path(root) / "keyring.db", os.urandom(KEY_BYTES))
        keys = max(50, n // 100)
        figures["keyring_keys_measured"] = keys
        figures["keyring_new_key_wall_us"] = wall_us(
            lambda i: store.subject_key("demo", pseudonyms.of(f"new-{i}")), keys
        )
        batch = 50
        figures["keyring_new_key_in_batches_of_50_wall_us"] = (
            wall_us(
                lambda i: store.create_keys(
                    [("demo", pseudonyms.of(f"batch-{i}-{j}")) for j in range(batch)]
                ),
                max(4, keys // batch),
            )
            / batch
        )
        figures["keyring_existing_key_us"] = wall_us(
            lambda i: store.existing_key("demo", pseudonyms.of(f"new-{i % keys}")), n
        )
        ids = [store.subject_key("demo", pseudonyms.of(f"new-{i}"))[0] for i in range(keys)]
        figures["keyring_read_key_by_id_us"] = wall_us(lambda i: store.keys([ids[i % keys]]), n)
        store.close()
    figures["machine"] = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    figures = measure(args.records)
    for name, value in figures.items():
        print(f"{name:32} {value:.2f}" if isinstance(value, float) else f"{name:32} {value}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
