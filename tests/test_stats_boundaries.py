"""Time-uniform boundaries against independent computations (scipy root finding, closed forms)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize, special

from canary.stats import (
    bernoulli_cs,
    normal_mixture_radius,
    normal_mixture_rho2,
    quantile_rank_bounds,
    rate_ratio_cs,
)


def test_radius_matches_formula() -> None:
    t, rho2, alpha = np.array([1.0, 10.0, 1e4]), 0.01, 0.05
    v = t * rho2 + 1
    expected = np.sqrt(2 * v / (t**2 * rho2) * np.log(np.sqrt(v) / alpha))
    np.testing.assert_allclose(normal_mixture_radius(t, rho2, alpha), expected, rtol=1e-12)
    assert np.isinf(normal_mixture_radius(0.0, rho2, alpha))


@pytest.mark.parametrize("alpha", [0.001, 0.05, 0.2])
def test_rho2_minimises_radius_at_t_opt(alpha: float) -> None:
    t_opt = 5000.0
    rho2 = normal_mixture_rho2(t_opt, alpha)
    best = normal_mixture_radius(t_opt, rho2, alpha)
    # A scan over rho2 finds nothing narrower (to grid resolution).
    scan = normal_mixture_radius(t_opt, rho2 * np.exp(np.linspace(-2, 2, 401)), alpha)
    assert best <= scan.min() * (1 + 1e-6)


def test_radius_decreases_with_time_and_grows_as_alpha_shrinks() -> None:
    t = np.arange(1, 100_000, 37, dtype=float)
    g = normal_mixture_radius(t, normal_mixture_rho2(1e4, 0.05), 0.05)
    assert np.all(np.diff(g) < 0)
    g_small = normal_mixture_radius(t, normal_mixture_rho2(1e4, 0.05), 0.01)
    assert np.all(g_small > g)


@pytest.mark.parametrize("q", [0.5, 0.95, 0.99])
def test_quantile_rank_bounds_match_a_brute_force_scan(q: float) -> None:
    alpha, t_opt = 0.025, 1000.0
    c = normal_mixture_rho2(t_opt, alpha) * t_opt
    r = max(t_opt / c - 1.0, 1.0)
    a, b = r * q, r * (1 - q)
    for n in (1, 7, 50, 333, 2000):
        k = np.arange(n + 1)
        log_m = (
            special.betaln(a + k, b + n - k)
            - special.betaln(a, b)
            - k * math.log(q)
            - (n - k) * math.log1p(-q)
        )
        accepted = k[log_m < math.log(1 / alpha)]
        k_lo, k_hi = quantile_rank_bounds(n, q, alpha, t_opt)
        assert (k_lo[0], k_hi[0]) == (accepted.min(), accepted.max())
        # accepted ranks are contiguous (log M is convex in k)
        assert accepted.size == accepted.max() - accepted.min() + 1


def _bernoulli_reference(n: float, s: float, alpha: float) -> tuple[float, float]:
    a = b = 0.5
    log_c = special.betaln(a + s, b + n - s) - special.betaln(a, b) - math.log(1 / alpha)

    def g(mu: float) -> float:
        return (s * math.log(mu) if s else 0.0) + ((n - s) * math.log1p(-mu) if n - s else 0.0)

    p = s / n
    lo = optimize.brentq(lambda mu: g(mu) - log_c, 1e-300, p, xtol=1e-15) if s > 0 else 0.0
    hi = optimize.brentq(lambda mu: g(mu) - log_c, p, 1 - 1e-16, xtol=1e-15) if s < n else 1.0
    return lo, hi


@pytest.mark.parametrize(
    ("n", "s"), [(1, 0), (10, 0), (10, 10), (100, 37), (1000, 1.5), (5, 2.5), (10**6, 9000)]
)
def test_bernoulli_cs_matches_root_finding(n: float, s: float) -> None:
    lo, hi = bernoulli_cs(n, s, 0.05)
    ref_lo, ref_hi = _bernoulli_reference(n, s, 0.05)
    # both solve the same smooth equation; tolerance is root-finding precision
    assert lo[0] == pytest.approx(ref_lo, rel=1e-7, abs=1e-12)
    assert hi[0] == pytest.approx(ref_hi, rel=1e-7, abs=1e-12)


def test_bernoulli_cs_properties() -> None:
    n = np.array([0.0, 20, 200, 2000, 20000])
    s = np.round(n * 0.3)
    lo, hi = bernoulli_cs(n, s, 0.05)
    assert (lo[0], hi[0]) == (0.0, 1.0)
    assert np.all(lo <= s / np.maximum(n, 1)) and np.all(s / np.maximum(n, 1) <= hi)
    width = hi - lo
    assert np.all(np.diff(width) < 0)  # shrinks with n at a fixed proportion
    lo2, hi2 = bernoulli_cs(n, s, 0.01)
    assert np.all(lo2 <= lo) and np.all(hi2 >= hi)  # nested in alpha


def _ratio_reference(k: int, m: int, alpha: float, h: float) -> tuple[float, float]:
    """pi = 1/2: theta = sigmoid(beta) with a Beta(h, h) prior on theta, in closed form."""
    log_z = special.betaln(h + k, h + m) - special.betaln(h, h)
    thr = math.log(alpha) + log_z

    def f(b: float) -> float:
        return -k * np.logaddexp(0, -b) - m * np.logaddexp(0, b) - thr

    mle = math.log(k / m) if k and m else (60.0 if k else -60.0)
    lo = optimize.brentq(f, -300, mle, xtol=1e-14) if k else -math.inf
    hi = optimize.brentq(f, mle, 300, xtol=1e-14) if m else math.inf
    return lo, hi


@pytest.mark.parametrize(("k", "m"), [(3, 0), (0, 5), (10, 12), (200, 150), (1, 1), (50, 3)])
def test_rate_ratio_matches_beta_binomial_closed_form(k: int, m: int) -> None:
    lo, hi = rate_ratio_cs([0.5], [k], [m], 0.05, prior_shape=2.0)
    ref_lo, ref_hi = _ratio_reference(k, m, 0.05, 2.0)
    # the mixture integral is done by quadrature: agreement to ~1e-7 in log ratio
    assert float(lo) == pytest.approx(ref_lo, abs=1e-6)
    assert float(hi) == pytest.approx(ref_hi, abs=1e-6)


def test_rate_ratio_without_events_is_unbounded() -> None:
    lo, hi = rate_ratio_cs([0.05, 0.25], [0, 0], [0, 0], 0.05)
    assert (float(lo), float(hi)) == (-math.inf, math.inf)


def test_rate_ratio_is_vectorised_and_stratum_order_free() -> None:
    k = np.array([[3, 7], [0, 4], [12, 30]])
    m = np.array([[40, 20], [15, 9], [100, 90]])
    lo, hi = rate_ratio_cs([0.05, 0.25], k, m, 0.05)
    lo_r, hi_r = rate_ratio_cs([0.25, 0.05], k[:, ::-1], m[:, ::-1], 0.05)
    np.testing.assert_allclose(lo, lo_r, rtol=1e-9)
    np.testing.assert_allclose(hi, hi_r, rtol=1e-9)
    for i in range(3):
        one_lo, one_hi = rate_ratio_cs([0.05, 0.25], k[i], m[i], 0.05)
        assert float(one_lo) == pytest.approx(lo[i], rel=1e-9)
        assert float(one_hi) == pytest.approx(hi[i], rel=1e-9)
    # an empty stratum changes nothing
    lo3, _ = rate_ratio_cs([0.05, 0.25, 0.5], np.c_[k, [0, 0, 0]], np.c_[m, [0, 0, 0]], 0.05)
    np.testing.assert_allclose(lo3, lo, rtol=1e-9)


def test_rate_ratio_nested_in_alpha() -> None:
    lo1, hi1 = rate_ratio_cs([0.05], [[9]], [[120]], 0.05)
    lo2, hi2 = rate_ratio_cs([0.05], [[9]], [[120]], 0.01)
    assert lo2 < lo1 < hi1 < hi2
