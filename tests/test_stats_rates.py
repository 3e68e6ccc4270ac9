"""Bounded rates, error rates (conditional binomial) and sample-ratio mismatch."""

from __future__ import annotations

import math

import numpy as np
import pytest

from canary.stats import (
    ArmMoments,
    ArmRouting,
    MetricKind,
    Verdict,
    allocation_log_evidence,
    bernoulli_cs,
    error_test,
    rate_ratio_cs,
    rate_test,
    srm_test,
)


def _binary(p: float, n: int, propensity: float, seed: int) -> ArmMoments:
    k = float(np.random.default_rng(seed).binomial(n, p))
    return ArmMoments.from_strata({propensity: (n, k, k)})


def test_rate_test_combines_per_arm_sequences_at_half_alpha() -> None:
    prod = ArmMoments.from_strata({0.95: (190000, 171000.0, 171000.0)})
    cand = ArmMoments.from_strata({0.05: (10000, 8700.0, 8700.0)})
    res = rate_test(prod, cand, 0.01, name="accuracy")
    (lc,), (hc,) = bernoulli_cs(10000, 8700, 0.025)
    (lp,), (hp,) = bernoulli_cs(190000, 171000, 0.025)
    assert res.lower == pytest.approx(lc - hp) and res.upper == pytest.approx(hc - lp)
    assert res.estimate == pytest.approx(0.87 - 0.90)
    assert res.verdict is Verdict.WORSE and res.kind is MetricKind.RATE
    assert "accuracy: candidate-production difference -3pp" in res.explain()
    ratio = rate_test(prod, cand, 0.01, relative=True)
    assert ratio.lower == pytest.approx(lc / hp) and ratio.upper == pytest.approx(hc / lp)


def test_rate_test_accepts_fractional_rewards_and_rejects_out_of_range() -> None:
    reward = ArmMoments.from_values(np.linspace(0, 1, 501), 0.5)
    assert rate_test(reward, reward, 0.2).verdict is Verdict.OK
    bad = ArmMoments.from_values([0.5, 2.0], 0.5)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        rate_test(bad, bad, 0.01)


def test_relative_error_test_is_the_rate_ratio_sequence() -> None:
    prod = ArmMoments.from_strata({0.5: (10000, 100.0, 100.0)})
    cand = ArmMoments.from_strata({0.5: (10000, 190.0, 190.0)})
    res = error_test(prod, cand, 0.0, relative=True)
    lo, hi = rate_ratio_cs([0.5], [190], [100], 0.05)
    assert res.lower == pytest.approx(math.exp(float(lo)))
    assert res.upper == pytest.approx(math.exp(float(hi)))
    assert res.estimate == pytest.approx(1.9)
    assert res.verdict is Verdict.WORSE and res.kind is MetricKind.ERROR_RATE


def test_absolute_error_test_detects_a_failing_candidate_quickly() -> None:
    prod = _binary(0.01, 1900, 0.95, 1)
    cand = _binary(0.2, 100, 0.05, 2)
    res = error_test(prod, cand, 0.005)
    assert res.verdict is Verdict.WORSE
    assert res.lower > 0.005 and res.lower <= 0.19 <= res.upper


def test_error_free_arms_can_be_proven_within_margin() -> None:
    """Without production errors the ratio is unbounded; the per-arm rates still decide."""
    prod = ArmMoments.from_strata({0.95: (38000, 0.0, 0.0)})
    cand = ArmMoments.from_strata({0.05: (2000, 0.0, 0.0)})
    res = error_test(prod, cand, 0.005)
    assert res.verdict is Verdict.OK and 0 < res.upper <= 0.005


def test_error_test_uses_every_allocation_stratum() -> None:
    prod = ArmMoments.from_strata({0.95: (9500, 95.0, 95.0), 0.75: (7500, 75.0, 75.0)})
    cand = ArmMoments.from_strata({0.05: (500, 15.0, 15.0), 0.25: (2500, 80.0, 80.0)})
    res = error_test(prod, cand, 0.0, relative=True)
    lo, hi = rate_ratio_cs([0.05, 0.25], [15, 80], [95, 75], 0.05)
    assert (res.lower, res.upper) == pytest.approx((math.exp(lo), math.exp(hi)))
    assert res.verdict is Verdict.WORSE


def test_error_test_rejects_non_binary_signals() -> None:
    arm = ArmMoments.from_strata({0.5: (10, 2.5, 2.5)})
    with pytest.raises(ValueError, match=r"2\.5"):
        error_test(arm, arm, 0.01)


def test_srm_flags_the_arm_that_drops_requests() -> None:
    fine = srm_test(
        ArmRouting.from_strata({0.95: (19000, 18990)}),
        ArmRouting.from_strata({0.05: (1000, 999)}),
    )
    assert fine.verdict is Verdict.UNKNOWN and fine.kind is MetricKind.SRM
    dropping = srm_test(
        ArmRouting.from_strata({0.95: (1900, 1900)}),
        ArmRouting.from_strata({0.05: (100, 95)}),
    )
    assert dropping.verdict is Verdict.WORSE and dropping.lower > 1
    assert "candidate drops more requests" in dropping.explain()
    prod_drops = srm_test(
        ArmRouting.from_strata({0.5: (1000, 950)}),
        ArmRouting.from_strata({0.5: (1000, 1000)}),
    )
    assert prod_drops.verdict is Verdict.WORSE and prod_drops.upper < 1
    assert "production drops more requests" in prod_drops.detail


def test_srm_without_drops_says_so_instead_of_a_nan_ratio() -> None:
    res = srm_test(
        ArmRouting.from_strata({0.5: (1000, 1000)}), ArmRouting.from_strata({0.5: (990, 990)})
    )
    text = res.explain()
    assert "no request dropped on either arm" in text and "nan" not in text, text


def test_srm_routing_counts_are_checked() -> None:
    with pytest.raises(ValueError, match="answered must not exceed routed"):
        ArmRouting.from_strata({0.05: (10, 11)})


def test_srm_flags_a_routed_split_off_the_weights() -> None:
    prod = ArmRouting.from_strata({0.95: (18800, 18800)})
    cand = ArmRouting.from_strata({0.05: (1200, 1200)})  # 6% instead of 5%
    res = srm_test(prod, cand)
    assert res.verdict is Verdict.WORSE and "routed split off the weights" in res.detail
    # With sticky routing the check is off; no drops, so nothing to report.
    assert srm_test(prod, cand, check_routing=False).verdict is Verdict.UNKNOWN


def test_allocation_evidence_is_the_beta_binomial_bayes_factor() -> None:
    from scipy import special

    c, pi, k, m = 1000.0, 0.05, 70, 930
    expected = (
        special.betaln(c * pi + k, c * (1 - pi) + m)
        - special.betaln(c * pi, c * (1 - pi))
        - k * math.log(pi)
        - m * math.log(1 - pi)
    )
    assert float(allocation_log_evidence([pi], [k], [m], c)) == pytest.approx(expected)
    two = allocation_log_evidence([0.05, 0.25], [[70, 10]], [[930, 30]], c)
    one = allocation_log_evidence([0.25], [[10]], [[30]], c)
    assert float(two[0]) == pytest.approx(expected + float(one[0]))
