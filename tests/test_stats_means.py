"""Difference of means: sufficient statistics vs per-request pseudo-outcomes, properties."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from canary.stats import (
    ArmMoments,
    Direction,
    MetricKind,
    Verdict,
    ipw_summary,
    mean_test,
    normal_mixture_radius,
    normal_mixture_rho2,
    variance_floor,
)
from canary.stats._means import DEFAULT_T_OPT


def _rollout(
    seed: int, steps: list[tuple[float, int]], scale: float = 1.0, sigma: float = 0.5
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per request: candidate propensity, assignment and observed latency."""
    rng = np.random.default_rng(seed)
    pi = np.concatenate([np.full(n, w) for w, n in steps])
    a = rng.random(pi.size) < pi
    y = np.exp(sigma * rng.standard_normal(pi.size)) * np.where(a, scale, 1.0)
    return pi, a, y


def _arms(pi: np.ndarray, a: np.ndarray, y: np.ndarray) -> tuple[ArmMoments, ArmMoments]:
    return ArmMoments.from_values(y[~a], 1 - pi[~a]), ArmMoments.from_values(y[a], pi[a])


def test_arm_moments_from_strata_and_values_agree() -> None:
    arm = ArmMoments.from_strata({0.05: (3, 6.0, 14.0), 0.25: (1, 2.0, 4.0)})
    same = ArmMoments.from_values([1.0, 2.0, 3.0, 2.0], [0.05, 0.05, 0.05, 0.25])
    for field in ("propensity", "n", "sum", "sumsq"):
        np.testing.assert_allclose(getattr(arm, field), getattr(same, field))
    assert arm.total == 4


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"propensity": [1.5], "n": [1], "sum": [1], "sumsq": [1]}, "1.5"),
        ({"propensity": [0.5], "n": [-1], "sum": [1], "sumsq": [1]}, "-1"),
        ({"propensity": [0.5], "n": [1.5], "sum": [1], "sumsq": [1]}, "1.5"),
        ({"propensity": [0.5, 0.5], "n": [1, 1], "sum": [1, 1], "sumsq": [1, 1]}, "distinct"),
        ({"propensity": [0.5], "n": [1, 2], "sum": [1], "sumsq": [1]}, "same length"),
    ],
)
def test_arm_moments_reject_bad_input(kwargs: dict[str, list[float]], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        ArmMoments(**kwargs)  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(
    cells=st.lists(
        st.tuples(
            st.sampled_from([0.05, 0.25, 0.5]),
            st.integers(0, 50),
            st.floats(0, 100),
            st.floats(0, 1000),
        ),
        min_size=1,
        max_size=8,
    ),
    seed=st.integers(0, 10**6),
)
def test_merge_is_order_free(cells: list[tuple[float, int, float, float]], seed: int) -> None:
    parts = [ArmMoments.from_strata({p: (n, s, q)}) for p, n, s, q in cells]
    forward = parts[0]
    for part in parts[1:]:
        forward = forward.merge(part)
    order = np.random.default_rng(seed).permutation(len(parts))
    shuffled = parts[order[0]]
    for i in order[1:]:
        shuffled = parts[i].merge(shuffled)
    for field in ("propensity", "n", "sum", "sumsq"):
        np.testing.assert_allclose(getattr(forward, field), getattr(shuffled, field), rtol=1e-12)


def test_summary_reduces_per_request_pseudo_outcomes() -> None:
    """The stratified sums give exactly the mean and variance of the per-request phi_i."""
    pi, a, y = _rollout(1, [(0.05, 4000), (0.25, 2000), (0.5, 1000)], scale=1.2)
    prod, cand = _arms(pi, a, y)
    s = ipw_summary(prod, cand)
    # Independent per-request computation (no sufficient statistics).
    w_c, w_p = a / pi, ~a / (1 - pi)
    m_c = (w_c * y).sum() / w_c.sum()
    m_p = (w_p * y).sum() / w_p.sum()
    for r in (1.0, 1.1):
        phi = (m_c - r * m_p) + w_c * (y - m_c) - r * w_p * (y - m_p)
        assert phi.mean() == pytest.approx(s.mean_c - r * s.mean_p, rel=1e-10)
        assert phi.var() == pytest.approx(s.var_c + r * r * s.var_p, rel=1e-9)
    assert (s.n_c, s.n_p, s.t) == (a.sum(), (~a).sum(), pi.size)
    assert s.s2_c == pytest.approx(np.mean((y[a] - m_c) ** 2), rel=1e-10)


def test_single_stratum_reduces_to_difference_of_means() -> None:
    pi, a, y = _rollout(2, [(0.05, 20000)])
    s = ipw_summary(*_arms(pi, a, y))
    assert s.mean_c == pytest.approx(y[a].mean(), rel=1e-12)
    assert s.mean_p == pytest.approx(y[~a].mean(), rel=1e-12)
    # IPW variance of the mean: n_c s^2 / (pi t)^2, i.e. s^2 / n_c with the expected n_c
    n_c = a.sum()
    assert s.var_c / s.t == pytest.approx(n_c * y[a].var() / (0.05 * s.t) ** 2, rel=1e-10)


def test_absolute_interval_is_the_asymptotic_cs_of_the_pseudo_outcomes() -> None:
    pi, a, y = _rollout(3, [(0.1, 10000)], scale=1.05)
    prod, cand = _arms(pi, a, y)
    res = mean_test(prod, cand, 0.0, relative=False, alpha=0.05)
    s = ipw_summary(prod, cand)
    vc, vp = variance_floor(
        s.mean_c, s.mean_p, s.var_c, s.var_p, s.s2_c, s.s2_p, s.w2_c, s.w2_p, False
    )
    g = normal_mixture_radius(pi.size, normal_mixture_rho2(DEFAULT_T_OPT, 0.05), 0.05)
    half = float(g * np.sqrt(vc + vp))
    assert res.estimate == pytest.approx(y[a].mean() - y[~a].mean(), rel=1e-10)
    assert res.lower == pytest.approx(res.estimate - half, rel=1e-10)
    assert res.upper == pytest.approx(res.estimate + half, rel=1e-10)
    assert res.kind is MetricKind.MEAN and res.n_candidate == a.sum()


def test_ratio_interval_agrees_with_the_contrast_test_at_every_margin() -> None:
    """Fieller: 1 + d is below the ratio interval iff the CS of mu_c - (1+d) mu_p is above 0."""
    pi, a, y = _rollout(4, [(0.05, 30000), (0.25, 6000)], scale=1.12)
    prod, cand = _arms(pi, a, y)
    res = mean_test(prod, cand, 0.0)
    s = ipw_summary(prod, cand)
    vc, vp = variance_floor(
        s.mean_c, s.mean_p, s.var_c, s.var_p, s.s2_c, s.s2_p, s.w2_c, s.w2_p, True
    )
    g = float(normal_mixture_radius(s.t, normal_mixture_rho2(DEFAULT_T_OPT, 0.05), 0.05))
    for r in np.linspace(res.lower - 0.05, res.upper + 0.05, 41):
        contrast_lo = s.mean_c - r * s.mean_p - g * math.sqrt(vc + r * r * vp)
        contrast_hi = s.mean_c - r * s.mean_p + g * math.sqrt(vc + r * r * vp)
        assert (contrast_lo > 0) == (r < res.lower - 1e-12) or abs(r - res.lower) < 1e-9
        assert (contrast_hi < 0) == (r > res.upper + 1e-12) or abs(r - res.upper) < 1e-9


def test_verdicts_against_margins_and_directions() -> None:
    pi, a, y = _rollout(5, [(0.05, 200000)], scale=1.2)
    prod, cand = _arms(pi, a, y)
    assert mean_test(prod, cand, 0.05).verdict is Verdict.WORSE
    assert mean_test(prod, cand, 0.40).verdict is Verdict.OK
    assert mean_test(prod, cand, 0.20).verdict is Verdict.UNKNOWN
    # Higher is better (e.g. tokens/s): a +20% candidate is fine against max_decrease 5%.
    assert mean_test(prod, cand, 0.05, direction="decrease").verdict is Verdict.OK
    assert mean_test(cand, prod, 0.05, direction=Direction.DECREASE).verdict is Verdict.WORSE


def test_burn_in_holds_the_verdict() -> None:
    pi, a, y = _rollout(6, [(0.05, 3000)], scale=3.0)
    prod, cand = _arms(pi, a, y)
    assert cand.total < 200
    assert mean_test(prod, cand, 0.1, burn_in=100).verdict is Verdict.WORSE
    assert mean_test(prod, cand, 0.1, burn_in=200).verdict is Verdict.UNKNOWN


def test_interval_nested_in_alpha_and_shrinking_with_n() -> None:
    pi, a, y = _rollout(7, [(0.05, 40000)], scale=1.1)
    prod, cand = _arms(pi, a, y)
    wide = mean_test(prod, cand, 0.1, alpha=0.01)
    narrow = mean_test(prod, cand, 0.1, alpha=0.1)
    assert wide.lower < narrow.lower < narrow.upper < wide.upper
    widths = []
    for n in (5000, 10000, 20000, 40000):
        r = mean_test(*_arms(pi[:n], a[:n], y[:n]), 0.1)
        widths.append(r.upper - r.lower)
    assert all(x > y for x, y in itertools.pairwise(widths))


def test_merging_workers_in_any_order_gives_the_same_result() -> None:
    pi, a, y = _rollout(8, [(0.05, 9000), (0.25, 3000)], scale=1.1)
    workers = np.random.default_rng(0).integers(0, 3, pi.size)
    parts = [_arms(pi[workers == w], a[workers == w], y[workers == w]) for w in range(3)]
    whole = mean_test(*_arms(pi, a, y), 0.1)
    for order in ((0, 1, 2), (2, 0, 1), (1, 2, 0)):
        prod, cand = parts[order[0]]
        for i in order[1:]:
            prod, cand = prod.merge(parts[i][0]), cand.merge(parts[i][1])
        res = mean_test(prod, cand, 0.1)
        assert res.lower == pytest.approx(whole.lower, rel=1e-12)
        assert res.upper == pytest.approx(whole.upper, rel=1e-12)


def test_empty_and_degenerate_inputs_are_unknown() -> None:
    empty = ArmMoments.empty()
    res = mean_test(empty, empty, 0.1)
    assert res.verdict is Verdict.UNKNOWN
    assert (res.lower, res.upper) == (-math.inf, math.inf)
    assert "mean: candidate/production ratio nan" in res.explain()


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"margin": -0.1}, "-0.1"),
        ({"margin": 1.0, "direction": "decrease"}, "< 1"),
        ({"alpha": 1.5}, "1.5"),
        ({"burn_in": -3}, "-3"),
        ({"direction": "sideways"}, "sideways"),
        ({"t_opt": 0}, "t_opt"),
    ],
)
def test_argument_checks_echo_the_bad_value(kwargs: dict[str, object], needle: str) -> None:
    args: dict[str, object] = {"margin": 0.1}
    args.update(kwargs)
    arm = ArmMoments.from_strata({0.5: (10, 10.0, 12.0)})
    with pytest.raises(ValueError, match=needle):
        mean_test(arm, arm, **args)  # type: ignore[arg-type]


def test_explain_names_metric_interval_margin_and_samples() -> None:
    pi, a, y = _rollout(9, [(0.05, 30000)], scale=1.04)
    text = mean_test(*_arms(pi, a, y), 0.10, name="latency_mean").explain()
    assert text.startswith("latency_mean: candidate/production ratio 1.0")
    assert "margin +10%" in text and f"n={(~a).sum()}/{a.sum()}" in text
