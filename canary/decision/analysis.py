"""Run a rollout's configured tests on a snapshot of its accumulators (pure, no I/O).

Maps each ``analysis.metrics`` entry to the statistics engine: ``error`` and ``rate`` signals
(feedback) to the two-sample proportion test, ``pNN`` to the quantile test on the per-stratum
log histograms (both post-stratified by split, so the arms are compared over the same
periods), ``agreement`` to the rate test, ``judge`` to the one-sample win-rate test, ``mean``
to the IPW mean test. With
``routing.sticky`` every one of them counts users' clusters, not requests, as the independent
units (the per-cluster sums the accumulators keep). Every test runs at
``alpha / m`` where m counts the metrics plus the sample-ratio guard (Bonferroni), so that
all intervals hold at once and the trade-off net value can be built from them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from canary.config import MetricConfig, RolloutConfig
from canary.observe import (
    CLUSTERS,
    ArmAccumulator,
    RolloutAccumulator,
    SignalAccumulator,
    coarse_upper,
)
from canary.observe.inputs import FieldDrift, InputHealth, drift_checks
from canary.signals import (
    AGREEMENT,
    ERROR,
    JUDGE,
    is_promql,
    is_rate,
    is_windowed,
    paired_key,
    parse_signal,
)
from canary.stats import (
    DEFAULT_BATCH_SIZES,
    DISTRIBUTION_QUANTILES,
    ArmClusters,
    ArmMoments,
    ArmRouting,
    ClusterHistogram,
    Direction,
    HistogramArrays,
    MetricKind,
    MetricResult,
    StratifiedHistogram,
    Verdict,
    distribution_test,
    mean_test,
    net_value,
    paired_mean_test,
    proportion_test,
    rate_test,
    split_alpha,
    srm_test,
    stratified_quantile_test,
    win_rate_test,
)

SRM_NAME = "sample_ratio"
NET_VALUE_NAME = "net_value"


@dataclass(frozen=True)
class Analysis:
    """Everything the policy needs from the data, computed once per interval.

    Attributes
    ----------
    metrics
        One result per configured metric, in config order.
    srm
        The sample-ratio guard (kind ``SRM``).
    net
        The trade-off net value, when the rollout has a ``tradeoff``.
    observed
        Observations per arm (``{"production": n, "candidate": n}``), shadow included.
    failing_for, failing_requests
        How long, and over how many requests, every candidate request has failed (0 when the
        last one succeeded): the hard-failure guard.
    inputs
        The input-health drift checks per field of ``inputs.fields`` (empty without
        ``inputs`` or without a snapshot of them): what ``inputs.on_drift: hold`` reads.
    """

    metrics: tuple[MetricResult, ...]
    srm: MetricResult
    net: MetricResult | None
    observed: dict[str, int]
    failing_for: float = 0.0
    failing_requests: int = 0
    inputs: tuple[FieldDrift, ...] = ()

    @property
    def candidate_observed(self) -> int:
        return self.observed.get("candidate", 0)

    @property
    def drifted_inputs(self) -> tuple[str, ...]:
        """The request-body fields whose drift check flags a shift from their baseline."""
        return tuple(f.field for f in self.inputs if f.drifted)

    def all_results(self) -> list[MetricResult]:
        out = [*self.metrics, self.srm]
        if self.net is not None:
            out.append(self.net)
        return out


def metric_alpha(rollout: RolloutConfig) -> float:
    """Level of each test: the rollout's alpha split over its metrics and the SRM guard."""
    return split_alpha(rollout.analysis.alpha, len(rollout.analysis.metrics) + 1)


def analyze(
    rollout: RolloutConfig,
    acc: RolloutAccumulator,
    *,
    failing_for: float = 0.0,
    failing_requests: int = 0,
    input_health: InputHealth | None = None,
) -> Analysis:
    """Evaluate every configured test on ``acc`` (cumulative since the rollout started) and,
    given a snapshot of the rollout's input health, its drift checks."""
    cfg = rollout.analysis
    alpha = metric_alpha(rollout)
    sticky = rollout.routing.sticky is not None
    results = tuple(
        _metric(m, acc.production, acc.candidate, alpha, cfg.burn_in, sticky) for m in cfg.metrics
    )
    srm = srm_test(
        _routing(acc.production),
        _routing(acc.candidate),
        alpha=alpha,
        # Sticky users are assigned as groups, so the routed split is overdispersed by design.
        check_routing=rollout.routing.sticky is None,
        name=SRM_NAME,
    )
    net = None
    if cfg.tradeoff:
        by_name = {r.name: r for r in results}
        parts = [by_name[n] for n in cfg.tradeoff]
        net = net_value(
            parts,
            {n: m.value for n, m in cfg.tradeoff.items()},
            burn_in=cfg.burn_in,
            name=NET_VALUE_NAME,
        )
    return Analysis(
        metrics=results,
        srm=srm,
        net=net,
        observed={"production": acc.production.observed, "candidate": acc.candidate.observed},
        failing_for=failing_for,
        failing_requests=failing_requests,
        inputs=(
            drift_checks(rollout.inputs, input_health)
            if rollout.inputs is not None and input_health is not None
            else ()
        ),
    )


def _metric(
    m: MetricConfig,
    prod: ArmAccumulator,
    cand: ArmAccumulator,
    alpha: float,
    burn_in: int,
    sticky: bool = False,
) -> MetricResult:
    margin = m.margin
    direction = Direction.INCREASE if m.higher_is_worse else Direction.DECREASE
    key = parse_signal(m.signal).key
    if is_windowed(key):  # resource: and promql:, one paired test
        return _resource(m, key, cand, direction, alpha)
    if key == JUDGE:
        return _judged(m, cand.signals.get(JUDGE), alpha, burn_in, sticky)
    p_acc, c_acc = prod.signals.get(key), cand.signals.get(key)
    if p_acc is None or c_acc is None:
        return _no_data(m, direction, alpha, p_acc, c_acc)
    rel, value, b = margin.relative, margin.value, burn_in
    # Only sticky rollouts record clusters; values recorded without one (a request with no
    # sticky key) leave the request-level variance as the floor.
    clustered = sticky and bool(p_acc.clusters or c_acc.clusters)
    if m.stat == "distribution":
        levels = m.quantile_levels
        return distribution_test(
            _strata_hist(p_acc), _strata_hist(c_acc), value,
            quantiles=levels if levels is not None else DISTRIBUTION_QUANTILES,
            relative=rel, direction=direction, alpha=alpha, burn_in=b,
            clusters=(_cluster_hist(p_acc), _cluster_hist(c_acc)) if clustered else None,
            name=m.name,
        )  # fmt: skip
    q = m.quantile
    if q is not None:
        return stratified_quantile_test(
            _strata_hist(p_acc), _strata_hist(c_acc), q, value,
            relative=rel, direction=direction, alpha=alpha, burn_in=b,
            clusters=(_cluster_hist(p_acc), _cluster_hist(c_acc)) if clustered else None,
            name=m.name,
        )  # fmt: skip
    cl = (_clusters(p_acc), _clusters(c_acc)) if clustered else None
    if key == AGREEMENT:  # shadow-only, production identically 1: the one-sample form
        return rate_test(
            _moments(p_acc), _moments(c_acc), value,
            relative=rel, direction=direction, alpha=alpha, burn_in=b, name=m.name,
        )  # fmt: skip
    if m.stat == "rate" or is_rate(key):
        kind = MetricKind.ERROR_RATE if key == ERROR else MetricKind.RATE
        return proportion_test(
            _moments(p_acc), _moments(c_acc), value,
            relative=rel, direction=direction, alpha=alpha, burn_in=b, clusters=cl,
            kind=kind, name=m.name,
        )  # fmt: skip
    return mean_test(
        _moments(p_acc), _moments(c_acc), value,
        relative=rel, direction=direction, alpha=alpha, burn_in=b, clusters=cl, name=m.name,
    )  # fmt: skip


def _resource(
    m: MetricConfig, key: str, cand: ArmAccumulator, direction: Direction, alpha: float
) -> MetricResult:
    # Scraped per window, not per request: a one-sample test on the time-paired values, with
    # its own burn-in in windows (the analysis burn_in counts requests).
    rel = m.margin.relative
    paired = cand.signals.get(paired_key(key, rel))
    if paired is None:
        return replace(
            _no_data(m, direction, alpha, None, None),
            detail=(
                f"no promql windows yet for {key} (queried for both arms; the last answers "
                "are under 'promql' in the rollout's status)"
                if is_promql(key)
                else f"no resource windows yet for {key} (scraped from both arms)"
            ),
        )
    changes = cand.signals.get(paired_key(key, rel, changes=True))
    batches = {
        b: _moments(acc)
        for b in DEFAULT_BATCH_SIZES
        if (acc := cand.signals.get(paired_key(key, rel, batch=b))) is not None
    }
    return paired_mean_test(
        _moments(paired), m.margin.value,
        changes=_moments(changes) if changes is not None else None,
        relative=rel, direction=direction, alpha=alpha, name=m.name, batches=batches or None,
    )  # fmt: skip


def _judged(
    m: MetricConfig, acc: SignalAccumulator | None, alpha: float, burn_in: int, sticky: bool
) -> MetricResult:
    # The judge's verdicts on pairs of answers, recorded on the candidate arm only (both arms
    # answered every judged request): a one-sample win-rate test against 50%.
    if acc is None:
        return replace(
            _no_data(m, Direction.DECREASE, alpha, None, None),
            detail="no judged pairs yet (the judge compares mirrored answers in shadow steps)",
        )
    clustered = sticky and bool(acc.clusters)
    return win_rate_test(
        _moments(acc), m.margin.value, alpha=alpha, burn_in=burn_in,
        clusters=_clusters(acc) if clustered else None, name=m.name,
    )  # fmt: skip


def _moments(acc: SignalAccumulator) -> ArmMoments:
    return ArmMoments.from_strata({p: (m.n, m.total, m.total_sq) for p, m in acc.strata.items()})


def _hist(acc: SignalAccumulator) -> HistogramArrays:
    values, counts = acc.hist.to_arrays()
    return HistogramArrays(values, counts, acc.accuracy)


def _strata_hist(acc: SignalAccumulator) -> StratifiedHistogram:
    strata = {p: h.to_arrays() for p, h in acc.hists.items() if h.count}
    return StratifiedHistogram.from_strata(strata, acc.accuracy)


def _clusters(acc: SignalAccumulator) -> ArmClusters:
    return ArmClusters.from_strata({p: (c.n, c.total) for p, c in acc.clusters.items()})


def _cluster_hist(acc: SignalAccumulator) -> ClusterHistogram:
    keys = sorted(acc.clusters)
    coarse = sorted({k // CLUSTERS for p in keys for k in acc.clusters[p].hist})
    index = {c: i for i, c in enumerate(coarse)}
    counts = np.zeros((len(keys), len(coarse), CLUSTERS))
    for s, p in enumerate(keys):
        for key, n in acc.clusters[p].hist.items():
            c, g = divmod(key, CLUSTERS)
            counts[s, index[c], g] += n
    upper = np.array([coarse_upper(c, acc.accuracy) for c in coarse], dtype=float)
    return ClusterHistogram(np.array(keys, dtype=float), upper, counts)


def _routing(arm: ArmAccumulator) -> ArmRouting:
    # Only randomised strata: propensity 1.0 is a shadow mirror or a 0%/100% step, where
    # there is no split to check.
    return ArmRouting.from_strata({p: (r, o) for p, (r, o) in arm.routing.items() if p < 1.0})


def _no_data(
    m: MetricConfig,
    direction: Direction,
    alpha: float,
    p_acc: SignalAccumulator | None,
    c_acc: SignalAccumulator | None,
) -> MetricResult:
    kind = (
        MetricKind.ERROR_RATE
        if m.signal == "error"
        else MetricKind.QUANTILE
        if m.quantile is not None
        else MetricKind.DISTRIBUTION
        if m.stat == "distribution"
        else MetricKind.RATE
        if m.stat == "rate"
        else MetricKind.MEAN
    )
    missing = [arm for arm, a in (("production", p_acc), ("candidate", c_acc)) if a is None]
    return MetricResult(
        name=m.name,
        kind=kind,
        estimate=math.nan,
        lower=-math.inf,
        upper=math.inf,
        margin=m.margin.value,
        relative=m.margin.relative,
        direction=direction,
        verdict=Verdict.UNKNOWN,
        n_production=p_acc.n if p_acc is not None else 0,
        n_candidate=c_acc.n if c_acc is not None else 0,
        alpha=alpha,
        detail=f"no {m.signal} values from {' and '.join(missing)} yet",
    )


__all__ = ["NET_VALUE_NAME", "SRM_NAME", "Analysis", "analyze", "metric_alpha"]
