"""Difference of means: asymptotic confidence sequence on IPW pseudo-outcomes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from canary.stats._boundaries import normal_mixture_radius, normal_mixture_rho2
from canary.stats._checks import check_alpha, check_burn_in, check_margin, check_positive
from canary.stats._design import (
    ArmClusters,
    align_clusters,
    cluster_sumsq,
    effective_clusters,
    few_clusters_factor,
)
from canary.stats._strata import pair_strata
from canary.stats._types import (
    ArmMoments,
    Direction,
    FloatArray,
    MetricKind,
    MetricResult,
    classify,
    tolerance_of,
)

DEFAULT_T_OPT = 10_000.0


@dataclass(frozen=True)
class IPWSummary:
    """Hajek means and pseudo-outcome variance parts of both arms.

    ``var_c`` and ``var_p`` are per-request variance contributions: the variance of the
    pseudo-outcome of the contrast ``mu_c - r mu_p`` is ``var_c + r**2 * var_p``. ``s2_*``
    are the per-observation variances of each arm and ``w2_*`` the factors turning a
    per-observation variance into a per-request contribution (``var = s2 * w2`` when the
    variance is the same in every stratum).
    """

    mean_c: float
    mean_p: float
    var_c: float
    var_p: float
    s2_c: float
    s2_p: float
    w2_c: float
    w2_p: float
    t: float
    n_c: int
    n_p: int


def ipw_summary(production: ArmMoments, candidate: ArmMoments) -> IPWSummary:
    """Reduce stratified moments to the quantities of the IPW confidence sequence.

    Notes
    -----
    With candidate propensity :math:`\\pi_s` in stratum s and per-arm cells
    :math:`(n, S, Q)` (count, sum, sum of squares), the Hajek means are

    .. math:: m_c = \\frac{\\sum_s S_{c,s}/\\pi_s}{\\sum_s n_{c,s}/\\pi_s},\\qquad
              m_p = \\frac{\\sum_s S_{p,s}/(1-\\pi_s)}{\\sum_s n_{p,s}/(1-\\pi_s)},

    and with :math:`t = \\sum_s (n_{c,s} + n_{p,s})` requests the variance parts are

    .. math:: v_c = \\frac1t\\sum_s \\frac{Q_{c,s} - 2m_cS_{c,s} + m_c^2n_{c,s}}{\\pi_s^2},
              \\qquad
              v_p = \\frac1t\\sum_s \\frac{Q_{p,s} - 2m_pS_{p,s} + m_p^2n_{p,s}}{(1-\\pi_s)^2}.

    Strata with a propensity of 0 or 1 (an arm at 0% or 100%) carry no comparison and are
    left out.
    """
    cells = pair_strata(production, candidate)
    keep = (cells.pi > 0) & (cells.pi < 1)
    pi = cells.pi[keep]
    n_c, s_c, q_c = cells.n_c[keep], cells.s_c[keep], cells.q_c[keep]
    n_p, s_p, q_p = cells.n_p[keep], cells.s_p[keep], cells.q_p[keep]
    w_c = n_c / pi
    w_p = n_p / (1.0 - pi)
    mean_c = float((s_c / pi).sum() / w_c.sum()) if w_c.sum() > 0 else float("nan")
    mean_p = float((s_p / (1.0 - pi)).sum() / w_p.sum()) if w_p.sum() > 0 else float("nan")
    t = float(n_c.sum() + n_p.sum())
    nan = float("nan")
    var_c = var_p = s2_c = s2_p = w2_c = w2_p = nan
    if t > 0 and np.isfinite(mean_c) and np.isfinite(mean_p):
        ss_c = np.maximum(q_c - 2.0 * mean_c * s_c + mean_c**2 * n_c, 0.0)
        ss_p = np.maximum(q_p - 2.0 * mean_p * s_p + mean_p**2 * n_p, 0.0)
        var_c = float((ss_c / pi**2).sum() / t)
        var_p = float((ss_p / (1.0 - pi) ** 2).sum() / t)
        s2_c = float(ss_c.sum() / n_c.sum())
        s2_p = float(ss_p.sum() / n_p.sum())
        w2_c = float((n_c / pi**2).sum() / t)
        w2_p = float((n_p / (1.0 - pi) ** 2).sum() / t)
    return IPWSummary(
        mean_c, mean_p, var_c, var_p, s2_c, s2_p, w2_c, w2_p, t, int(n_c.sum()), int(n_p.sum())
    )


def cluster_ipw_variance(
    production: ArmMoments,
    candidate: ArmMoments,
    clusters: tuple[ArmClusters, ArmClusters],
    mean_c: float,
    mean_p: float,
    t: float,
    alpha: float,
) -> tuple[float, float, int, int]:
    r"""Cluster-robust variance parts of the IPW contrast (the scale of :class:`IPWSummary`).

    Returns ``(var_c, var_p, clusters_c, clusters_p)``.

    Notes
    -----
    The pseudo-outcome sums of cluster g, :math:`X_g = \sum_s (S_{c,s,g} - m_c n_{c,s,g})
    /\pi_s` and :math:`Y_g = \sum_s (S_{p,s,g} - m_p n_{p,s,g})/(1 - \pi_s)`, replace the
    per-request terms: :math:`v_c = \kappa_c \sum_g X_g^2 / t` with the few-clusters factor
    :math:`\kappa` of :func:`~canary.stats._design.few_clusters_factor` at the
    :func:`~canary.stats._design.effective_clusters` of the arm (and likewise
    :math:`v_p`). Clusters hold different users on the two arms, so their cross term is
    left out. Strata at 0 or 1 are left out, as in :func:`ipw_summary`.
    """
    cells = pair_strata(production, candidate)
    keep = (cells.pi > 0) & (cells.pi < 1)
    pi = cells.pi[keep]
    if pi.size == 0 or not (np.isfinite(mean_c) and np.isfinite(mean_p)) or t <= 0:
        return float("nan"), float("nan"), 0, 0
    prod, cand = clusters
    cn, cs = align_clusters(cand, pi, "candidate")
    pn, ps = align_clusters(prod, pi, "production")
    g_c = int(np.count_nonzero(cn.sum(axis=0)))
    g_p = int(np.count_nonzero(pn.sum(axis=0)))
    v_c = cluster_sumsq(cn, cs, 1.0 / pi, np.full(pi.size, mean_c)) / t
    v_p = cluster_sumsq(pn, ps, 1.0 / (1.0 - pi), np.full(pi.size, mean_p)) / t
    kappa_c = few_clusters_factor(effective_clusters(cn, 1.0 / pi), alpha) if cn.sum() else 0.0
    kappa_p = (
        few_clusters_factor(effective_clusters(pn, 1.0 / (1.0 - pi)), alpha) if pn.sum() else 0.0
    )
    return (
        v_c * kappa_c if cn.sum() else 0.0,
        v_p * kappa_p if pn.sum() else 0.0,
        g_c,
        g_p,
    )


def variance_floor(
    mean_c: ArrayLike,
    mean_p: ArrayLike,
    var_c: ArrayLike,
    var_p: ArrayLike,
    s2_c: ArrayLike,
    s2_p: ArrayLike,
    w2_c: ArrayLike,
    w2_p: ArrayLike,
    relative: bool,
) -> tuple[FloatArray, FloatArray]:
    """Floor each arm's variance by the other arm's (vectorised).

    Parameters
    ----------
    mean_c, mean_p, var_c, var_p, s2_c, s2_p, w2_c, w2_p : array_like
        See :class:`IPWSummary`.
    relative : bool
        Floor the coefficient of variation (relative margins) or the variance (absolute).

    Returns
    -------
    var_c, var_p : ndarray
        Variance parts with each arm's per-observation variance raised to at least
        :math:`s^2_{other}\\,(m_{self}/m_{other})^2` (relative) or :math:`s^2_{other}`.

    Notes
    -----
    With skewed signals (latency) a small sample that has not yet seen the tail has both a
    low mean and a low variance, so the interval is too short exactly when it is too low;
    taking the other arm's, much better estimated, coefficient of variation (or variance)
    as a floor removes that finite-sample bias. Asymptotically the floor is inactive when
    the arms share the statistic and conservative otherwise, so the sequence stays valid.
    """
    mc, mp, vc, vp, sc, sp, wc, wp = (
        np.asarray(x, dtype=float) for x in (mean_c, mean_p, var_c, var_p, s2_c, s2_p, w2_c, w2_p)
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        if relative:
            floor_c = sp * (mc / mp) ** 2
            floor_p = sc * (mp / mc) ** 2
        else:
            floor_c, floor_p = sp, sc
        add_c = np.where(np.isfinite(floor_c), np.maximum(floor_c - sc, 0.0), 0.0) * wc
        add_p = np.where(np.isfinite(floor_p), np.maximum(floor_p - sp, 0.0), 0.0) * wp
    return vc + add_c, vp + add_p


def mean_interval(
    mean_c: ArrayLike,
    mean_p: ArrayLike,
    var_c: ArrayLike,
    var_p: ArrayLike,
    radius: ArrayLike,
    relative: bool,
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Estimate and interval from IPW summaries and a unit-variance radius (vectorised).

    Parameters
    ----------
    mean_c, mean_p, var_c, var_p : array_like
        See :func:`ipw_summary`.
    radius : array_like
        :math:`g_t` of :func:`normal_mixture_radius` (or ``z / sqrt(t)`` for a fixed-sample
        interval).
    relative : bool
        Interval for the ratio :math:`\\mu_c/\\mu_p` (True) or the difference (False).

    Returns
    -------
    estimate, lower, upper : ndarray

    Notes
    -----
    Difference: :math:`m_c - m_p \\pm g_t\\sqrt{v_c + v_p}`. Ratio: the set of r whose
    contrast :math:`\\mu_c - r\\mu_p` has a confidence sequence containing 0 (Fieller),

    .. math:: (m_c - r m_p)^2 \\le g_t^2 (v_c + r^2 v_p)
              \\iff r \\in \\frac{m_c m_p \\pm g_t\\sqrt{v_c m_p^2 + v_p m_c^2 - g_t^2 v_c v_p}}
              {m_p^2 - g_t^2 v_p},

    unbounded (``[-inf, inf]``) unless :math:`m_p^2 > g_t^2 v_p` and :math:`m_p > 0`. Because
    each r is tested with its own contrast, "ratio interval above 1 + d" is exactly "the
    confidence sequence of :math:`\\mu_c - (1+d)\\mu_p` lies above 0".
    """
    mc, mp, vc, vp, g = np.broadcast_arrays(
        *(np.asarray(x, dtype=float) for x in (mean_c, mean_p, var_c, var_p, radius))
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        if not relative:
            est = mc - mp
            half = g * np.sqrt(vc + vp)
            return est, est - half, est + half
        est = mc / mp
        g2 = g * g
        denom = mp * mp - g2 * vp
        disc = np.maximum(vc * mp * mp + vp * mc * mc - g2 * vc * vp, 0.0)
        root = g * np.sqrt(disc)
        lo = (mc * mp - root) / denom
        hi = (mc * mp + root) / denom
    bounded = (denom > 0) & (mp > 0) & np.isfinite(lo) & np.isfinite(hi)
    lo = np.where(bounded, lo, -np.inf)
    hi = np.where(bounded, hi, np.inf)
    return est, lo, hi


def mean_test(
    production: ArmMoments,
    candidate: ArmMoments,
    margin: float,
    *,
    relative: bool = True,
    direction: Direction | str = Direction.INCREASE,
    alpha: float = 0.05,
    burn_in: int = 100,
    t_opt: float = DEFAULT_T_OPT,
    clusters: tuple[ArmClusters, ArmClusters] | None = None,
    name: str = "mean",
) -> MetricResult:
    """Compare the means of a numeric signal (latency, cost, any per-request number).

    Parameters
    ----------
    production, candidate : ArmMoments
        Stratified moments of the signal on each arm.
    margin : float
        Tolerance, >= 0. Relative (``0.10`` = 10%): the candidate may be up to
        ``(1 + margin)`` times production (``(1 - margin)`` for ``DECREASE``). Absolute: the
        difference may be up to ``+margin`` (``-margin``) in the signal's unit.
    relative : bool
        Whether ``margin`` is relative (result on the ratio scale) or absolute (difference).
    direction : Direction or {"increase", "decrease"}
        ``INCREASE`` when higher is worse (``max_increase``), ``DECREASE`` when lower is worse.
    alpha : float
        Level of the confidence sequence: the verdict is wrong with probability <= alpha
        (asymptotically), however often it is evaluated.
    burn_in : int
        Verdict is UNKNOWN until both arms have this many observations.
    t_opt : float
        Number of requests (both arms) at which the sequence is tightest.
    clusters : (ArmClusters, ArmClusters), optional
        Production's and the candidate's per-cluster sums (sticky routing): each arm's
        variance part becomes cluster-robust (:func:`cluster_ipw_variance`), never below the
        request-level one.
    name : str
        Metric name used in the result and its explanation.

    Returns
    -------
    MetricResult
        ``kind=MEAN``; ratio or difference interval, verdict against the margin.

    Notes
    -----
    Each request i, assigned to the candidate (:math:`A_i = 1`) with known probability
    :math:`\\pi_i`, yields the augmented IPW pseudo-outcome for the contrast
    :math:`\\psi_r = \\mu_c - r\\mu_p`

    .. math:: \\varphi_i = (m_c - r m_p) + \\frac{A_i (Y_i - m_c)}{\\pi_i}
              - r\\,\\frac{(1 - A_i)(Y_i - m_p)}{1 - \\pi_i},

    whose mean is :math:`\\psi_r` for any centring constants and whose sums are functions of
    the stratified moments (:func:`ipw_summary`). The asymptotic confidence sequence is
    :math:`\\bar\\varphi_t \\pm \\hat\\sigma_t g_t` with :math:`g_t` from
    :func:`normal_mixture_radius` and :math:`\\hat\\sigma_t^2 = v_c + r^2 v_p` (each part
    floored by the other arm, :func:`variance_floor`); it is valid for allocations that
    change between steps because the propensities are known.

    Assumptions: the sums hold no order, so the centring means :math:`m_c, m_p` are the
    current Hajek means rather than predictable ones; their error multiplies a mean-zero
    martingale of known design terms and is of smaller order than :math:`g_t`, the same
    argument as for the paper's AIPW sequences. Evaluating on the current sums is exactly
    the sequence at time t. Relative margins assume a positive production mean.

    References
    ----------
    Waudby-Smith, Arbour, Sinha, Kennedy & Ramdas (2024), "Time-uniform central limit theory
    and asymptotic confidence sequences", Ann. Statist., Theorem 2.2 (Gaussian-mixture
    AsympCS) and Sec. 3 (IPW/AIPW pseudo-outcomes in randomised experiments); Fieller (1954),
    J. R. Stat. Soc. B 16(2) (ratio sets).
    """
    d = check_margin(margin, relative, direction)
    alpha = check_alpha(alpha)
    burn_in = check_burn_in(burn_in)
    t_opt = check_positive("t_opt", t_opt)
    summary = ipw_summary(production, candidate)
    radius = normal_mixture_radius(summary.t, normal_mixture_rho2(t_opt, alpha), alpha)
    var_c, var_p = variance_floor(
        summary.mean_c,
        summary.mean_p,
        summary.var_c,
        summary.var_p,
        summary.s2_c,
        summary.s2_p,
        summary.w2_c,
        summary.w2_p,
        relative,
    )
    detail = ""
    if clusters is not None:
        cr_c, cr_p, g_c, g_p = cluster_ipw_variance(
            production, candidate, clusters, summary.mean_c, summary.mean_p, summary.t, alpha
        )
        var_c, var_p = np.maximum(var_c, cr_c), np.maximum(var_p, cr_p)
        detail = f"clusters {g_p}/{g_c}"
    est, lo, hi = mean_interval(summary.mean_c, summary.mean_p, var_c, var_p, radius, relative)
    tol = tolerance_of(margin, relative, d)
    low, up = float(lo), float(hi)
    if np.isnan(low) or np.isnan(up):
        low, up = -np.inf, np.inf
    verdict = classify(low, up, tol, d)
    if min(summary.n_c, summary.n_p) < max(burn_in, 2):
        verdict = classify(-np.inf, np.inf, tol, d)
    return MetricResult(
        name=name,
        kind=MetricKind.MEAN,
        estimate=float(est),
        lower=low,
        upper=up,
        margin=float(margin),
        relative=relative,
        direction=d,
        verdict=verdict,
        n_production=summary.n_p,
        n_candidate=summary.n_c,
        alpha=alpha,
        detail=detail,
    )


__all__ = [
    "DEFAULT_T_OPT",
    "IPWSummary",
    "cluster_ipw_variance",
    "ipw_summary",
    "mean_interval",
    "mean_test",
    "variance_floor",
]
