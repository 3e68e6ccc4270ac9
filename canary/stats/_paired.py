"""Paired windows: anytime-valid test on the mean of per-window candidate-vs-production values.

Resource signals (memory, CPU per request, GPU utilisation) are not measured per request but
per scrape window, on both arms at the same moment. Each window gives one paired value: the
log ratio ``log(c / p)`` for relative tolerances, the difference ``c - p`` for absolute ones.
Pairing in time removes what both arms share (load, time of day, a noisy neighbour), so the
test is a one-sample test on the paired values. What pairing does not remove is that
consecutive windows are correlated (garbage collection cycles, caches, slow drifts): the
variance of their mean is the long-run variance, not the per-window one, and the test below
is built for that (:func:`paired_interval`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from statistics import NormalDist

import numpy as np
from numpy.typing import ArrayLike

from canary.stats._boundaries import normal_mixture_rho2
from canary.stats._checks import check_alpha, check_burn_in, check_margin, check_positive
from canary.stats._types import (
    ArmMoments,
    Direction,
    FloatArray,
    MetricKind,
    MetricResult,
    classify,
    tolerance_of,
)

DEFAULT_WINDOW_BURN_IN = 10
"""Paired windows before any verdict. Below about ten windows nothing useful can be said
about their autocorrelation, so the sequence is not looked at (simulated:
``loadtest/paired_sim.py``, ``docs/paired-simulation.md``)."""
DEFAULT_WINDOW_T_OPT = 30.0
"""Windows at which the sequence is tightest: 30 windows of 5 s are 2.5 minutes."""
DEFAULT_SD_FLOOR_FRACTION = 0.01
"""Default floor of the per-window standard deviation, as a fraction of the tolerance's
distance from "no change" on the test scale (``log(1 + d)`` or ``d``)."""
MAX_AUTOCORRELATION = 0.99
"""Largest lag-1 autocorrelation the upper bound can reach (design effect up to 199)."""
AUTOCORRELATION_BETA_PER_ALPHA = 1.5
"""The upper confidence bound on the autocorrelation is at level ``1 - beta`` with
``beta = AUTOCORRELATION_BETA_PER_ALPHA * alpha`` (calibrated in ``loadtest/paired_sim.py``:
the largest error rate over the simulated dependence stays below alpha)."""
DEFAULT_BATCH_SIZES = (4, 16, 64, 256)
"""Batch lengths (windows) whose sliding sums a caller should record for the long-run
variance check of :func:`paired_interval` (``batches``)."""
BATCH_MIN_DF = 10.0
"""A batch length is used once its overlapping-batch-means variance has this many degrees of
freedom (``1.5 (n / b - 1)``), i.e. from about ``7.7 b`` windows on."""

_RHO_GRID = np.linspace(0.0, MAX_AUTOCORRELATION, 100)


def design_effect(rho: ArrayLike, n: ArrayLike) -> FloatArray:
    """Variance of the mean of ``n`` consecutive AR(1) values, in units of ``var / n``.

    Parameters
    ----------
    rho : array_like
        Lag-1 autocorrelation, in [0, 1).
    n : array_like
        Number of consecutive values (> 0).

    Returns
    -------
    ndarray
        :math:`f_n(\\rho) = n \\operatorname{Var}(\\bar x_n) / \\gamma_0`, between 1 and
        :math:`(1 + \\rho) / (1 - \\rho)` (its limit).

    Notes
    -----
    For a stationary AR(1) sequence with marginal variance :math:`\\gamma_0`,

    .. math:: f_n(\\rho) = \\frac{1 + \\rho}{1 - \\rho}
              - \\frac{2\\rho\\,(1 - \\rho^n)}{n\\,(1 - \\rho)^2},

    and the expected sample variance is :math:`\\gamma_0\\,(n - f_n(\\rho)) / (n - 1)` (Bayley &
    Hammersley 1946): with few strongly correlated windows the sample variance is much
    smaller than the marginal one.
    """
    r = np.asarray(rho, dtype=float)
    nn = np.asarray(n, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        f = (1.0 + r) / (1.0 - r) - 2.0 * r * (1.0 - r**nn) / (nn * (1.0 - r) ** 2)
    return np.where((r > 0.0) & (nn > 0.0), f, 1.0)


def _log_ratio_upper_quantile(rho: FloatArray, n: float, z: float) -> FloatArray:
    """Approximate upper quantile (normal quantile ``z``) of the log von Neumann ratio at n
    windows of a Gaussian AR(1) sequence with coefficient ``rho`` (see paired_interval)."""
    f = design_effect(rho, n)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.log((1.0 - rho) * (n - 1.0) / (n - f))
        var = (1.0 + rho) / (n * (1.0 - rho) + 3.0 * rho)
        skew = -(2.8 - 1.9 * rho) / math.sqrt(n)
        zz = np.maximum(z + (z * z - 1.0) * skew / 6.0, 0.5 * z)  # Cornish-Fisher
        return mean + np.maximum(rho - 0.45, 0.0) * var + zz * np.sqrt(var)


def autocorrelation_upper(
    n: ArrayLike, var: ArrayLike, change_n: ArrayLike, change_sq: ArrayLike, beta: float
) -> FloatArray:
    """Upper confidence bound for the lag-1 autocorrelation from the von Neumann ratio.

    Parameters
    ----------
    n : array_like
        Number of values.
    var : array_like
        Their sample variance (``n - 1`` denominator).
    change_n, change_sq : array_like
        Number of changes between consecutive values and the sum of their squares.
    beta : float
        Level: under a Gaussian AR(1) sequence the bound is below the true coefficient with
        probability about ``beta`` (at most, for fewer than about 30 values).

    Returns
    -------
    ndarray
        :math:`\\tilde\\rho \\in [0, 0.99]`; 0 without changes or without variation, 0.99 with
        fewer than three values.

    Notes
    -----
    With the ratio :math:`R = (D / k) / (2 s^2)` (``D`` the sum of ``k`` squared changes),
    :math:`\\tilde\\rho = \\sup\\{\\rho \\in [0, 0.99] : q_{1-\\beta}(\\rho, n) \\ge \\log R\\}`,
    :math:`q` the upper quantile of :math:`\\log R` under an AR(1) sequence with coefficient
    :math:`\\rho` (approximation: :func:`paired_interval`, Notes). It is found on a grid of
    100 values with linear interpolation.
    """
    nn, v, k, dq = np.broadcast_arrays(
        *(np.asarray(x, dtype=float) for x in (n, var, change_n, change_sq))
    )
    z = NormalDist().inv_cdf(1.0 - beta)
    out = np.where(nn > 2, 0.0, MAX_AUTOCORRELATION)
    live = (nn > 2) & (k > 0) & (v > 0) & np.isfinite(v)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_r = np.where(live, np.log(np.maximum(dq, 0.0) / k / (2.0 * v)), 0.0)
    grid = _RHO_GRID
    last = grid.size - 1
    flat_out = out.reshape(-1)
    idx = np.flatnonzero(live.reshape(-1))
    if idx.size == 0:
        return out
    sizes = nn.reshape(-1)[idx]
    order = np.argsort(sizes, kind="stable")
    idx, sizes = idx[order], sizes[order]
    starts = np.flatnonzero(np.r_[True, sizes[1:] != sizes[:-1]])
    for a, b in zip(starts, np.r_[starts[1:], sizes.size], strict=True):
        q = _log_ratio_upper_quantile(grid, float(sizes[a]), z)
        qm = np.maximum.accumulate(q[::-1])[::-1]  # non-increasing in rho
        lr = log_r.reshape(-1)[idx[a:b]]
        count = np.searchsorted(-qm, -lr, side="right")  # grid points with qm >= log R
        i = np.clip(count - 1, 0, last)
        j = np.clip(count, 0, last)
        with np.errstate(divide="ignore", invalid="ignore"):
            frac = np.where(j > i, (qm[i] - lr) / (qm[i] - qm[j]), 0.0)
        rho = grid[i] + np.clip(np.nan_to_num(frac), 0.0, 1.0) * (grid[j] - grid[i])
        flat_out[idx[a:b]] = np.where(count == 0, 0.0, np.where(count > last, grid[last], rho))
    return flat_out.reshape(out.shape)


def student_mixture_radius(t: ArrayLike, df: ArrayLike, rho2: float, alpha: float) -> FloatArray:
    """Unit-variance radius of the Gaussian-mixture sequence with an estimated variance.

    Parameters
    ----------
    t : array_like
        Number of observations (> 0).
    df : array_like
        Degrees of freedom of the variance estimate (> 0; ``inf`` gives
        :func:`normal_mixture_radius`).
    rho2 : float
        Mixing variance, see :func:`normal_mixture_rho2`.
    alpha : float
        Level.

    Returns
    -------
    ndarray
        :math:`g_t^{(\\nu)}` such that :math:`\\bar x_t \\pm \\hat\\sigma_t g_t^{(\\nu)}` is the
        sequence; ``inf`` when ``df`` is too small for any finite radius.

    Notes
    -----
    With :math:`a = t\\rho^2 + 1` and :math:`L = (a / \\alpha^2)^{1/(\\nu + 1)}`,

    .. math:: g_t^{(\\nu)} = \\sqrt{\\frac{\\nu (L - 1)}{t\\,(1 - L / a)}}
              \\quad (L < a;\\ \\infty \\text{ otherwise}).

    For i.i.d. Gaussian values, :math:`\\hat\\sigma_t = s_t` and :math:`\\nu = t - 1` this is the
    exact confidence sequence of the scale-invariant mixture martingale (a Gaussian mixture
    over :math:`\\mu/\\sigma` with variance :math:`\\rho^2`, the right Haar measure over
    :math:`\\sigma`): Lai (1976), Wang & Ramdas (2023). As :math:`\\nu \\to \\infty` it tends to
    the known-variance radius of :func:`normal_mixture_radius`; for small :math:`\\nu` it is
    wider, as a t quantile is wider than the normal one.

    References
    ----------
    Lai (1976), "On confidence sequences", Ann. Statist. 4(2); Wang & Ramdas (2023),
    "Anytime-valid t-tests and confidence sequences for Gaussian means with unknown
    variance", arXiv:2310.03722, Sec. 3.
    """
    tt = np.asarray(t, dtype=float)
    nu = np.asarray(df, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        log_a = np.log(tt * rho2 + 1.0)
        log_l = (log_a + 2.0 * math.log(1.0 / alpha)) / (nu + 1.0)
        finite = np.isfinite(nu)
        num = np.where(finite, np.expm1(log_l) * nu, log_a + 2.0 * math.log(1.0 / alpha))
        den = -np.expm1(log_l - log_a)
        den = np.where(finite, den, tt * rho2 / (tt * rho2 + 1.0))
        g = np.sqrt(num / (tt * den))
    return np.where((tt > 0) & (nu > 0) & (den > 0) & np.isfinite(g), g, np.inf)


def _batch_variances(
    nn: FloatArray,
    mean: FloatArray,
    batches: Mapping[int, tuple[ArrayLike, ArrayLike, ArrayLike]],
) -> list[tuple[FloatArray, FloatArray]]:
    """Overlapping-batch-means variance and its degrees of freedom per batch length."""
    out = []
    for b, (count, total, total_sq) in sorted(batches.items()):
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"batch lengths must be integers >= 1, got {b!r}")
        m, t, q = (np.asarray(x, dtype=float) for x in (count, total, total_sq))
        with np.errstate(divide="ignore", invalid="ignore"):
            ss = np.maximum(q - 2.0 * b * mean * t + m * b * b * mean * mean, 0.0)
            var = ss / (b * m) * nn / (nn - b)
            df = 1.5 * (m - 1.0) / b
        ok = (m > 1) & (nn > b) & np.isfinite(var)
        out.append((np.where(ok, var, np.nan), np.where(ok, df, 0.0)))
    return out


def paired_interval(
    n: ArrayLike,
    total: ArrayLike,
    total_sq: ArrayLike,
    change_n: ArrayLike,
    change_sq: ArrayLike,
    alpha: float,
    t_opt: float = DEFAULT_WINDOW_T_OPT,
    sd_floor: float = 0.0,
    *,
    batches: Mapping[int, tuple[ArrayLike, ArrayLike, ArrayLike]] | None = None,
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """Mean of paired values and its confidence sequence under serial dependence (vectorised).

    Parameters
    ----------
    n, total, total_sq : array_like
        Number of paired values and their sum and sum of squares.
    change_n, change_sq : array_like
        Number of changes between consecutive windows and the sum of their squares
        (``(x_i - x_{i-1})**2``, only where window i-1 directly preceded window i); zeros
        mean "independent windows" (no autocorrelation allowance).
    alpha : float
        Level of the confidence sequence.
    t_opt : float
        Number of windows at which the sequence is tightest.
    sd_floor : float
        Lower bound on the per-window standard deviation (same unit as the values).
    batches : mapping of int to (count, sum, sum of squares), optional
        For batch lengths ``b`` (e.g. :data:`DEFAULT_BATCH_SIZES`): the number, sum and sum
        of squares of the sums of ``b`` consecutive windows, one per window whose ``b - 1``
        predecessors were all recorded (overlapping batches). They add a long-run variance
        check that does not rely on an AR(1) shape. None: the AR(1) allowance alone.

    Returns
    -------
    mean, lower, upper, rho : ndarray
        Mean of the values, the bounds (``-inf``/``inf`` below two values or while the
        dependence allows no finite bound), and the lag-1 autocorrelation allowed for (the
        upper bound :math:`\\tilde\\rho` below; 0 without changes).

    Notes
    -----
    *Target.* For a stationary sequence with autocovariances :math:`\\gamma_k`, the mean's
    variance is :math:`\\operatorname{Var}(\\bar x_n) \\approx \\sigma^2 / n` with the long-run
    variance :math:`\\sigma^2 = \\sum_{k} \\gamma_k`, not :math:`\\gamma_0`. The partial sums of
    weakly dependent sequences are strongly approximated by :math:`\\sigma W(n)` (Berkes, Liu &
    Wu 2014), which is what the asymptotic confidence sequence of Waudby-Smith et al. (2024,
    Thm 2.2) needs, so :math:`\\bar x_n \\pm \\hat\\sigma_n g_n` stays asymptotically valid with
    any consistent (or upward-biased) :math:`\\hat\\sigma_n^2` of the long-run variance. The
    i.i.d. variance :math:`s_n^2` is too small under positive correlation, and so is an AR(1)
    allowance from a point estimate of the autocorrelation (the former one: 13% false
    decisions at alpha = 5% with an autocorrelation of 0.9). The windows are few (10 to a few
    hundred) and the estimate is what fails; the steps below are built for that.

    *1. Autocorrelation bound.* With :math:`D` the sum of :math:`k` squared changes and the
    von Neumann ratio :math:`R = (D / k) / (2 s_n^2)`, under a Gaussian AR(1) sequence
    :math:`\\log R` is approximately normal with mean
    :math:`m = \\log\\frac{(1 - \\rho)(n - 1)}{n - f_n(\\rho)} + (\\rho - 0.45)_+ v`, variance
    :math:`v = (1 + \\rho) / (n (1 - \\rho) + 3\\rho)` and skewness
    :math:`-(2.8 - 1.9\\rho) / \\sqrt n` (:math:`f_n` of :func:`design_effect`). The first
    term of :math:`m` is exact in expectation (:math:`E[D/k] = 2\\gamma_0(1 - \\rho)`,
    :math:`E[s_n^2] = \\gamma_0 (n - f_n)/(n - 1)`), :math:`v` is the asymptotic variance
    :math:`(1+\\rho)/((1-\\rho)n)` with its small-sample saturation, and the constants are
    fitted to simulated quantiles (n 10 to 500, :math:`\\rho` 0 to 0.95); upper quantiles use a
    Cornish-Fisher correction. The bound :math:`\\tilde\\rho` (:func:`autocorrelation_upper`)
    is the largest :math:`\\rho \\le 0.99` whose upper :math:`1 - \\beta` quantile still
    reaches the observed :math:`\\log R`, with
    :math:`\\beta = 1.5\\alpha` (:data:`AUTOCORRELATION_BETA_PER_ALPHA`). It is the small-sample
    part: ten windows from a sequence with autocorrelation 0.9 look independent often enough
    (the estimate :math:`1 - R` at or below 0 in about 5% of runs) that a point estimate, or
    an estimate plus one standard error, lets the sequence decide on what is one slowly
    moving level.

    *2. Variance of the mean.* Under AR(1) with :math:`\\tilde\\rho`,
    :math:`\\hat\\gamma_0 = (s_n^2 + f^2) \\frac{n - 1}{n - f_n(\\tilde\\rho)}` (the expected
    shortfall of :math:`s_n^2` undone) and
    :math:`\\hat\\sigma_n^2 = \\hat\\gamma_0 f_n(\\tilde\\rho)`, exact in expectation for the mean
    of the n windows seen. The floor ``f`` enters as independent noise of variance
    :math:`f^2` added to every window, in :math:`s_n^2` and in :math:`D` (:math:`2f^2` per
    change): windows that vary less than the floor (a stable ratio with rounding noise)
    then look independent rather than perfectly smooth, and the interval never gets
    narrower than the floor's.

    *3. Boundary.* :math:`\\bar x_n \\pm \\hat\\sigma_n g_n^{(\\nu)}` with the Student-ised
    mixture radius of :func:`student_mixture_radius` and
    :math:`\\nu = (n - 1)(1 - \\tilde\\rho^2)/(1 + \\tilde\\rho^2)` degrees of freedom (the
    effective degrees of freedom of :math:`s_n^2` under AR(1), Bayley & Hammersley 1946). For
    independent windows (no changes) this is Lai's exact sequence for a Gaussian mean with
    unknown variance; as n grows :math:`\\tilde\\rho \\to \\rho`, :math:`\\nu \\to \\infty` and
    :math:`\\hat\\sigma_n^2 \\to \\gamma_0 (1 + \\rho)/(1 - \\rho)`, the AR(1) long-run variance
    (Andrews 1991's approximating model), i.e. the asymptotic sequence above.

    *4. Batches (optional).* With :math:`S_j` the sums of ``b`` consecutive windows
    (:math:`m` of them), the overlapping-batch-means variance
    :math:`\\hat\\sigma_b^2 = \\frac{n}{b\\,m\\,(n - b)} \\sum_j (S_j - b\\bar x_n)^2`
    (Meketon & Schmeiser 1984) is asymptotically the Bartlett-kernel (Newey-West) estimate with
    bandwidth ``b`` (Welch 1987) and consistent for :math:`\\sigma^2` when ``b`` grows with n
    (Flegal & Jones 2010), whatever the shape of the dependence. Each ``b`` with
    :math:`\\nu_b = 1.5 (m - 1)/b \\ge 10` (:data:`BATCH_MIN_DF`) gives the radius
    :math:`(\\hat\\sigma_b^2 + f^2)^{1/2} g_n^{(\\nu_b)}` and the largest radius is used (valid
    whichever of the AR(1) and the batch estimate is the right one; asymptotically as wide
    as the larger), so the usable bandwidth grows linearly with n up to the largest recorded
    ``b``. This catches
    dependence that lag 1 understates (a slow component under white noise), once n is a few
    times its correlation time; without batches such dependence stays under-covered however
    long the test runs.

    Simulated (``loadtest/paired_sim.py``, ``docs/paired-simulation.md``: 4000 runs per row,
    checked after every window up to 500 windows, burn-in 10, mean exactly at the margin,
    relative and absolute margins, both directions): with batches, false WORSE and false OK
    each stay below alpha for AR(1) autocorrelations 0 to 0.9 (at most 3.9% at alpha = 5%,
    0.6% at 1.25%), MA(3) (0.7%, 0.05%) and an AR(1) component with coefficient 0.7 carrying
    half the variance under white noise (4.5%, 0.95%); the former allowance reached 14% and
    11% at 0.9. Not covered: a component with coefficient 0.8 (lag-1 autocorrelation 0.4,
    long-run variance 5 times the per-window one) gives up to 8.2% and 2.3% (1.6 to 1.8
    alpha), and strongly skewed windows (exponential innovations) err on one side at about
    alpha (4.5%, 1.2%) whatever the dependence. The price is time to a decision while windows
    are few: for a true effect of twice the margin, 1.4 to 2.7 times the windows the former
    (invalid) allowance needed, most where it decided right after its burn-in; rarely a
    decision before 15 windows.

    References
    ----------
    Waudby-Smith, Arbour, Sinha, Kennedy & Ramdas (2024), "Time-uniform central limit theory
    and asymptotic confidence sequences", Ann. Statist., Thm 2.2; Berkes, Liu & Wu (2014),
    "Komlós-Major-Tusnády approximation under dependence", Ann. Probab. 42(2); von Neumann
    (1941), "Distribution of the ratio of the mean square successive difference to the
    variance", Ann. Math. Statist. 12(4); Bayley & Hammersley (1946), "The 'effective' number
    of independent observations in an autocorrelated time series", J. R. Stat. Soc. Suppl.
    8(2); Lai (1976), "On confidence sequences", Ann. Statist. 4(2); Wang & Ramdas (2023),
    arXiv:2310.03722; Andrews (1991), "Heteroskedasticity and autocorrelation consistent
    covariance matrix estimation", Econometrica 59(3); Meketon & Schmeiser (1984),
    "Overlapping batch means: something for nothing?", Proc. Winter Simulation Conf.; Welch
    (1987), "On the relationship between batch means, overlapping means and spectral
    estimation", Proc. Winter Simulation Conf.; Flegal & Jones (2010), "Batch means and
    spectral variance estimators in Markov chain Monte Carlo", Ann. Statist. 38(2); Newey &
    West (1987), Econometrica 55(3).
    """
    nn, s, q, k, dq = np.broadcast_arrays(
        *(np.asarray(x, dtype=float) for x in (n, total, total_sq, change_n, change_sq))
    )
    floor2 = float(sd_floor) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(nn > 0, s / nn, np.nan)
        ss = np.maximum(q - s * mean, 0.0)
        var = np.where(nn > 1, ss / (nn - 1.0), np.nan)
    beta = min(AUTOCORRELATION_BETA_PER_ALPHA * alpha, 0.5)
    # The floor acts as independent noise of variance floor2 added to every window: on the
    # variance, and on the squared changes (2 floor2 each), so that windows that vary less
    # than the floor look independent rather than smooth.
    var = var + floor2
    dq = dq + 2.0 * floor2 * k
    rho = np.where(k > 0, autocorrelation_upper(nn, var, k, dq, beta), 0.0)
    rho2 = normal_mixture_rho2(t_opt, alpha)
    f = design_effect(rho, nn)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        gamma0 = np.where(nn - f > 0, var * (nn - 1.0) / (nn - f), np.inf)
        lrv = gamma0 * f
        df = (nn - 1.0) * (1.0 - rho * rho) / (1.0 + rho * rho)
        half = np.sqrt(lrv) * student_mixture_radius(nn, df, rho2, alpha)
        if batches:
            for v_b, df_b in _batch_variances(nn, mean, batches):
                use = df_b >= BATCH_MIN_DF
                g_b = student_mixture_radius(nn, np.where(use, df_b, 1.0), rho2, alpha)
                h_b = np.sqrt(np.nan_to_num(v_b) + floor2) * g_b
                half = np.where(use, np.maximum(half, h_b), half)
    ok = (nn > 1) & np.isfinite(half)
    lower = np.where(ok, mean - half, -np.inf)
    upper = np.where(ok, mean + half, np.inf)
    return mean, lower, upper, np.asarray(rho, dtype=float)


def _sums(m: ArmMoments | None) -> tuple[int, float, float]:
    # Windows are not randomised: every stratum is the same population, merge them.
    if m is None:
        return 0, 0.0, 0.0
    return m.total, float(m.sum.sum()), float(m.sumsq.sum())


def paired_mean_test(
    paired: ArmMoments,
    margin: float,
    *,
    changes: ArmMoments | None = None,
    batches: Mapping[int, ArmMoments] | None = None,
    relative: bool = True,
    direction: Direction | str = Direction.INCREASE,
    alpha: float = 0.05,
    burn_in: int = DEFAULT_WINDOW_BURN_IN,
    t_opt: float = DEFAULT_WINDOW_T_OPT,
    sd_floor: float | None = None,
    name: str = "paired_mean",
) -> MetricResult:
    """Compare the arms on per-window paired values (resource signals).

    Parameters
    ----------
    paired : ArmMoments
        Moments of the paired values, one per window: ``log(c / p)`` when ``relative``,
        ``c - p`` otherwise. Propensity strata are merged (windows are not randomised).
    margin : float
        Tolerance, >= 0: relative (``0.20`` = the candidate may use up to 1.2 times
        production's) or absolute (the difference may be up to ``margin``, in the signal's
        unit). ``(1 - margin)`` / ``-margin`` for ``DECREASE``.
    changes : ArmMoments, optional
        Moments of the changes of the paired value between consecutive windows; their sum of
        squares bound the autocorrelation that inflates the variance. None: assume
        independent windows.
    batches : mapping of int to ArmMoments, optional
        For batch lengths ``b`` (:data:`DEFAULT_BATCH_SIZES`), moments of the sums of ``b``
        consecutive windows (one per window whose ``b - 1`` predecessors were recorded): the
        long-run variance check of :func:`paired_interval`. None: without it.
    relative : bool
        Whether the values are log ratios (result on the ratio scale) or differences.
    direction : Direction or {"increase", "decrease"}
        ``INCREASE`` when higher is worse (``max_increase``), ``DECREASE`` otherwise.
    alpha : float
        Level of the confidence sequence (asymptotic, however often it is evaluated).
    burn_in : int
        Verdict is UNKNOWN until this many windows (default 10, see
        :data:`DEFAULT_WINDOW_BURN_IN`); it counts windows, not requests.
    t_opt : float
        Number of windows at which the sequence is tightest.
    sd_floor : float, optional
        Floor on the per-window standard deviation on the test scale (log ratio or
        difference). Default: 1% of the tolerance's distance from no change, so that
        windows that happen to agree exactly do not give a zero-width interval.
    name : str
        Metric name used in the result and its explanation.

    Returns
    -------
    MetricResult
        ``kind=MEAN``. Relative: ``exp`` of the mean log ratio (the geometric mean of the
        per-window ratios) and its interval, compared with ``1 + margin`` like the other
        relative tests; absolute: the mean difference. ``n_production`` and
        ``n_candidate`` are both the number of windows.

    Notes
    -----
    The interval is :func:`paired_interval` at level ``alpha``. Because exp is increasing,
    "ratio interval above 1 + d" is exactly "log-ratio interval above log(1 + d)".
    Assumptions: the paired values are stationary with a finite variance and short-memory
    dependence between windows: AR(1)-like (the allowance from ``changes``) or, with
    ``batches``, any dependence shorter than the longest batch; the level is asymptotic in
    the number of windows and calibrated by simulation from the burn-in on.

    References
    ----------
    See :func:`paired_interval`.
    """
    d = check_margin(margin, relative, direction)
    alpha = check_alpha(alpha)
    burn_in = check_burn_in(burn_in)
    t_opt = check_positive("t_opt", t_opt)
    tol = tolerance_of(margin, relative, d)
    scale = abs(math.log(tol)) if relative else float(margin)
    if sd_floor is None:
        sd_floor = DEFAULT_SD_FLOOR_FRACTION * scale
    elif not math.isfinite(sd_floor) or sd_floor < 0:
        raise ValueError(f"sd_floor must be a finite number >= 0, got {sd_floor!r}")
    n, s, q = _sums(paired)
    k, _, dq = _sums(changes)
    sums = {b: _sums(m) for b, m in batches.items()} if batches else None
    mean, lo, hi, rho = (
        float(x)
        for x in paired_interval(n, s, q, k, dq, alpha, t_opt, float(sd_floor), batches=sums)
    )
    if relative:
        with np.errstate(over="ignore"):
            est, low, up = (float(np.exp(x)) for x in (mean, lo, hi))
    else:
        est, low, up = mean, lo, hi
    if math.isnan(low) or math.isnan(up):
        low, up = -math.inf, math.inf
    verdict = classify(low, up, tol, d)
    if n < max(burn_in, 2):
        verdict = classify(-math.inf, math.inf, tol, d)
    detail = f"{n} paired windows"
    if rho > 0:
        detail += f", autocorrelation allowance {rho:.2f}"
    if n < burn_in:
        detail += f", burn-in {burn_in}"
    return MetricResult(
        name=name,
        kind=MetricKind.MEAN,
        estimate=est,
        lower=low,
        upper=up,
        margin=float(margin),
        relative=relative,
        direction=d,
        verdict=verdict,
        n_production=n,
        n_candidate=n,
        alpha=alpha,
        detail=detail,
    )


__all__ = [
    "AUTOCORRELATION_BETA_PER_ALPHA",
    "BATCH_MIN_DF",
    "DEFAULT_BATCH_SIZES",
    "DEFAULT_SD_FLOOR_FRACTION",
    "DEFAULT_WINDOW_BURN_IN",
    "DEFAULT_WINDOW_T_OPT",
    "MAX_AUTOCORRELATION",
    "autocorrelation_upper",
    "design_effect",
    "paired_interval",
    "paired_mean_test",
    "student_mixture_radius",
]
