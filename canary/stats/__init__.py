"""Anytime-valid statistics for canary analysis: pure functions of mergeable accumulators.

Every test takes both arms' sufficient statistics, returns a :class:`MetricResult` (estimate,
confidence-sequence interval, verdict against a margin) and may be evaluated as often as
wanted: the probability that a verdict is ever wrong is at most the test's ``alpha``.

- :func:`mean_test`: difference/ratio of means (latency, cost, any number), asymptotic
  confidence sequence on IPW pseudo-outcomes, valid when the allocation changes.
- :func:`quantile_test`: p50/p95/p99 from log-bucket histograms (Howard & Ramdas).
- :func:`error_test`: error rates from the arm labels of errors (Lindon & Malek).
- :func:`rate_test`: bounded rates such as accuracy (beta-mixture sequences per arm).
- :func:`srm_test`: sample-ratio mismatch from routed vs answered counts.
- :func:`paired_mean_test`: per-window paired values of both arms (resource signals).
- :func:`split_alpha`, :func:`rollback_verdict`, :func:`promotion_verdict`,
  :func:`net_value`: combining metrics.

This package imports only numpy and scipy.
"""

from canary.stats._boundaries import (
    allocation_log_evidence,
    bernoulli_cs,
    normal_mixture_radius,
    normal_mixture_rho2,
    quantile_rank_bounds,
    rate_ratio_cs,
)
from canary.stats._combine import net_value, promotion_verdict, rollback_verdict, split_alpha
from canary.stats._means import IPWSummary, ipw_summary, mean_interval, mean_test, variance_floor
from canary.stats._paired import paired_interval, paired_mean_test
from canary.stats._quantiles import HistogramArrays, quantile_cs, quantile_test
from canary.stats._rates import error_test, rate_test, srm_test
from canary.stats._types import (
    ArmMoments,
    ArmRouting,
    Direction,
    MetricKind,
    MetricResult,
    Verdict,
    classify,
    verdict_codes,
)

__all__ = [
    "ArmMoments",
    "ArmRouting",
    "Direction",
    "HistogramArrays",
    "IPWSummary",
    "MetricKind",
    "MetricResult",
    "Verdict",
    "allocation_log_evidence",
    "bernoulli_cs",
    "classify",
    "error_test",
    "ipw_summary",
    "mean_interval",
    "mean_test",
    "net_value",
    "normal_mixture_radius",
    "normal_mixture_rho2",
    "paired_interval",
    "paired_mean_test",
    "promotion_verdict",
    "quantile_cs",
    "quantile_rank_bounds",
    "quantile_test",
    "rate_ratio_cs",
    "rate_test",
    "rollback_verdict",
    "split_alpha",
    "srm_test",
    "variance_floor",
    "verdict_codes",
]
