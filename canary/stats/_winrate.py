"""The candidate's win rate in pairwise judging, tested against 50% (``signal: judge``).

A judge sees both arms' answers to the same request and gives a verdict
:math:`w \\in [0, 1]` for the candidate (1 it wins, 0 production wins, 0.5 a tie, or a
probability). Both arms answered every judged request, so there is no allocation to undo and
no second arm to estimate: the test is one-sample, on the running mean of ``w``, compared
with 1/2. With sticky routing the judged requests of one user share that user's preference,
so the variance is cluster-robust over the users' hash buckets, as in the two-sample rate
test (:mod:`canary.stats._design`).
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats as _sps

from canary.stats._boundaries import normal_mixture_radius, normal_mixture_rho2
from canary.stats._checks import check_alpha, check_burn_in, check_positive
from canary.stats._design import ArmClusters
from canary.stats._types import (
    ArmMoments,
    Direction,
    FloatArray,
    MetricKind,
    MetricResult,
    classify,
    tolerance_of,
)

EVEN = 0.5  # the win rate of a candidate that is as good as production
# Judged pairs cost a model call each: a few hundred to a few thousand per rollout, so the
# sequence is tuned to be tightest at 1000 pairs rather than at the 10k requests of the
# two-sample tests (any value is valid; it only moves width between times).
DEFAULT_WIN_RATE_T_OPT = 1000.0


def few_clusters_factors(clusters: ArrayLike, alpha: float) -> FloatArray:
    """Vectorised :func:`~canary.stats._design.few_clusters_factor` (same rounding to 0.01):
    :math:`\\frac{G}{G-1}(t_{G-1,1-\\alpha/2}/z_{1-\\alpha/2})^2`, ``inf`` for G <= 1."""
    g = np.round(np.asarray(clusters, dtype=float), 2)
    q = 1.0 - alpha / 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        df = np.where(g > 1.0, g - 1.0, 1.0)
        ratio = _sps.t.ppf(q, df) / _sps.norm.ppf(q)
        out = g / df * ratio * ratio
    return np.where(g > 1.0, out, np.inf)


def win_rate_interval(
    n: ArrayLike,
    total: ArrayLike,
    total_sq: ArrayLike,
    alpha: float,
    *,
    cluster_n: ArrayLike | None = None,
    cluster_sum: ArrayLike | None = None,
    t_opt: float = DEFAULT_WIN_RATE_T_OPT,
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Win rate and its (1 - alpha) asymptotic confidence sequence (vectorised).

    Parameters
    ----------
    n, total, total_sq : array_like
        Judged pairs, the sum of their verdicts and of their squares (any leading shape).
    alpha : float
        Level.
    cluster_n, cluster_sum : array_like, optional
        Pairs and verdict sums per cluster, shape ``n.shape + (G,)`` (sticky routing).
    t_opt : float
        Pairs at which the sequence is tightest.

    Returns
    -------
    estimate, lower, upper : ndarray
        The mean verdict and the interval, clipped to [0, 1]; ``nan, 0, 1`` with no pairs.

    Notes
    -----
    With :math:`m_t` the mean of t verdicts and :math:`g_t` the Gaussian-mixture radius of
    :func:`normal_mixture_radius`, the interval is :math:`m_t \\pm g_t\\hat\\sigma_t` where
    :math:`\\hat\\sigma^2_t` is the largest of

    - the sample variance of the verdicts,
    - the Bernoulli variance :math:`\\tilde p(1-\\tilde p)` at :math:`\\tilde p = (S+1)/(t+2)`
      (the most a [0, 1] value with that mean can vary; it keeps the start honest, as the
      two-sample rate test's floor does),
    - with clusters, :math:`\\kappa\\,\\frac1t\\sum_g (S_g - m_t n_g)^2` (cluster-robust),
      :math:`\\kappa` the few-clusters inflation at the effective number of clusters
      :math:`(\\sum_g n_g^2)^2/\\sum_g n_g^4`.

    References
    ----------
    Waudby-Smith, Arbour, Sinha, Kennedy & Ramdas (2024), "Time-uniform central limit theory
    and asymptotic confidence sequences", Ann. Statist., Theorem 2.2; Cameron & Miller
    (2015), J. Human Resources 50(2), Sec. VI (few clusters).
    """
    alpha = check_alpha(alpha)
    t_opt = check_positive("t_opt", t_opt)
    nn = np.asarray(n, dtype=float)
    s = np.asarray(total, dtype=float)
    q = np.asarray(total_sq, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        m = np.where(nn > 0, s / nn, np.nan)
        ss = np.maximum(q - s * np.where(nn > 0, m, 0.0), 0.0)
        s2 = np.where(nn > 1, ss / np.maximum(nn - 1.0, 1.0), 0.0)
        p = (s + 1.0) / (nn + 2.0)
        var = np.maximum(s2, p * (1.0 - p))
        if cluster_n is not None and cluster_sum is not None:
            cn = np.asarray(cluster_n, dtype=float)
            cs = np.asarray(cluster_sum, dtype=float)
            z = cs - np.where(nn > 0, m, 0.0)[..., None] * cn
            a2 = cn * cn
            a4 = (a2 * a2).sum(axis=-1)
            g_eff = np.where(a4 > 0, a2.sum(axis=-1) ** 2 / np.where(a4 > 0, a4, 1.0), 0.0)
            robust = (z * z).sum(axis=-1) / np.where(nn > 0, nn, 1.0)
            kappa = few_clusters_factors(g_eff, alpha)
            var = np.where(cn.sum(axis=-1) > 0, np.maximum(var, robust * kappa), var)
        g = normal_mixture_radius(nn, normal_mixture_rho2(t_opt, alpha), alpha)
        half = g * np.sqrt(var)
        lo = np.where(nn > 0, np.clip(m - half, 0.0, 1.0), 0.0)
        hi = np.where(nn > 0, np.clip(m + half, 0.0, 1.0), 1.0)
    return m, lo, hi


def win_rate_test(
    verdicts: ArmMoments,
    margin: float,
    *,
    alpha: float = 0.05,
    burn_in: int = 100,
    clusters: ArmClusters | None = None,
    t_opt: float = DEFAULT_WIN_RATE_T_OPT,
    name: str = "judge",
) -> MetricResult:
    """Test the candidate's win rate against 50%: WORSE when provably below ``0.5 - margin``.

    Parameters
    ----------
    verdicts : ArmMoments
        Moments of the judge's verdicts (values in [0, 1]; strata are pooled: every judged
        request was answered by both arms).
    margin : float
        Tolerance in [0, 0.5): ``0.05`` (5 pp) makes the candidate WORSE when its win rate is
        provably below 45% and OK when provably at least 45%.
    alpha : float
        Level of the confidence sequence.
    burn_in : int
        Verdict is UNKNOWN until this many pairs are judged.
    clusters : ArmClusters, optional
        The verdicts' per-cluster counts and sums (sticky routing: users are the unit).
    t_opt : float
        Pairs at which the sequence is tightest.
    name : str
        Metric name.

    Returns
    -------
    MetricResult
        ``kind=RATE`` on the difference scale: estimate and interval are the win rate minus
        0.5, the tolerance is ``-margin``; ``n_production = n_candidate`` = judged pairs.

    Notes
    -----
    See :func:`win_rate_interval`.
    """
    alpha = check_alpha(alpha)
    burn_in = check_burn_in(burn_in)
    if not 0.0 <= margin < EVEN or math.isnan(margin):
        raise ValueError(f"margin must be in [0, 0.5) (percentage points below 50%), got {margin}")
    n, s, q = float(verdicts.n.sum()), float(verdicts.sum.sum()), float(verdicts.sumsq.sum())
    if n and (s < -1e-9 or s > n * (1 + 1e-9) or q > s * (1 + 1e-9) + 1e-9):
        raise ValueError(f"verdicts must lie in [0, 1], got n={n} sum={s} sumsq={q}")
    cn = cs = None
    g = 0
    if clusters is not None and clusters.n.size:
        cn, cs = clusters.n.sum(axis=0), clusters.sum.sum(axis=0)
        g = int(np.count_nonzero(cn))
    m, lo_a, hi_a = win_rate_interval(n, s, q, alpha, cluster_n=cn, cluster_sum=cs, t_opt=t_opt)
    est, lo, hi = float(m) - EVEN, float(lo_a) - EVEN, float(hi_a) - EVEN
    d = Direction.DECREASE
    tol = tolerance_of(margin, False, d)
    verdict = classify(lo, hi, tol, d)
    if n < max(burn_in, 2):
        verdict = classify(-math.inf, math.inf, tol, d)
    detail = f"win rate {float(m):.3f} over {int(n)} judged pairs" if n else "no judged pairs"
    if g:
        detail += f"; clusters {g}"
    return MetricResult(
        name=name,
        kind=MetricKind.RATE,
        estimate=est,
        lower=lo,
        upper=hi,
        margin=float(margin),
        relative=False,
        direction=d,
        verdict=verdict,
        n_production=int(n),
        n_candidate=int(n),
        alpha=alpha,
        detail=detail,
    )


__all__ = [
    "DEFAULT_WIN_RATE_T_OPT",
    "EVEN",
    "few_clusters_factors",
    "win_rate_interval",
    "win_rate_test",
]
