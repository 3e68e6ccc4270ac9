"""Combining metrics: Bonferroni for rollback, intersection-union for promotion, net value."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from canary.stats._checks import check_alpha, check_burn_in, check_positive
from canary.stats._types import Direction, MetricKind, MetricResult, Verdict


def split_alpha(alpha: float, n_metrics: int) -> float:
    """Per-metric level for the rollback checks: ``alpha / n_metrics`` (Bonferroni).

    Parameters
    ----------
    alpha : float
        Error budget of the whole rollout.
    n_metrics : int
        Number of metrics (and guards such as SRM) whose WORSE verdict triggers a rollback.

    Returns
    -------
    float

    Notes
    -----
    Rollback when any of m sequences at level alpha/m says WORSE: a false rollback needs at
    least one of them to miss, which has probability <= m * alpha/m = alpha. Promotion
    needs every metric OK; under the intersection-union principle each metric may use the
    full alpha, because a false promotion needs the sequence of a truly-worse metric to
    miss. Using the alpha/m results for both decisions is valid and slightly conservative.

    References
    ----------
    Berger (1982), "Multiparameter hypothesis testing and acceptance sampling",
    Technometrics 24(4) (intersection-union tests).
    """
    alpha = check_alpha(alpha)
    if isinstance(n_metrics, bool) or not isinstance(n_metrics, int) or n_metrics < 1:
        raise ValueError(f"n_metrics must be an integer >= 1, got {n_metrics!r}")
    return alpha / n_metrics


def rollback_verdict(results: Iterable[MetricResult]) -> Verdict:
    """WORSE when any result is WORSE, otherwise UNKNOWN (never OK: see promotion)."""
    return Verdict.WORSE if any(r.verdict is Verdict.WORSE for r in results) else Verdict.UNKNOWN


def promotion_verdict(results: Iterable[MetricResult]) -> Verdict:
    """OK when every result is OK (intersection-union), WORSE if any is, else UNKNOWN.

    SRM results are guards (they can only be WORSE or UNKNOWN) and are skipped here apart
    from a WORSE one.
    """
    seen = False
    all_ok = True
    for r in results:
        if r.verdict is Verdict.WORSE:
            return Verdict.WORSE
        if r.kind is MetricKind.SRM:
            continue
        seen = True
        all_ok = all_ok and r.verdict is Verdict.OK
    return Verdict.OK if seen and all_ok else Verdict.UNKNOWN


def _effect(r: MetricResult, x: float) -> float:
    return x - 1.0 if r.relative else x


def net_value(
    results: Sequence[MetricResult],
    weights: Mapping[str, float],
    *,
    burn_in: int = 0,
    name: str = "net_value",
) -> MetricResult:
    """Combine per-metric intervals into one net-value interval (positive = candidate better).

    Parameters
    ----------
    results : sequence of MetricResult
        One result per trade-off metric, each with its interval (use the same alpha split as
        for rollback, so that all intervals hold simultaneously).
    weights : mapping of str to float
        Trade-off weights by metric name: the change in that metric worth one unit, in the
        metric's own scale (``{"accuracy": 0.01, "latency_p95": 0.10, "cost": 0.05}`` for
        "+1 pp accuracy is worth +10% p95 latency and +5% cost"). Relative results take
        relative weights (fractions), absolute results absolute ones.
    burn_in : int
        Verdict is UNKNOWN while any component has fewer observations per arm.
    name : str
        Name of the combined result.

    Returns
    -------
    MetricResult
        ``kind=NET_VALUE``; verdict WORSE when the interval is below 0 (provably net
        negative), OK when it is >= 0 (provably not negative), otherwise UNKNOWN. ``alpha``
        is the sum of the components' (union bound); ``n_*`` are the smallest over them.

    Notes
    -----
    Metric j's effect :math:`\\Delta_j` is ratio - 1 (relative) or the difference (absolute),
    with interval :math:`[l_j, u_j]`, and sign :math:`s_j = -1` when higher is worse
    (``INCREASE``), +1 when lower is worse. The net value and its interval are

    .. math:: V = \\sum_j s_j \\Delta_j / w_j,\\qquad
              V \\in \\Big[\\sum_j \\min(s_j l_j, s_j u_j)/w_j,\\;
              \\sum_j \\max(s_j l_j, s_j u_j)/w_j\\Big],

    interval arithmetic, valid whenever every component interval covers its effect. Hard
    tolerances on the components still apply separately.

    References
    ----------
    Moore, Kearfott & Cloud (2009), "Introduction to Interval Analysis", SIAM, Ch. 2.
    """
    if not results:
        raise ValueError("results must not be empty")
    names = [r.name for r in results]
    if sorted(names) != sorted(weights):
        raise ValueError(
            f"weights must name exactly the results {sorted(names)!r}, got {sorted(weights)!r}"
        )
    est = lo = hi = 0.0
    alpha = 0.0
    for r in results:
        if r.kind in (MetricKind.SRM, MetricKind.NET_VALUE):
            raise ValueError(f"result {r.name!r} of kind {r.kind.value!r} has no trade-off value")
        w = check_positive(f"weight of {r.name!r}", weights[r.name])
        sign = -1.0 if r.direction is Direction.INCREASE else 1.0
        a, b = sign * _effect(r, r.lower) / w, sign * _effect(r, r.upper) / w
        lo += min(a, b)
        hi += max(a, b)
        est += sign * _effect(r, r.estimate) / w
        alpha += r.alpha
    if math.isnan(lo) or math.isnan(hi):
        lo, hi = -math.inf, math.inf
    verdict = Verdict.WORSE if hi < 0 else Verdict.OK if lo >= 0 else Verdict.UNKNOWN
    n_p = min(r.n_production for r in results)
    n_c = min(r.n_candidate for r in results)
    if min(n_p, n_c) < check_burn_in(burn_in):
        verdict = Verdict.UNKNOWN
    return MetricResult(
        name=name,
        kind=MetricKind.NET_VALUE,
        estimate=est,
        lower=lo,
        upper=hi,
        margin=0.0,
        relative=False,
        direction=Direction.DECREASE,
        verdict=verdict,
        n_production=n_p,
        n_candidate=n_c,
        alpha=min(alpha, 1.0),
        detail=", ".join(f"{r.name}/{weights[r.name]:g}" for r in results),
    )


__all__ = [
    "net_value",
    "promotion_verdict",
    "rollback_verdict",
    "split_alpha",
]
