"""What the controller asks of an analyzer, and the one that runs the analysis in the event loop.

The controller hands each due analysis to an :class:`Analyzer` as an :class:`AnalysisJob` and
awaits the :class:`~canary.decision.Analysis`; where the statistics run (here, or in a worker
process: :class:`~canary.analyzer.pool.WorkerAnalyzer`) and what happens when that place
fails is the analyzer's business, not the controller's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from canary.config import RolloutConfig
from canary.decision import Analysis, analyze
from canary.observe import RolloutAccumulator
from canary.observe.inputs import InputHealth


@dataclass(frozen=True, slots=True)
class AnalysisJob:
    """One analysis of one rollout.

    ``totals`` is the controller's live accumulator, not a copy: an analyzer reads it
    synchronously when :meth:`Analyzer.analyze` is called (before its first ``await``), because
    flushes merge into it between turns of the event loop. ``failing_for`` and
    ``failing_requests`` are the hard-failure clock; ``input_health`` goes to
    :func:`~canary.decision.analyze` as it is (and to a worker process pickled, so it must
    pickle).
    """

    config: RolloutConfig
    totals: RolloutAccumulator
    failing_for: float = 0.0
    failing_requests: int = 0
    input_health: InputHealth | None = None


class Analyzer(Protocol):
    """Runs the analyses of a controller (started by its ``start``, closed by its ``stop``)."""

    def warm(self) -> None:
        """Get ready for the first analysis without waiting (called once the rollouts are
        loaded, before the proxy serves)."""

    async def start(self) -> None:
        """Begin serving analyses the fast way (the controller's loop starts)."""

    async def check(self) -> None:
        """Before each round of analyses: notice a failure since the last round, start a
        recovery that is due. Cheap when nothing is wrong."""

    async def analyze(self, job: AnalysisJob) -> Analysis:
        """The analysis of ``job``; never raises for a failure of where it runs (it falls back
        to running it here)."""
        ...

    async def close(self) -> None:
        """Release what :meth:`start` and recoveries acquired."""


def analyze_here(job: AnalysisJob) -> Analysis:
    """:func:`~canary.decision.analyze` of ``job`` in this thread (synchronous: no flush can
    change the totals meanwhile, so no copy is needed)."""
    return analyze(
        job.config,
        job.totals,
        failing_for=job.failing_for,
        failing_requests=job.failing_requests,
        input_health=job.input_health,
    )


class InlineAnalyzer:
    """Runs every analysis in the event loop: tests, simulations and ``run_controller=False``
    (a worker process costs more than the milliseconds of the statistics save there)."""

    def warm(self) -> None:
        """Nothing to get ready."""

    async def start(self) -> None:
        """Nothing to start."""

    async def check(self) -> None:
        """Nothing can fail apart from the analysis itself."""

    async def analyze(self, job: AnalysisJob) -> Analysis:
        return analyze_here(job)

    async def close(self) -> None:
        """Nothing to release."""


__all__ = ["AnalysisJob", "Analyzer", "InlineAnalyzer", "analyze_here"]
