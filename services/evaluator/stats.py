"""Pure statistics of the evaluation report: no I/O, no protos, deterministic.

- Latency quantiles: `LatencySketch`, a DDSketch (DataDog's `ddsketch` from PyPI).
- Paired comparison: `paired_bootstrap` of per-request error differences.
- Agreement: `mean_absolute_difference` and `rank_correlation` (Spearman).
- Drift: `psi`, the population stability index, with `drift_level` (0.1 / 0.25).
- Error against ground truth: `request_error`, `regression_error`, `classification_error`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
from ddsketch import DDSketch

# ---------------------------------------------------------------------------------------
# Latency quantiles
# ---------------------------------------------------------------------------------------

#: The quantiles the report shows (p50, p90, p99, p99.9).
REPORT_QUANTILES: tuple[float, ...] = (0.5, 0.9, 0.99, 0.999)

#: Relative accuracy of the latency sketch: a reported quantile is within 1 % of the exact
#: value of that rank (a 40 ms p99 is reported between 39.6 and 40.4 ms).
LATENCY_RELATIVE_ACCURACY = 0.01


class LatencySketch:
    """Mergeable latency quantiles: a DDSketch of arrival times in seconds.

    Why DDSketch rather than a t-digest: its guarantee is a *relative* error on the value
    (every quantile within `relative_accuracy` of the exact value of its rank, tail included),
    which is what a latency SLO needs at p99.9, whereas t-digest's error is bounded in rank
    and is largest in absolute terms exactly in the long tail. DDSketch's merge is exact (bin
    counts add), so sketches per window, per evaluator instance or per partition combine into
    the same quantiles as one sketch of all values, whatever the order; its memory grows with
    the log of the value range (about 1 000 bins from 1 µs to 1 h at 1 %), not with the count.
    The library is DataDog's reference implementation of the paper (Masson, Rim, Lee, VLDB
    2019), maintained, pure Python, and serializes to a protobuf for shipping sketches.
    """

    def __init__(self, relative_accuracy: float = LATENCY_RELATIVE_ACCURACY) -> None:
        """An empty sketch with the given relative accuracy (0 < accuracy < 1)."""
        self._sketch = DDSketch(relative_accuracy=relative_accuracy)
        self.relative_accuracy = relative_accuracy

    @property
    def count(self) -> int:
        """How many values were added (merged sketches included)."""
        return int(self._sketch.count)

    def add(self, seconds: float) -> None:
        """Add one latency in seconds (negative values are clamped to zero)."""
        self._sketch.add(max(0.0, seconds))

    def merge(self, other: LatencySketch) -> None:
        """Fold another sketch with the same accuracy into this one (exact: counts add)."""
        self._sketch.merge(other._sketch)

    def quantile(self, q: float) -> float | None:
        """The approximate value at quantile q (0..1); None when the sketch is empty.

        The rank is q * (count - 1), as in the library; the value returned is within
        `relative_accuracy` of the exact value at that rank.
        """
        value = self._sketch.get_quantile_value(q)
        return None if value is None else float(value)

    def quantiles(self, qs: Iterable[float] = REPORT_QUANTILES) -> dict[float, float | None]:
        """The approximate values at several quantiles, keyed by quantile."""
        return {q: self.quantile(q) for q in qs}


# ---------------------------------------------------------------------------------------
# Paired comparison
# ---------------------------------------------------------------------------------------


class Interval(NamedTuple):
    """A mean and its confidence interval; unpacks as (mean, low, high)."""

    mean: float
    low: float
    high: float


Verdict = Literal["better", "worse", "inconclusive"]

#: Bootstrap resamples by default: the percentile interval's ends are stable to about
#: 1 % of their width at 10 000 resamples.
BOOTSTRAP_RESAMPLES = 10_000

# The resample matrix is built in chunks of at most this many cells (8 MB of indices).
_CHUNK_CELLS = 1_000_000


def paired_bootstrap(
    diffs: Sequence[float],
    confidence: float = 0.95,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> Interval:
    """Mean of paired differences and its percentile-bootstrap confidence interval.

    `diffs[i]` is error(model) - error(incumbent) on the same request i, so the pairing
    removes the request's own difficulty from the comparison (both models saw the same
    inputs): a negative mean means the model's error is lower. The requests are resampled
    with replacement `resamples` times, the mean of each resample taken, and the interval is
    the (1 - confidence) / 2 and (1 + confidence) / 2 quantiles of those means.

    Why the bootstrap rather than a paired t-test: per-request errors (absolute error, log
    loss) are skewed and heavy-tailed, and the bootstrap assumes no distribution; with
    hundreds of pairs or more both agree, with few the bootstrap does not pretend to know
    the tails. Seeded (numpy's PCG64), the same pairs give the same interval, so a report
    refreshed without new data does not flicker.

    Raises ValueError when there are no pairs or the confidence is not in (0, 1).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    values = np.asarray(diffs, dtype=np.float64)
    n = values.size
    if n == 0:
        raise ValueError("paired_bootstrap needs at least one difference")
    mean = float(values.mean())
    if n == 1:
        return Interval(mean, mean, mean)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples, dtype=np.float64)
    chunk = max(1, _CHUNK_CELLS // n)
    for start in range(0, resamples, chunk):
        rows = min(chunk, resamples - start)
        picks = rng.integers(0, n, size=(rows, n))
        means[start : start + rows] = values[picks].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return Interval(mean, float(low), float(high))


def verdict(interval: Interval) -> Verdict:
    """Better when the interval of error differences lies wholly below zero, worse when
    wholly above, inconclusive when it contains zero."""
    if interval.high < 0.0:
        return "better"
    if interval.low > 0.0:
        return "worse"
    return "inconclusive"


# ---------------------------------------------------------------------------------------
# Agreement with the incumbent
# ---------------------------------------------------------------------------------------


def mean_absolute_difference(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Mean of |x - y| over pairs: how far two models' scores are, in score units.

    NaN when there are no pairs. It answers "how different", `rank_correlation` answers
    "do they order requests alike" (a model shifted by a constant has a large difference
    and a rank correlation of 1).
    """
    a, b = _pairs(xs, ys)
    if a.size == 0:
        return math.nan
    return float(np.abs(a - b).mean())


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, tied values sharing the mean of the ranks they span."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    ranks = np.empty(values.size, dtype=np.float64)
    start = 0
    n = values.size
    while start < n:
        end = start + 1
        while end < n and ordered[end] == ordered[start]:
            end += 1
        # positions start..end-1 hold ranks start+1..end: their mean is (start+1+end)/2
        ranks[order[start:end]] = (start + 1 + end) / 2.0
        start = end
    return ranks


def rank_correlation(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman's rank correlation of paired scores (-1..1), ties handled.

    The Pearson correlation of the average ranks (ties share the mean of their ranks), the
    form that stays exact with ties, unlike 1 - 6 sum d^2 / (n (n^2 - 1)). Why ranks: for a
    policy that thresholds or sorts scores, what matters is whether two models order
    requests alike, not whether they are on the same scale. NaN when undefined: fewer than
    two pairs, or either side constant.
    """
    a, b = _pairs(xs, ys)
    if a.size < 2:
        return math.nan
    ra = _average_ranks(a) - (a.size + 1) / 2.0
    rb = _average_ranks(b) - (b.size + 1) / 2.0
    denominator = math.sqrt(float((ra * ra).sum()) * float((rb * rb).sum()))
    if denominator == 0.0:
        return math.nan
    return float((ra * rb).sum()) / denominator


def _pairs(xs: Sequence[float], ys: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    if len(xs) != len(ys):
        raise ValueError(f"paired sequences differ in length: {len(xs)} and {len(ys)}")
    return np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)


# ---------------------------------------------------------------------------------------
# Drift: population stability index
# ---------------------------------------------------------------------------------------

#: Below this PSI the distribution has not shifted (industry convention, credit scoring).
PSI_STABLE = 0.1
#: Above this PSI the shift is significant: the canary's drift alarm threshold.
PSI_ALARM = 0.25
#: Bins of the PSI: deciles of the reference.
PSI_BINS = 10
#: Share given to an empty bin so the logarithm stays finite.
PSI_EPSILON = 1e-4

DriftLevel = Literal["stable", "moderate", "significant"]


def psi(
    reference: Sequence[float],
    recent: Sequence[float],
    bins: int = PSI_BINS,
    epsilon: float = PSI_EPSILON,
) -> float:
    """Population stability index of `recent` against `reference`.

    PSI = sum over bins of (r_i - f_i) * ln(r_i / f_i), with f_i and r_i the shares of the
    reference and recent values in bin i. The bins are the reference's quantiles (deciles by
    default), so each holds about the same share of the reference and the index does not
    depend on the score's scale; edges repeated by ties are merged, and the outer bins are
    open to -inf and +inf so every recent value falls in one. An empty bin's share is raised
    to `epsilon` (an unseen region would otherwise make the index infinite).

    Conventional reading (see `drift_level`): < 0.1 no shift, 0.1 to 0.25 moderate,
    > 0.25 significant, the alarm. Why PSI rather than Kolmogorov-Smirnov: PSI's scale does
    not shrink with the sample size, so a fixed threshold means the same at 1 000 and at
    1 000 000 scores (a KS p-value flags any trivial shift once the windows are large), and
    it is symmetric and additive over bins, so a report can show which bins moved.

    Raises ValueError when either sample is empty.
    """
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    ref = np.asarray(reference, dtype=np.float64)
    new = np.asarray(recent, dtype=np.float64)
    if ref.size == 0 or new.size == 0:
        raise ValueError("psi needs a non-empty reference and recent sample")
    edges = np.unique(np.quantile(ref, np.arange(1, bins) / bins))
    slots = edges.size + 1
    f = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=slots) / ref.size
    r = np.bincount(np.searchsorted(edges, new, side="right"), minlength=slots) / new.size
    f = np.maximum(f, epsilon)
    r = np.maximum(r, epsilon)
    return float(((r - f) * np.log(r / f)).sum())


def drift_level(value: float) -> DriftLevel:
    """The conventional reading of a PSI: stable < 0.1 <= moderate <= 0.25 < significant."""
    if value < PSI_STABLE:
        return "stable"
    if value <= PSI_ALARM:
        return "moderate"
    return "significant"


# ---------------------------------------------------------------------------------------
# Error against the ground truth
# ---------------------------------------------------------------------------------------

TargetKind = Literal["regression", "classification"]

#: Probabilities are clipped to [LOG_LOSS_EPSILON, 1 - LOG_LOSS_EPSILON] in the log loss
#: (scikit-learn's convention), so one confident mistake costs about 34.5, not infinity.
LOG_LOSS_EPSILON = 1e-15
#: A probability at or above this predicts the positive class (accuracy).
CLASSIFICATION_THRESHOLD = 0.5


def request_error(kind: TargetKind, prediction: float, truth: float) -> float:
    """One request's error, the unit the paired comparison averages.

    Regression: the absolute error |prediction - truth| (so the paired mean difference is
    the difference of MAEs). Classification: the log loss of the probability `prediction`
    for the label `truth` (1.0 positive, 0.0 negative), which, unlike a 0/1 hit, rewards a
    well-calibrated probability and separates models on every request.
    """
    if kind == "regression":
        return abs(prediction - truth)
    p = min(max(prediction, LOG_LOSS_EPSILON), 1.0 - LOG_LOSS_EPSILON)
    return -math.log(p) if truth >= 0.5 else -math.log(1.0 - p)


@dataclass(frozen=True)
class RegressionError:
    """Error of numeric predictions: n pairs, mean absolute and root mean squared error."""

    n: int
    mae: float
    rmse: float


@dataclass(frozen=True)
class ClassificationError:
    """Error of probabilities of a binary label: n pairs, accuracy at 0.5, mean log loss."""

    n: int
    accuracy: float
    log_loss: float


def regression_error(predictions: Sequence[float], truths: Sequence[float]) -> RegressionError:
    """MAE and RMSE of predictions against the observed values (NaN when empty).

    Both are reported because they weigh mistakes differently: MAE is the typical miss in
    the target's units, RMSE grows with the large misses (it is at least the MAE; far above
    it means a few bad misses).
    """
    p, t = _pairs(predictions, truths)
    if p.size == 0:
        return RegressionError(0, math.nan, math.nan)
    miss = p - t
    return RegressionError(
        int(p.size), float(np.abs(miss).mean()), math.sqrt(float((miss * miss).mean()))
    )


def classification_error(
    probabilities: Sequence[float], labels: Sequence[float]
) -> ClassificationError:
    """Accuracy and log loss of positive-class probabilities against labels 1.0 / 0.0.

    Accuracy counts a hit when (probability >= 0.5) equals the label; log loss is the mean
    negative log-likelihood of the labels, probabilities clipped to [1e-15, 1 - 1e-15]. NaN
    when empty.
    """
    p, t = _pairs(probabilities, labels)
    if p.size == 0:
        return ClassificationError(0, math.nan, math.nan)
    positive = t >= 0.5
    hits = (p >= CLASSIFICATION_THRESHOLD) == positive
    clipped = np.clip(p, LOG_LOSS_EPSILON, 1.0 - LOG_LOSS_EPSILON)
    losses = -np.where(positive, np.log(clipped), np.log(1.0 - clipped))
    return ClassificationError(int(p.size), float(hits.mean()), float(losses.mean()))


def error_figures(
    kind: TargetKind, predictions: Sequence[float], truths: Sequence[float]
) -> RegressionError | ClassificationError:
    """The error measures that fit the target kind."""
    if kind == "regression":
        return regression_error(predictions, truths)
    return classification_error(predictions, truths)
