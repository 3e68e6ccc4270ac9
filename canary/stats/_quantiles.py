"""Quantiles: Howard & Ramdas confidence sequences per arm from log-bucket histograms."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from canary.stats._boundaries import quantile_rank_bounds
from canary.stats._checks import (
    check_alpha,
    check_burn_in,
    check_margin,
    check_positive,
    check_probability_open,
)
from canary.stats._types import (
    Direction,
    FloatArray,
    MetricKind,
    MetricResult,
    classify,
    tolerance_of,
)

DEFAULT_QUANTILE_T_OPT = 1_000.0


@dataclass(frozen=True, eq=False)
class HistogramArrays:
    """A histogram snapshot: bucket representatives, counts and their relative accuracy.

    ``values`` ascending; each represents every observation of its bucket within relative
    error ``relative_accuracy`` (``|value - x| <= relative_accuracy * |x|``), as produced by
    ``LogHistogram.to_arrays()``.
    """

    values: np.ndarray  # any numeric dtype; stored as float64
    counts: np.ndarray  # any numeric dtype; stored as float64
    relative_accuracy: float = 0.005

    def __post_init__(self) -> None:
        v = np.atleast_1d(np.asarray(self.values, dtype=float))
        c = np.atleast_1d(np.asarray(self.counts, dtype=float))
        if v.ndim != 1 or v.shape != c.shape:
            raise ValueError(
                f"values and counts must be 1-d of equal length, got {v.shape} and {c.shape}"
            )
        if not np.all(np.isfinite(v)) or np.any(np.diff(v) <= 0):
            raise ValueError(f"values must be finite and strictly ascending, got {v.tolist()!r}")
        if np.any(c < 0) or np.any(c != np.round(c)) or not np.all(np.isfinite(c)):
            raise ValueError(f"counts must be whole numbers >= 0, got {c.tolist()!r}")
        a = self.relative_accuracy
        if not isinstance(a, (int, float)) or not 0.0 <= a < 1.0:
            raise ValueError(f"relative_accuracy must be in [0, 1), got {a!r}")
        object.__setattr__(self, "values", v)
        object.__setattr__(self, "counts", c)

    @property
    def total(self) -> int:
        return int(self.counts.sum())


def order_statistics(values: FloatArray, cumcounts: FloatArray, ranks: ArrayLike) -> FloatArray:
    """Bucket values of the order statistics of 1-based ``ranks`` (nan outside 1..n)."""
    r = np.asarray(ranks, dtype=float)
    n = cumcounts[-1] if cumcounts.size else 0.0
    idx = np.searchsorted(cumcounts, r, side="left")
    idx = np.clip(idx, 0, max(values.size - 1, 0))
    out = values[idx] if values.size else np.full(r.shape, np.nan)
    return np.where((r >= 1) & (r <= n), out, np.nan)


def widen(lower: ArrayLike, upper: ArrayLike, accuracy: float) -> tuple[FloatArray, FloatArray]:
    """Bounds on the true values behind bucket representatives (relative error ``accuracy``).

    A representative v of true value x satisfies ``|v - x| <= a|x|``, so
    ``x in [v/(1+a), v/(1-a)]`` for v > 0 and ``[v/(1-a), v/(1+a)]`` for v < 0.
    """
    lo = np.asarray(lower, dtype=float)
    hi = np.asarray(upper, dtype=float)
    lo = np.where(lo > 0, lo / (1.0 + accuracy), lo / (1.0 - accuracy))
    hi = np.where(hi > 0, hi / (1.0 - accuracy), hi / (1.0 + accuracy))
    return lo, hi


def quantile_cs(
    histogram: HistogramArrays, q: float, *, alpha: float, t_opt: float = DEFAULT_QUANTILE_T_OPT
) -> tuple[float, float, float]:
    """Point estimate and confidence sequence for the q-quantile of one arm.

    Parameters
    ----------
    histogram : HistogramArrays
        The arm's histogram.
    q : float
        Quantile level in (0, 1).
    alpha : float
        Level of the two-sided confidence sequence.
    t_opt : float
        Sample size at which the sequence is tightest.

    Returns
    -------
    estimate, lower, upper : float
        ``lower`` is ``-inf`` and ``upper`` ``inf`` where the data do not bound them yet.

    Notes
    -----
    With :math:`[k_{lo}, k_{hi}]` from :func:`quantile_rank_bounds`, the sequence is
    :math:`[X_{(k_{lo})},\\, X_{(k_{hi}+1)})`, widened by the bucket accuracy a to
    :math:`[X_{(k_{lo})}/(1+a),\\, X_{(k_{hi}+1)}/(1-a)]` for positive values, so it covers
    the quantile of the true (unbucketed) observations. Assumes i.i.d. observations per arm
    from a continuous distribution (or one whose shape changes identically on both arms
    while the allocation is fixed).

    References
    ----------
    Howard & Ramdas (2022), Bernoulli 28(3), Theorem 1 (confidence sequence for a fixed
    quantile) with the beta-binomial boundary; Masson, Rim & Lee (2019), "DDSketch", PVLDB 12
    (relative-error buckets).
    """
    q = check_probability_open("q", q)
    alpha = check_alpha(alpha)
    cum = np.cumsum(histogram.counts)
    n = int(cum[-1]) if cum.size else 0
    if n == 0:
        return math.nan, -math.inf, math.inf
    k_lo, k_hi = quantile_rank_bounds(n, q, alpha, t_opt)
    ranks = np.array([max(math.ceil(q * n), 1), k_lo[0], k_hi[0] + 1], dtype=float)
    est, lo_v, hi_v = order_statistics(histogram.values, cum, ranks)
    lo, hi = widen(lo_v, hi_v, histogram.relative_accuracy)
    low = float(lo) if np.isfinite(lo) else -math.inf
    up = float(hi) if np.isfinite(hi) else math.inf
    return float(est), low, up


def ratio_interval(
    lo_c: ArrayLike, hi_c: ArrayLike, lo_p: ArrayLike, hi_p: ArrayLike
) -> tuple[FloatArray, FloatArray]:
    """Interval for x_c / x_p from intervals of two positive quantities (vectorised)."""
    lc = np.maximum(np.asarray(lo_c, dtype=float), 0.0)
    hc = np.asarray(hi_c, dtype=float)
    lp = np.maximum(np.asarray(lo_p, dtype=float), 0.0)
    hp = np.asarray(hi_p, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        lo = np.where(np.isfinite(hp) & (hp > 0), lc / hp, 0.0)
        hi = np.where(lp > 0, hc / lp, np.inf)
    lo = np.where(np.isnan(lo), 0.0, lo)
    hi = np.where(np.isnan(hi), np.inf, hi)
    return lo, hi


def quantile_test(
    production: HistogramArrays,
    candidate: HistogramArrays,
    q: float,
    margin: float,
    *,
    relative: bool = True,
    direction: Direction | str = Direction.INCREASE,
    alpha: float = 0.05,
    burn_in: int = 100,
    t_opt: float = DEFAULT_QUANTILE_T_OPT,
    name: str = "",
) -> MetricResult:
    """Compare a quantile (p50, p95, p99, any q) of the two arms.

    Parameters
    ----------
    production, candidate : HistogramArrays
        Histograms of the signal on each arm.
    q : float
        Quantile level in (0, 1), e.g. 0.95.
    margin : float
        Tolerance, >= 0: relative (``0.10`` = candidate quantile up to 1.1x production's)
        or absolute (in the signal's unit).
    relative : bool
        Ratio scale (True) or difference scale (False).
    direction : Direction or {"increase", "decrease"}
        ``INCREASE`` when higher is worse.
    alpha : float
        Overall level; each arm's sequence is built at ``alpha / 2`` (union bound).
    burn_in : int
        Verdict is UNKNOWN until both arms have this many observations.
    t_opt : float
        Per-arm sample size at which the sequences are tightest.
    name : str
        Metric name; defaults to ``p<100q>``.

    Returns
    -------
    MetricResult
        ``kind=QUANTILE``.

    Notes
    -----
    With per-arm sequences :math:`[l_c, u_c]` and :math:`[l_p, u_p]` at level alpha/2
    (:func:`quantile_cs`), the ratio :math:`x_c/x_p` lies in :math:`[l_c/u_p, u_c/l_p]` and
    the difference in :math:`[l_c - u_p, u_c - l_p]` for all times with probability
    >= 1 - alpha. Ratios assume positive values. Work is proportional to the number of
    buckets, not of observations.

    References
    ----------
    Howard & Ramdas (2022), Bernoulli 28(3), Theorem 1 and Sec. 5 (A/B comparison of
    quantiles by combining per-arm sequences).
    """
    q = check_probability_open("q", q)
    d = check_margin(margin, relative, direction)
    alpha = check_alpha(alpha)
    burn_in = check_burn_in(burn_in)
    t_opt = check_positive("t_opt", t_opt)
    est_c, lo_c, hi_c = quantile_cs(candidate, q, alpha=alpha / 2, t_opt=t_opt)
    est_p, lo_p, hi_p = quantile_cs(production, q, alpha=alpha / 2, t_opt=t_opt)
    with np.errstate(divide="ignore", invalid="ignore"):
        if relative:
            lo_a, hi_a = ratio_interval(lo_c, hi_c, lo_p, hi_p)
            lo, hi = float(lo_a), float(hi_a)
            est = est_c / est_p if est_p > 0 else math.nan
        else:
            lo, hi = lo_c - hi_p, hi_c - lo_p
            est = est_c - est_p
    if math.isnan(lo) or math.isnan(hi):
        lo, hi = -math.inf, math.inf
    tol = tolerance_of(margin, relative, d)
    n_c, n_p = candidate.total, production.total
    verdict = classify(lo, hi, tol, d)
    if min(n_c, n_p) < max(burn_in, 1):
        verdict = classify(-math.inf, math.inf, tol, d)
    return MetricResult(
        name=name or f"p{q * 100:g}",
        kind=MetricKind.QUANTILE,
        estimate=float(est),
        lower=lo,
        upper=hi,
        margin=float(margin),
        relative=relative,
        direction=d,
        verdict=verdict,
        n_production=n_p,
        n_candidate=n_c,
        alpha=alpha,
        detail=f"q={q:g}",
    )


__all__ = [
    "DEFAULT_QUANTILE_T_OPT",
    "HistogramArrays",
    "order_statistics",
    "quantile_cs",
    "quantile_test",
    "ratio_interval",
    "widen",
]
