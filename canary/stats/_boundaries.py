"""Time-uniform boundaries: the numeric core shared by the tests and the simulations.

Every function here is vectorised over its array arguments so that the simulation harness
evaluates exactly the code the controller runs, for thousands of runs at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from numpy.typing import ArrayLike
from scipy import special

from canary.stats._types import FloatArray


def normal_mixture_rho2(t_opt: float, alpha: float) -> float:
    """Mixing variance of the Gaussian-mixture boundary that is tightest at ``t_opt``.

    Parameters
    ----------
    t_opt : float
        Number of observations at which the radius of :func:`normal_mixture_radius` should be
        smallest (any positive value is valid; it only trades width between times).
    alpha : float
        Level of the boundary.

    Returns
    -------
    float
        :math:`\\rho^2`.

    Notes
    -----
    With :math:`x = t^*\\rho^2` the squared radius at :math:`t^*` is proportional to
    :math:`\\frac{x+1}{x}\\log\\frac{x+1}{\\alpha^2}`; setting its derivative to zero gives
    :math:`x + 1 = \\alpha^2 e^{x}`, so

    .. math:: \\rho^2 = \\frac{-W_{-1}(-\\alpha^2 / e) - 1}{t^*},

    with :math:`W_{-1}` the lower branch of the Lambert W function.

    References
    ----------
    Waudby-Smith, Arbour, Sinha, Kennedy & Ramdas (2024), "Time-uniform central limit theory
    and asymptotic confidence sequences", Ann. Statist., Sec. 2 (choice of rho, their
    Appendix on tuning); Howard, Ramdas, McAuliffe & Sekhon (2021), Ann. Statist., Sec. 3.5.
    """
    w = float(special.lambertw(-(alpha**2) / math.e, k=-1).real)
    return (-w - 1.0) / t_opt


def normal_mixture_radius(t: ArrayLike, rho2: ArrayLike, alpha: float) -> FloatArray:
    """Unit-variance radius of the two-sided Gaussian-mixture confidence sequence.

    Parameters
    ----------
    t : array_like
        Number of observations (> 0; zero or less gives ``inf``).
    rho2 : array_like
        Mixing variance, see :func:`normal_mixture_rho2`.
    alpha : float
        Level: the boundary is crossed at any time with probability <= alpha (exactly for
        Gaussian increments, asymptotically otherwise).

    Returns
    -------
    ndarray
        :math:`g_t` such that :math:`\\hat\\mu_t \\pm \\hat\\sigma_t g_t` is a (1 - alpha)
        asymptotic confidence sequence.

    Notes
    -----
    .. math:: g_t = \\sqrt{\\frac{2(t\\rho^2 + 1)}{t^2\\rho^2}
              \\log\\left(\\frac{\\sqrt{t\\rho^2 + 1}}{\\alpha}\\right)}

    References
    ----------
    Waudby-Smith et al. (2024), Ann. Statist., Theorem 2.2 (Gaussian-mixture AsympCS);
    Robbins (1970), "Statistical methods related to the law of the iterated logarithm".
    """
    tt = np.asarray(t, dtype=float)
    rho2 = np.asarray(rho2, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        v = tt * rho2 + 1.0
        g = np.sqrt(2.0 * v / (tt * tt * rho2) * np.log(np.sqrt(v) / alpha))
    return np.where(tt > 0, g, np.inf)


def _log_beta_binomial_ratio(
    k: FloatArray, n: FloatArray, q: float, a: float, b: float, log_threshold: float
) -> FloatArray:
    """log M - log(1/alpha) for the beta-binomial mixture against success probability q."""
    return (
        special.betaln(a + k, b + n - k)
        - special.betaln(a, b)
        - k * math.log(q)
        - (n - k) * math.log1p(-q)
        - log_threshold
    )


def quantile_rank_bounds(
    n: ArrayLike, q: float, alpha: float, t_opt: float
) -> tuple[np.ndarray, np.ndarray]:
    """Rank bounds of the beta-binomial quantile confidence sequence.

    Parameters
    ----------
    n : array_like of int
        Sample sizes.
    q : float
        Quantile level in (0, 1).
    alpha : float
        Level of the two-sided confidence sequence.
    t_opt : float
        Sample size at which the sequence should be tightest (sets the prior concentration).

    Returns
    -------
    k_lo, k_hi : ndarray of int64
        With probability >= 1 - alpha, simultaneously for all n, the number of observations
        ``<= x_q`` lies in ``[k_lo, k_hi]``. Hence ``X_(k_lo) <= x_q`` (when ``k_lo >= 1``)
        and ``x_q < X_(k_hi + 1)`` (when ``k_hi < n``), ``X_(j)`` the j-th order statistic.

    Notes
    -----
    For continuous F the indicators :math:`1\\{X_i \\le x_q\\}` are i.i.d. Bernoulli(q),
    so with :math:`K_n` their sum and a Beta(rq, r(1-q)) mixture over the success
    probability,

    .. math:: M_n = \\frac{B(rq + K_n,\\, r(1-q) + n - K_n)}{B(rq,\\, r(1-q))\\,
              q^{K_n}(1-q)^{n-K_n}}

    is a nonnegative martingale with mean one; by Ville's inequality
    :math:`P(\\exists n: M_n \\ge 1/\\alpha) \\le \\alpha`. ``log M_n`` is convex in
    :math:`K_n`, so :math:`\\{k : M_n(k) < 1/\\alpha\\}` is an interval of ranks. The
    concentration ``r + 1 = t_opt / c`` (``c`` the Gaussian-mixture constant
    :math:`t^*\\rho^2`) matches the prior variance q(1-q)/(r+1) of the success probability
    to the optimal Gaussian mixture at ``t_opt``.

    References
    ----------
    Howard & Ramdas (2022), "Sequential estimation of quantiles with applications to
    A/B-testing and best-arm identification", Bernoulli 28(3), Theorem 1 and the
    beta-binomial boundary of their Sec. 3 (conjugate mixture of Howard et al. 2021,
    Ann. Statist., Prop. 7 / Eq. (46)).
    """
    nn = np.atleast_1d(np.asarray(n, dtype=float))
    c = normal_mixture_rho2(t_opt, alpha) * t_opt
    r = max(t_opt / c - 1.0, 1.0)
    a, b = r * q, r * (1.0 - q)
    log_thr = math.log(1.0 / alpha)
    logit_q = math.log(q / (1.0 - q))
    size = nn.size
    # Lower and upper roots solved together: f(k) = log M(k) - log(1/alpha) is convex in k.
    n2 = np.concatenate([nn, nn])
    ends = np.concatenate([np.zeros(size), nn])
    exists = _log_beta_binomial_ratio(ends, n2, q, a, b, log_thr) > 0
    # Start at the Gaussian-mixture approximation, one rank beyond the minimiser (which is
    # within half a rank of nq): Newton then converges on the right branch from either side.
    half = np.sqrt(2.0 * nn * q * (1.0 - q) * (log_thr + 0.5 * np.log1p(nn / (r + 1.0))))
    x = np.clip(np.concatenate([nn * q - half - 1.0, nn * q + half + 1.0]), 0.0, n2)

    def step(k: FloatArray, idx: np.ndarray) -> FloatArray:
        nk = n2[idx]
        fk = _log_beta_binomial_ratio(k, nk, q, a, b, log_thr)
        slope = special.digamma(a + k) - special.digamma(b + nk - k) - logit_q
        return -fk / slope

    with np.errstate(divide="ignore", invalid="ignore"):
        x = _newton_active(x, exists, step, tol=1e-7)
    x = np.clip(x, 0.0, n2)
    # Integers strictly inside the acceptance interval (tiny slack absorbs rounding).
    k_lo = np.where(exists[:size], np.ceil(x[:size] - 1e-9), 0.0)
    k_hi = np.where(exists[size:], np.floor(x[size:] + 1e-9), nn)
    return k_lo.astype(np.int64), k_hi.astype(np.int64)


def bernoulli_cs(
    n: ArrayLike, s: ArrayLike, alpha: float, prior: tuple[float, float] = (0.5, 0.5)
) -> tuple[FloatArray, FloatArray]:
    """Confidence sequence for the mean of [0, 1]-valued observations (beta mixture).

    Parameters
    ----------
    n : array_like
        Number of observations.
    s : array_like
        Sum of the observations, ``0 <= s <= n`` (need not be an integer).
    alpha : float
        Level of the two-sided confidence sequence.
    prior : (float, float)
        Parameters (a, b) of the fixed Beta mixing distribution; the default is Jeffreys'.

    Returns
    -------
    lower, upper : ndarray
        Bounds in [0, 1]; ``[0, 1]`` when ``n == 0``.

    Notes
    -----
    For a candidate mean :math:`\\mu`,

    .. math:: M_n(\\mu) = \\frac{B(a + S_n,\\, b + n - S_n)}{B(a, b)\\,
              \\mu^{S_n}(1-\\mu)^{n-S_n}}

    is a nonnegative supermartingale under any distribution on [0, 1] with conditional mean
    :math:`\\mu` (each factor is a Bernoulli likelihood ratio, and
    :math:`E[e^{\\lambda X}] \\le 1 - \\mu + \\mu e^{\\lambda}` on [0, 1]), so
    :math:`\\{\\mu : M_n(\\mu) < 1/\\alpha\\}` is a (1 - alpha) confidence sequence. It is
    the set where the concave log-likelihood :math:`S\\log\\mu + (n-S)\\log(1-\\mu)` exceeds
    :math:`\\log B(a+S, b+n-S) - \\log B(a,b) - \\log(1/\\alpha)`; the two roots are found by
    Newton's method in logit space started outside them.

    References
    ----------
    Robbins (1970), Ann. Math. Statist. 41(5), Sec. 3 (beta mixture); Howard, Ramdas,
    McAuliffe & Sekhon (2021), Ann. Statist. 49(2), Sec. 3.3 and Prop. 7 (sub-Bernoulli
    conjugate mixtures); Hoeffding (1963), Sec. 3 (Bernoulli dominates bounded variables).
    """
    nn, ss = np.broadcast_arrays(
        np.asarray(n, dtype=float), np.clip(np.asarray(s, dtype=float), 0.0, None)
    )
    nn = np.atleast_1d(nn).astype(float)
    ss = np.minimum(np.atleast_1d(ss).astype(float), nn)
    a, b = prior
    log_c = special.betaln(a + ss, b + nn - ss) - special.betaln(a, b) - math.log(1.0 / alpha)
    upper = _bernoulli_upper(nn, ss, log_c)
    lower = 1.0 - _bernoulli_upper(nn, nn - ss, log_c)
    empty = nn <= 0
    lower[empty] = 0.0
    upper[empty] = 1.0
    return lower, upper


def _log_sigmoid(u: FloatArray) -> FloatArray:
    return -np.logaddexp(0.0, -u)


def _newton_active(
    x: FloatArray,
    active: np.ndarray,
    step_fn: Callable[[FloatArray, np.ndarray], FloatArray],
    tol: float = 1e-10,
    max_iter: int = 100,
) -> FloatArray:
    """Newton iterations on the active elements only, dropping each once it has converged.

    ``step_fn(x_sub, idx)`` returns the Newton step for the elements ``idx`` at ``x_sub``.
    """
    out = x.copy()
    idx = np.flatnonzero(active)
    xs = out[idx]
    for _ in range(max_iter):
        if idx.size == 0:
            break
        step = step_fn(xs, idx)
        step = np.where(np.isfinite(step), step, 0.0)
        xs = xs + step
        done = np.abs(step) < tol
        if done.any():
            out[idx[done]] = xs[done]
            keep = ~done
            idx, xs = idx[keep], xs[keep]
    out[idx] = xs
    return out


def _bernoulli_upper(n: FloatArray, s: FloatArray, log_c: FloatArray) -> FloatArray:
    """Largest mu with s log mu + (n - s) log(1 - mu) >= log_c (1 where s == n)."""
    f = n - s
    active = (f > 0) & (n > 0)
    nz = np.where(n > 0, n, 1.0)
    p = np.clip(s / nz, 1e-300, 1.0)
    # In logit space the log-likelihood g(u) = s u - n softplus(u) is concave with its
    # maximum at logit(p). Start one quadratic-approximation radius to the right: Newton
    # then converges from either side without crossing the maximum.
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        u_hat = np.log(p) - np.log1p(-np.minimum(p, 1.0 - 1e-16))
        g_max = s * u_hat - n * np.logaddexp(0.0, u_hat)
        depth = np.maximum(g_max - log_c, 0.0)
        u0 = u_hat + np.sqrt(2.0 * depth / (nz * p * (1.0 - p))) + 1e-6
        # s == 0: n log(1 - mu) = log_c in closed form.
        u_zero = np.log(-np.expm1(np.minimum(log_c / nz, -1e-300))) - log_c / nz
    u = np.where(s > 0, u0, u_zero)
    u = np.where(active & np.isfinite(u), u, 0.0)

    def step(u: FloatArray, idx: np.ndarray) -> FloatArray:
        sp = np.logaddexp(0.0, u)
        gv = s[idx] * u - n[idx] * sp - log_c[idx]
        slope = s[idx] - n[idx] * np.exp(u - sp)  # negative right of the maximum
        with np.errstate(divide="ignore", invalid="ignore"):
            return -gv / slope

    u = _newton_active(u, active & (s > 0), step)
    out = 1.0 / (1.0 + np.exp(-u))
    return np.where(active, out, 1.0)


def allocation_log_evidence(
    propensity: ArrayLike, k: ArrayLike, m: ArrayLike, concentration: float = 1000.0
) -> FloatArray:
    """Log of the Dirichlet-multinomial test martingale for "arms split as allocated".

    Parameters
    ----------
    propensity : array_like, shape (S,)
        Candidate propensity of each stratum, in (0, 1).
    k, m : array_like, shape (..., S)
        Candidate and production counts per stratum (e.g. routed requests).
    concentration : float
        c of the Beta(c pi_s, c (1 - pi_s)) mixing distribution of each stratum's
        candidate share; larger values favour detecting small deviations.

    Returns
    -------
    ndarray, shape (...)
        :math:`\\log M`; the split contradicts the allocation at level alpha once
        :math:`\\log M \\ge \\log(1/\\alpha)`.

    Notes
    -----
    Per stratum,

    .. math:: M_s = \\frac{B(c\\pi_s + k_s,\\, c(1-\\pi_s) + m_s)}
              {B(c\\pi_s,\\, c(1-\\pi_s))\\, \\pi_s^{k_s}(1-\\pi_s)^{m_s}}

    is the Beta-binomial (two-category Dirichlet-multinomial) Bayes factor against the
    allocation :math:`\\pi_s`, a test martingale over the stratum's requests. The strata
    receive disjoint requests, each factor moving only with its own, so the product
    :math:`M = \\prod_s M_s` is a test martingale too and Ville's inequality bounds the
    probability that it ever reaches :math:`1/\\alpha` by alpha.

    References
    ----------
    Lindon & Malek (2022), "Anytime-valid inference for multinomial count data", NeurIPS,
    Sec. 3 (Dirichlet-multinomial sequential test of the sample ratio).
    """
    pi = np.asarray(propensity, dtype=float)
    kk = np.asarray(k, dtype=float)
    mm = np.asarray(m, dtype=float)
    a = concentration * pi
    b = concentration * (1.0 - pi)
    per = (
        special.betaln(a + kk, b + mm) - special.betaln(a, b) - kk * np.log(pi) - mm * np.log1p(-pi)
    )
    return np.asarray(per.sum(axis=-1), dtype=float)


def rate_ratio_cs(
    propensity: ArrayLike,
    k: ArrayLike,
    m: ArrayLike,
    alpha: float,
    prior_shape: float = 2.0,
    grid_points: int = 65,
) -> tuple[FloatArray, FloatArray]:
    """Confidence sequence for the log rate ratio from the arm labels of events.

    Parameters
    ----------
    propensity : array_like, shape (S,)
        Candidate propensity of each stratum, in (0, 1).
    k, m : array_like, shape (..., S)
        Events (errors, drops) from the candidate and from production, per stratum.
    alpha : float
        Level of the two-sided confidence sequence.
    prior_shape : float
        h of the mixing density of :math:`\\beta = \\log\\rho`: the logit of a Beta(h, h)
        variable (sd 1.14 for h = 2).
    grid_points : int
        Quadrature points for the mixture integral.

    Returns
    -------
    lower, upper : ndarray, shape (...)
        Bounds on :math:`\\beta = \\log\\rho` (``-inf``/``inf`` where unbounded).

    Notes
    -----
    If each request of stratum s goes to the candidate with probability :math:`\\pi_s` and
    produces an event with probability :math:`e_c` (candidate) or :math:`e_p` (production),
    the arm of each event is Bernoulli with

    .. math:: \\theta_s(\\rho) = \\frac{\\pi_s\\rho}{\\pi_s\\rho + 1 - \\pi_s},\\qquad
              \\rho = e_c / e_p,

    whatever the (possibly time-varying) common level of the rates. With
    :math:`L(\\beta) = \\prod_s \\theta_s^{k_s}(1-\\theta_s)^{m_s}` and mixing density p,
    :math:`M(\\beta_0) = \\int L(\\beta)p(\\beta)d\\beta / L(\\beta_0)` is a test martingale
    for :math:`H_0: \\beta = \\beta_0` over the sequence of events, so
    :math:`\\{\\beta_0 : L(\\beta_0) > \\alpha \\int L p\\}` is a (1 - alpha) confidence
    sequence; it is an interval because :math:`\\log L` is concave. With one stratum and
    :math:`\\pi = 1/2` the mixture is the Beta(h, h)-binomial (Dirichlet-multinomial) of
    Lindon & Malek in closed form; with several strata the ratio is shared across them and
    the integral is done by the trapezoid rule over the bulk of the log-concave integrand.

    References
    ----------
    Lindon & Malek (2022), "Anytime-valid inference for multinomial count data", NeurIPS,
    Sec. 3 (Dirichlet-multinomial test martingale) and Sec. 5 (conditional tests of
    Poisson/Bernoulli rates from event labels); Lindon, Sanden, Shirikian, Liu & Malek
    (2022), "Rapid regression detection in software deployments through sequential
    testing", KDD.
    """
    pi = np.asarray(propensity, dtype=float)
    ell = np.log(pi) - np.log1p(-pi)
    kk, mm = np.broadcast_arrays(np.asarray(k, dtype=float), np.asarray(m, dtype=float))
    if kk.ndim == 0 or kk.shape[-1] != ell.shape[0]:
        raise ValueError(f"k and m must end with {ell.shape[0]} strata, got shape {kk.shape}")
    lead = kk.shape[:-1]
    kk = kk.reshape(-1, ell.size)
    nev = kk + mm.reshape(-1, ell.size)
    ktot = kk.sum(axis=1)
    ntot = nev.sum(axis=1)
    mtot = ntot - ktot
    h = float(prior_shape)
    log_norm = float(special.betaln(h, h))
    every = np.arange(ktot.size)

    # log L(beta) = sum_s k_s z_s - (k_s + m_s) softplus(z_s), z_s = beta + logit(pi_s).
    def loglik(beta: FloatArray, rows: np.ndarray) -> FloatArray:
        z = beta[..., None] + ell
        kr, nr = kk[rows], nev[rows]
        if beta.ndim == 2:
            kr, nr = kr[:, None, :], nr[:, None, :]
        return (kr * z - nr * np.logaddexp(0.0, z)).sum(axis=-1)

    def score(beta: FloatArray, rows: np.ndarray) -> tuple[FloatArray, FloatArray]:
        sig = special.expit(beta[:, None] + ell)
        nr = nev[rows]
        return (kk[rows] - nr * sig).sum(axis=1), -(nr * sig * (1.0 - sig)).sum(axis=1)

    def log_prior(beta: FloatArray) -> FloatArray:
        return h * (beta - 2.0 * np.logaddexp(0.0, beta)) - log_norm

    def posterior_score(beta: FloatArray, rows: np.ndarray) -> tuple[FloatArray, FloatArray]:
        d1, d2 = score(beta, rows)
        sp = special.expit(beta)
        return d1 + h * (1.0 - 2.0 * sp), d2 - 2.0 * h * sp * (1.0 - sp)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        # A start for the Newton iterations: the pooled odds of the events corrected by the
        # events' average allocation odds (exact with one stratum).
        mean_ell = np.where(ntot > 0, (nev * ell).sum(axis=1) / ntot, 0.0)
        start = np.log((ktot + 0.5) / (mtot + 0.5)) - mean_ell
        both = np.flatnonzero((ktot > 0) & (mtot > 0))
        mle = np.where(ktot > 0, np.inf, -np.inf)
        mle[ntot == 0] = np.nan
        if both.size:
            mle[both] = _bracketed_newton(score, both, start[both], 80.0)
        mode = _bracketed_newton(posterior_score, every, np.clip(start, -30.0, 30.0), 60.0)
        curv = -posterior_score(mode, every)[1]
        peak = loglik(mode, every) + log_prior(mode)

        # Integration range: where the log posterior is within 40 of its peak (concavity
        # makes the mass beyond negligible), found by doubling from ten curvature widths.
        reach = []
        for side in (-1.0, 1.0):
            dist = 10.0 / np.sqrt(curv)
            rows = every
            for _ in range(40):
                x = mode[rows] + side * dist[rows]
                grow = loglik(x, rows) + log_prior(x) > peak[rows] - 40.0
                if not grow.any():
                    break
                rows = rows[grow]
                dist[rows] *= 2.0
            reach.append(dist)
        left, right = reach
        frac = np.linspace(0.0, 1.0, grid_points)
        grid = (mode - left)[:, None] + (left + right)[:, None] * frac
        logf = loglik(grid, every) + log_prior(grid)
        weights = np.ones(grid_points)
        weights[0] = weights[-1] = 0.5
        log_step = np.log((left + right) / (grid_points - 1))
        threshold = np.log(alpha) + special.logsumexp(logf, axis=1, b=weights) + log_step

        # The likelihood maximum is always inside the set; the roots of the concave
        # log-likelihood at the threshold are found by Newton, started one quadratic-
        # approximation radius from the maximum (or from the mode when it is at infinity).
        base = np.where(np.isfinite(mle), mle, mode)
        info = np.where(np.isfinite(mle), -score(base, every)[1], curv)
        depth = np.where(np.isfinite(mle), loglik(base, every) - threshold, 1.0)
        radius = np.sqrt(2.0 * np.maximum(depth, 1e-12) / info)
        lower = _concave_root(loglik, score, base - radius, threshold, ktot > 0)
        upper = _concave_root(loglik, score, base + radius, threshold, mtot > 0)
    return np.where(ktot > 0, lower, -np.inf).reshape(lead), np.where(
        mtot > 0, upper, np.inf
    ).reshape(lead)


def _bracketed_newton(
    score: Callable[[FloatArray, np.ndarray], tuple[FloatArray, FloatArray]],
    rows: np.ndarray,
    start: FloatArray,
    bound: float,
) -> FloatArray:
    """Zero of a decreasing score on [-bound, bound] by Newton, bisecting when it leaves
    the bracket; returns values for ``rows`` (in that order)."""
    x = np.clip(np.asarray(start, dtype=float), -bound, bound)
    lo = np.full(rows.size, -bound)
    hi = np.full(rows.size, bound)
    act = np.arange(rows.size)
    for _ in range(200):
        if act.size == 0:
            break
        xa = x[act]
        d1, d2 = score(xa, rows[act])
        lo[act] = np.where(d1 > 0, xa, lo[act])
        hi[act] = np.where(d1 <= 0, xa, hi[act])
        new = xa - d1 / d2
        bad = ~np.isfinite(new) | (new <= lo[act]) | (new >= hi[act])
        new = np.where(bad, 0.5 * (lo[act] + hi[act]), new)
        x[act] = new
        act = act[np.abs(new - xa) >= 1e-10]
    return x


def _concave_root(
    loglik: Callable[[FloatArray, np.ndarray], FloatArray],
    score: Callable[[FloatArray, np.ndarray], tuple[FloatArray, FloatArray]],
    start: FloatArray,
    threshold: FloatArray,
    exists: np.ndarray,
) -> FloatArray:
    """Where the concave loglik equals ``threshold``, by Newton from ``start``.

    ``start`` must lie on the branch of the wanted root (left of the maximum for the lower
    one): Newton on a concave function then steps outwards from inside the set and
    converges monotonically from outside it.
    """
    x = start.copy()
    rows = np.flatnonzero(exists)
    for _ in range(200):
        if rows.size == 0:
            break
        xr = x[rows]
        d1, _ = score(xr, rows)
        step = (threshold[rows] - loglik(xr, rows)) / d1
        step = np.where(np.isfinite(step), step, 0.0)
        x[rows] = xr + step
        rows = rows[np.abs(step) >= 1e-10]
    return x


__all__ = [
    "allocation_log_evidence",
    "bernoulli_cs",
    "normal_mixture_radius",
    "normal_mixture_rho2",
    "quantile_rank_bounds",
    "rate_ratio_cs",
]
