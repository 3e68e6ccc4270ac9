"""The rollouts' Prometheus gauges: phase, step, every result of the latest analysis, and
each arm's quantiles of the quantile-judged signals as the analysis sees them.

Per-arm quantiles (``canary_signal_quantile``) are computed when ``/metrics`` is scraped, from
the controller's totals of each rollout (shared store: the merged totals of every process, as
the leader's analysis and a follower's admin API read them), never on the hot path. They are
the distributions the quantile test compares (:func:`canary.stats.stratified_quantile_test`):
each arm's samples since the rollout (or its retry) started, post-stratified over the traffic
splits both arms have samples in, every split weighted by its share of the requests, from the
0.5%-accurate log histograms. So the candidate's value over production's at a metric's
quantile is that metric's ``canary_metric_estimate``. The cost of a scrape is bounded by the
histograms' buckets times the splits used (never by the number of requests), and cached until
the totals change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from canary.config import RolloutConfig
from canary.decision import (
    Analysis,
    Phase,
    RolloutState,
)
from canary.metrics import Metrics, QuantileRow
from canary.observe import RolloutAccumulator, SignalAccumulator
from canary.signals import CANDIDATE, PRODUCTION, is_windowed, parse_signal
from canary.stats import DISTRIBUTION_QUANTILES, Verdict

if TYPE_CHECKING:
    from canary.controller.rollout import Rollout

log = logging.getLogger("canary.controller")
_VERDICT_VALUE = {Verdict.OK: 1, Verdict.UNKNOWN: 0, Verdict.WORSE: -1}

#: Quantiles exported for ``latency``, ``ttft`` and every quantile-judged signal, next to the
#: levels the rollout's metrics judge on that signal.
QUANTILE_LEVELS = (0.5, 0.9, 0.95, 0.99)
_ALWAYS = ("latency", "ttft")
# As canary.stats: a shadow pair is its own stratum; propensities are rounded to pair them.
_SHADOW = -1.0
_DECIMALS = 9
_EPS = 1e-12
_LABEL_DECIMALS = 6  # as canary.metrics labels a level


def quantile_levels(config: RolloutConfig) -> dict[str, tuple[float, ...]]:
    """Signal key -> the quantile levels exported for it: :data:`QUANTILE_LEVELS` for latency,
    ttft and every signal a ``pNN`` or ``distribution`` metric judges, plus those levels."""
    # keyed by the level as labelled (0.999 for p99.9's 0.9990000000000001): one series each,
    # at the exact level the metric's test uses
    out: dict[str, dict[float, float]] = {}
    for key in _ALWAYS:
        out[key] = {round(q, _LABEL_DECIMALS): q for q in QUANTILE_LEVELS}
    for m in config.analysis.metrics:
        key = parse_signal(m.signal).key
        if is_windowed(key):
            continue
        if m.stat == "distribution":
            levels = m.quantile_levels or DISTRIBUTION_QUANTILES
        elif m.quantile is not None:
            levels = (m.quantile,)
        else:
            continue
        mine = out.setdefault(key, {round(q, _LABEL_DECIMALS): q for q in QUANTILE_LEVELS})
        mine.update((round(q, _LABEL_DECIMALS), q) for q in levels)
    return {key: tuple(sorted(levels.values())) for key, levels in out.items()}


def arm_quantiles(config: RolloutConfig, totals: RolloutAccumulator) -> list[QuantileRow]:
    """``(arm, signal, quantile, value)`` of every signal of :func:`quantile_levels` that both
    arms have samples of in a common split: each arm's post-stratified quantile, as the
    quantile test estimates it."""
    rows: list[QuantileRow] = []
    for key, levels in quantile_levels(config).items():
        p_acc = totals.production.signals.get(key)
        c_acc = totals.candidate.signals.get(key)
        if p_acc is None or c_acc is None:
            continue
        qs = np.asarray(levels, dtype=float)
        for arm, values in _post_stratified_quantiles(p_acc, c_acc, qs).items():
            rows.extend((arm, key, q, float(v)) for q, v in zip(levels, values, strict=True))
    return rows


def _stratum_key(propensity: float, arm: str) -> float:
    if propensity >= 1.0:
        return _SHADOW
    return round(propensity if arm == CANDIDATE else 1.0 - propensity, _DECIMALS)


_ZERO_KEY = -(1 << 40)  # sort keys of buckets: negatives below zero below positives
_NEG_KEY = -(1 << 41)


def _strata(acc: SignalAccumulator, arm: str) -> tuple[np.ndarray, dict[float, np.ndarray]]:
    """The arm's grid (every non-empty bucket's value, ascending) and its counts on it per
    stratum: :meth:`LogHistogram.to_arrays` of each stratum on one grid, vectorised."""
    parts: list[tuple[float, np.ndarray, np.ndarray]] = []  # (stratum, sort keys, counts)
    for p, h in acc.hists.items():
        if not h.count:
            continue
        keys = [
            np.fromiter(h.pos.keys(), dtype=np.int64, count=len(h.pos)),
            _NEG_KEY - np.fromiter(h.neg.keys(), dtype=np.int64, count=len(h.neg)),
        ]
        counts = [
            np.fromiter(h.pos.values(), dtype=float, count=len(h.pos)),
            np.fromiter(h.neg.values(), dtype=float, count=len(h.neg)),
        ]
        if h.zero:
            keys.append(np.array([_ZERO_KEY], dtype=np.int64))
            counts.append(np.array([float(h.zero)]))
        parts.append((_stratum_key(p, arm), np.concatenate(keys), np.concatenate(counts)))
    if not parts:
        return np.zeros(0), {}
    grid_keys = np.unique(np.concatenate([k for _, k, _ in parts]))
    out: dict[float, np.ndarray] = {}
    for key, k, c in parts:
        row = out.get(key)
        if row is None:
            row = out[key] = np.zeros(grid_keys.size)
        row[np.searchsorted(grid_keys, k)] += c
    gamma = acc.hists[next(iter(acc.hists))].gamma
    grid = np.zeros(grid_keys.size)
    pos, neg = grid_keys > _ZERO_KEY, grid_keys < _ZERO_KEY
    grid[pos] = 2.0 * gamma ** grid_keys[pos].astype(float) / (gamma + 1.0)
    grid[neg] = -2.0 * gamma ** (_NEG_KEY - grid_keys[neg]).astype(float) / (gamma + 1.0)
    return grid, out


def _post_stratified_quantiles(
    prod: SignalAccumulator, cand: SignalAccumulator, qs: np.ndarray
) -> dict[str, np.ndarray]:
    grid_p, rows_p = _strata(prod, PRODUCTION)
    grid_c, rows_c = _strata(cand, CANDIDATE)
    keys = sorted(k for k in rows_p if k in rows_c and rows_p[k].sum() > 0 and rows_c[k].sum() > 0)
    if not keys:
        return {}
    n_p = np.array([rows_p[k].sum() for k in keys])
    n_c = np.array([rows_c[k].sum() for k in keys])
    big_n = np.where(np.array(keys) == _SHADOW, np.maximum(n_p, n_c), n_p + n_c)
    w = big_n / big_n.sum()
    out: dict[str, np.ndarray] = {}
    for arm, grid, rows, n in ((PRODUCTION, grid_p, rows_p, n_p), (CANDIDATE, grid_c, rows_c, n_c)):
        counts = np.stack([rows[k] for k in keys])
        cdf = (w[:, None] * np.cumsum(counts, axis=1) / n[:, None]).sum(axis=0)
        k = np.searchsorted(cdf, qs - _EPS, side="left")
        out[arm] = grid[np.minimum(k, grid.size - 1)]
    return out


class Gauges:
    """The rollouts' gauges; children looked up once (``labels()`` costs a lock and a lookup,
    and the label sets never change)."""

    def __init__(
        self,
        metrics: Metrics,
        rollouts: Callable[[], Mapping[str, Rollout]] | None = None,
        leading: Callable[[], bool] | None = None,
    ) -> None:
        """``rollouts()``: the controller's rollouts, whose totals the per-arm quantiles are
        computed from at scrape time; ``leading()``: this process analyses and decides
        (``canary_leader``). Both are registered with ``metrics`` (None: not exported)."""
        self._metrics = metrics
        self._results: dict[tuple[str, str], tuple[Any, ...]] = {}
        self._rollouts = rollouts
        # rollout -> (totals, samples version, config, rows): recomputed when any changed
        self._cache: dict[str, tuple[RolloutAccumulator, int, RolloutConfig, list[QuantileRow]]]
        self._cache = {}
        if rollouts is not None:
            metrics.quantile_source = self.quantiles
        if leading is not None:
            metrics.leading_source = leading

    def quantiles(self) -> Iterator[tuple[str, list[QuantileRow]]]:
        """Every rollout's per-arm quantiles (:func:`arm_quantiles`) from its current totals."""
        if self._rollouts is None:
            return
        rollouts = self._rollouts()
        for gone in set(self._cache) - set(rollouts):
            del self._cache[gone]
        for name, ro in rollouts.items():
            cached = self._cache.get(name)
            if (
                cached is not None
                and cached[0] is ro.totals
                and cached[1] == ro.version
                and cached[2] is ro.config
            ):
                yield name, cached[3]
                continue
            try:
                rows = arm_quantiles(ro.config, ro.totals)
            except Exception:  # a bug here must not take the rest of /metrics down
                log.exception("rollout %s: per-arm quantiles failed", name)
                rows = []
            self._cache[name] = (ro.totals, ro.version, ro.config, rows)
            yield name, rows

    def state(self, config: RolloutConfig, state: RolloutState) -> None:
        name, m = config.name, self._metrics
        for phase in Phase:
            m.phase.labels(name, phase.value).set(1 if state.phase is phase else 0)
        m.step.labels(name).set(min(state.step, len(config.steps) - 1) + 1)

    def analysis(self, name: str, analysis: Analysis) -> None:
        for r in analysis.all_results():
            estimate, lower, upper, tolerance, verdict, n_prod, n_cand = self._result(name, r.name)
            estimate.set(r.estimate)
            lower.set(r.lower)
            upper.set(r.upper)
            tolerance.set(r.tolerance)
            verdict.set(_VERDICT_VALUE[r.verdict])
            n_prod.set(r.n_production)
            n_cand.set(r.n_candidate)

    def _result(self, name: str, result: str) -> tuple[Any, ...]:
        key = (name, result)
        gauges = self._results.get(key)
        if gauges is None:
            m = self._metrics
            gauges = self._results[key] = (
                m.metric_estimate.labels(name, result),
                m.metric_lower.labels(name, result),
                m.metric_upper.labels(name, result),
                m.metric_tolerance.labels(name, result),
                m.metric_verdict.labels(name, result),
                m.metric_samples.labels(name, result, "production"),
                m.metric_samples.labels(name, result, "candidate"),
            )
        return gauges


__all__ = [
    "QUANTILE_LEVELS",
    "Gauges",
    "arm_quantiles",
    "quantile_levels",
]
