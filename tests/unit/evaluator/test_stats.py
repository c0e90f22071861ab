"""The evaluator's statistics: exact values and properties that fail when the method is wrong."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.evaluator import stats

# --- latency quantiles -----------------------------------------------------------------


def exact_at_rank(values: list[float], q: float) -> tuple[float, float]:
    """The exact values around rank q * (n - 1) (the sketch's rank convention)."""
    ordered = sorted(values)
    rank = q * (len(ordered) - 1)
    return ordered[math.floor(rank)], ordered[math.ceil(rank)]


def within(approx: float, low: float, high: float, accuracy: float) -> bool:
    return low * (1 - accuracy) - 1e-12 <= approx <= high * (1 + accuracy) + 1e-12


def test_quantiles_within_relative_accuracy_of_exact() -> None:
    rng = random.Random(7)
    # A long-tailed latency: lognormal around 5 ms with rare 100x outliers.
    values = [rng.lognormvariate(math.log(0.005), 0.6) for _ in range(20_000)]
    values += [rng.uniform(0.2, 0.5) for _ in range(40)]
    sketch = stats.LatencySketch()
    for v in values:
        sketch.add(v)
    assert sketch.count == len(values)
    for q, approx in sketch.quantiles().items():
        assert approx is not None
        low, high = exact_at_rank(values, q)
        assert within(approx, low, high, stats.LATENCY_RELATIVE_ACCURACY), (q, approx, low)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.floats(min_value=1e-5, max_value=60.0), min_size=1, max_size=300),
    st.lists(st.floats(min_value=1e-5, max_value=60.0), min_size=1, max_size=300),
)
def test_merged_sketches_give_the_quantiles_of_all_values(a: list[float], b: list[float]) -> None:
    left, right = stats.LatencySketch(), stats.LatencySketch()
    for v in a:
        left.add(v)
    for v in b:
        right.add(v)
    left.merge(right)
    assert left.count == len(a) + len(b)
    for q in stats.REPORT_QUANTILES:
        approx = left.quantile(q)
        assert approx is not None
        low, high = exact_at_rank(a + b, q)
        assert within(approx, low, high, stats.LATENCY_RELATIVE_ACCURACY)


def test_sketches_merge_exactly_and_empty_has_no_quantile() -> None:
    sketch = stats.LatencySketch()
    assert sketch.quantile(0.5) is None
    for i in range(1, 1001):
        sketch.add(i / 1000)
    restored = stats.LatencySketch()
    restored.merge(sketch)
    assert restored.count == 1000
    for q in stats.REPORT_QUANTILES:
        assert restored.quantile(q) == pytest.approx(sketch.quantile(q), rel=1e-9)
    # Merging is exact (bin counts add), whatever the order.
    local = stats.LatencySketch()
    local.add(0.5)
    local.merge(restored)
    restored.merge(local)
    assert local.count == 1001 and restored.count == 2001


# --- paired bootstrap ------------------------------------------------------------------


def test_bootstrap_excludes_zero_for_a_clearly_better_model_with_the_right_sign() -> None:
    rng = random.Random(1)
    incumbent = [abs(rng.gauss(0, 50)) for _ in range(400)]
    # The challenger's error is 20 % lower on the same requests, plus noise.
    challenger = [e * 0.8 + abs(rng.gauss(0, 2)) for e in incumbent]
    diffs = [c - i for c, i in zip(challenger, incumbent, strict=True)]
    interval = stats.paired_bootstrap(diffs, seed=3)
    mean, low, high = interval
    assert low <= mean <= high < 0.0
    assert stats.verdict(interval) == "better"
    worse = stats.paired_bootstrap([-d for d in diffs], seed=3)
    assert worse.low > 0.0 and stats.verdict(worse) == "worse"


def test_bootstrap_includes_zero_for_an_identical_model() -> None:
    rng = random.Random(2)
    # Same model, independent noise of the same size: no real difference.
    diffs = [rng.gauss(0, 10) for _ in range(400)]
    interval = stats.paired_bootstrap(diffs, seed=4)
    assert interval.low < 0.0 < interval.high
    assert stats.verdict(interval) == "inconclusive"
    zero = stats.paired_bootstrap([0.0] * 50)
    assert zero == (0.0, 0.0, 0.0)


def test_bootstrap_is_deterministic_with_a_seed_and_the_interval_widens_with_confidence() -> None:
    rng = random.Random(5)
    diffs = [rng.gauss(-1, 5) for _ in range(200)]
    assert stats.paired_bootstrap(diffs, seed=9) == stats.paired_bootstrap(diffs, seed=9)
    narrow = stats.paired_bootstrap(diffs, confidence=0.8, seed=9)
    wide = stats.paired_bootstrap(diffs, confidence=0.99, seed=9)
    assert wide.low < narrow.low < narrow.high < wide.high
    # Close to the normal approximation for 200 roughly normal pairs.
    sd = (sum((d - narrow.mean) ** 2 for d in diffs) / (len(diffs) - 1)) ** 0.5
    half = 1.96 * sd / len(diffs) ** 0.5
    ci95 = stats.paired_bootstrap(diffs, seed=9)
    assert ci95.high - ci95.low == pytest.approx(2 * half, rel=0.1)


def test_bootstrap_rejects_no_pairs_and_bad_confidence() -> None:
    with pytest.raises(ValueError):
        stats.paired_bootstrap([])
    with pytest.raises(ValueError):
        stats.paired_bootstrap([1.0, 2.0], confidence=1.0)
    assert stats.paired_bootstrap([2.5]) == (2.5, 2.5, 2.5)


# --- agreement -------------------------------------------------------------------------


def test_spearman_matches_a_hand_computed_example_with_ties() -> None:
    xs = [1.0, 2.0, 2.0, 3.0, 4.0]
    ys = [10.0, 30.0, 20.0, 20.0, 50.0]
    # ranks x: 1, 2.5, 2.5, 4, 5; ranks y: 1, 4, 2.5, 2.5, 5 (mean 3 each)
    # centred x: -2, -0.5, -0.5, 1, 2; centred y: -2, 1, -0.5, -0.5, 2
    # sum xy = 4 - 0.5 + 0.25 - 0.5 + 4 = 7.25; sum x^2 = sum y^2 = 9.5
    assert stats.rank_correlation(xs, ys) == pytest.approx(7.25 / 9.5)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(-5, 5), st.integers(-5, 5)).map(lambda t: (float(t[0]), float(t[1]))),
        min_size=3,
        max_size=40,
    )
)
def test_spearman_agrees_with_scipy(pairs: list[tuple[float, float]]) -> None:
    from scipy.stats import spearmanr

    xs = [p[0] for p in pairs]
    ys = [p[1] for p in pairs]
    ours = stats.rank_correlation(xs, ys)
    if len(set(xs)) < 2 or len(set(ys)) < 2:
        assert math.isnan(ours)
        return
    assert ours == pytest.approx(float(spearmanr(xs, ys).statistic), abs=1e-9)


def test_spearman_ignores_scale_and_mean_absolute_difference_does_not() -> None:
    xs = [0.1, 0.4, 0.2, 0.9]
    shifted = [x * 10 + 3 for x in xs]
    assert stats.rank_correlation(xs, shifted) == pytest.approx(1.0)
    assert stats.rank_correlation(xs, [-x for x in xs]) == pytest.approx(-1.0)
    assert stats.mean_absolute_difference([1.0, 2.0], [2.0, 0.0]) == pytest.approx(1.5)
    assert math.isnan(stats.mean_absolute_difference([], []))
    with pytest.raises(ValueError):
        stats.rank_correlation([1.0], [1.0, 2.0])


# --- PSI -------------------------------------------------------------------------------


def test_psi_is_near_zero_for_the_same_distribution() -> None:
    rng = random.Random(11)
    reference = [rng.gauss(150, 40) for _ in range(5000)]
    recent = [rng.gauss(150, 40) for _ in range(5000)]
    value = stats.psi(reference, recent)
    assert 0.0 <= value < 0.02
    assert stats.drift_level(value) == "stable"


def test_psi_is_above_the_alarm_for_a_shifted_distribution() -> None:
    rng = random.Random(12)
    reference = [rng.gauss(150, 40) for _ in range(5000)]
    recent = [rng.gauss(190, 40) for _ in range(5000)]  # a one-sd shift
    value = stats.psi(reference, recent)
    assert value > stats.PSI_ALARM
    assert stats.drift_level(value) == "significant"


def test_psi_is_finite_with_empty_bins_and_discrete_scores() -> None:
    reference = [0.0] * 50 + [1.0] * 50
    assert stats.psi(reference, reference) == pytest.approx(0.0)
    # Everything recent lands in one bin: large but finite thanks to epsilon.
    value = stats.psi(reference, [1.0] * 100)
    assert math.isfinite(value) and value > stats.PSI_ALARM
    assert stats.drift_level(0.1) == "moderate" and stats.drift_level(0.25) == "moderate"
    with pytest.raises(ValueError):
        stats.psi([], [1.0])


# --- errors ----------------------------------------------------------------------------


def test_regression_error_exact() -> None:
    figures = stats.regression_error([1.0, 2.0, 5.0], [2.0, 2.0, 1.0])
    assert figures.n == 3
    assert figures.mae == pytest.approx(5 / 3)
    assert figures.rmse == pytest.approx(math.sqrt(17 / 3))
    assert stats.request_error("regression", 5.0, 1.0) == 4.0


def test_classification_error_exact() -> None:
    probabilities = [0.9, 0.2, 0.6, 0.5]
    labels = [1.0, 0.0, 0.0, 1.0]
    figures = stats.classification_error(probabilities, labels)
    assert figures.accuracy == pytest.approx(0.75)  # 0.6 for a negative is the miss
    expected = -(math.log(0.9) + math.log(0.8) + math.log(0.4) + math.log(0.5)) / 4
    assert figures.log_loss == pytest.approx(expected)
    assert stats.request_error("classification", 0.9, 1.0) == pytest.approx(-math.log(0.9))
    assert stats.request_error("classification", 1.0, 0.0) == pytest.approx(
        -math.log(stats.LOG_LOSS_EPSILON), rel=1e-3
    )
    assert isinstance(stats.error_figures("classification", [], []), stats.ClassificationError)
    assert stats.error_figures("regression", [], []).n == 0
