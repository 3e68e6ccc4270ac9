"""Design-based tests: post-stratification by split, cluster-robust variances, quantiles.

Reference values are computed here independently with plain numpy on the raw observations
(per-request data, not the sufficient statistics the library reads).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as sps

from canary.stats import (
    ArmClusters,
    ArmMoments,
    ClusterHistogram,
    Direction,
    MetricKind,
    StratifiedHistogram,
    Verdict,
    design_summary,
    few_clusters_factor,
    mean_test,
    normal_mixture_radius,
    normal_mixture_rho2,
    proportion_test,
    stratified_quantile_test,
)
from canary.stats._design import SHADOW, design_strata, effective_clusters, stratum_key
from canary.stats._design_tests import DEFAULT_DESIGN_T_OPT

G = 64


def test_few_clusters_factor_is_cr1_times_the_t_over_normal_ratio() -> None:
    for g in (2, 5, 10, 64):
        q = 1 - 0.05 / 2
        want = g / (g - 1) * (sps.t.ppf(q, g - 1) / sps.norm.ppf(q)) ** 2
        assert few_clusters_factor(g, 0.05) == pytest.approx(want, rel=1e-12)
    assert few_clusters_factor(1, 0.05) == math.inf
    assert few_clusters_factor(0, 0.05) == math.inf
    factors = [few_clusters_factor(g, 0.01) for g in range(2, 65)]
    assert all(a > b for a, b in itertools.pairwise(factors))
    assert 1.0 < few_clusters_factor(64, 0.05) < 1.06


def test_effective_clusters_count_equal_clusters_and_shrink_with_a_heavy_one() -> None:
    coef = np.array([0.5, 0.25])
    equal = np.full((2, 40), 10.0)
    assert effective_clusters(equal, coef) == pytest.approx(40.0)
    heavy = equal.copy()
    heavy[:, 0] = 2000.0  # one user with 200x the requests of the others
    assert 1.0 < effective_clusters(heavy, coef) < 1.1
    # Reference: Satterthwaite's (sum v)^2 / sum v^2 with v_g = a_g^2.
    rng = np.random.default_rng(5)
    n = rng.integers(0, 50, (3, 64)).astype(float)
    c = np.array([0.1, 0.3, 0.6])
    a = (c[:, None] * n).sum(axis=0)
    assert effective_clusters(n, c) == pytest.approx((a**2).sum() ** 2 / (a**4).sum(), rel=1e-12)
    assert effective_clusters(np.zeros((2, 0)), coef) == 0.0
    # Fractional counts are allowed; one cluster or fewer has no variance estimate.
    assert few_clusters_factor(2.5, 0.05) > few_clusters_factor(3, 0.05)
    assert few_clusters_factor(1.0, 0.05) == math.inf


def test_stratum_keys_pair_the_arms_and_keep_shadow_apart() -> None:
    assert stratum_key(0.05, "candidate") == stratum_key(0.95, "production") == 0.05
    assert stratum_key(1.0, "candidate") == stratum_key(1.0, "production") == SHADOW


def _draw(seed: int, strata: list[tuple[float, int, float]]) -> dict[str, np.ndarray]:
    """Requests of several strata (candidate share, count, level): arm, propensity, value."""
    rng = np.random.default_rng(seed)
    pi = np.concatenate([np.full(n, w) for w, n, _ in strata])
    level = np.concatenate([np.full(n, lv) for _, n, lv in strata])
    cand = rng.random(pi.size) < pi
    y = (rng.random(pi.size) < level).astype(float)
    prop = np.where(cand, pi, 1 - pi)
    return {"cand": cand, "prop": prop, "y": y, "pi": pi}


def test_design_summary_is_the_post_stratified_mean_and_variance() -> None:
    d = _draw(1, [(0.05, 4000, 0.01), (0.5, 3000, 0.05)])
    c, p = d["cand"], ~d["cand"]
    prod = ArmMoments.from_values(d["y"][p], d["prop"][p])
    cand = ArmMoments.from_values(d["y"][c], d["prop"][c])
    keys, cells = design_strata(
        np.array([stratum_key(x, "production") for x in prod.propensity]),
        (prod.n, prod.sum, prod.sumsq),
        np.array([stratum_key(x, "candidate") for x in cand.propensity]),
        (cand.n, cand.sum, cand.sumsq),
    )
    s = design_summary(keys, *cells)
    # Reference: per-stratum means weighted by the stratum's share of all requests.
    t = d["pi"].size
    mc = mp = vc = vp = 0.0
    for w in (0.05, 0.5):
        sel = d["pi"] == w
        ys_c, ys_p = d["y"][sel & c], d["y"][sel & p]
        share = sel.sum() / t
        mc += share * ys_c.mean()
        mp += share * ys_p.mean()
        vc += share**2 * ys_c.var(ddof=1) / ys_c.size
        vp += share**2 * ys_p.var(ddof=1) / ys_p.size
    assert s.mean_c == pytest.approx(mc, rel=1e-12)
    assert s.mean_p == pytest.approx(mp, rel=1e-12)
    assert s.var_c == pytest.approx(t * vc, rel=1e-9)
    assert s.var_p == pytest.approx(t * vp, rel=1e-9)
    assert s.t == t


def test_pooling_a_drifting_rate_across_steps_is_biased_post_stratifying_is_not() -> None:
    # Both arms identical; the error rate rises from 1% (candidate at 5%) to 5% (at 50%).
    d = _draw(2, [(0.05, 20000, 0.01), (0.5, 20000, 0.05)])
    c, p = d["cand"], ~d["cand"]
    pooled = d["y"][c].mean() - d["y"][p].mean()
    assert pooled > 0.015  # the candidate's samples come mostly from the later, worse period
    r = proportion_test(
        ArmMoments.from_values(d["y"][p], d["prop"][p]),
        ArmMoments.from_values(d["y"][c], d["prop"][c]),
        0.0,
        kind=MetricKind.ERROR_RATE,
        name="errors",
    )
    assert abs(r.estimate) < 0.008
    assert r.lower < 0 < r.upper < pooled
    assert r.verdict is not Verdict.WORSE
    assert r.kind is MetricKind.ERROR_RATE


def test_proportion_interval_is_the_normal_mixture_radius_on_the_contrast() -> None:
    d = _draw(3, [(0.2, 5000, 0.3)])
    c, p = d["cand"], ~d["cand"]
    r = proportion_test(
        ArmMoments.from_values(d["y"][p], d["prop"][p]),
        ArmMoments.from_values(d["y"][c], d["prop"][c]),
        0.05,
        direction=Direction.INCREASE,
        alpha=0.05,
    )
    t = d["y"].size
    yc, yp = d["y"][c], d["y"][p]
    s2c, s2p = yc.var(ddof=1), yp.var(ddof=1)
    # Each arm's per-observation variance is floored by the other arm's (as for means).
    var = t * (max(s2c, s2p) / yc.size + max(s2p, s2c) / yp.size)
    g = float(normal_mixture_radius(t, normal_mixture_rho2(DEFAULT_DESIGN_T_OPT, 0.05), 0.05))
    est = yc.mean() - yp.mean()
    assert r.estimate == pytest.approx(est, rel=1e-12)
    assert r.upper - r.estimate == pytest.approx(g * math.sqrt(var), rel=1e-9)


def test_no_events_still_give_an_honest_interval() -> None:
    prod = ArmMoments.from_values(np.zeros(19000), np.full(19000, 0.95))
    cand = ArmMoments.from_values(np.zeros(1000), np.full(1000, 0.05))
    r = proportion_test(prod, cand, 0.005, kind=MetricKind.ERROR_RATE)
    # 1000 candidate requests without an error cannot prove a rate below ~0.3%.
    assert r.upper > 0.002
    assert r.verdict is not Verdict.OK or r.upper < 0.005


def _sticky(
    seed: int, users: int, requests: int, weight: float, user_sd: float
) -> tuple[np.ndarray, ...]:
    """Sticky users with persistent latency levels: arm, propensity, value, cluster."""
    rng = np.random.default_rng(seed)
    user = rng.integers(0, users, requests)
    point = rng.random(users)
    cluster_of = rng.integers(0, G, users)
    cand = point[user] < weight
    y = np.exp(rng.normal(0, user_sd, users)[user] + rng.normal(0, 0.3, requests))
    prop = np.where(cand, weight, 1 - weight)
    return cand, prop, y, cluster_of[user]


def _clusters(mask: np.ndarray, prop: np.ndarray, y: np.ndarray, cl: np.ndarray) -> ArmClusters:
    keys = np.unique(prop[mask])
    n = np.zeros((keys.size, G))
    s = np.zeros((keys.size, G))
    k = np.searchsorted(keys, prop[mask])
    np.add.at(n, (k, cl[mask]), 1)
    np.add.at(s, (k, cl[mask]), y[mask])
    return ArmClusters(keys, n, s)


def test_clusters_widen_the_mean_interval_by_the_users_share_of_the_variance() -> None:
    cand, prop, y, cl = _sticky(4, users=300, requests=30000, weight=0.2, user_sd=0.5)
    c, p = cand, ~cand
    prod_m = ArmMoments.from_values(y[p], prop[p])
    cand_m = ArmMoments.from_values(y[c], prop[c])
    plain = mean_test(prod_m, cand_m, 0.1)
    robust = mean_test(
        prod_m, cand_m, 0.1, clusters=(_clusters(p, prop, y, cl), _clusters(c, prop, y, cl))
    )
    # With 30000 requests from 300 users the users, not the requests, carry the variance.
    assert (robust.upper - robust.lower) > 3 * (plain.upper - plain.lower)
    assert "clusters" in robust.detail
    assert robust.estimate == plain.estimate


def test_clusters_of_single_requests_change_little() -> None:
    rng = np.random.default_rng(5)
    n = 20000
    cand = rng.random(n) < 0.3
    prop = np.where(cand, 0.3, 0.7)
    y = (rng.random(n) < 0.1).astype(float)
    cl = rng.integers(0, G, n)  # every request its own user, spread over the clusters
    c, p = cand, ~cand
    prod_m = ArmMoments.from_values(y[p], prop[p])
    cand_m = ArmMoments.from_values(y[c], prop[c])
    plain = proportion_test(prod_m, cand_m, 0.01)
    robust = proportion_test(
        prod_m, cand_m, 0.01, clusters=(_clusters(p, prop, y, cl), _clusters(c, prop, y, cl))
    )
    ratio = (robust.upper - robust.lower) / (plain.upper - plain.lower)
    assert 1.0 <= ratio < 1.3


def _strat_hist(mask: np.ndarray, prop: np.ndarray, y: np.ndarray) -> StratifiedHistogram:
    keys = np.unique(prop[mask])
    values = np.unique(np.round(y[mask], 6))
    counts = np.zeros((keys.size, values.size))
    np.add.at(counts, (np.searchsorted(keys, prop[mask]),
                       np.searchsorted(values, np.round(y[mask], 6))), 1)  # fmt: skip
    return StratifiedHistogram(keys, values, counts, 0.0)


def test_quantile_of_one_stratum_is_the_sample_quantile_and_covers_it() -> None:
    rng = np.random.default_rng(6)
    y = rng.lognormal(0, 0.5, 20000)
    cand = rng.random(y.size) < 0.1
    prop = np.where(cand, 0.1, 0.9)
    r = stratified_quantile_test(_strat_hist(~cand, prop, y), _strat_hist(cand, prop, y), 0.95, 0.1)
    qc = np.quantile(np.round(y[cand], 6), 0.95, method="inverted_cdf")
    qp = np.quantile(np.round(y[~cand], 6), 0.95, method="inverted_cdf")
    assert r.estimate == pytest.approx(qc / qp, rel=1e-9)
    assert r.lower < 1.0 < r.upper
    assert r.verdict is not Verdict.WORSE


def test_quantiles_are_compared_within_the_same_periods() -> None:
    # Latency doubles between a 5% step and a 50% step, on both arms alike.
    rng = np.random.default_rng(7)
    pi = np.repeat([0.05, 0.5], 20000)
    scale = np.repeat([1.0, 2.0], 20000)
    y = rng.lognormal(0, 0.3, pi.size) * scale
    cand = rng.random(pi.size) < pi
    prop = np.where(cand, pi, 1 - pi)
    pooled = np.quantile(y[cand], 0.5) / np.quantile(y[~cand], 0.5)
    assert pooled > 1.3
    r = stratified_quantile_test(_strat_hist(~cand, prop, y), _strat_hist(cand, prop, y), 0.5, 0.1)
    assert r.lower < 1.0 < r.upper
    assert r.verdict is not Verdict.WORSE
    assert 0.9 < r.estimate < 1.1


def _cluster_hist(
    mask: np.ndarray, prop: np.ndarray, y: np.ndarray, cl: np.ndarray
) -> ClusterHistogram:
    keys = np.unique(prop[mask])
    edges = np.exp(np.arange(-3.0, 3.0, 0.15))
    b = np.searchsorted(edges, y[mask])
    counts = np.zeros((keys.size, edges.size + 1, G))
    np.add.at(counts, (np.searchsorted(keys, prop[mask]), b, cl[mask]), 1)
    upper = np.append(edges, 1e9)
    return ClusterHistogram(keys, upper, counts)


def test_sticky_users_give_the_quantile_a_design_effect() -> None:
    cand, prop, y, cl = _sticky(8, users=200, requests=40000, weight=0.1, user_sd=0.5)
    c, p = cand, ~cand
    hp, hc = _strat_hist(p, prop, y), _strat_hist(c, prop, y)
    plain = stratified_quantile_test(hp, hc, 0.95, 0.0)
    robust = stratified_quantile_test(
        hp, hc, 0.95, 0.0, clusters=(_cluster_hist(p, prop, y, cl), _cluster_hist(c, prop, y, cl))
    )
    assert "design effect" in robust.detail
    assert robust.lower <= plain.lower and robust.upper >= plain.upper
    assert (robust.upper - robust.lower) > 2 * (plain.upper - plain.lower)
