"""Drift of a stream from its baseline: the sequential tests behind input health.

Input health (``canary.observe.inputs``) counts, per configured request-body field, the JSON
type of each value and the moments of the numeric ones, in two windows: the baseline (learned
from the first requests, or given in the config) and the requests since. This module turns
those counts into the drift checks, one pure vectorised call for all fields at once
(:func:`shift_checks`), so the metrics, the admin API and the rollout analysis evaluate the
very same tests:

- the **mean** of the numeric values: an asymptotic confidence sequence on the difference of
  means (:func:`mean_shift_cs`), flagged when it lies wholly beyond a tolerance in baseline
  standard deviations;
- **proportions** (the null rate, the share of each type): beta-mixture confidence sequences
  (:func:`proportion_shift_cs`), flagged when the difference lies wholly beyond a tolerance in
  percentage points.

Every check is anytime-valid and ``alpha`` is split equally over all of them, so the
probability that any field is ever flagged while the inputs are within the tolerances is at
most ``alpha``, however often the checks are evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import special

from canary.stats._boundaries import bernoulli_cs, normal_mixture_radius, normal_mixture_rho2
from canary.stats._types import FloatArray

MIN_MEAN_SAMPLES: Final = 30  # numeric values per window before the mean is tested
T_OPT: Final = 1000.0  # values at which the mean's confidence sequence is tightest


def mean_shift_cs(
    n: ArrayLike,
    mean: ArrayLike,
    var: ArrayLike,
    base_mean: ArrayLike,
    base_std: ArrayLike,
    base_n: ArrayLike,
    alpha: float,
    t_opt: float = T_OPT,
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Anytime-valid interval for the shift of a mean from its baseline.

    Parameters
    ----------
    n, mean, var : array_like
        Count, mean and (population) variance of the values since the baseline.
    base_mean, base_std : array_like
        Mean and standard deviation of the baseline.
    base_n : array_like
        Number of values the baseline was learned from, or ``inf`` when it was given (then
        it is taken as exact and the whole ``alpha`` goes to the current values).
    alpha : float
        Level: the interval misses the true shift at any time with probability <= alpha
        (asymptotically).
    t_opt : float
        Number of values at which the sequence is tightest.

    Returns
    -------
    estimate, lower, upper : ndarray
        :math:`\\bar x_n - m_b` and the bounds on :math:`\\mu - \\mu_b` (``-inf``/``inf`` when
        ``n`` is 0).

    Notes
    -----
    The values since the baseline get the one-sample Gaussian-mixture asymptotic confidence
    sequence

    .. math:: \\bar x_n \\pm \\hat\\sigma_n\\, g_n, \\qquad
              g_n = \\sqrt{\\frac{2(n\\rho^2 + 1)}{n^2\\rho^2}
              \\log\\frac{\\sqrt{n\\rho^2 + 1}}{a}}

    (:func:`canary.stats.normal_mixture_radius`), with :math:`\\hat\\sigma_n^2` the sample
    variance floored by the baseline's (a small sample that has not yet seen the tails has a
    too small variance; the floor only widens the interval, so the sequence stays valid).
    A learned baseline is one fixed sample of ``base_n`` values taken before the current
    ones: its mean gets the fixed-sample interval :math:`m_b \\pm z_{1-\\alpha/4}
    s_b/\\sqrt{n_b}`, the current sequence is built at :math:`a = \\alpha/2`, and the union
    bound makes :math:`[\\bar x_n - m_b - h_n - h_b,\\ \\bar x_n - m_b + h_n + h_b]` a
    (1 - alpha) sequence for :math:`\\mu - \\mu_b`. A given baseline is exact: :math:`a =
    \\alpha`, :math:`h_b = 0`.

    References
    ----------
    Waudby-Smith, Arbour, Sinha, Kennedy & Ramdas (2024), "Time-uniform central limit theory
    and asymptotic confidence sequences", Ann. Statist., Theorem 2.2 (Gaussian-mixture
    AsympCS for the mean of i.i.d. observations) and Sec. 2.3 (tuning rho).
    """
    nn, m, v, mb, sb, nb = np.broadcast_arrays(
        *(np.asarray(x, dtype=float) for x in (n, mean, var, base_mean, base_std, base_n))
    )
    learned = np.isfinite(nb)
    est = m - mb
    with np.errstate(divide="ignore", invalid="ignore"):
        g = np.where(
            learned,
            normal_mixture_radius(nn, normal_mixture_rho2(t_opt, alpha / 2.0), alpha / 2.0),
            normal_mixture_radius(nn, normal_mixture_rho2(t_opt, alpha), alpha),
        )
        z = float(special.ndtri(1.0 - alpha / 4.0))
        half_b = np.where(learned, z * sb / np.sqrt(np.where(learned, nb, 1.0)), 0.0)
        half = g * np.sqrt(np.maximum(v, sb * sb)) + half_b
    half = np.where(nn > 0, half, np.inf)
    return est, est - half, est + half


def proportion_shift_cs(
    n: ArrayLike,
    k: ArrayLike,
    base_n: ArrayLike,
    base_k: ArrayLike,
    base_p: ArrayLike,
    alpha: float,
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Anytime-valid interval for the shift of a proportion from its baseline.

    Parameters
    ----------
    n, k : array_like
        Requests since the baseline and how many of them had the property.
    base_n, base_k : array_like
        The same for a learned baseline; ``base_n = inf`` when the baseline was given.
    base_p : array_like
        The given baseline proportion (used where ``base_n`` is ``inf``).
    alpha : float
        Level of the two-sided sequence.

    Returns
    -------
    estimate, lower, upper : ndarray
        :math:`k/n - p_b` and bounds on :math:`p - p_b`.

    Notes
    -----
    The same construction as :func:`canary.stats.rate_test` on the difference scale: the
    beta-mixture confidence sequence of :func:`canary.stats.bernoulli_cs` for each sample at
    ``alpha / 2`` (for the current one; the learned baseline is one of its fixed times) and
    :math:`[l - u_b,\\ u - l_b]` by the union bound. A given baseline proportion is exact:
    the current sequence gets the whole ``alpha`` and :math:`[l - p_b,\\ u - p_b]`.

    References
    ----------
    Robbins (1970), Ann. Math. Statist. 41(5), Sec. 3 (beta mixture); Howard, Ramdas,
    McAuliffe & Sekhon (2021), Ann. Statist. 49(2), Prop. 7.
    """
    nn, kk, nb, kb, pb = np.broadcast_arrays(
        *(np.asarray(x, dtype=float) for x in (n, k, base_n, base_k, base_p))
    )
    shape = nn.shape
    nn, kk, nb, kb, pb = (np.atleast_1d(x).ravel() for x in (nn, kk, nb, kb, pb))
    learned = np.isfinite(nb)
    lower, upper = np.empty_like(nn), np.empty_like(nn)
    if learned.any():
        i = learned
        lo, hi = bernoulli_cs(nn[i], kk[i], alpha / 2.0)
        lo_b, hi_b = bernoulli_cs(nb[i], kb[i], alpha / 2.0)
        lower[i], upper[i] = lo - hi_b, hi - lo_b
    if not learned.all():
        i = ~learned
        lo, hi = bernoulli_cs(nn[i], kk[i], alpha)
        lower[i], upper[i] = lo - pb[i], hi - pb[i]
    with np.errstate(divide="ignore", invalid="ignore"):
        p_now = np.where(nn > 0, kk / np.where(nn > 0, nn, 1.0), np.nan)
        p_base = np.where(learned, kb / np.where(learned & (nb > 0), nb, 1.0), pb)
    est = p_now - p_base
    return est.reshape(shape), lower.reshape(shape), upper.reshape(shape)


@dataclass(frozen=True)
class ShiftChecks:
    """The drift checks of F fields, as ``(F, 1 + P)`` arrays: column 0 is the mean of the
    numeric values, columns 1.. the P proportions in the order they were given.

    Attributes
    ----------
    estimate, lower, upper
        Estimated shift from the baseline and its confidence-sequence bounds.
    tolerance
        Allowed shift either way: ``mean_tolerance`` baseline standard deviations for the
        mean, ``rate_tolerance`` for the proportions.
    samples
        Values behind the current side: numeric values for the mean, requests else.
    shown
        The check has data to show (a check without is skipped, never flagged).
    drifted
        Shown, and the interval lies wholly beyond the tolerance.
    alpha
        Level of each check (the family ``alpha`` split over ``F x (1 + P)`` checks).
    """

    estimate: FloatArray
    lower: FloatArray
    upper: FloatArray
    tolerance: FloatArray
    samples: NDArray[np.int64]
    shown: NDArray[np.bool_]
    drifted: NDArray[np.bool_]
    alpha: float


def shift_checks(
    *,
    n: ArrayLike,
    k: ArrayLike,
    base_n: ArrayLike,
    base_k: ArrayLike,
    base_p: ArrayLike,
    keep_unseen: ArrayLike,
    numbers: ArrayLike,
    mean: ArrayLike,
    var: ArrayLike,
    base_numbers: ArrayLike,
    base_mean: ArrayLike,
    base_std: ArrayLike,
    alpha: float,
    mean_tolerance: float,
    rate_tolerance: float,
    min_numbers: int = MIN_MEAN_SAMPLES,
) -> ShiftChecks:
    """Every drift check of F fields against their baselines, at a family level ``alpha``.

    Parameters
    ----------
    n, k : array_like, shape (F, P)
        Per field and proportion: requests since the baseline and how many had the property.
    base_n, base_k, base_p : array_like, shape (F, P)
        The baseline's: counts of a learned one, or ``base_n = inf`` and the proportion
        ``base_p`` of a given one (``nan`` where the config gives none: no check).
    keep_unseen : array_like of bool, shape (P,)
        Proportions checked even when the property was seen on neither side (a null rate
        of 0 is a finding; a type that nobody sends is not).
    numbers, mean, var : array_like, shape (F,)
        Count, mean and population variance of the numeric values since the baseline.
    base_numbers, base_mean, base_std : array_like, shape (F,)
        The baseline's numeric values: count (``inf`` when given), mean and standard
        deviation (``nan`` where unknown: no mean check).
    alpha : float
        Family level, split equally over all ``F x (1 + P)`` checks.
    mean_tolerance : float
        Allowed shift of the mean, in baseline standard deviations.
    rate_tolerance : float
        Allowed shift of a proportion (a fraction: 0.05 is 5 percentage points).
    min_numbers : int
        Numeric values each window needs before its mean is checked (a learned baseline
        counts; a given one is exact).

    Returns
    -------
    ShiftChecks
        Column 0 the mean, columns 1.. the proportions.

    Notes
    -----
    The mean check is :func:`mean_shift_cs`, each proportion :func:`proportion_shift_cs`,
    all at :math:`a = \\alpha / (F (1 + P))`: by the union bound over the checks and the
    time-uniform coverage of each sequence, the probability that any check ever flags while
    every shift is within its tolerance is at most :math:`\\alpha`, at whatever times the
    checks are evaluated.
    """
    cur_n, cur_k, nb, kb, pb = np.broadcast_arrays(
        *(np.asarray(x, dtype=float) for x in (n, k, base_n, base_k, base_p))
    )
    if cur_n.ndim != 2:
        raise ValueError(f"proportion counts must be (fields, proportions), got {cur_n.shape}")
    fields, props = cur_n.shape
    m_n, m, v, m_nb, mb, sb = np.broadcast_arrays(
        *(
            np.asarray(x, dtype=float)
            for x in (numbers, mean, var, base_numbers, base_mean, base_std)
        )
    )
    a = alpha / max(fields * (1 + props), 1)
    shape = (fields, 1 + props)
    estimate, lower, upper = np.empty(shape), np.empty(shape), np.empty(shape)
    tolerance = np.empty(shape)

    # Proportions: shown with data and a baseline, unless the property is unseen on both sides.
    est, lo, hi = proportion_shift_cs(cur_n, cur_k, nb, kb, pb, a)
    learned = np.isfinite(nb)
    with np.errstate(divide="ignore", invalid="ignore"):
        base_share = np.where(learned, np.where(nb > 0, kb / np.where(nb > 0, nb, 1.0), 0.0), pb)
    seen = (cur_k != 0) | (base_share != 0) | np.asarray(keep_unseen, dtype=bool)
    shown_p = (cur_n > 0) & ~np.isnan(est) & seen
    estimate[:, 1:], lower[:, 1:], upper[:, 1:] = est, lo, hi
    tolerance[:, 1:] = rate_tolerance

    # The mean: enough numeric values on the current side (and in a learned baseline).
    given = ~np.isfinite(m_nb)
    shown_m = (
        (m_n >= min_numbers) & (given | (m_nb >= min_numbers)) & np.isfinite(mb) & np.isfinite(sb)
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        est_m, lo_m, hi_m = mean_shift_cs(m_n, m, v, mb, sb, m_nb, a)
        tolerance[:, 0] = mean_tolerance * sb
    estimate[:, 0], lower[:, 0], upper[:, 0] = est_m, lo_m, hi_m

    shown = np.empty(shape, dtype=bool)
    shown[:, 0], shown[:, 1:] = shown_m, shown_p
    samples = np.empty(shape, dtype=np.int64)
    samples[:, 0], samples[:, 1:] = m_n, cur_n
    drifted = shown & ((lower > tolerance) | (upper < -tolerance))
    return ShiftChecks(estimate, lower, upper, tolerance, samples, shown, drifted, a)


__all__ = [
    "MIN_MEAN_SAMPLES",
    "T_OPT",
    "ShiftChecks",
    "mean_shift_cs",
    "proportion_shift_cs",
    "shift_checks",
]
