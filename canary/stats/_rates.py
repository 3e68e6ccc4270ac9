"""Rates: bounded means (accuracy), error rates (Lindon & Malek) and sample-ratio mismatch."""

from __future__ import annotations

import math

import numpy as np

from canary.stats._boundaries import allocation_log_evidence, bernoulli_cs, rate_ratio_cs
from canary.stats._checks import check_alpha, check_burn_in, check_margin, check_positive
from canary.stats._strata import pair_strata
from canary.stats._types import (
    ArmMoments,
    ArmRouting,
    Direction,
    FloatArray,
    MetricKind,
    MetricResult,
    Verdict,
    classify,
    tolerance_of,
)

JEFFREYS = (0.5, 0.5)
DEFAULT_PRIOR_SHAPE = 2.0


def _check_unit_interval(arm: ArmMoments, name: str) -> None:
    if (
        np.any(arm.sum < 0)
        or np.any(arm.sum > arm.n)
        or np.any(arm.sumsq > arm.sum * (1 + 1e-9) + 1e-9)
    ):
        raise ValueError(
            f"{name} must hold a signal in [0, 1] (0 <= sum <= n, sumsq <= sum), got "
            f"n={arm.n.tolist()!r} sum={arm.sum.tolist()!r} sumsq={arm.sumsq.tolist()!r}"
        )


def _check_binary(arm: ArmMoments, name: str) -> None:
    _check_unit_interval(arm, name)
    if np.any(arm.sum != np.round(arm.sum)):
        raise ValueError(f"{name} must hold a 0/1 signal (whole sums), got {arm.sum.tolist()!r}")


def _combine_arms(
    lo_c: float, hi_c: float, lo_p: float, hi_p: float, relative: bool
) -> tuple[float, float]:
    if relative:
        lo = lo_c / hi_p if hi_p > 0 else 0.0
        hi = hi_c / lo_p if lo_p > 0 else math.inf
        return lo, hi
    return lo_c - hi_p, hi_c - lo_p


def _clip(x: float, lo: float, hi: float) -> float:
    if math.isnan(x):
        return x
    return min(max(x, lo), hi)


def _result(
    kind: MetricKind,
    name: str,
    est: float,
    lo: float,
    hi: float,
    margin: float,
    relative: bool,
    d: Direction,
    n_p: int,
    n_c: int,
    alpha: float,
    burn_in: int,
    detail: str = "",
) -> MetricResult:
    tol = tolerance_of(margin, relative, d)
    verdict = classify(lo, hi, tol, d)
    if min(n_c, n_p) < max(burn_in, 1):
        verdict = Verdict.UNKNOWN
    return MetricResult(
        name=name,
        kind=kind,
        estimate=float(est),
        lower=float(lo),
        upper=float(hi),
        margin=float(margin),
        relative=relative,
        direction=d,
        verdict=verdict,
        n_production=n_p,
        n_candidate=n_c,
        alpha=alpha,
        detail=detail,
    )


def rate_test(
    production: ArmMoments,
    candidate: ArmMoments,
    margin: float,
    *,
    relative: bool = False,
    direction: Direction | str = Direction.DECREASE,
    alpha: float = 0.05,
    burn_in: int = 100,
    prior: tuple[float, float] = JEFFREYS,
    name: str = "rate",
) -> MetricResult:
    """Compare a bounded rate in [0, 1] (accuracy, agreement, reward) of the two arms.

    Parameters
    ----------
    production, candidate : ArmMoments
        Moments of the [0, 1]-valued signal per arm (strata are pooled per arm).
    margin : float
        Tolerance, >= 0: absolute (``0.01`` = 1 pp) or relative (``0.05`` = 5%).
    relative : bool
        Ratio scale (True) or difference scale (False, the default: rates are usually
        compared in percentage points).
    direction : Direction or {"increase", "decrease"}
        ``DECREASE`` (default) when lower is worse (``max_decrease``, e.g. accuracy).
    alpha : float
        Overall level; each arm's sequence is built at ``alpha / 2``.
    burn_in : int
        Verdict is UNKNOWN until both arms have this many observations.
    prior : (float, float)
        Beta mixing distribution of the per-arm sequences (default Jeffreys).
    name : str
        Metric name.

    Returns
    -------
    MetricResult
        ``kind=RATE``; difference ``[l_c - u_p, u_c - l_p]`` or ratio ``[l_c/u_p, u_c/l_p]``.

    Notes
    -----
    Per arm, :func:`bernoulli_cs` gives a nonasymptotic (1 - alpha/2) confidence sequence
    for the mean of [0, 1] observations; the union bound makes the combined interval a
    (1 - alpha) sequence. The per-arm sequences cover each arm's running average of
    conditional means, so the comparison assumes the rate does not drift in a way that
    differs between steps with different allocations.

    References
    ----------
    Robbins (1970), Ann. Math. Statist. 41(5); Howard, Ramdas, McAuliffe & Sekhon (2021),
    Ann. Statist. 49(2), Prop. 7 (beta-binomial conjugate mixture for sub-Bernoulli
    observations).
    """
    d = check_margin(margin, relative, direction)
    alpha = check_alpha(alpha)
    burn_in = check_burn_in(burn_in)
    _check_unit_interval(production, "production")
    _check_unit_interval(candidate, "candidate")
    n_c, s_c = float(candidate.n.sum()), float(candidate.sum.sum())
    n_p, s_p = float(production.n.sum()), float(production.sum.sum())
    (lo_c,), (hi_c,) = bernoulli_cs(n_c, s_c, alpha / 2, prior)
    (lo_p,), (hi_p,) = bernoulli_cs(n_p, s_p, alpha / 2, prior)
    lo, hi = _combine_arms(lo_c, hi_c, lo_p, hi_p, relative)
    mean_c = s_c / n_c if n_c else math.nan
    mean_p = s_p / n_p if n_p else math.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        est = (mean_c / mean_p if mean_p > 0 else math.nan) if relative else mean_c - mean_p
    return _result(
        MetricKind.RATE,
        name,
        _clip(est, lo, hi),
        lo,
        hi,
        margin,
        relative,
        d,
        int(n_p),
        int(n_c),
        alpha,
        burn_in,
    )


def _events_by_stratum(
    production: ArmMoments, candidate: ArmMoments
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Candidate propensity and event counts per stratum, 0/100% strata left out."""
    cells = pair_strata(production, candidate)
    keep = (cells.pi > 0) & (cells.pi < 1)
    return cells.pi[keep], cells.s_c[keep], cells.s_p[keep]


def error_test(
    production: ArmMoments,
    candidate: ArmMoments,
    margin: float,
    *,
    relative: bool = False,
    direction: Direction | str = Direction.INCREASE,
    alpha: float = 0.05,
    burn_in: int = 100,
    prior_shape: float = DEFAULT_PRIOR_SHAPE,
    prior: tuple[float, float] = JEFFREYS,
    name: str = "errors",
) -> MetricResult:
    """Compare error rates with the conditional-binomial test on which arm each error hit.

    Parameters
    ----------
    production, candidate : ArmMoments
        Stratified moments of the 0/1 error signal (``n`` requests, ``sum`` errors).
    margin : float
        Tolerance, >= 0: absolute (``0.005`` = 0.5 pp, the default scale) or relative
        (``0.5`` = candidate error rate up to 1.5x production's).
    relative : bool
        Ratio of error rates (True) or difference (False).
    direction : Direction or {"increase", "decrease"}
        ``INCREASE`` (default): more errors is worse.
    alpha : float
        Overall level.
    burn_in : int
        Verdict is UNKNOWN until both arms have this many requests.
    prior_shape : float
        h of the logistic-beta mixing density of the log rate ratio (:func:`rate_ratio_cs`).
    prior : (float, float)
        Beta mixing distribution of the per-arm rate sequences (absolute margins only).
    name : str
        Metric name.

    Returns
    -------
    MetricResult
        ``kind=ERROR_RATE``.

    Notes
    -----
    Relative margins: the confidence sequence for :math:`\\rho = e_c/e_p` is read off the
    arm labels of the errors alone (:func:`rate_ratio_cs`, level alpha): given that an error
    occurred in stratum s, it came from the candidate with probability
    :math:`\\pi_s\\rho/(\\pi_s\\rho + 1 - \\pi_s)`, whatever the common error level does over
    time. Absolute margins: with :math:`\\rho \\in [\\rho_l, \\rho_u]` at alpha/2 and per-arm
    rates :math:`e_p \\in [p_l, p_u]`, :math:`e_c \\in [c_l, c_u]` at alpha/4 each
    (:func:`bernoulli_cs`), the difference :math:`e_c - e_p = e_p(\\rho - 1)` lies in the
    intersection of :math:`[p_l, p_u]\\cdot[\\rho_l - 1, \\rho_u - 1]` and
    :math:`[c_l - p_u, c_u - p_l]` (union bound over the three sequences). The first
    interval detects regressions from few errors; the second lets a candidate be proven
    within tolerance when production has no errors at all.

    References
    ----------
    Lindon & Malek (2022), "Anytime-valid inference for multinomial count data", NeurIPS,
    Sec. 3 and Sec. 5; Lindon, Sanden, Shirikian, Liu & Malek (2022), "Rapid regression
    detection in software deployments through sequential testing", KDD, Sec. 3.
    """
    d = check_margin(margin, relative, direction)
    alpha = check_alpha(alpha)
    burn_in = check_burn_in(burn_in)
    prior_shape = check_positive("prior_shape", prior_shape)
    _check_binary(production, "production")
    _check_binary(candidate, "candidate")
    pi, k, m = _events_by_stratum(production, candidate)
    n_c, e_c = float(candidate.n.sum()), float(candidate.sum.sum())
    n_p, e_p = float(production.n.sum()), float(production.sum.sum())
    rate_c = e_c / n_c if n_c else math.nan
    rate_p = e_p / n_p if n_p else math.nan
    ratio_alpha = alpha if relative else alpha / 2
    if pi.size:
        b_lo, b_hi = rate_ratio_cs(pi, k, m, ratio_alpha, prior_shape)
        rho_lo, rho_hi = math.exp(float(b_lo)), math.exp(float(b_hi))
    else:
        rho_lo, rho_hi = 0.0, math.inf
    if relative:
        lo, hi = rho_lo, rho_hi
        est = rate_c / rate_p if rate_p > 0 else (math.inf if rate_c > 0 else math.nan)
    else:
        (pl,), (pu,) = bernoulli_cs(n_p, e_p, alpha / 4, prior)
        (cl,), (cu,) = bernoulli_cs(n_c, e_c, alpha / 4, prior)
        y_lo, y_hi = rho_lo - 1.0, rho_hi - 1.0
        lo1 = pl * y_lo if y_lo >= 0 else pu * y_lo
        hi1 = (pu * y_hi if y_hi >= 0 else pl * y_hi) if math.isfinite(y_hi) else math.inf
        lo, hi = max(lo1, cl - pu), min(hi1, cu - pl)
        if lo > hi:  # the sequences disagree: only possible on their joint miscoverage event
            lo = hi = 0.5 * (lo + hi)
        est = rate_c - rate_p
    return _result(
        MetricKind.ERROR_RATE,
        name,
        _clip(est, lo, hi),
        lo,
        hi,
        margin,
        relative,
        d,
        int(n_p),
        int(n_c),
        alpha,
        burn_in,
        detail=f"errors {int(e_p)}/{int(e_c)}",
    )


def srm_test(
    production: ArmRouting,
    candidate: ArmRouting,
    *,
    alpha: float = 0.05,
    burn_in: int = 0,
    check_routing: bool = True,
    prior_shape: float = DEFAULT_PRIOR_SHAPE,
    name: str = "srm",
) -> MetricResult:
    """Detect sample-ratio mismatch: routed counts off the weights, or one arm losing requests.

    Parameters
    ----------
    production, candidate : ArmRouting
        Routed and answered request counts per arm and propensity stratum.
    alpha : float
        Level of the test (split in half between the two checks when ``check_routing``).
    burn_in : int
        Verdict is UNKNOWN until both arms have this many routed requests (default 0: the
        test is exact from the first request).
    check_routing : bool
        Also test the routed counts against the configured weights
        (:func:`allocation_log_evidence`). Turn it off with sticky routing: requests of one
        user are then not assigned independently and the routed split is overdispersed by
        design.
    prior_shape : float
        h of the logistic-beta mixing density (:func:`rate_ratio_cs`).
    name : str
        Metric name.

    Returns
    -------
    MetricResult
        ``kind=SRM``, relative scale: the interval is for the ratio of the arms' drop
        probabilities (candidate/production). Verdict WORSE when that interval excludes 1 (in
        either direction: the comparison is no longer on the same traffic) or when the
        routed split contradicts the weights; otherwise UNKNOWN. It is a rollback guard, not
        a promotion criterion; ``detail`` says which check fired.

    Notes
    -----
    Routing: each request of stratum s is routed to the candidate with probability
    :math:`\\pi_s`, so the routed counts are multinomial with the allocation's
    probabilities; the Dirichlet-multinomial test martingale of Lindon & Malek
    (:func:`allocation_log_evidence`, level alpha/2) tests it. Drops: a routed request is
    dropped (routed but never answered) with probability :math:`\\delta_c` or
    :math:`\\delta_p`; under :math:`H_0: \\delta_c = \\delta_p` the arm of each drop is
    again Bernoulli(:math:`\\pi_s`), and the same construction gives the confidence
    sequence for :math:`\\delta_c/\\delta_p`. Testing drops against the allocation is far
    more sensitive than testing answered counts, because drops are rare and one-sided.

    References
    ----------
    Lindon & Malek (2022), "Anytime-valid inference for multinomial count data", NeurIPS,
    Sec. 3 (sequential sample-ratio-mismatch test) and Sec. 5.
    """
    alpha = check_alpha(alpha)
    burn_in = check_burn_in(burn_in)
    prior_shape = check_positive("prior_shape", prior_shape)
    level = alpha / 2 if check_routing else alpha

    def as_events(arm: ArmRouting, events: FloatArray) -> ArmMoments:
        return ArmMoments(arm.propensity, arm.routed, events, events)

    def ratio(prod: ArmMoments, cand: ArmMoments) -> tuple[float, float]:
        pi, k, m = _events_by_stratum(prod, cand)
        if not pi.size:
            return 0.0, math.inf
        b_lo, b_hi = rate_ratio_cs(pi, k, m, level, prior_shape)
        return math.exp(float(b_lo)), math.exp(float(b_hi))

    drops_c = as_events(candidate, candidate.routed - candidate.answered)
    drops_p = as_events(production, production.routed - production.answered)
    lo, hi = ratio(drops_p, drops_c)
    n_c, d_c = float(candidate.routed.sum()), float(drops_c.sum.sum())
    n_p, d_p = float(production.routed.sum()), float(drops_p.sum.sum())
    rate_c = d_c / n_c if n_c else math.nan
    rate_p = d_p / n_p if n_p else math.nan
    est = rate_c / rate_p if rate_p > 0 else (math.inf if rate_c > 0 else math.nan)
    detail = f"dropped {int(d_p)}/{int(d_c)}"
    fired = []
    if lo > 1.0 or hi < 1.0:
        fired.append(f"{'candidate' if lo > 1.0 else 'production'} drops more requests")
    if check_routing:
        pi, k, m = _events_by_stratum(
            as_events(production, production.routed), as_events(candidate, candidate.routed)
        )
        if pi.size and float(allocation_log_evidence(pi, k, m)) >= math.log(1.0 / level):
            share = n_c / (n_c + n_p) if n_c + n_p else math.nan
            fired.append(f"routed split off the weights (candidate share {share:.4g})")
    verdict = Verdict.WORSE if fired else Verdict.UNKNOWN
    if min(n_c, n_p) < max(burn_in, 1):
        verdict = Verdict.UNKNOWN
    elif fired:
        detail += "; " + "; ".join(fired)
    return MetricResult(
        name=name,
        kind=MetricKind.SRM,
        estimate=_clip(est, lo, hi),
        lower=lo,
        upper=hi,
        margin=0.0,
        relative=True,
        direction=Direction.INCREASE,
        verdict=verdict,
        n_production=int(n_p),
        n_candidate=int(n_c),
        alpha=alpha,
        detail=detail,
    )


__all__ = [
    "DEFAULT_PRIOR_SHAPE",
    "JEFFREYS",
    "error_test",
    "rate_test",
    "srm_test",
]
