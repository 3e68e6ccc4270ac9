"""Two-sample tests of rates and quantiles, post-stratified by split and clustered by user.

See :mod:`canary.stats._design` for why (time variation with changing weights, sticky users)
and for the estimator; these are the tests the analysis runs for ``rate`` (errors, accuracy,
any 0..1 signal) and ``pNN`` metrics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from canary.stats._boundaries import normal_mixture_radius, normal_mixture_rho2
from canary.stats._checks import (
    check_alpha,
    check_burn_in,
    check_margin,
    check_positive,
    check_probability_open,
)
from canary.stats._design import (
    SHADOW,
    ArmClusters,
    ClusterHistogram,
    DesignSummary,
    design_strata,
    design_summary,
    effective_clusters,
    few_clusters_factor,
    stratum_key,
)
from canary.stats._means import mean_interval
from canary.stats._quantiles import ratio_interval, widen
from canary.stats._types import (
    ArmMoments,
    Direction,
    FloatArray,
    MetricKind,
    MetricResult,
    Verdict,
    classify,
    tolerance_of,
)

DEFAULT_DESIGN_T_OPT = 10_000.0  # requests (both arms) at which the sequences are tightest


def _keys(arm: ArmMoments | StratifiedHistogram, name: str) -> FloatArray:
    return np.array([stratum_key(float(p), name) for p in arm.propensity], dtype=float)


def _check_unit(arm: ArmMoments, name: str) -> None:
    if np.any(arm.sum < -1e-9 * np.maximum(arm.n, 1)) or np.any(arm.sum > arm.n * (1 + 1e-9)):
        raise ValueError(
            f"{name} must hold a signal in [0, 1] (0 <= sum <= n), got n={arm.n.tolist()!r} "
            f"sum={arm.sum.tolist()!r}"
        )


def _bernoulli_floor(s: DesignSummary, events_c: float, events_p: float) -> tuple[float, float]:
    """Variance parts raised to a Bernoulli variance at shrunk rates, and to the other arm's.

    With no or few events the sample variance of a 0/1 signal is 0 or tiny exactly when the
    rate is most uncertain; :math:`\\tilde p = (x + 1)/(n + 2)` keeps the interval honest
    (about ``log(1/alpha) / n`` wide with no events, as an exact bound would be). The other
    arm's per-observation variance is the second floor, as for means.
    """
    pc = (events_c + 1.0) / (s.n_c + 2.0)
    pp = (events_p + 1.0) / (s.n_p + 2.0)
    fc = max(pc * (1.0 - pc), s.s2_p if math.isfinite(s.s2_p) else 0.0)
    fp = max(pp * (1.0 - pp), s.s2_c if math.isfinite(s.s2_c) else 0.0)
    return max(s.var_c, s.w2_c * fc), max(s.var_p, s.w2_p * fp)


def _detail(s: DesignSummary, extra: str = "") -> str:
    parts = [f"{int(s.t)} requests in compared strata"]
    if s.clusters_c or s.clusters_p:
        parts.append(f"clusters {s.clusters_p}/{s.clusters_c}")
    if extra:
        parts.append(extra)
    return "; ".join(parts)


def proportion_test(
    production: ArmMoments,
    candidate: ArmMoments,
    margin: float,
    *,
    relative: bool = False,
    direction: Direction | str = Direction.INCREASE,
    alpha: float = 0.05,
    burn_in: int = 100,
    t_opt: float = DEFAULT_DESIGN_T_OPT,
    clusters: tuple[ArmClusters, ArmClusters] | None = None,
    kind: MetricKind = MetricKind.RATE,
    name: str = "rate",
) -> MetricResult:
    """Compare a rate (errors, accuracy, any signal in [0, 1]) of the two arms.

    Parameters
    ----------
    production, candidate : ArmMoments
        Stratified moments of the signal on each arm (values in [0, 1]).
    margin : float
        Tolerance, >= 0: absolute (``0.01`` = 1 pp) or relative (``0.5`` = 1.5x).
    relative : bool
        Ratio of rates (True) or difference (False).
    direction : Direction or {"increase", "decrease"}
        ``INCREASE`` when a higher rate is worse (errors), ``DECREASE`` when lower is worse
        (accuracy).
    alpha : float
        Level of the confidence sequence.
    burn_in : int
        Verdict is UNKNOWN until both arms have this many observations.
    t_opt : float
        Requests (both arms) at which the sequence is tightest.
    clusters : (ArmClusters, ArmClusters), optional
        Production's and the candidate's per-cluster sums (sticky routing).
    kind : MetricKind
        ``RATE`` or ``ERROR_RATE`` (how the result is labelled).
    name : str
        Metric name.

    Returns
    -------
    MetricResult

    Notes
    -----
    One two-sample asymptotic confidence sequence on the post-stratified contrast
    (:func:`~canary.stats._design.design_summary`): :math:`m_c - m_p \\pm g_t
    \\sqrt{v_c + v_p}` for differences, the Fieller set of :func:`mean_interval` for ratios,
    with :math:`g_t` the Gaussian-mixture radius at t requests. Each stratum compares the arms
    over the same period (valid while the rate drifts and the weights step); with clusters
    the variance is cluster-robust. Shadow pairs count as a stratum. Assumptions: requests
    (or, with clusters, users) are independent given the time; asymptotic in the number of
    events, so the Bernoulli floor guards the start.

    References
    ----------
    Waudby-Smith et al. (2024), Ann. Statist., Theorem 2.2 and Sec. 2.5; Miratrix, Sekhon &
    Yu (2013), JRSS B 75(2) (post-stratification); Deng, Knoblich & Lu (2018), KDD (cluster
    sums for user-randomised metrics).
    """
    d = check_margin(margin, relative, direction)
    alpha = check_alpha(alpha)
    burn_in = check_burn_in(burn_in)
    t_opt = check_positive("t_opt", t_opt)
    _check_unit(production, "production")
    _check_unit(candidate, "candidate")
    keys, (n_c, s_c, q_c, n_p, s_p, q_p) = design_strata(
        _keys(production, "production"),
        (production.n, production.sum, production.sumsq),
        _keys(candidate, "candidate"),
        (candidate.n, candidate.sum, candidate.sumsq),
    )
    s = design_summary(keys, n_c, s_c, q_c, n_p, s_p, q_p, clusters=clusters, alpha=alpha)
    tol = tolerance_of(margin, relative, d)
    if s.t <= 0:
        lo, hi, est = -math.inf, math.inf, math.nan
    else:
        keep = (n_c > 0) & (n_p > 0)
        var_c, var_p = _bernoulli_floor(s, float(s_c[keep].sum()), float(s_p[keep].sum()))
        radius = normal_mixture_radius(s.t, normal_mixture_rho2(t_opt, alpha), alpha)
        e, lo_a, hi_a = mean_interval(s.mean_c, s.mean_p, var_c, var_p, radius, relative)
        est, lo, hi = float(e), float(lo_a), float(hi_a)
        if not relative:
            lo, hi = max(lo, -1.0), min(hi, 1.0)
        if math.isnan(lo) or math.isnan(hi):
            lo, hi = -math.inf, math.inf
    verdict = classify(lo, hi, tol, d)
    if min(s.n_c, s.n_p) < max(burn_in, 2):
        verdict = classify(-math.inf, math.inf, tol, d)
    return MetricResult(
        name=name,
        kind=kind,
        estimate=est,
        lower=lo,
        upper=hi,
        margin=float(margin),
        relative=relative,
        direction=d,
        verdict=verdict,
        n_production=s.n_p,
        n_candidate=s.n_c,
        alpha=alpha,
        detail=_detail(s),
    )


# -- quantiles -------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class StratifiedHistogram:
    """One arm's histogram per propensity stratum on a common grid.

    ``values`` are bucket representatives (ascending) within relative error
    ``relative_accuracy`` of the values they hold; ``counts[s, k]`` the observations of
    stratum s (arm propensity ``propensity[s]``) in bucket k.
    """

    propensity: np.ndarray  # (S,)
    values: np.ndarray  # (K,)
    counts: np.ndarray  # (S, K)
    relative_accuracy: float = 0.005

    def __post_init__(self) -> None:
        p = np.atleast_1d(np.asarray(self.propensity, dtype=float))
        v = np.atleast_1d(np.asarray(self.values, dtype=float))
        c = np.asarray(self.counts, dtype=float).reshape(p.size, v.size)
        if v.size > 1 and np.any(np.diff(v) <= 0):
            raise ValueError("values must be strictly ascending")
        if np.any(c < 0) or not np.all(np.isfinite(v)):
            raise ValueError("counts must be >= 0 and values finite")
        object.__setattr__(self, "propensity", p)
        object.__setattr__(self, "values", v)
        object.__setattr__(self, "counts", c)

    @classmethod
    def from_strata(
        cls,
        strata: dict[float, tuple[np.ndarray, np.ndarray]],
        relative_accuracy: float = 0.005,
    ) -> StratifiedHistogram:
        """Build from ``{propensity: (values, counts)}`` of each stratum's histogram."""
        keys = sorted(strata)
        grid = (
            np.unique(np.concatenate([np.asarray(strata[k][0], dtype=float) for k in keys]))
            if keys
            else np.zeros(0)
        )
        counts = np.zeros((len(keys), grid.size))
        for i, k in enumerate(keys):
            v, c = strata[k]
            counts[i, np.searchsorted(grid, np.asarray(v, dtype=float))] = c
        return cls(np.array(keys, dtype=float), grid, counts, relative_accuracy)


def _stratum_rows(keys: FloatArray, arm_keys: FloatArray, rows: FloatArray) -> FloatArray:
    """``rows`` (one per arm stratum) summed onto ``keys`` (leading axis)."""
    out = np.zeros((keys.size, *rows.shape[1:]))
    idx = np.searchsorted(keys, arm_keys)
    np.add.at(out, idx, rows)
    return out


@dataclass(frozen=True, eq=False)
class _ClusterCdf:
    """One arm's per-cluster CDF counts on the compared strata, for design effects."""

    below: FloatArray  # (S, K, G): values <= upper[k] of cluster g in stratum s
    n_sg: FloatArray  # (S, G)
    n_s: FloatArray  # (S,)
    w: FloatArray  # (S,) stratum weights
    upper: FloatArray  # (K,)
    factor: float  # few-clusters inflation


def _cluster_cdf(
    hist: ClusterHistogram, arm: str, keys: FloatArray, w: FloatArray, alpha: float
) -> _ClusterCdf | None:
    """Cumulative per-cluster counts of ``hist`` on ``keys`` (None: nothing to estimate)."""
    counts = _stratum_rows(keys, _keys_of(hist, arm), hist.counts)  # (S, K, G)
    n_sg = counts.sum(axis=1)  # (S, G)
    n_s = n_sg.sum(axis=1)  # (S,)
    ok = n_s > 0
    if not np.any(ok) or hist.upper.size == 0:
        return None
    coef = w[ok] / n_s[ok]
    factor = few_clusters_factor(effective_clusters(n_sg[ok], coef), alpha)
    return _ClusterCdf(np.cumsum(counts[ok], axis=1), n_sg[ok], n_s[ok], w[ok], hist.upper, factor)


def _design_effects(c: _ClusterCdf | None, estimates: FloatArray) -> FloatArray:
    """Cluster-robust over request-level variance of the post-stratified CDF near each estimate.

    Evaluated at both ends of the coarse bucket holding the estimate (the larger is used),
    with the few-clusters inflation included; at least 1 (1 everywhere without clusters).
    """
    out = np.ones(estimates.size)
    if c is None:
        return out
    if not math.isfinite(c.factor):
        return np.full(estimates.size, math.inf)
    j_hi = np.searchsorted(c.upper, estimates, side="left")
    js = np.concatenate([j_hi - 1, np.minimum(j_hi, c.upper.size - 1)])  # (2Q,)
    valid = js >= 0
    below = c.below[:, np.maximum(js, 0), :]  # (S, 2Q, G): values <= upper[j]
    f_s = below.sum(axis=2) / c.n_s[:, None]  # (S, 2Q)
    iid = (c.w[:, None] ** 2 * f_s * (1.0 - f_s) / c.n_s[:, None]).sum(axis=0)  # (2Q,)
    z = ((c.w / c.n_s)[:, None, None] * (below - f_s[:, :, None] * c.n_sg[:, None, :])).sum(
        axis=0
    )  # (2Q, G)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ratio = np.where(valid & (iid > 0), (z * z).sum(axis=1) * c.factor / iid, 1.0)
    q = estimates.size
    return np.maximum(out, np.maximum(ratio[:q], ratio[q:]))


def _keys_of(arm: ClusterHistogram, name: str) -> FloatArray:
    return np.array([stratum_key(float(p), name) for p in arm.propensity], dtype=float)


def _cdf(counts: FloatArray, w: FloatArray) -> FloatArray:
    """Post-stratified CDF at the grid values: :math:`\\sum_s W_s \\hat F_s`."""
    n_s = counts.sum(axis=1)
    return (w[:, None] * np.cumsum(counts, axis=1) / n_s[:, None]).sum(axis=0)


_EPS = 1e-12


def _quantiles_of(values: FloatArray, cdf: FloatArray, q: FloatArray) -> FloatArray:
    """The q-quantiles of ``cdf``: the first value whose CDF reaches each q."""
    k = np.searchsorted(cdf, q - _EPS, side="left")
    return np.asarray(values[np.minimum(k, values.size - 1)], dtype=float)


def _quantile_band(
    values: FloatArray, cdf: FloatArray, q: FloatArray, r: FloatArray, accuracy: float
) -> tuple[FloatArray, FloatArray]:
    """The quantiles of ``cdf`` at levels ``q - r`` and ``q + r``, widened by the accuracy.

    Lower: the first value whose CDF reaches ``q - r`` (``-inf`` when ``q - r <= 0``);
    upper: the first whose CDF exceeds ``q + r`` (``inf`` when there is none).
    """
    last = values.size - 1
    with np.errstate(invalid="ignore"):
        k_lo = np.searchsorted(cdf, q - r - _EPS, side="left")
        k_up = np.searchsorted(cdf, q + r + _EPS, side="right")
    lo = widen(values[np.minimum(k_lo, last)], values[0], accuracy)[0]
    hi = widen(values[0], values[np.minimum(k_up, last)], accuracy)[1]
    lo = np.where(q - r <= 0, -math.inf, lo)
    hi = np.where((q + r >= 1) | (k_up > last), math.inf, hi)
    return lo, hi


def _quantile_rows(
    production: StratifiedHistogram,
    candidate: StratifiedHistogram,
    qs: tuple[float, ...],
    relative: bool,
    alpha: float,
    t_opt: float,
    clusters: tuple[ClusterHistogram, ClusterHistogram] | None,
) -> tuple[list[tuple[float, float, float, float, float]], int, int, float]:
    """Estimate and interval of the ratio (or difference) at each quantile in ``qs``.

    Every interval is at level ``alpha`` (see :func:`stratified_quantile_test`, Notes).
    Returns ``(rows, n_production, n_candidate, t)``: one ``(estimate, lower, upper, design
    effect production, design effect candidate)`` per quantile, the observations of each
    arm in the compared strata and the requests those strata hold (0: nothing to compare).
    """
    kp, kc = _keys(production, "production"), _keys(candidate, "candidate")
    keys = np.union1d(kp, kc)
    cp = _stratum_rows(keys, kp, production.counts)
    cc = _stratum_rows(keys, kc, candidate.counts)
    n_p, n_c = cp.sum(axis=1), cc.sum(axis=1)
    keep = (n_p > 0) & (n_c > 0)
    total_c, total_p = int(n_c[keep].sum()), int(n_p[keep].sum())
    if not np.any(keep):
        return [(math.nan, -math.inf, math.inf, 1.0, 1.0) for _ in qs], total_p, total_c, 0.0
    k = keys[keep]
    big_n = np.where(k == SHADOW, np.maximum(n_c[keep], n_p[keep]), n_c[keep] + n_p[keep])
    t = float(big_n.sum())
    w = big_n / t
    g = float(normal_mixture_radius(t, normal_mixture_rho2(t_opt, alpha), alpha))
    cdf_c, cdf_p = _cdf(cc[keep], w), _cdf(cp[keep], w)
    iid_c = float((w * w / n_c[keep]).sum())
    iid_p = float((w * w / n_p[keep]).sum())
    cells: tuple[_ClusterCdf | None, _ClusterCdf | None] = (None, None)  # candidate, production
    if clusters is not None:
        cells = (
            _cluster_cdf(clusters[1], "candidate", k, w, alpha),
            _cluster_cdf(clusters[0], "production", k, w, alpha),
        )
    qa = np.asarray(qs, dtype=float)
    est_c = _quantiles_of(candidate.values, cdf_c, qa)
    est_p = _quantiles_of(production.values, cdf_p, qa)
    deff_c, deff_p = _design_effects(cells[0], est_c), _design_effects(cells[1], est_p)
    v = qa * (1.0 - qa) * (iid_c * deff_c + iid_p * deff_p)
    with np.errstate(invalid="ignore", over="ignore"):
        r = np.where(np.isfinite(v), g * np.sqrt(t * v), np.inf)
    lo_c, hi_c = _quantile_band(candidate.values, cdf_c, qa, r, candidate.relative_accuracy)
    lo_p, hi_p = widen(est_p, est_p, production.relative_accuracy)
    with np.errstate(divide="ignore", invalid="ignore"):
        if relative:
            lo, hi = ratio_interval(lo_c, hi_c, lo_p, hi_p)
            est = np.where(est_p > 0, est_c / est_p, math.nan)
        else:
            lo, hi = lo_c - hi_p, hi_c - lo_p
            est = est_c - est_p
    bad = np.isnan(lo) | np.isnan(hi)
    lo, hi = np.where(bad, -math.inf, lo), np.where(bad, math.inf, hi)
    rows = [
        (float(est[i]), float(lo[i]), float(hi[i]), float(deff_p[i]), float(deff_c[i]))
        for i in range(qa.size)
    ]
    return rows, total_p, total_c, t


def stratified_quantile_test(
    production: StratifiedHistogram,
    candidate: StratifiedHistogram,
    q: float,
    margin: float,
    *,
    relative: bool = True,
    direction: Direction | str = Direction.INCREASE,
    alpha: float = 0.05,
    burn_in: int = 100,
    t_opt: float = DEFAULT_DESIGN_T_OPT,
    clusters: tuple[ClusterHistogram, ClusterHistogram] | None = None,
    name: str = "",
) -> MetricResult:
    """Compare a quantile of the two arms, post-stratified by split, clustered by user.

    Parameters
    ----------
    production, candidate : StratifiedHistogram
        Each arm's histograms per stratum.
    q : float
        Quantile level in (0, 1).
    margin : float
        Tolerance, >= 0 (relative: ``0.10`` = candidate quantile up to 1.1x production's).
    relative : bool
        Ratio (True) or difference (False).
    direction : Direction or {"increase", "decrease"}
        ``INCREASE`` when higher is worse.
    alpha : float
        Level of the confidence sequence.
    burn_in : int
        Verdict is UNKNOWN until both arms have this many observations.
    t_opt : float
        Requests (both arms) at which the sequence is tightest.
    clusters : (ClusterHistogram, ClusterHistogram), optional
        Production's and the candidate's per-cluster coarse histograms (sticky routing).
    name : str
        Metric name; defaults to ``p<100q>``.

    Returns
    -------
    MetricResult
        ``kind=QUANTILE``.

    Notes
    -----
    Each arm's distribution is the post-stratified mixture
    :math:`\\hat F_a(x) = \\sum_s W_s \\hat F_{a,s}(x)` (:math:`W_s` the stratum's share of
    the requests): both arms are weighted to the same periods, so a latency level that
    changes while the weights step affects both alike.

    Two-sample comparison: the ratio :math:`r = x_c/x_p` of the q-quantiles is in the set
    where the candidate's CDF at :math:`r\\hat x_p` is within
    :math:`R = g_t\\sqrt{t\\,V}` of q, i.e.
    :math:`[\\hat F_c^{-1}(q - R),\\ \\hat F_c^{-1}(q + R)] / \\hat x_p`, with

    .. math:: V = q(1-q)\\Big(D_c\\sum_s \\frac{W_s^2}{n_{c,s}}
              + D_p\\sum_s \\frac{W_s^2}{n_{p,s}}\\Big),

    the variance of :math:`\\hat F_c(r x_p) - \\hat F_p(x_p)` at the true ratio when the
    two distributions have the same shape near the quantile (a scale change there: the
    delta-method term of :math:`\\hat x_p` then equals production's CDF variance; with 5/95
    splits it is the small part either way), :math:`g_t` the Gaussian-mixture radius at
    level alpha and :math:`D_a` each arm's design effect of user clusters
    (cluster-robust over request-level variance of :math:`\\hat F_a` at the coarse buckets
    around its estimate, inflated for few clusters; 1 without clusters). Differences use
    :math:`\\hat F_c^{-1}(q \\pm R) - \\hat x_p`. Bounds are widened by the histogram
    accuracy on both arms. Asymptotic, as the normal-mixture mean sequences. Compared with
    per-arm sequences joined by a union bound, one radius at level alpha on the summed
    variance needs about half the samples.

    References
    ----------
    Waudby-Smith et al. (2024), Ann. Statist., Theorem 2.2 (AsympCS; here on the indicator
    :math:`1\\{Y \\le x\\}`); Howard & Ramdas (2022), Bernoulli 28(3), Sec. 5 (comparing
    quantiles by per-arm sequences); Woodruff (1952), JASA 47 (quantile intervals by
    inverting the CDF's); Deng, Knoblich & Lu (2018), KDD (cluster-level variance).
    """
    q = check_probability_open("q", q)
    d = check_margin(margin, relative, direction)
    rows, total_p, total_c, t = _quantile_rows(
        production,
        candidate,
        (q,),
        relative,
        check_alpha(alpha),
        check_positive("t_opt", t_opt),
        clusters,
    )
    burn_in = check_burn_in(burn_in)
    est, lo, hi, deff_p, deff_c = rows[0]
    detail = f"q={q:g}"
    if t > 0:
        detail = f"q={q:g}; {int(t)} requests in compared strata"
        if clusters is not None:
            detail += f"; design effect {deff_p:.3g}/{deff_c:.3g}"
    tol = tolerance_of(margin, relative, d)
    verdict = classify(lo, hi, tol, d)
    if min(total_c, total_p) < max(burn_in, 1):
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
        n_production=total_p,
        n_candidate=total_c,
        alpha=alpha,
        detail=detail,
    )


DISTRIBUTION_QUANTILES = (*(i / 20 for i in range(1, 20)), 0.99)
"""Quantiles a ``distribution`` test compares by default: p5, p10, ..., p95 and p99."""


def distribution_test(
    production: StratifiedHistogram,
    candidate: StratifiedHistogram,
    margin: float,
    *,
    quantiles: tuple[float, ...] = DISTRIBUTION_QUANTILES,
    relative: bool = True,
    direction: Direction | str = Direction.INCREASE,
    alpha: float = 0.05,
    burn_in: int = 100,
    t_opt: float = DEFAULT_DESIGN_T_OPT,
    clusters: tuple[ClusterHistogram, ClusterHistogram] | None = None,
    name: str = "distribution",
) -> MetricResult:
    """Compare the arms at every quantile of a grid at once: worse anywhere is worse.

    Parameters
    ----------
    production, candidate : StratifiedHistogram
        Each arm's histograms per stratum.
    margin : float
        Tolerance, >= 0, at every quantile (relative: ``0.10`` = each candidate quantile up
        to 1.1x production's).
    quantiles : tuple of float
        Levels in (0, 1) compared simultaneously (default p5, p10, ..., p95, p99).
    relative, direction, alpha, burn_in, t_opt, clusters
        As for :func:`stratified_quantile_test`; ``alpha`` is the level of the whole band.
    name : str
        Metric name.

    Returns
    -------
    MetricResult
        ``kind=DISTRIBUTION``: the interval is a confidence sequence for the worst ratio
        (difference) over the grid, :math:`\\theta = \\max_q x_c(q)/x_p(q)` (``min`` when
        lower is worse); ``detail`` names the quantile that drives the verdict.

    Notes
    -----
    Each quantile gets the two-sample sequence of :func:`stratified_quantile_test` (post-
    stratified by split, clustered by user) at level :math:`\\alpha/K` for K levels, so with
    probability at least :math:`1-\\alpha` every :math:`\\theta_q` lies in its interval
    :math:`[L_q, U_q]` at every time (union bound). Then
    :math:`\\theta \\in [\\max_q L_q, \\max_q U_q]`: WORSE when some quantile is provably
    beyond the tolerance, OK when all are provably within it. A regression confined to one
    part of the distribution (a slow tail, a slower middle, a second mode) is caught where
    a single ``pNN`` metric looks elsewhere. The union bound costs little: the radius grows
    with :math:`\\sqrt{\\log(K/\\alpha)}`, about 1.4x for K = 20 at alpha 0.05 against one
    quantile; OK needs every quantile, so the tails (p99, p5, where the density is low)
    set the time to promotion.

    References
    ----------
    Lindon, Sanden & Shirikian (2022), "Rapid regression detection in software deployments
    through sequential testing", KDD (the whole distribution, sequentially, at Netflix);
    Howard & Ramdas (2022), Bernoulli 28(3), Sec. 4 (confidence sequences for many
    quantiles at once); Waudby-Smith et al. (2024), Ann. Statist., Theorem 2.2.
    """
    if len(quantiles) == 0:
        raise ValueError("quantiles must name at least one level")
    qs = tuple(check_probability_open("quantiles", q) for q in quantiles)
    d = check_margin(margin, relative, direction)
    alpha = check_alpha(alpha)
    burn_in = check_burn_in(burn_in)
    rows, total_p, total_c, t = _quantile_rows(
        production, candidate, qs, relative, alpha / len(qs), check_positive("t_opt", t_opt),
        clusters,
    )  # fmt: skip
    sign = 1.0 if d is Direction.INCREASE else -1.0

    def worst(col: int) -> int:
        vals = [sign * r[col] if not math.isnan(r[col]) else -math.inf for r in rows]
        return int(np.argmax(vals))

    # theta is the max over the grid (min when lower is worse), so its interval runs from
    # the worst lower end to the worst upper end.
    i_lo, i_hi = worst(1), worst(2)
    lo, hi = rows[i_lo][1], rows[i_hi][2]
    tol = tolerance_of(margin, relative, d)
    verdict = classify(lo, hi, tol, d)
    if min(total_c, total_p) < max(burn_in, 1):
        verdict = classify(-math.inf, math.inf, tol, d)
    detail = f"{len(qs)} quantiles p{qs[0] * 100:g}-p{qs[-1] * 100:g} at alpha/{len(qs)} each"
    if t > 0:
        # The quantile that proves WORSE, or the one that holds OK back.
        at = (
            (i_lo if sign > 0 else i_hi)
            if verdict is Verdict.WORSE
            else (i_hi if sign > 0 else i_lo)
        )
        e, a, b = rows[at][:3]
        detail += (
            f"; worst at p{qs[at] * 100:g}: {_fmt(e)} [{_fmt(a)}, {_fmt(b)}]"
            f"; {int(t)} requests in compared strata"
        )
    return MetricResult(
        name=name,
        kind=MetricKind.DISTRIBUTION,
        estimate=float(rows[worst(0)][0]),
        lower=lo,
        upper=hi,
        margin=float(margin),
        relative=relative,
        direction=d,
        verdict=verdict,
        n_production=total_p,
        n_candidate=total_c,
        alpha=alpha,
        detail=detail,
    )


def _fmt(x: float) -> str:
    return f"{x:.4g}" if math.isfinite(x) else str(x)


__all__ = [
    "DEFAULT_DESIGN_T_OPT",
    "DISTRIBUTION_QUANTILES",
    "StratifiedHistogram",
    "distribution_test",
    "proportion_test",
    "stratified_quantile_test",
]
