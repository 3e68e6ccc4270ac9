"""The CI form of the simulation harness, and checks that it computes what the library does.

``loadtest.stats_sim --fast`` simulates a few hundred rollouts per metric kind with the tests
evaluated after every request and asserts the targets: false rollback and false promotion
rates <= alpha (a rate counts as too high only when its 99.9% Clopper-Pearson lower bound is
above alpha, so Monte-Carlo noise cannot fail the build), median samples to detect +10% mean
latency <= 1.3x the fixed-sample size for 80% power (bootstrap), and a 2x slower or
20%-failing candidate rolled back within 200 candidate requests.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from canary.stats import (
    ArmMoments,
    HistogramArrays,
    bernoulli_cs,
    mean_test,
    quantile_cs,
    rate_ratio_cs,
)
from loadtest import stats_sim


def test_fast_simulation_meets_the_targets() -> None:
    outcomes = stats_sim.run("fast", seed=20240601)
    kinds = {o.scenario.kind for o in outcomes if o.scenario.group == "aa"}
    assert kinds == {"mean", "quantile", "error", "rate", "srm"}
    assert all(o.scenario.runs >= 300 for o in outcomes)
    failures = stats_sim.check_targets(outcomes)
    assert not failures, "\n".join(failures)
    # The baselines really do fail under continuous monitoring (the point of the harness).
    naive = next(o.worse["naive"] for o in outcomes if o.scenario.key == "mean-aa-s05")
    assert stats_sim.lower_bound(naive) > 0.05


def _scenario(**kw: object) -> stats_sim.Scenario:
    base: dict[str, object] = {
        "key": "t",
        "title": "t",
        "kind": "mean",
        "group": "aa",
        "runs": 3,
        "steps": ((0.1, 3000), (0.3, 1500)),
    }
    base.update(kw)
    return stats_sim.Scenario(**base)  # type: ignore[arg-type]


def test_simulated_mean_intervals_equal_the_library_on_the_same_data() -> None:
    sc = _scenario(scale=1.1)
    st, y = stats_sim.latency_stream(sc, np.random.default_rng(1), sc.runs)
    lo, hi, n_c, _ = stats_sim.mean_intervals(sc, st, y)["anytime"]
    for r in range(sc.runs):
        for t in (499, 2999, 3600, 4499):
            a, pi, yy = st.a[r, : t + 1], st.pi[: t + 1], y[r, : t + 1]
            res = mean_test(
                ArmMoments.from_values(yy[~a], 1 - pi[~a]),
                ArmMoments.from_values(yy[a], pi[a]),
                0.0,
                burn_in=0,
            )
            assert lo[r, t] == pytest.approx(res.lower, rel=1e-9)
            assert hi[r, t] == pytest.approx(res.upper, rel=1e-9)
            assert n_c[r, t] == res.n_candidate


def test_prefix_order_statistics_match_sorting() -> None:
    rng = np.random.default_rng(2)
    buckets = rng.integers(0, 40, 500)
    prefixes = np.array([0, 1, 7, 100, 250, 500])
    po = stats_sim.PrefixOrder(buckets, prefixes, 40)
    for row, n in enumerate(prefixes):
        for rank in (0, 1, n // 2, n, n + 1):
            got = int(po.bucket(np.array([row]), np.array([rank]))[0])
            if rank < 1:
                assert got == -1
            elif rank > n:
                assert got == 40
            else:
                assert got == np.sort(buckets[:n])[rank - 1]


def test_simulated_arm_bounds_and_ratio_equal_the_library() -> None:
    sc = _scenario(kind="error", relative=False, runs=2)
    rng = np.random.default_rng(3)
    st = stats_sim.make_stream(sc, rng, sc.runs)
    event = rng.random(st.a.shape) < 0.05
    lo, hi = stats_sim._arm_bounds(st.a, event, 0.0125)
    r_lo, r_hi = stats_sim._ratio_codes_per_request(st, event, 0.025)
    for r in range(sc.runs):
        for t in (10, 2999, 4499):
            a, e = st.a[r, : t + 1], event[r, : t + 1]
            (ref_lo,), (ref_hi,) = bernoulli_cs(a.sum(), (a & e).sum(), 0.0125)
            assert (lo[r, t], hi[r, t]) == pytest.approx((ref_lo, ref_hi), rel=1e-12)
            strata = st.stratum[: t + 1]
            k = [(a & e & (strata == s)).sum() for s in (0, 1)]
            m = [(~a & e & (strata == s)).sum() for s in (0, 1)]
            b_lo, b_hi = rate_ratio_cs([0.1, 0.3], k, m, 0.025)
            assert r_lo[r, t] == pytest.approx(math.exp(float(b_lo)), rel=1e-9)
            assert r_hi[r, t] == pytest.approx(math.exp(float(b_hi)), rel=1e-9)


def test_simulated_quantile_bounds_equal_the_library() -> None:
    """The rank bounds and bucket bounds of the harness are those of ``quantile_cs``."""
    sc = _scenario(kind="quantile", steps=((0.5, 2000),))
    tab = stats_sim._quantile_tables(sc)
    y = np.exp(0.5 * np.random.default_rng(4).standard_normal(700))
    bt = stats_sim.bucket_tables(y)
    values, counts = np.unique(
        stats_sim.bucket_value(stats_sim.bucket_index(y)), return_counts=True
    )
    hist = HistogramArrays(values, counts.astype(float), 0.005)
    po = stats_sim.PrefixOrder(bt.local, np.array([200, 700]), bt.nb)
    for row, n in enumerate((200, 700)):
        sub = stats_sim.bucket_value(stats_sim.bucket_index(y[:n]))
        v, c = np.unique(sub, return_counts=True)
        _, lo, hi = quantile_cs(HistogramArrays(v, c.astype(float), 0.005), 0.95, alpha=0.025)
        rows = np.array([row])
        lo_b = po.bucket(rows, tab.kl[[n]])
        hi_b = po.bucket(rows, tab.kh[[n]] + 1)
        assert stats_sim._vals(lo_b, bt.lo_val, bt.nb)[0] == pytest.approx(lo, rel=1e-12)
        assert stats_sim._vals(hi_b, bt.hi_val, bt.nb)[0] == pytest.approx(hi, rel=1e-12)
    assert hist.total == 700
