"""Anytime-valid statistics for canary analysis: pure functions of mergeable accumulators.

Every test takes both arms' sufficient statistics, returns a :class:`MetricResult` (estimate,
confidence-sequence interval, verdict against a margin) and may be evaluated as often as
wanted: the probability that a verdict is ever wrong is at most the test's ``alpha``.

- :func:`mean_test`: difference/ratio of means (latency, cost, any number), asymptotic
  confidence sequence on IPW pseudo-outcomes, valid when the allocation changes.
- :func:`stratified_quantile_test`: p50/p95/p99 per split stratum, clustered by user (what
  the analysis runs); :func:`quantile_test`: the i.i.d. per-arm form (Howard & Ramdas);
  :func:`distribution_test`: every quantile of a grid at once (``stat: distribution``).
- :func:`proportion_test`: errors, accuracy, any rate in [0, 1]: one two-sample sequence,
  post-stratified, clustered by user (what the analysis runs); :func:`error_test` (Lindon &
  Malek) and :func:`rate_test` (per-arm beta mixtures) are the i.i.d. forms.
- :func:`srm_test`: sample-ratio mismatch from routed vs answered counts.
- :func:`paired_mean_test`: per-window paired values of both arms (resource signals).
- :func:`win_rate_test`: a judge's verdicts on pairs of answers, win rate against 50%.
- :func:`shift_checks`: drift of request inputs from their baseline (input health), from
  :func:`mean_shift_cs` and :func:`proportion_shift_cs`.
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
from canary.stats._design import (
    ArmClusters,
    ClusterHistogram,
    DesignSummary,
    design_summary,
    few_clusters_factor,
)
from canary.stats._design_tests import (
    DISTRIBUTION_QUANTILES,
    StratifiedHistogram,
    distribution_test,
    proportion_test,
    stratified_quantile_test,
)
from canary.stats._inputs import (
    MIN_MEAN_SAMPLES,
    ShiftChecks,
    mean_shift_cs,
    proportion_shift_cs,
    shift_checks,
)
from canary.stats._means import IPWSummary, ipw_summary, mean_interval, mean_test, variance_floor
from canary.stats._paired import DEFAULT_BATCH_SIZES, paired_interval, paired_mean_test
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
from canary.stats._winrate import win_rate_interval, win_rate_test

__all__ = [
    "DEFAULT_BATCH_SIZES",
    "DISTRIBUTION_QUANTILES",
    "MIN_MEAN_SAMPLES",
    "ArmClusters",
    "ArmMoments",
    "ArmRouting",
    "ClusterHistogram",
    "DesignSummary",
    "Direction",
    "HistogramArrays",
    "IPWSummary",
    "MetricKind",
    "MetricResult",
    "ShiftChecks",
    "StratifiedHistogram",
    "Verdict",
    "allocation_log_evidence",
    "bernoulli_cs",
    "classify",
    "design_summary",
    "distribution_test",
    "error_test",
    "few_clusters_factor",
    "ipw_summary",
    "mean_interval",
    "mean_shift_cs",
    "mean_test",
    "net_value",
    "normal_mixture_radius",
    "normal_mixture_rho2",
    "paired_interval",
    "paired_mean_test",
    "promotion_verdict",
    "proportion_shift_cs",
    "proportion_test",
    "quantile_cs",
    "quantile_rank_bounds",
    "quantile_test",
    "rate_ratio_cs",
    "rate_test",
    "rollback_verdict",
    "shift_checks",
    "split_alpha",
    "srm_test",
    "stratified_quantile_test",
    "variance_floor",
    "verdict_codes",
    "win_rate_interval",
    "win_rate_test",
]
