"""Quantile confidence sequences from log-bucket histograms."""

from __future__ import annotations

import math

import numpy as np
import pytest

from canary.observe.histogram import LogHistogram
from canary.stats import HistogramArrays, MetricKind, Verdict, quantile_cs, quantile_test
from canary.stats._quantiles import order_statistics


def _hist(values: np.ndarray, accuracy: float = 0.005) -> LogHistogram:
    h = LogHistogram(accuracy)
    for v in values:
        h.add(float(v))
    return h


def _arrays(h: LogHistogram) -> HistogramArrays:
    return HistogramArrays(*h.to_arrays(), h.accuracy)


def _sample(seed: int, n: int, scale: float = 1.0) -> np.ndarray:
    return scale * np.exp(0.5 * np.random.default_rng(seed).standard_normal(n))


def test_order_statistics_of_buckets_match_sorted_raw_values() -> None:
    y = _sample(1, 3000)
    h = _arrays(_hist(y))
    ranks = np.array([1, 17, 1500, 2850, 3000])
    got = order_statistics(h.values, np.cumsum(h.counts), ranks)
    exact = np.sort(y)[ranks - 1]
    # each bucket value is within the relative accuracy of every value in its bucket
    assert np.all(np.abs(got - exact) <= 0.005 * exact * (1 + 1e-12))
    assert np.all(np.isnan(order_statistics(h.values, np.cumsum(h.counts), [0, 3001])))


def test_widened_interval_brackets_the_order_statistics_of_the_raw_data() -> None:
    """The sequence built from buckets contains the one built from exact values."""
    y = _sample(2, 5000)
    exact = HistogramArrays(np.unique(y), np.ones(np.unique(y).size), 0.0)
    est, lo, hi = quantile_cs(_arrays(_hist(y)), 0.95, alpha=0.025)
    est_x, lo_x, hi_x = quantile_cs(exact, 0.95, alpha=0.025)
    assert lo <= lo_x and hi_x <= hi
    assert est == pytest.approx(est_x, rel=0.0051)


def test_sequence_covers_the_true_quantile() -> None:
    true_p95 = math.exp(0.5 * 1.6448536269514722)
    for seed in range(5):
        _, lo, hi = quantile_cs(_arrays(_hist(_sample(seed, 4000))), 0.95, alpha=0.05)
        assert lo < true_p95 < hi


def test_interval_nested_in_alpha_and_shrinking_with_n() -> None:
    y = _sample(3, 20000)
    h = _arrays(_hist(y))
    _, lo1, hi1 = quantile_cs(h, 0.9, alpha=0.01)
    _, lo2, hi2 = quantile_cs(h, 0.9, alpha=0.1)
    assert lo1 <= lo2 < hi2 <= hi1
    widths = []
    for n in (1000, 4000, 16000):
        _, lo, hi = quantile_cs(_arrays(_hist(y[:n])), 0.9, alpha=0.05)
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]


def test_small_samples_are_unbounded_and_unknown() -> None:
    h = _arrays(_hist(_sample(4, 5)))
    _, _, hi = quantile_cs(h, 0.99, alpha=0.05)
    assert hi == math.inf
    res = quantile_test(h, h, 0.99, 0.1, burn_in=0)
    assert res.verdict is Verdict.UNKNOWN and res.upper == math.inf


def test_test_detects_regressions_and_accepts_within_margin() -> None:
    prod = _arrays(_hist(_sample(5, 40000)))
    slow = _arrays(_hist(_sample(6, 4000, scale=1.5)))
    same = _arrays(_hist(_sample(7, 4000)))
    worse = quantile_test(prod, slow, 0.95, 0.10, name="latency_p95")
    assert worse.verdict is Verdict.WORSE and worse.kind is MetricKind.QUANTILE
    assert worse.lower > 1.1 and worse.lower <= 1.5 <= worse.upper
    fine = quantile_test(prod, same, 0.95, 0.25)
    assert fine.verdict is Verdict.OK
    absolute = quantile_test(prod, slow, 0.5, 0.1, relative=False)
    assert absolute.verdict is Verdict.WORSE and absolute.lower > 0.1
    assert worse.explain().startswith("latency_p95: candidate/production ratio")


def test_merging_histograms_in_any_order_gives_the_same_result() -> None:
    y = _sample(8, 6000)
    parts = [_hist(y[i::3]) for i in range(3)]
    results = []
    for order in ((0, 1, 2), (2, 1, 0), (1, 0, 2)):
        h = parts[order[0]].copy()
        for i in order[1:]:
            h.merge(parts[i])
        results.append(quantile_cs(_arrays(h), 0.95, alpha=0.05))
    assert results[0] == results[1] == results[2]
    assert results[0] == quantile_cs(_arrays(_hist(y)), 0.95, alpha=0.05)


@pytest.mark.parametrize(
    ("values", "counts", "accuracy", "needle"),
    [
        ([2.0, 1.0], [1, 1], 0.005, "ascending"),
        ([1.0, 2.0], [1, -1], 0.005, "-1"),
        ([1.0, 2.0], [1, 0.5], 0.005, "0.5"),
        ([1.0, 2.0], [1, 1], 1.5, "1.5"),
        ([1.0], [1, 2], 0.005, "equal length"),
    ],
)
def test_histogram_arrays_reject_bad_input(
    values: list[float], counts: list[float], accuracy: float, needle: str
) -> None:
    with pytest.raises(ValueError, match=needle):
        HistogramArrays(np.array(values), np.array(counts), accuracy)


def test_quantile_level_is_checked() -> None:
    h = _arrays(_hist(_sample(9, 100)))
    with pytest.raises(ValueError, match=r"1\.2"):
        quantile_test(h, h, 1.2, 0.1)
