"""``stat: distribution``: every quantile of a grid at once, post-stratified, clustered.

References are the per-quantile :func:`stratified_quantile_test` at ``alpha / K`` (the union
bound the test is built on) and plain numpy quantiles of the raw observations.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from canary.stats import (
    DISTRIBUTION_QUANTILES,
    ClusterHistogram,
    Direction,
    MetricKind,
    StratifiedHistogram,
    Verdict,
    distribution_test,
    stratified_quantile_test,
)

G = 64


def _hist(y: np.ndarray, prop: np.ndarray) -> StratifiedHistogram:
    keys = np.unique(prop)
    values = np.unique(np.round(y, 6))
    counts = np.zeros((keys.size, values.size))
    np.add.at(counts, (np.searchsorted(keys, prop), np.searchsorted(values, np.round(y, 6))), 1)
    return StratifiedHistogram(keys, values, counts, 0.0)


def _arms(
    seed: int, n: int, weight: float, candidate: object = None
) -> tuple[StratifiedHistogram, StratifiedHistogram, np.ndarray, np.ndarray]:
    """Lognormal latency on both arms; ``candidate(noise, y)`` changes the candidate's."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 0.5, n)
    y = np.exp(z)
    cand = rng.random(n) < weight
    if candidate is not None:
        y = np.where(cand, candidate(z, y), y)  # type: ignore[operator]
    prop = np.where(cand, weight, 1.0 - weight)
    return _hist(y[~cand], prop[~cand]), _hist(y[cand], prop[cand]), y, cand


def _slow_between(lo: float, hi: float, factor: float):  # type: ignore[no-untyped-def]
    """Multiply the values whose own quantile lies in [lo, hi] (a regression in one part)."""
    from scipy.special import ndtri

    a, b = 0.5 * ndtri(lo), 0.5 * ndtri(hi)
    return lambda z, y: np.where((z >= a) & (z <= b), y * factor, y)


def test_the_band_is_the_union_of_the_per_quantile_intervals_at_alpha_over_k() -> None:
    hp, hc, _, _ = _arms(1, 30000, 0.2)
    qs = (0.1, 0.5, 0.9, 0.99)
    r = distribution_test(hp, hc, 0.1, quantiles=qs, alpha=0.05)
    each = [stratified_quantile_test(hp, hc, q, 0.1, alpha=0.05 / len(qs)) for q in qs]
    assert r.kind is MetricKind.DISTRIBUTION
    assert r.lower == max(e.lower for e in each)
    assert r.upper == max(e.upper for e in each)
    assert r.estimate == max(e.estimate for e in each)
    assert r.alpha == 0.05
    assert "4 quantiles p10-p99" in r.detail and "worst at" in r.detail


def test_a_regression_in_the_middle_is_caught_where_single_percentiles_look_elsewhere() -> None:
    # The candidate is 25% slower between its p65 and p85 only: p50, p95 and p99 are equal.
    hp, hc, y, cand = _arms(2, 60000, 0.3, _slow_between(0.65, 0.85, 1.25))
    for q in (0.5, 0.95, 0.99):
        ratio = np.quantile(y[cand], q) / np.quantile(y[~cand], q)
        assert abs(ratio - 1.0) < 0.04, (q, ratio)
        single = stratified_quantile_test(hp, hc, q, 0.10)
        assert single.verdict is not Verdict.WORSE, (q, single.explain())
    r = distribution_test(hp, hc, 0.10)
    assert r.verdict is Verdict.WORSE, r.explain()
    assert r.lower > 1.10
    worst = float(r.detail.split("worst at p")[1].split(":")[0])
    assert 65 <= worst <= 85, r.detail


def test_identical_arms_are_ok_with_enough_samples_and_unknown_before() -> None:
    hp, hc, _, _ = _arms(3, 200000, 0.5)
    r = distribution_test(hp, hc, 0.10)
    assert r.verdict is Verdict.OK, r.explain()
    assert r.lower < 1.0 < r.upper <= 1.10
    few_p, few_c, _, _ = _arms(3, 2000, 0.5)
    assert distribution_test(few_p, few_c, 0.10).verdict is Verdict.UNKNOWN


def test_the_tails_hold_promotion_back() -> None:
    # OK needs every quantile: at a sample size where the middle is OK, p99 is not yet.
    hp, hc, _, _ = _arms(4, 30000, 0.2)
    middle = distribution_test(hp, hc, 0.10, quantiles=(0.25, 0.5, 0.75))
    whole = distribution_test(hp, hc, 0.10)
    assert middle.verdict is Verdict.OK, middle.explain()
    assert whole.verdict is Verdict.UNKNOWN, whole.explain()
    assert whole.upper > middle.upper


def test_lower_is_worse_takes_the_smallest_ratio() -> None:
    # tokens/s: the candidate is 30% slower (lower) below its median only.
    hp, hc, _, _ = _arms(5, 60000, 0.3, lambda z, y: np.where(z < 0, y * 0.7, y))
    r = distribution_test(hp, hc, 0.10, direction=Direction.DECREASE)
    assert r.verdict is Verdict.WORSE, r.explain()
    assert r.upper < 0.9 and r.estimate < 0.8
    assert distribution_test(hp, hc, 0.10).verdict is not Verdict.WORSE  # not worse upward


def test_burn_in_and_empty_arms_give_unknown() -> None:
    hp, hc, _, _ = _arms(6, 1000, 0.05)
    assert distribution_test(hp, hc, 0.0, burn_in=10_000).verdict is Verdict.UNKNOWN
    empty = StratifiedHistogram(np.zeros(0), np.zeros(0), np.zeros((0, 0)))
    r = distribution_test(empty, hc, 0.1)
    assert r.verdict is Verdict.UNKNOWN and math.isnan(r.estimate)
    assert r.lower == -math.inf and r.upper == math.inf


@pytest.mark.parametrize(
    ("kw", "fragment"),
    [
        ({"quantiles": ()}, "at least one level"),
        ({"quantiles": (0.5, 1.0)}, "quantiles"),
        ({"alpha": 0.0}, "alpha"),
        ({"margin": -0.1}, "margin"),
    ],
)
def test_bad_arguments_echo_the_value(kw: dict[str, object], fragment: str) -> None:
    hp, hc, _, _ = _arms(7, 1000, 0.5)
    args: dict[str, object] = {"margin": 0.1, **kw}
    margin = args.pop("margin")
    with pytest.raises(ValueError, match=fragment):
        distribution_test(hp, hc, margin, **args)  # type: ignore[arg-type]


def test_default_grid() -> None:
    assert DISTRIBUTION_QUANTILES[0] == 0.05 and DISTRIBUTION_QUANTILES[-1] == 0.99
    assert len(DISTRIBUTION_QUANTILES) == 20
    assert list(DISTRIBUTION_QUANTILES) == sorted(set(DISTRIBUTION_QUANTILES))


def _sticky_hists(
    seed: int, users: int, n: int, weight: float
) -> tuple[StratifiedHistogram, StratifiedHistogram, tuple[ClusterHistogram, ClusterHistogram]]:
    rng = np.random.default_rng(seed)
    user = rng.integers(0, users, n)
    level = rng.normal(0.0, 0.5, users)
    on_cand = rng.random(users) < weight
    cl_of = rng.integers(0, G, users)
    y = np.exp(level[user] + rng.normal(0.0, 0.5, n))
    cand, cl = on_cand[user], cl_of[user]
    prop = np.where(cand, weight, 1.0 - weight)
    edges = np.exp(np.arange(-3.0, 3.0, 0.15))
    out = []
    for mask in (~cand, cand):
        keys = np.unique(prop[mask])
        counts = np.zeros((keys.size, edges.size + 1, G))
        b = np.searchsorted(edges, y[mask])
        np.add.at(counts, (np.searchsorted(keys, prop[mask]), b, cl[mask]), 1)
        out.append(ClusterHistogram(keys, np.append(edges, 1e9), counts))
    return _hist(y[~cand], prop[~cand]), _hist(y[cand], prop[cand]), (out[0], out[1])


def test_sticky_users_widen_every_quantile() -> None:
    hp, hc, cl = _sticky_hists(8, users=300, n=40000, weight=0.2)
    plain = distribution_test(hp, hc, 0.0)
    robust = distribution_test(hp, hc, 0.0, clusters=cl)
    assert robust.lower <= plain.lower and robust.upper >= plain.upper
    assert (robust.upper - robust.lower) > 1.5 * (plain.upper - plain.lower)


def test_sticky_a_a_rarely_rolls_back() -> None:
    # 60 A/A runs with 200 users who differ, each looked at once: the request-level
    # band would roll back often (the users' levels dominate); the clustered one at most
    # alpha of the time (a binomial(60, 0.05) exceeds 8 with probability < 0.5%).
    false_plain = false_robust = 0
    for seed in range(60):
        rng_seed = 1000 + seed
        hp_all = _sticky_hists(rng_seed, users=200, n=20000, weight=0.3)
        hp, hc, cl = hp_all
        plain = distribution_test(hp, hc, 0.0, t_opt=5000.0)
        robust = distribution_test(hp, hc, 0.0, clusters=cl, t_opt=5000.0)
        false_plain += plain.verdict is Verdict.WORSE
        false_robust += robust.verdict is Verdict.WORSE
    assert false_robust <= 8, false_robust
    assert false_plain >= 15, false_plain
