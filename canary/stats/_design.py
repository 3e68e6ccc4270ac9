"""Design-based comparisons: post-stratified by split, clustered by user.

Two facts of production traffic break tests that count requests as independent draws from
one distribution per arm (see DESIGN.md, "The unit of inference"):

- **Time.** Latency, error rates and label arrival change over a day while the split changes
  between steps, so a candidate that got 5% in the morning and 50% in the afternoon has its
  samples from other hours than production's. Within one *stratum* (the requests that had
  the same split) both arms were sampled at the same times, so comparing the arms stratum by
  stratum and weighting the strata by their share of all requests compares like with like
  (post-stratification; the IPW mean test does the same through its propensity weights).
- **Users.** With ``routing.sticky`` the randomised unit is the user: a user's requests share
  the user's latency level, error propensity and labels. Each observation carries its user's
  *cluster* (a hash bucket independent of the arm, ``canary.observe.CLUSTERS`` of them), and
  the variance is estimated from the per-cluster sums (cluster-robust, "sandwich"), which
  holds however the requests of one user are correlated, with O(clusters) state. With few
  clusters that variance is itself uncertain, so it is inflated by the squared ratio of the
  Student-t and normal quantiles at ``G - 1`` degrees of freedom (as CR1 with t reference
  distributions does in fixed-sample work), and never goes below the request-level variance.

Every function is pure and works on arrays; nothing here imports from canary.

References
----------
Deng, Knoblich & Lu (2018), "Applying the delta method in metric analytics: a practical guide
with novel ideas", KDD, Sec. 3 (user-randomised ratio metrics, cluster sums); Cameron & Miller
(2015), "A practitioner's guide to cluster-robust inference", J. Human Resources 50(2), Sec.
VI (few clusters: CR1 with t(G-1)); Miratrix, Sekhon & Yu (2013), "Adjusting treatment effect
estimates by post-stratification in randomized experiments", JRSS B 75(2);
Waudby-Smith, Arbour, Sinha, Kennedy & Ramdas (2024), Ann. Statist. (asymptotic confidence
sequences for running averages of non-identically distributed terms, Sec. 2.5).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as _sps

from canary.stats._types import PROPENSITY_DECIMALS, FloatArray

SHADOW = -1.0  # stratum key of shadow pairs: both arms answered every request (p = 1, 1)


@dataclass(frozen=True, eq=False)
class ArmClusters:
    """Per-cluster count and sum of one signal on one arm, by propensity stratum.

    ``propensity[s]`` is the arm's assignment probability in stratum s (as in
    :class:`~canary.stats.ArmMoments`); ``n[s, g]`` and ``sum[s, g]`` the count and sum of
    the values of cluster g in that stratum.
    """

    propensity: np.ndarray  # (S,)
    n: np.ndarray  # (S, G)
    sum: np.ndarray  # (S, G)

    def __post_init__(self) -> None:
        p = np.atleast_1d(np.asarray(self.propensity, dtype=float))
        n = np.atleast_2d(np.asarray(self.n, dtype=float))
        s = np.atleast_2d(np.asarray(self.sum, dtype=float))
        if p.size == 0:
            n = n.reshape(0, n.shape[-1] if n.size else 1)
            s = s.reshape(n.shape)
        if n.shape != s.shape or n.shape[0] != p.size:
            raise ValueError(
                f"n and sum must be (strata, clusters) with one row per propensity, got "
                f"propensity {p.shape}, n {n.shape}, sum {s.shape}"
            )
        if np.any(n < 0) or not np.all(np.isfinite(s)) or np.any(~np.isfinite(p)):
            raise ValueError("cluster counts must be >= 0 and sums finite")
        object.__setattr__(self, "propensity", p)
        object.__setattr__(self, "n", n)
        object.__setattr__(self, "sum", s)

    @classmethod
    def from_strata(
        cls, strata: Mapping[float, tuple[Sequence[float], Sequence[float]]]
    ) -> ArmClusters:
        """Build from ``{propensity: (n per cluster, sum per cluster)}``."""
        keys = sorted(strata)
        if not keys:
            return cls(np.zeros(0), np.zeros((0, 1)), np.zeros((0, 1)))
        return cls(
            np.array(keys, dtype=float),
            np.array([strata[k][0] for k in keys], dtype=float),
            np.array([strata[k][1] for k in keys], dtype=float),
        )

    @property
    def clusters(self) -> int:
        """Clusters with at least one observation."""
        return int(np.count_nonzero(self.n.sum(axis=0))) if self.n.size else 0


@dataclass(frozen=True, eq=False)
class ClusterHistogram:
    """Per-cluster counts of one signal on one arm in coarse value buckets, by stratum.

    ``upper[k]`` is the largest value coarse bucket k holds (ascending), ``counts[s, k, g]``
    the observations of cluster g in stratum s and bucket k.
    """

    propensity: np.ndarray  # (S,)
    upper: np.ndarray  # (K,)
    counts: np.ndarray  # (S, K, G)

    def __post_init__(self) -> None:
        p = np.atleast_1d(np.asarray(self.propensity, dtype=float))
        u = np.atleast_1d(np.asarray(self.upper, dtype=float))
        c = np.asarray(self.counts, dtype=float)
        if c.ndim != 3 or c.shape[0] != p.size or c.shape[1] != u.size:
            raise ValueError(
                f"counts must be (strata, buckets, clusters), got {c.shape} for "
                f"{p.size} strata and {u.size} buckets"
            )
        if u.size > 1 and np.any(np.diff(u) <= 0):
            raise ValueError("coarse bucket bounds must be strictly ascending")
        object.__setattr__(self, "propensity", p)
        object.__setattr__(self, "upper", u)
        object.__setattr__(self, "counts", c)


def stratum_key(propensity: float, arm: str) -> float:
    """The candidate's propensity of the stratum a value of ``arm`` was recorded in.

    Randomised strata pair production's ``p`` with the candidate's ``1 - p``; a shadow pair
    (both arms at 1.0: production's answer went to the user, the candidate got a mirror) is
    its own stratum, :data:`SHADOW`. Production at 1.0 outside a shadow step (the candidate
    at 0%) has no candidate values to pair with and drops out with its empty partner.
    """
    if propensity >= 1.0:
        return SHADOW
    p = propensity if arm == "candidate" else 1.0 - propensity
    return round(p, PROPENSITY_DECIMALS)


def few_clusters_factor(clusters: float, alpha: float) -> float:
    """Variance inflation for a cluster-robust variance from ``clusters`` clusters.

    :math:`\\frac{G}{G-1}\\,(t_{G-1,1-\\alpha/2} / z_{1-\\alpha/2})^2`: the CR1 factor and the
    squared ratio of the t(G-1) and normal quantiles; ``inf`` at one cluster or fewer (no
    variance estimate), about 1.05 at 64 clusters and alpha 0.05. ``clusters`` may be an
    effective number (:func:`effective_clusters`), rounded here to 0.01.
    """
    return _few_clusters_factor(round(float(clusters), 2), alpha)


@functools.lru_cache(maxsize=4096)
def _few_clusters_factor(clusters: float, alpha: float) -> float:
    if clusters <= 1.0:
        return math.inf
    q = 1.0 - alpha / 2.0
    ratio = float(_sps.t.ppf(q, clusters - 1.0) / _sps.norm.ppf(q))
    return clusters / (clusters - 1.0) * ratio * ratio


def effective_clusters(n: FloatArray, coef: FloatArray) -> float:
    """Clusters a cluster-robust variance effectively rests on: :math:`(\\sum_g a_g^2)^2 /
    \\sum_g a_g^4` with :math:`a_g = \\sum_s c_s n_{s,g}` (``n`` of shape (S, G), ``coef``
    (S,)).

    Notes
    -----
    A cluster-robust variance :math:`\\sum_g X_g^2` of cluster totals with variances
    :math:`v_g` behaves like a scaled chi-square with
    :math:`(\\sum_g v_g)^2 / \\sum_g v_g^2` degrees of freedom (Satterthwaite); under the
    working model where a user's requests share one level, :math:`v_g \\propto a_g^2`, the
    cluster's weight in the statistic. Equal clusters give G; when a few heavy users carry
    most requests, the variance rests on them and the count falls toward 1, so the
    few-clusters inflation grows as the fixed-sample small-sample corrections do.

    References
    ----------
    Bell & McCaffrey (2002), Survey Methodology 28(2) (bias-reduced linearisation and its
    degrees of freedom); Imbens & Kolesar (2016), Rev. Econ. Stat. 98(4), Sec. 3
    (data-dependent degrees of freedom for cluster-robust variances).
    """
    if n.size == 0:
        return 0.0
    a2 = (coef[:, None] * n).sum(axis=0) ** 2
    a4 = float(np.dot(a2, a2))
    return float(a2.sum() ** 2 / a4) if a4 > 0 else 0.0


def cluster_sumsq(n: FloatArray, sums: FloatArray, coef: FloatArray, center: FloatArray) -> float:
    """:math:`\\sum_g (\\sum_s c_s (S_{s,g} - \\mu_s n_{s,g}))^2`: squared cluster totals of a
    linearised statistic (``n``, ``sums`` of shape (S, G); ``coef``, ``center`` of shape (S,))."""
    if n.size == 0:
        return 0.0
    z = (coef[:, None] * (sums - center[:, None] * n)).sum(axis=0)
    return float(np.dot(z, z))


def align_clusters(arm: ArmClusters, keys: FloatArray, arm_name: str) -> tuple[FloatArray, ...]:
    """``(n, sum)`` of ``arm`` with one row per entry of ``keys`` (missing rows are zero)."""
    g = arm.n.shape[1] if arm.n.ndim == 2 and arm.n.shape[1] else 1
    n = np.zeros((keys.size, g))
    s = np.zeros((keys.size, g))
    for i, p in enumerate(arm.propensity):
        k = stratum_key(float(p), arm_name)
        j = np.searchsorted(keys, k)
        if j < keys.size and keys[j] == k:
            n[j] += arm.n[i]
            s[j] += arm.sum[i]
    return n, s


@dataclass(frozen=True)
class DesignSummary:
    """Post-stratified means of both arms and their per-request variance parts.

    ``var_c`` and ``var_p`` are ``t`` times the variance of each arm's mean (the scale of
    :class:`~canary.stats.IPWSummary`); ``w2_*`` turn a per-observation variance into such a
    part; ``s2_*`` are the arms' pooled within-stratum variances; ``clusters_*`` the clusters
    behind a cluster-robust part (0 when none was used).
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
    clusters_c: int = 0
    clusters_p: int = 0


def design_summary(
    keys: FloatArray,
    n_c: FloatArray,
    s_c: FloatArray,
    q_c: FloatArray,
    n_p: FloatArray,
    s_p: FloatArray,
    q_p: FloatArray,
    *,
    clusters: tuple[ArmClusters, ArmClusters] | None = None,
    alpha: float = 0.05,
) -> DesignSummary:
    """Post-stratified means and variances from per-stratum moments of both arms.

    Parameters
    ----------
    keys : ndarray
        Stratum keys (:func:`stratum_key`), ascending.
    n_c, s_c, q_c, n_p, s_p, q_p : ndarray
        Count, sum and sum of squares of each arm per stratum.
    clusters : (ArmClusters, ArmClusters), optional
        Production's and the candidate's per-cluster sums: the variance parts become
        cluster-robust (never below the request-level ones).
    alpha : float
        Level the few-clusters inflation is computed for.

    Notes
    -----
    Strata where either arm has no observation carry no comparison and are left out. With
    :math:`N_s` the requests of stratum s (both arms' counts for a randomised split, the
    larger one for a shadow pair), :math:`W_s = N_s/t` and :math:`t = \\sum_s N_s`,

    .. math:: m_a = \\sum_s W_s \\bar y_{a,s},\\qquad
              \\operatorname{Var}(m_a) = \\sum_s W_s^2 \\frac{\\hat\\sigma^2_{a,s}}{n_{a,s}},

    and with clusters the variance is
    :math:`\\frac{G}{G-1}\\sum_g \\big(\\sum_s \\frac{W_s}{n_{a,s}}(S_{a,s,g} - \\bar y_{a,s}
    n_{a,s,g})\\big)^2` times the t/normal factor of :func:`few_clusters_factor` at the
    :func:`effective_clusters` of the arm. A shadow
    pair's two means share their requests and so are positively correlated: leaving the
    covariance out is conservative.
    """
    keep = (n_c > 0) & (n_p > 0)
    k = keys[keep]
    nc, sc, qc, np_, sp, qp = (x[keep] for x in (n_c, s_c, q_c, n_p, s_p, q_p))
    nan = math.nan
    if k.size == 0:
        return DesignSummary(nan, nan, nan, nan, nan, nan, nan, nan, 0.0, 0, 0)
    shadow = k == SHADOW
    big_n = np.where(shadow, np.maximum(nc, np_), nc + np_)
    t = float(big_n.sum())
    w = big_n / t
    ybar_c, ybar_p = sc / nc, sp / np_
    ss_c = np.maximum(qc - sc * ybar_c, 0.0)
    ss_p = np.maximum(qp - sp * ybar_p, 0.0)
    mean_c = float((w * ybar_c).sum())
    mean_p = float((w * ybar_p).sum())
    # Within-stratum variances with n - 1 (0 for a single value: the floors take over).
    s2c_s = np.where(nc > 1, ss_c / np.maximum(nc - 1, 1), 0.0)
    s2p_s = np.where(np_ > 1, ss_p / np.maximum(np_ - 1, 1), 0.0)
    var_c = t * float((w * w * s2c_s / nc).sum())
    var_p = t * float((w * w * s2p_s / np_).sum())
    w2_c = t * float((w * w / nc).sum())
    w2_p = t * float((w * w / np_).sum())
    s2_c = float(ss_c.sum() / max(nc.sum() - k.size, 1))
    s2_p = float(ss_p.sum() / max(np_.sum() - k.size, 1))
    g_c = g_p = 0
    if clusters is not None:
        prod, cand = clusters
        cn, cs = align_clusters(cand, keys, "candidate")
        pn, ps = align_clusters(prod, keys, "production")
        cn, cs, pn, ps = cn[keep], cs[keep], pn[keep], ps[keep]
        g_c = int(np.count_nonzero(cn.sum(axis=0)))
        g_p = int(np.count_nonzero(pn.sum(axis=0)))
        if cn.sum() > 0:  # values recorded with a cluster: the unit is the cluster
            kappa = few_clusters_factor(effective_clusters(cn, w / nc), alpha)
            var_c = max(var_c, t * cluster_sumsq(cn, cs, w / nc, ybar_c) * kappa)
        if pn.sum() > 0:
            kappa = few_clusters_factor(effective_clusters(pn, w / np_), alpha)
            var_p = max(var_p, t * cluster_sumsq(pn, ps, w / np_, ybar_p) * kappa)
    return DesignSummary(
        mean_c,
        mean_p,
        var_c,
        var_p,
        s2_c,
        s2_p,
        w2_c,
        w2_p,
        t,
        int(nc.sum()),
        int(np_.sum()),
        g_c,
        g_p,
    )


def design_strata(
    production_keys: FloatArray,
    production: tuple[FloatArray, FloatArray, FloatArray],
    candidate_keys: FloatArray,
    candidate: tuple[FloatArray, FloatArray, FloatArray],
) -> tuple[FloatArray, tuple[FloatArray, ...]]:
    """Union of both arms' stratum keys and each arm's (n, sum, sumsq) on it."""
    keys = np.union1d(production_keys, candidate_keys)
    out: list[FloatArray] = []
    for arm_keys, cells in ((candidate_keys, candidate), (production_keys, production)):
        idx = np.searchsorted(keys, arm_keys)
        for values in cells:
            row = np.zeros(keys.size)
            np.add.at(row, idx, values)
            out.append(row)
    return keys, tuple(out)


__all__ = [
    "SHADOW",
    "ArmClusters",
    "ClusterHistogram",
    "DesignSummary",
    "align_clusters",
    "cluster_sumsq",
    "design_strata",
    "design_summary",
    "effective_clusters",
    "few_clusters_factor",
    "stratum_key",
]
