"""Metric history: one compact point per rollout per analysis, and one at each decision, kept
in the state store (``Store.append_history``) for the dashboard and ``canary report``.

A point (JSON, short keys; numbers rounded to 6 significant digits, non-finite ones null)::

    {"t": 1765142400.25,          # Unix seconds (the controller's wall clock)
     "ph": "running",             # phase
     "st": 1,                     # step index, 0-based (as ``step_index`` in the API)
     "w": [95.0, 5.0],            # weights: production %, candidate %
     "sh": false,                 # the step mirrors to the candidate (shadow)
     "n": [1200, 61],             # samples per arm (production, candidate) of the rollout
     "sn": 40,                    # candidate samples in the current step
     "m": [{"k": "latency_p95",   # per metric (and ``net_value`` with a trade-off): name,
            "e": 1.031, "l": 0.982, "u": 1.094,   # estimate and interval,
            "tol": 1.1,           # the line the interval is judged against, same units,
            "v": "UNKNOWN",       # verdict (OK, WORSE, UNKNOWN),
            "n": [1200, 61]}],    # and its samples per arm
     "srm": "OK",                 # the sample-ratio guard's verdict
     "dr": ["text"],              # input fields drifting (only when some do)
     "a": "ADVANCE", "r": "..."}  # a decision point: the action and its reason

``m`` and ``srm`` are absent before the first analysis. Only the process that acts (alone, or
the leader) records, at most one analysis point per :data:`MIN_SPACING` seconds and none
without new samples or once the rollout finished; decision points always.

Writing is off the analysis path: :meth:`HistoryWriter.record` only queues the point, and the
controller's flush (every 250 ms) writes the queue (at most :data:`PER_FLUSH` points a
flush), each call bounded by the store timeout.
A failed write is logged (once until a write works again), counted in
``canary_store_errors_total{operation="history"}`` and retried at the next flush; the queue
keeps at most :data:`MAX_PENDING` points (the oldest analysis points go first), so a long
store outage loses history points, never holds a rollout. The history is not what decisions
depend on: its failures do not mark the store down. A write refused by the fence (another
process leads now) drops the queue: the new leader records from then on. A write that timed
out but landed after all is sent again: the point is then stored twice (same time, same
values; harmless for a chart).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from canary.config import RolloutConfig
from canary.decision import Analysis, Decision, RolloutState
from canary.errors import FencedError, StoreError
from canary.metrics import Metrics
from canary.stats import MetricResult
from canary.store import Store

log = logging.getLogger("canary.controller")

MIN_SPACING = 1.0  # seconds between two analysis points of a rollout (decisions: always)
MAX_PENDING = 1000  # points waiting for the store per rollout (about 17 minutes at 1 s)
PER_FLUSH = 100  # points written per flush at most (a backlog drains over several flushes)


def _num(x: float) -> float | None:
    return float(f"{x:.5g}") if math.isfinite(x) else None


def metric_point(r: MetricResult) -> dict[str, Any]:
    """One test's result in a history point (see the module docstring)."""
    return {
        "k": r.name,
        "e": _num(r.estimate),
        "l": _num(r.lower),
        "u": _num(r.upper),
        "tol": _num(r.tolerance),
        "v": r.verdict.value.upper(),
        "n": [r.n_production, r.n_candidate],
    }


def history_point(
    cfg: RolloutConfig,
    state: RolloutState,
    analysis: Analysis | None,
    now: float,
    samples: tuple[int, int],
    decision: Decision | None = None,
) -> dict[str, Any]:
    """The history point of a rollout in ``state`` after ``analysis`` (None: none yet) at
    ``now``, with ``samples`` per arm (production, candidate); ``decision``: a decision point."""
    candidate, shadow = state.weights(cfg)
    point: dict[str, Any] = {
        "t": round(now, 3),
        "ph": state.phase.value,
        "st": max(0, min(state.step, len(cfg.steps) - 1)),
        "w": [100.0 - candidate, candidate],
        "sh": shadow,
        "n": [samples[0], samples[1]],
        "sn": max(0, samples[1] - state.step_base),
    }
    if analysis is not None:
        results = list(analysis.metrics)
        if analysis.net is not None:
            results.append(analysis.net)
        point["m"] = [metric_point(r) for r in results]
        point["srm"] = analysis.srm.verdict.value.upper()
        drifted = analysis.drifted_inputs
        if drifted:
            point["dr"] = list(drifted)
    if decision is not None:
        point["a"] = decision.action.value
        point["r"] = decision.reason
    return point


def metric_info(cfg: RolloutConfig) -> list[dict[str, Any]]:
    """What each ``k`` of a point's ``m`` is: name, signal, stat and tolerance, as configured
    (``net_value`` with a trade-off)."""
    out: list[dict[str, Any]] = []
    for m in cfg.analysis.metrics:
        if m.max_increase is not None:
            margin, key = m.max_increase, "max_increase"
        else:
            assert m.max_decrease is not None  # config: exactly one of the two
            margin, key = m.max_decrease, "max_decrease"
        unit = "candidate/production ratio" if margin.relative else "candidate - production"
        out.append(
            {
                "name": m.name,
                "signal": m.signal,
                "stat": m.stat,
                "tolerance": f"{key}: {margin}",
                "scale": unit,
            }
        )
    if cfg.analysis.tradeoff:
        parts = ", ".join(f"{n}: {v}" for n, v in cfg.analysis.tradeoff.items())
        out.append(
            {
                "name": "net_value",
                "signal": None,
                "stat": "net value",
                "tolerance": f"net value >= 0 (trade-off {parts})",
                "scale": "trade-off units, positive = candidate better",
            }
        )
    return out


class HistoryWriter:
    """Queues history points and writes them to the store at each flush (module docstring)."""

    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        *,
        timeout: float,
        fence: Callable[[], int | None],
        max_points: int | None = None,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._timeout = timeout
        self._fence = fence
        self._max_points = max_points
        self._pending: dict[str, deque[tuple[dict[str, Any], bool]]] = {}
        self._last: dict[str, float] = {}  # time of the last analysis point recorded
        self._failing = False
        self._lock = asyncio.Lock()

    def record(self, rollout: str, point: dict[str, Any], *, keep: bool = False) -> bool:
        """Queue ``point`` (``keep``: a decision, never thinned or spaced out); False when it
        came within :data:`MIN_SPACING` of the last analysis point (not recorded)."""
        at = float(point["t"])
        if not keep:
            last = self._last.get(rollout)
            if last is not None and 0 <= at - last < MIN_SPACING:
                return False
            self._last[rollout] = at
        queue = self._pending.setdefault(rollout, deque())
        queue.append((point, keep))
        if len(queue) > MAX_PENDING:  # a long store outage: the oldest analysis point goes
            for i, (_, kept) in enumerate(queue):
                if not kept:
                    del queue[i]
                    break
            else:
                queue.popleft()
        return True

    def exclusive(self) -> asyncio.Lock:
        """Held, no history write runs: a caller that resets a rollout in the store holds it,
        so that no point of the old rollout lands after the reset."""
        return self._lock

    def forget(self, rollout: str) -> None:
        """Drop what is queued for ``rollout`` (it starts anew: the store's history is reset)."""
        self._pending.pop(rollout, None)
        self._last.pop(rollout, None)

    def pending(self, rollout: str) -> list[dict[str, Any]]:
        """The points of ``rollout`` not stored yet, oldest first."""
        return [p for p, _ in self._pending.get(rollout, ())]

    def retain(self, rollouts: Mapping[str, object]) -> None:
        """Forget the queues of rollouts no longer configured."""
        for name in list(self._pending):
            if name not in rollouts:
                del self._pending[name]

    async def flush(self) -> None:
        """Write the queued points (oldest first, at most :data:`PER_FLUSH`: a backlog after an
        outage never holds the loop, whose flushes also renew the lease); stop at the first
        failure (retried at the next flush)."""
        if not any(self._pending.values()):
            return
        budget = PER_FLUSH
        async with self._lock:
            for name, queue in list(self._pending.items()):
                while queue and budget > 0:
                    budget -= 1
                    point, keep = queue[0]
                    try:
                        await asyncio.wait_for(self._write(name, point, keep), self._timeout)
                    except FencedError:  # another process leads: it records from now on
                        self._pending.clear()
                        return
                    except (StoreError, TimeoutError) as exc:
                        self._metrics.store_errors.labels("history").inc()
                        if not self._failing:
                            log.warning(
                                "rollout %s: cannot write its metric history (%s); "
                                "retrying at the next flush",
                                name,
                                exc or "timed out",
                            )
                        self._failing = True
                        return
                    if self._pending.get(name) is queue and queue and queue[0][0] is point:
                        queue.popleft()
        if self._failing:
            log.info("metric history is written again")
        self._failing = False

    async def _write(self, rollout: str, point: dict[str, Any], keep: bool) -> None:
        extra = {} if self._max_points is None else {"max_points": self._max_points}
        await self._store.append_history(
            rollout, point, at=point["t"], keep=keep, fence=self._fence(), **extra
        )


__all__ = [
    "MAX_PENDING",
    "MIN_SPACING",
    "PER_FLUSH",
    "HistoryWriter",
    "history_point",
    "metric_info",
    "metric_point",
]
