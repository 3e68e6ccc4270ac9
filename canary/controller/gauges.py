"""The rollouts' Prometheus gauges: phase, step and every result of the latest analysis."""

from __future__ import annotations

from typing import Any

from canary.config import RolloutConfig
from canary.decision import (
    Analysis,
    Phase,
    RolloutState,
)
from canary.metrics import Metrics
from canary.stats import Verdict

_VERDICT_VALUE = {Verdict.OK: 1, Verdict.UNKNOWN: 0, Verdict.WORSE: -1}


class Gauges:
    """The rollouts' gauges; children looked up once (``labels()`` costs a lock and a lookup,
    and the label sets never change)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._results: dict[tuple[str, str], tuple[Any, ...]] = {}

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
    "Gauges",
]
