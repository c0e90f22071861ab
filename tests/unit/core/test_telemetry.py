"""The metric helpers: one collector per name, and a clear error when two callers disagree."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from services.core.telemetry import SLA_BUCKETS_S, counter, histogram


def test_asking_twice_for_a_counter_returns_the_same_one() -> None:
    first = counter("rdv_test_twice", "asked twice", ("model",))
    second = counter("rdv_test_twice", "asked twice, worded otherwise", ("model",))
    assert second is first


def test_asking_twice_for_a_histogram_returns_the_same_one() -> None:
    first = histogram("rdv_test_twice_seconds", "asked twice", ("model",))
    assert histogram("rdv_test_twice_seconds", "again", ("model",), SLA_BUCKETS_S) is first


@pytest.mark.parametrize(
    "ask_again",
    [
        lambda: counter("rdv_test_clash", "other labels", ("model", "outcome")),
        lambda: histogram("rdv_test_clash", "other kind", ("model",)),
    ],
    ids=["labels", "kind"],
)
def test_a_second_ask_that_disagrees_is_an_error(ask_again: Callable[[], object]) -> None:
    counter("rdv_test_clash", "the first", ("model",))
    with pytest.raises(ValueError, match="'rdv_test_clash' was made as Counter"):
        ask_again()


def test_a_histogram_with_other_buckets_is_an_error() -> None:
    histogram("rdv_test_buckets", "the first", buckets=(1.0, 2.0))
    with pytest.raises(ValueError, match="'rdv_test_buckets' was made as Histogram"):
        histogram("rdv_test_buckets", "other buckets", buckets=(1.0, 3.0))
